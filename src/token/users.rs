//! Password users from an htpasswd file (bcrypt entries only: the other htpasswd formats are
//! too weak to accept).

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct HtpasswdError {
    pub path: String,
    pub line: usize,
    pub reason: String,
}

pub struct Htpasswd {
    users: HashMap<String, String>,
}

/// Verified against when the user is unknown, so both answers take a bcrypt's time.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| bcrypt::hash("not a password", bcrypt::DEFAULT_COST).unwrap_or_default())
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
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
        Ok(Htpasswd { users })
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Checks a password; slow on purpose (bcrypt), so call it off the async threads.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, dummy_hash());
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
        std::fs::write(&p, format!("alice:{hash}\nbob:{{SHA}}abc\n")).unwrap();
        let e = Htpasswd::load(&p).err().unwrap().to_string();
        assert!(
            e.ends_with(":2: only bcrypt entries are accepted (htpasswd -B)"),
            "{e}"
        );
    }
}
