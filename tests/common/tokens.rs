//! A test PKI and JWT minting for client-auth tests: a CA (the root bundle), a leaf signed by
//! it, a stranger nobody trusts, and a JWKS key.

use std::path::PathBuf;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://auth.test";
pub const SERVICE: &str = "ocigate.test";
pub const JWKS_KID: &str = "jwks-key-1";

pub struct Signer {
    pub key: rcgen::KeyPair,
    pub cert_der: Vec<u8>,
}

impl Signer {
    pub fn encoding(&self) -> EncodingKey {
        EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap()
    }

    pub fn x5c(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.cert_der)
    }

    /// The DER SubjectPublicKeyInfo, for kid computations.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }
}

pub struct Pki {
    pub ca: Signer,
    pub leaf: Signer,
    pub stranger: Signer,
    pub jwks_key: rcgen::KeyPair,
    pub bundle: PathBuf,
    pub jwks: PathBuf,
    _dir: tempfile::TempDir,
}

fn self_signed(name: &str, ca: bool) -> (Signer, rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(&key).unwrap();
    (
        Signer {
            cert_der: cert.der().to_vec(),
            key,
        },
        params,
    )
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_params) = self_signed("test token CA", true);
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca.key);
        let leaf_cert = rcgen::CertificateParams::new(vec!["token signer".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let leaf = Signer {
            cert_der: leaf_cert.der().to_vec(),
            key: leaf_key,
        };
        let (stranger, _) = self_signed("stranger", false);
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, pem("CERTIFICATE", &ca.cert_der)).unwrap();
        let jwks_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            json!({ "keys": [jwk_of(&jwks_key, Some(JWKS_KID))] }).to_string(),
        )
        .unwrap();
        Pki {
            ca,
            leaf,
            stranger,
            jwks_key,
            bundle,
            jwks,
            _dir: dir,
        }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// The public JWK of a P-256 key.
pub fn jwk_of(key: &rcgen::KeyPair, kid: Option<&str>) -> Value {
    let der = rcgen::PublicKeyData::subject_public_key_info(key);
    // The uncompressed point ends the SPKI: 0x04 || x || y.
    let point = &der[der.len() - 65..];
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let mut jwk =
        json!({ "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]) });
    if let Some(kid) = kid {
        jwk["kid"] = json!(kid);
    }
    jwk
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Good claims granting `actions` on `repository:name`.
pub fn claims(name: &str, actions: &[&str]) -> Value {
    let now = now();
    json!({
        "iss": ISSUER, "sub": "tester", "aud": SERVICE,
        "exp": now + 300, "nbf": now - 5, "iat": now, "jti": format!("{now}-{name}"),
        "access": [{ "type": "repository", "name": name, "actions": actions }],
    })
}

pub fn header_x5c(chain: &[&Signer]) -> Header {
    let mut h = Header::new(Algorithm::ES256);
    h.x5c = Some(chain.iter().map(|s| s.x5c()).collect());
    h
}

pub fn header_kid(kid: &str) -> Header {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.to_string());
    h
}

pub fn mint(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

/// A token built by hand: any header JSON, claims and signature bytes.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// What the built-in token server needs on disk: an ES256 signing key, its self-signed
/// certificate (`token.key`, `token.crt`) and an htpasswd file of `users`.
pub struct TokenServerFiles {
    dir: tempfile::TempDir,
}

impl TokenServerFiles {
    pub fn new(users: &[(&str, &str)]) -> TokenServerFiles {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ocigate token signer".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("token.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("token.crt"), cert.pem()).unwrap();
        let htpasswd: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
            .collect();
        std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        TokenServerFiles { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}
