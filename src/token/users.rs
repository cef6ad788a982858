//! Password users from an htpasswd file (bcrypt entries only: the other htpasswd formats are
//! too weak to accept).

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct HtpasswdError {
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) reason: String,
}

pub(crate) struct Htpasswd {
    users: HashMap<String, String>,
    /// Verified against when the user is unknown, at the highest cost of the file's own
    /// entries: an unknown name then takes as long as a known one, and names cannot be told
    /// apart by timing.
    dummy: String,
}

/// The cost of a bcrypt hash (`$2y$05$…` → 5).
fn cost_of(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

impl Htpasswd {
    pub(crate) fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let err = |line, reason: &str| HtpasswdError {
            path: path.display().to_string(),
            line,
            reason: reason.to_string(),
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(0, &e.to_string()))?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err(i + 1, "expected user:hash"))?;
            if !(hash.starts_with("$2y$") || hash.starts_with("$2a$") || hash.starts_with("$2b$")) {
                return Err(err(i + 1, "only bcrypt entries are accepted (htpasswd -B)"));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        let cost = users.values().filter_map(|h| cost_of(h)).max();
        let cost = cost.unwrap_or(bcrypt::DEFAULT_COST).clamp(4, 31);
        let dummy = bcrypt::hash("not a password", cost).map_err(|e| err(0, &e.to_string()))?;
        Ok(Htpasswd { users, dummy })
    }

    /// A fingerprint of `user`'s entry (a hash of its bcrypt hash, salt included): it
    /// changes whenever the password is set again.
    pub(crate) fn fingerprint(&self, user: &str) -> Option<String> {
        use sha2::Digest as _;
        let hash = self.users.get(user)?;
        Some(hex::encode(&sha2::Sha256::digest(hash.as_bytes())[..16]))
    }

    /// Checks a password; slow on purpose (bcrypt), so call it off the async threads.
    pub(crate) fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, &self.dummy);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_only_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&p, format!("# users\nalice:{hash}\n")).unwrap();
        let h = Htpasswd::load(&p).unwrap();
        assert!(h.verify("alice", "pw"));
        assert!(!h.verify("alice", "nope"));
        assert!(!h.verify("bob", "pw"));
        assert_eq!(
            cost_of(&h.dummy),
            Some(4),
            "unknown names cost what known ones do"
        );
        let before = h.fingerprint("alice").unwrap();
        assert!(h.fingerprint("bob").is_none());
        std::fs::write(&p, format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap())).unwrap();
        let again = Htpasswd::load(&p).unwrap();
        assert_ne!(
            again.fingerprint("alice").unwrap(),
            before,
            "same password, new salt"
        );
        std::fs::write(&p, format!("alice:{hash}\nbob:{{SHA}}abc\n")).unwrap();
        let e = Htpasswd::load(&p).err().unwrap().to_string();
        assert!(
            e.ends_with(":2: only bcrypt entries are accepted (htpasswd -B)"),
            "{e}"
        );
    }
}
