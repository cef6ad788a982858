//! Guards in front of the password check: bcrypt runs in a bounded queue (one check per
//! core, a few waiting; beyond that `429`), and failed logins are limited per peer and per
//! username, so neither a flood of logins nor password guessing can starve real logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Failed logins are counted over this window, then forgotten.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Failed logins from one address within the window before it is refused.
pub(crate) const MAX_FAILURES_PER_PEER: u32 = 20;
/// Failed logins for one username within the window before it is refused.
pub(crate) const MAX_FAILURES_PER_USER: u32 = 10;
/// Password checks waiting for a core, per core.
const WAITING_PER_SLOT: usize = 8;
/// Entries kept at most; beyond it expired ones are dropped, then the oldest.
const MAX_TRACKED: usize = 65_536;

/// Why a login was not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many failures lately, from this peer or for this username.
    Throttled { retry_after: Duration },
    /// The password-check queue is full.
    Busy,
}

pub(crate) struct LoginGuard {
    slots: tokio::sync::Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    failures: Mutex<HashMap<Key, Failures>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Peer(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

impl LoginGuard {
    pub(crate) fn new(cores: usize) -> LoginGuard {
        LoginGuard {
            slots: tokio::sync::Semaphore::new(cores),
            waiting: AtomicUsize::new(0),
            max_waiting: cores * WAITING_PER_SLOT,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Runs a password check (`check` returns whether it passed) unless the peer or the
    /// username failed too often lately or the queue is full. Failures are counted.
    pub(crate) async fn check(
        &self,
        peer: IpAddr,
        user: &str,
        check: impl FnOnce() -> bool + Send + 'static,
    ) -> Result<bool, Refusal> {
        let keys = [Key::Peer(peer), Key::User(user.to_string())];
        if let Some(retry_after) = self.throttled(&keys, Instant::now()) {
            return Err(Refusal::Throttled { retry_after });
        }
        let ok = self.queued(check).await?;
        if !ok {
            self.record_failure(&keys, Instant::now());
        }
        Ok(ok)
    }

    async fn queued(&self, check: impl FnOnce() -> bool + Send + 'static) -> Result<bool, Refusal> {
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(Refusal::Busy);
                }
                let slot = self.slots.acquire().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                slot.map_err(|_| Refusal::Busy)?
            }
        };
        Ok(tokio::task::spawn_blocking(check).await.unwrap_or(false))
    }

    fn throttled(&self, keys: &[Key], now: Instant) -> Option<Duration> {
        let failures = self.failures.lock();
        keys.iter()
            .filter_map(|k| {
                let f = failures.get(k)?;
                let left = FAILURE_WINDOW.checked_sub(now.duration_since(f.since))?;
                (f.count >= limit(k) && !left.is_zero()).then_some(left)
            })
            .max()
    }

    fn record_failure(&self, keys: &[Key], now: Instant) {
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, f| now.duration_since(f.since) < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(k, _)| k.clone())
            {
                failures.remove(&oldest);
            }
        }
        for key in keys {
            let f = failures.entry(key.clone()).or_insert(Failures {
                count: 0,
                since: now,
            });
            if now.duration_since(f.since) >= FAILURE_WINDOW {
                *f = Failures {
                    count: 0,
                    since: now,
                };
            }
            f.count += 1;
        }
    }
}

fn limit(key: &Key) -> u32 {
    match key {
        Key::Peer(_) => MAX_FAILURES_PER_PEER,
        Key::User(_) => MAX_FAILURES_PER_USER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[tokio::test]
    async fn failures_are_limited_per_user_and_per_peer() {
        let guard = LoginGuard::new(1);
        for _ in 0..MAX_FAILURES_PER_USER {
            assert_eq!(guard.check(peer(1), "alice", || false).await, Ok(false));
        }
        // alice's name is refused from anywhere, even with the right password…
        assert!(matches!(
            guard.check(peer(2), "alice", || true).await,
            Err(Refusal::Throttled { .. })
        ));
        // …while another user logs in from the same address.
        assert_eq!(guard.check(peer(1), "bob", || true).await, Ok(true));
        for n in 0..MAX_FAILURES_PER_PEER - MAX_FAILURES_PER_USER {
            let user = format!("user{n}");
            assert_eq!(guard.check(peer(1), &user, || false).await, Ok(false));
        }
        let Err(Refusal::Throttled { retry_after }) = guard.check(peer(1), "carol", || true).await
        else {
            panic!("the address failed too often");
        };
        assert!(retry_after <= FAILURE_WINDOW && retry_after > Duration::ZERO);
        assert_eq!(guard.check(peer(3), "carol", || true).await, Ok(true));
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let guard = LoginGuard::new(1);
        let keys = [Key::User("alice".into())];
        let start = Instant::now();
        for _ in 0..MAX_FAILURES_PER_USER {
            guard.record_failure(&keys, start);
        }
        assert!(guard.throttled(&keys, start).is_some());
        assert!(guard.throttled(&keys, start + FAILURE_WINDOW).is_none());
        guard.record_failure(&keys, start + FAILURE_WINDOW);
        assert!(
            guard.throttled(&keys, start + FAILURE_WINDOW).is_none(),
            "a new window"
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded() {
        let guard = std::sync::Arc::new(LoginGuard::new(1));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Arc::new(Mutex::new(gate));
        let mut running = Vec::new();
        for _ in 0..=WAITING_PER_SLOT {
            let (guard, gate) = (guard.clone(), gate.clone());
            running.push(tokio::spawn(async move {
                guard
                    .check(peer(1), "alice", move || gate.lock().recv().is_ok())
                    .await
            }));
        }
        // One check holds the core and WAITING_PER_SLOT wait: the next is turned away.
        while guard.waiting.load(Ordering::Acquire) < WAITING_PER_SLOT {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            guard.check(peer(1), "bob", || true).await,
            Err(Refusal::Busy)
        );
        for _ in 0..=WAITING_PER_SLOT {
            release.send(()).unwrap();
        }
        for r in running {
            assert_eq!(r.await.unwrap(), Ok(true));
        }
    }
}
