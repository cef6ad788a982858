//! Trusted token-signing keys, as distribution trusts them: the public keys of the
//! certificates in `rootcertbundle` and the keys of a JWKS, found by `kid` (the libtrust
//! fingerprint of distribution 2.x and the RFC 7638 thumbprint of 3.x), by a `jwk` header that
//! matches one of them, or by an `x5c` chain that verifies to the bundle.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sha2::{Digest, Sha256};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("unsupported key: {0}")]
    Unsupported(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("x5c chain does not verify to the root bundle: {0}")]
    Chain(String),
}

/// The key types a JWT algorithm may be bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyFamily {
    /// Whether `alg` is allowed with this key type (never HMAC, never a mismatched curve).
    pub(crate) fn allows(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (
                KeyFamily::Rsa,
                RS256 | RS384 | RS512 | PS256 | PS384 | PS512
            ) | (KeyFamily::EcP256, ES256)
                | (KeyFamily::EcP384, ES384)
                | (KeyFamily::Ed25519, EdDSA)
        )
    }
}

pub(crate) struct TrustedKey {
    pub(crate) family: KeyFamily,
    pub(crate) decoding: DecodingKey,
    /// RFC 7638 SHA-256 thumbprint, base64url.
    pub(crate) thumbprint: String,
}

impl TrustedKey {
    /// From a DER SubjectPublicKeyInfo (a certificate's key).
    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<TrustedKey, KeyError> {
        let raw = &spki.subject_public_key.data;
        let oid = &spki.algorithm.algorithm;
        let (family, decoding) = if *oid == OID_PKCS1_RSAENCRYPTION {
            (KeyFamily::Rsa, DecodingKey::from_rsa_der(raw))
        } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| KeyError::Unsupported("EC key without a named curve".into()))?;
            let family = if curve == OID_EC_P256 {
                KeyFamily::EcP256
            } else if curve == OID_NIST_EC_P384 {
                KeyFamily::EcP384
            } else {
                return Err(KeyError::Unsupported(format!("EC curve {curve}")));
            };
            (family, DecodingKey::from_ec_der(raw))
        } else if *oid == OID_SIG_ED25519 {
            (KeyFamily::Ed25519, DecodingKey::from_ed_der(raw))
        } else {
            return Err(KeyError::Unsupported(format!("key algorithm {oid}")));
        };
        let thumbprint = Jwk::from_decoding_key(&decoding, None)
            .and_then(|j| j.thumbprint(ThumbprintHash::SHA256))
            .map_err(|e| KeyError::Unsupported(e.to_string()))?;
        Ok(TrustedKey {
            family,
            decoding,
            thumbprint,
        })
    }

    pub(crate) fn from_jwk(jwk: &Jwk) -> Result<TrustedKey, KeyError> {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => KeyFamily::EcP256,
                EllipticCurve::P384 => KeyFamily::EcP384,
                ref other => return Err(KeyError::Unsupported(format!("curve {other:?}"))),
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyFamily::Ed25519
            }
            _ => return Err(KeyError::Unsupported("symmetric or unknown JWK".into())),
        };
        let decoding =
            DecodingKey::from_jwk(jwk).map_err(|e| KeyError::Unsupported(e.to_string()))?;
        let thumbprint = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| KeyError::Unsupported(e.to_string()))?;
        Ok(TrustedKey {
            family,
            decoding,
            thumbprint,
        })
    }
}

/// distribution 2.x's key id: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits,
/// base32, in 12 groups of 4 joined by `:`.
pub fn libtrust_fingerprint(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let encoded = data_encoding::BASE32_NOPAD.encode(&digest[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts any extended key usage, as distribution does (`x509.ExtKeyUsageAny`).
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, _: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

/// Every key a token may be signed with, and the roots `x5c` chains must reach.
#[derive(Default)]
pub(crate) struct KeyStore {
    anchors: Vec<TrustAnchor<'static>>,
    /// The bundle's certificates themselves: an `x5c` leaf equal to one is trusted as is.
    bundle: Vec<CertificateDer<'static>>,
    by_kid: HashMap<String, Arc<TrustedKey>>,
    by_thumbprint: HashMap<String, Arc<TrustedKey>>,
}

impl KeyStore {
    pub(crate) fn has_roots(&self) -> bool {
        !self.anchors.is_empty()
    }

    fn insert(&mut self, kids: &[String], key: TrustedKey) {
        let key = Arc::new(key);
        self.by_thumbprint
            .insert(key.thumbprint.clone(), key.clone());
        self.by_kid.insert(key.thumbprint.clone(), key.clone());
        for kid in kids {
            self.by_kid.insert(kid.clone(), key.clone());
        }
    }

    /// Adds the certificates of a PEM bundle as trust anchors and their keys as trusted keys.
    pub(crate) fn add_bundle(&mut self, path: &Path) -> Result<(), KeyError> {
        let err = |reason: String| KeyError::File {
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect())
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in the bundle".into()));
        }
        for der in certs {
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| err(format!("not a usable root: {e:?}")))?
                .to_owned();
            self.anchors.push(anchor);
            let (_, cert) = X509Certificate::from_der(&der).map_err(|e| err(e.to_string()))?;
            let spki = cert.public_key();
            let key = TrustedKey::from_spki(spki).map_err(|e| err(e.to_string()))?;
            self.insert(&[libtrust_fingerprint(spki.raw)], key);
            self.bundle.push(der);
        }
        Ok(())
    }

    /// Adds the keys of a JWKS document, by their `kid` and thumbprint.
    pub(crate) fn add_jwks(&mut self, json: &[u8], source: &str) -> Result<usize, KeyError> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| KeyError::File {
            path: source.to_string(),
            reason: format!("not a JWKS: {e}"),
        })?;
        let mut added = 0;
        for jwk in &set.keys {
            // Skip keys we cannot use (symmetric, other curves) rather than refuse the set.
            if let Ok(key) = TrustedKey::from_jwk(jwk) {
                let kids: Vec<String> = jwk.common.key_id.iter().cloned().collect();
                self.insert(&kids, key);
                added += 1;
            }
        }
        Ok(added)
    }

    pub(crate) fn by_kid(&self, kid: &str) -> Option<Arc<TrustedKey>> {
        self.by_kid.get(kid).cloned()
    }

    /// A `jwk` header counts only as a reference to a key we already trust.
    pub(crate) fn matching_jwk(&self, jwk: &Jwk) -> Option<Arc<TrustedKey>> {
        let thumbprint = jwk.thumbprint(ThumbprintHash::SHA256).ok()?;
        self.by_thumbprint.get(&thumbprint).cloned()
    }

    /// Verifies an `x5c` chain (base64 DER, leaf first) to the root bundle; the leaf's key.
    pub(crate) fn verify_chain(&self, x5c: &[String]) -> Result<TrustedKey, KeyError> {
        let ders: Vec<CertificateDer<'static>> = x5c
            .iter()
            .map(|c| {
                base64::engine::general_purpose::STANDARD
                    .decode(c)
                    .map(CertificateDer::from)
                    .map_err(|_| KeyError::Certificate("x5c entry is not base64 DER".into()))
            })
            .collect::<Result<_, _>>()?;
        let (leaf_der, intermediates) = ders
            .split_first()
            .ok_or_else(|| KeyError::Certificate("empty x5c".into()))?;
        let (_, cert) = X509Certificate::from_der(leaf_der)
            .map_err(|e| KeyError::Certificate(e.to_string()))?;
        if self.bundle.iter().any(|b| b.as_ref() == leaf_der.as_ref()) {
            // The bundle names this very certificate (often a self-signed `CA:TRUE` one from
            // `openssl req -x509`, which path building refuses as an end entity). Go's
            // verifier, and so distribution, trusts it as is, within its validity period.
            if !cert.validity().is_valid() {
                return Err(KeyError::Chain(
                    "certificate expired or not yet valid".into(),
                ));
            }
            return TrustedKey::from_spki(cert.public_key());
        }
        let leaf = webpki::EndEntityCert::try_from(leaf_der)
            .map_err(|e| KeyError::Certificate(format!("{e:?}")))?;
        let algorithms = rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        leaf.verify_for_usage(
            algorithms,
            &self.anchors,
            intermediates,
            UnixTime::now(),
            AnyUsage,
            None,
            None,
        )
        .map_err(|e| KeyError::Chain(format!("{e:?}")))?;
        TrustedKey::from_spki(cert.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtrust_fingerprints_have_twelve_groups() {
        let f = libtrust_fingerprint(b"any spki bytes");
        let groups: Vec<&str> = f.split(':').collect();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| g.len() == 4));
        assert!(
            f.bytes()
                .all(|b| b == b':' || b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
    }

    #[test]
    fn algorithms_are_bound_to_key_types() {
        assert!(KeyFamily::Rsa.allows(Algorithm::RS256));
        assert!(KeyFamily::Rsa.allows(Algorithm::PS512));
        assert!(!KeyFamily::Rsa.allows(Algorithm::HS256));
        assert!(!KeyFamily::Rsa.allows(Algorithm::ES256));
        assert!(KeyFamily::EcP256.allows(Algorithm::ES256));
        assert!(!KeyFamily::EcP256.allows(Algorithm::ES384));
        assert!(KeyFamily::Ed25519.allows(Algorithm::EdDSA));
        assert!(!KeyFamily::Ed25519.allows(Algorithm::HS512));
    }
}
