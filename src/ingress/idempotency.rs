//! `Idempotency-Key`s seen recently, with a digest of the body each came with: a key sent
//! again with the same body is the same message (the bus stores it once), with another body a
//! conflict (409) rather than a message silently dropped as a duplicate. Bounded: the oldest
//! keys are forgotten first, and none is kept past the window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Keys remembered at most (about 100 bytes each).
pub const CAPACITY: usize = 100_000;

/// How long a key is remembered: longer than any bus duplicate window it could matter for.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Default)]
pub struct IdempotencyKeys {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    digests: HashMap<String, [u8; 32]>,
    order: VecDeque<(Instant, String)>,
}

impl IdempotencyKeys {
    /// Records `key` (already scoped to its target) with `body`; `false` when the key was
    /// seen with another body.
    pub fn check(&self, key: &str, body: &[u8], now: Instant) -> bool {
        let digest: [u8; 32] = Sha256::digest(body).into();
        let mut inner = self.lock();
        inner.forget_old(now);
        if let Some(seen) = inner.digests.get(key) {
            return *seen == digest;
        }
        if inner.order.len() >= CAPACITY {
            if let Some((_, oldest)) = inner.order.pop_front() {
                inner.digests.remove(&oldest);
            }
        }
        inner.digests.insert(key.to_owned(), digest);
        inner.order.push_back((now, key.to_owned()));
        true
    }

    /// A panic elsewhere leaves the map as consistent as before it.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < WINDOW {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.digests.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_body_passes_another_body_conflicts() {
        let keys = IdempotencyKeys::default();
        let now = Instant::now();
        assert!(keys.check("t\nk1", b"a", now));
        assert!(keys.check("t\nk1", b"a", now));
        assert!(!keys.check("t\nk1", b"b", now));
        assert!(keys.check("u\nk1", b"b", now), "keys are per target");
        assert!(
            keys.check("t\nk1", b"b", now + WINDOW),
            "forgotten after the window"
        );
    }

    #[test]
    fn bounded() {
        let keys = IdempotencyKeys::default();
        let now = Instant::now();
        for i in 0..CAPACITY + 10 {
            keys.check(&i.to_string(), b"x", now);
        }
        let inner = keys.lock();
        assert_eq!(inner.digests.len(), CAPACITY);
        assert_eq!(inner.order.len(), CAPACITY);
    }
}
