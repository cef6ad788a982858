//! The interception CA: loaded from the operator's files or generated once into a directory
//! (`ca.crt`, `ca.key` mode 0600) and kept there, and the leaf certificates it signs for the
//! hosts clients CONNECT to, minted on first use and kept in a bounded map.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::CaSource;

/// Leaves kept at most (one per host name clients CONNECT to).
const LEAVES: usize = 1024;
/// How long a minted leaf is valid, and how long before its end it is minted again.
const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// A generated CA's lifetime: it is installed on every node, so it should last.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("forward_proxy.ca: {path}: {reason}")]
    File { path: String, reason: String },
    #[error("forward_proxy.ca: {0}")]
    Crypto(String),
}

fn file_error(path: &Path, reason: impl ToString) -> CaError {
    CaError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The CA and the leaves it signed.
pub(crate) struct Authority {
    /// PEM, served at `/ca.crt`.
    cert_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: minting is a signature, not a key generation.
    leaf_key: KeyPair,
    leaves: Mutex<lru::LruCache<String, Leaf>>,
}

#[derive(Clone)]
struct Leaf {
    config: Arc<rustls::ServerConfig>,
    renew_at: time::OffsetDateTime,
}

impl Authority {
    /// Loads the CA, generating it in its directory first when `create` allows and it is
    /// not there yet. `None`: a directory without a CA that may not be created (check-config).
    pub(crate) fn open(source: &CaSource, create: bool) -> Result<Option<Authority>, CaError> {
        let (cert, key) = match source {
            CaSource::Files { cert, key } => (cert.clone(), key.clone()),
            CaSource::Dir(dir) => {
                let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
                if !cert.exists() && !key.exists() {
                    if !create {
                        return Ok(None);
                    }
                    generate(dir, &cert, &key)?;
                }
                (cert, key)
            }
        };
        check_private(&key)?;
        let cert_pem = std::fs::read_to_string(&cert).map_err(|e| file_error(&cert, e))?;
        let key_pem = std::fs::read_to_string(&key).map_err(|e| file_error(&key, e))?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|e| {
            file_error(
                &key,
                format!("not a private key in PEM (PKCS#8, SEC1 or PKCS#1): {e}"),
            )
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, ca_key)
            .map_err(|e| file_error(&cert, format!("not a CA certificate in PEM: {e}")))?;
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| file_error(&cert, e))?;
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Crypto(e.to_string()))?;
        let leaves = lru::LruCache::new(std::num::NonZeroUsize::MIN.saturating_add(LEAVES - 1));
        Ok(Some(Authority {
            cert_pem,
            ca_der,
            issuer,
            leaf_key,
            leaves: Mutex::new(leaves),
        }))
    }

    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate's SHA-256 fingerprint (`AB:CD:…`, as `openssl x509 -fingerprint
    /// -sha256` prints it), for nodes to check the `/ca.crt` they fetched.
    pub(crate) fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.ca_der.as_ref());
        let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
        hex.join(":")
    }

    /// The TLS config that presents a leaf for `name` (a DNS name), minted now if there is
    /// none yet or it is near its end.
    pub(crate) fn server_config(&self, name: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let now = time::OffsetDateTime::now_utc();
        let mut leaves = self.leaves.lock();
        if let Some(leaf) = leaves.get(name).filter(|l| l.renew_at > now) {
            return Ok(leaf.config.clone());
        }
        let leaf = self.mint(name, now)?;
        leaves.put(name.to_string(), leaf.clone());
        Ok(leaf.config)
    }

    fn mint(&self, name: &str, now: time::OffsetDateTime) -> Result<Leaf, CaError> {
        let crypto = |e: rcgen::Error| CaError::Crypto(format!("minting a leaf for {name}: {e}"));
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(crypto)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_LIFETIME;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(crypto)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone(), self.ca_der.clone()], key)
            })
            .map_err(|e| CaError::Crypto(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Leaf {
            config: Arc::new(config),
            renew_at: now + (LEAF_LIFETIME - LEAF_RENEW_BEFORE),
        })
    }
}

/// A key readable by anyone else is no secret: refused, with the fix.
fn check_private(key: &Path) -> Result<(), CaError> {
    let meta = std::fs::metadata(key).map_err(|e| file_error(key, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_error(
            key,
            format!("the CA key is accessible to other users (mode {mode:04o}): chmod 600 it"),
        ));
    }
    Ok(())
}

/// A new P-256 CA in `dir` (created 0700): the key is written 0600 before any byte of it.
fn generate(dir: &PathBuf, cert: &Path, key: &Path) -> Result<(), CaError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_error(dir, e))?;
    let dir_mode = std::fs::metadata(dir)
        .map_err(|e| file_error(dir, e))?
        .permissions()
        .mode();
    if dir_mode & 0o022 != 0 {
        return Err(file_error(
            dir,
            format!(
                "the CA directory is writable by other users (mode {:04o}): chmod 700 it",
                dir_mode & 0o777
            ),
        ));
    }
    let crypto = |e: rcgen::Error| CaError::Crypto(format!("generating the CA: {e}"));
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "ocigate interception CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "ocigate");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + CA_LIFETIME;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = params.self_signed(&ca_key).map_err(crypto)?;
    let write = |path: &Path, mode: u32, text: &str| -> Result<(), CaError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| file_error(path, e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| file_error(path, e))
    };
    write(key, 0o600, &ca_key.serialize_pem())?;
    write(cert, 0o644, &ca.pem())?;
    tracing::info!(cert = %cert.display(), "generated the interception CA; clients must trust it");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_ca_is_kept_and_signs_leaves_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let source = CaSource::Dir(ca_dir.clone());
        assert!(Authority::open(&source, false).unwrap().is_none());
        let first = Authority::open(&source, true).unwrap().unwrap();
        let mode = |p: &str| {
            std::fs::metadata(ca_dir.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        let again = Authority::open(&source, true).unwrap().unwrap();
        assert_eq!(
            first.cert_pem(),
            again.cert_pem(),
            "reused, not regenerated"
        );

        let a = first.server_config("quay.test").unwrap();
        assert!(Arc::ptr_eq(&a, &first.server_config("quay.test").unwrap()));
        assert!(!Arc::ptr_eq(
            &a,
            &first.server_config("registry.test").unwrap()
        ));
        assert_eq!(a.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);

        std::fs::set_permissions(
            ca_dir.join("ca.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Authority::open(&source, true).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn an_operators_ca_must_be_a_ca_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, "not a key").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        let source = CaSource::Files {
            cert: c.clone(),
            key: k.clone(),
        };
        let e = Authority::open(&source, true).err().unwrap().to_string();
        assert!(e.contains("PKCS#8, SEC1 or PKCS#1"), "{e}");
        std::fs::write(&k, key.serialize_pem()).unwrap();
        assert!(Authority::open(&source, true).unwrap().is_some());
    }
}
