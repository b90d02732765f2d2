//! The callbacks already published, so that an exact repeat of one (a captured request sent
//! again while its timestamp is still inside the replay window) is answered as the platform
//! expects for a success and not published a second time.
//!
//! A request is remembered by what authenticates it: platform, app and signature. The
//! signature covers the timestamp, the nonce and the ciphertext (DingTalk, WeCom) or the whole
//! body (Lark), so a repeat cannot vary any of them without failing verification; and as every
//! platform compares its hex signature case-insensitively, the key uses it lowercased, or an
//! upper-cased copy would pass as new. Only requests that passed verification get here, so only
//! whoever holds a platform's request can add an entry.
//!
//! A request is remembered only once the bus has stored its event: a request refused with 503
//! is forgotten, and the platform's retry of it is processed normally. While it is being
//! published it is marked in flight, so an identical request arriving meanwhile is answered
//! 409 (retry later) instead of being published beside it.
//!
//! Bounded: an entry lives until its signed timestamp leaves the window (after that the
//! timestamp check refuses the request anyway), and when the set is full the entry closest to
//! expiry is evicted and counted in `imbridge_replay_evictions_total`. The capacity is
//! `server.max_callback_rate` × `server.replay_window`, under [`MAX_ENTRIES`]. This set is per
//! replica and shared by nothing else; a replay reaching another replica (or this one after a
//! restart or an eviction) is caught only by the bus's duplicate window.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use warp::http::StatusCode;

use super::reply::ApiError;
use super::{Event, Outcome, State};
use crate::metrics::Metrics;
use crate::platform::now_ms;

/// The most requests remembered whatever the configuration: about 250 bytes each (measured
/// with a million entries, the maps' spare room included), so about 125 MB at the ceiling.
pub const MAX_ENTRIES: u64 = 500_000;

/// Kept past the moment the timestamp check starts refusing a request, so that a repeat at
/// that very moment, with clocks a little apart, still finds it.
const MARGIN: Duration = Duration::from_secs(1);

/// Entries needed to remember `rate` callbacks a second for `window` (whole seconds, rounded
/// up). Not capped: validation refuses a product above [`MAX_ENTRIES`].
pub fn capacity(rate: u32, window: Duration) -> u64 {
    let secs = window
        .as_secs()
        .saturating_add(u64::from(window.subsec_nanos() > 0));
    u64::from(rate).saturating_mul(secs)
}

/// What identifies one authenticated request.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub platform: &'static str,
    pub app: &'a str,
    /// The request's signature as sent; for a request without one (a Lark app without an
    /// encrypt key), a digest of its body ([`body_digest`]).
    pub signature: &'a str,
    /// When the request says it was signed, in milliseconds since the epoch; `None` when it
    /// carries no signed timestamp.
    pub signed_at_ms: Option<u64>,
}

impl Signed<'_> {
    /// A fixed-size digest, so that an entry's size does not depend on the input. Each field
    /// is length-prefixed, so no two different triples share a digest input.
    pub fn key(&self) -> Key {
        let mut h = Sha256::new();
        for field in [
            self.platform.as_bytes(),
            self.app.as_bytes(),
            self.signature.to_ascii_lowercase().as_bytes(),
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        h.finalize().into()
    }
}

/// What stands in for the signature of an unsigned request: an exact repeat of its bytes is
/// still recognised.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The digest of a [`Signed`] request.
pub type Key = [u8; 32];

/// What [`Seen::check`] found.
#[must_use]
pub enum Check {
    /// Never seen (or forgotten): publish it, then call [`Claim::published`].
    Fresh(Claim),
    /// Already published within the window.
    Replay,
    /// The same request is being published right now.
    InFlight,
}

/// The requests published within the replay window: one per daemon, owned by the ingress
/// state.
pub struct Seen {
    window: Duration,
    capacity: usize,
    inner: Arc<Mutex<Inner>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// The same entries by expiry: the first one is the next to go, and the one evicted first.
    by_expiry: BTreeMap<(Instant, u64), Key>,
    /// Tells apart two entries under one key over time, so that a claim only ever removes its
    /// own entry.
    next_seq: u64,
}

struct Entry {
    expires: Instant,
    seq: u64,
    published: bool,
}

impl Seen {
    /// `capacity` entries at most (at least one); requests are remembered until their signed
    /// timestamp is `window` old.
    pub fn new(window: Duration, capacity: usize, metrics: Metrics) -> Self {
        Seen {
            window,
            capacity: capacity.max(1),
            inner: Arc::default(),
            metrics,
        }
    }

    /// How long a request signed at `signed_at_ms` must be remembered from `now_ms`: until its
    /// timestamp leaves the window, never longer than the two windows a timestamp from the
    /// future could span. Without a signed timestamp, a whole window from now.
    pub fn lifetime(&self, signed_at_ms: Option<u64>, now_ms: u64) -> Duration {
        let window = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let left = match signed_at_ms {
            Some(at) => at.saturating_add(window).saturating_sub(now_ms),
            None => window,
        };
        Duration::from_millis(left.min(window.saturating_mul(2))) + MARGIN
    }

    /// Looks `key` up and, when it is new, marks it in flight until `expires`.
    pub fn check(&self, key: Key, now: Instant, expires: Instant) -> Check {
        let mut inner = self.lock();
        inner.forget_expired(now);
        if let Some(entry) = inner.entries.get(&key) {
            return if entry.published {
                Check::Replay
            } else {
                Check::InFlight
            };
        }
        while inner.entries.len() >= self.capacity {
            if !inner.evict_first() {
                break;
            }
            self.metrics.replay_evicted();
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.entries.insert(
            key,
            Entry {
                expires,
                seq,
                published: false,
            },
        );
        inner.by_expiry.insert((expires, seq), key);
        Check::Fresh(Claim {
            inner: self.inner.clone(),
            key,
            seq,
            done: false,
        })
    }

    /// Entries held right now, expired ones included until the next check.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

/// A panic elsewhere leaves the maps as consistent as before it.
fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((&(expires, _), _)) = self.by_expiry.first_key_value() {
            if expires > now {
                break;
            }
            self.evict_first();
        }
    }

    /// Removes the entry closest to expiry; `false` when there is none.
    fn evict_first(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((_, key)) => {
                self.entries.remove(&key);
                true
            }
            None => false,
        }
    }
}

/// A request marked in flight. Dropped without [`Claim::published`] (the publish failed, or
/// the client went away mid-request), it is forgotten, so the platform's retry goes through.
pub struct Claim {
    inner: Arc<Mutex<Inner>>,
    key: Key,
    seq: u64,
    done: bool,
}

impl Claim {
    /// The bus has the event: repeats of this request are replays from now on. (When the entry
    /// was evicted meanwhile, there is nothing left to mark.)
    pub fn published(mut self) {
        self.done = true;
        let mut inner = lock(&self.inner);
        if let Some(entry) = inner.entries.get_mut(&self.key) {
            if entry.seq == self.seq {
                entry.published = true;
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.entries.get(&self.key) else {
            return;
        };
        if entry.seq == self.seq {
            let index = (entry.expires, entry.seq);
            inner.entries.remove(&self.key);
            inner.by_expiry.remove(&index);
        }
    }
}

/// Publishes the event of an authenticated callback unless this very request was already
/// published within the replay window: then it is answered as a success again
/// ([`Outcome::Replay`]) and not published. With the replay check off, it just publishes.
pub async fn publish_once(
    state: &State,
    signed: Signed<'_>,
    event: Event,
) -> Result<Outcome, ApiError> {
    let Some(seen) = &state.replay else {
        return super::publish(state, event).await;
    };
    let now = Instant::now();
    let expires = now + seen.lifetime(signed.signed_at_ms, now_ms());
    let claim = match seen.check(signed.key(), now, expires) {
        Check::Fresh(claim) => claim,
        Check::Replay => {
            tracing::debug!(
                platform = signed.platform,
                app = signed.app,
                "replayed callback answered, not published again"
            );
            return Ok(Outcome::Replay);
        }
        Check::InFlight => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "replay_in_flight",
                "the same request is being processed; retry later",
            ))
        }
    };
    // On a failure the claim is dropped here, and the request forgotten.
    let outcome = super::publish(state, event).await?;
    claim.published();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(120);

    fn seen(capacity: usize) -> Seen {
        Seen::new(WINDOW, capacity, Metrics::new())
    }

    fn key(signature: &str) -> Key {
        Signed {
            platform: "dingtalk",
            app: "main",
            signature,
            signed_at_ms: None,
        }
        .key()
    }

    fn publish(seen: &Seen, k: Key, now: Instant, expires: Instant) {
        match seen.check(k, now, expires) {
            Check::Fresh(claim) => claim.published(),
            _ => panic!("expected a fresh request"),
        }
    }

    fn is_replay(seen: &Seen, k: Key, now: Instant) -> bool {
        matches!(seen.check(k, now, now + WINDOW), Check::Replay)
    }

    #[test]
    fn a_published_request_is_a_replay_until_it_expires() {
        let s = seen(10);
        let t0 = Instant::now();
        publish(&s, key("ab"), t0, t0 + WINDOW);
        assert!(is_replay(
            &s,
            key("ab"),
            t0 + WINDOW - Duration::from_millis(1)
        ));
        // At its expiry it is forgotten: the request is new again (and marked in flight).
        assert!(matches!(
            s.check(key("ab"), t0 + WINDOW, t0 + 2 * WINDOW),
            Check::Fresh(_)
        ));
    }

    #[test]
    fn keys_bind_platform_app_and_signature_but_not_its_case() {
        let base = Signed {
            platform: "lark",
            app: "main",
            signature: "abcdef",
            signed_at_ms: Some(1),
        };
        assert_eq!(
            base.key(),
            Signed {
                signature: "ABCDEF",
                signed_at_ms: Some(2),
                ..base
            }
            .key()
        );
        for other in [
            Signed {
                platform: "wecom",
                ..base
            },
            Signed {
                app: "other",
                ..base
            },
            Signed {
                signature: "abcdee",
                ..base
            },
            // Length prefixes: moving a byte from one field to the next is another key.
            Signed {
                app: "mai",
                signature: "nabcdef",
                ..base
            },
        ] {
            assert_ne!(base.key(), other.key(), "{other:?}");
        }
    }

    #[test]
    fn a_claim_dropped_without_a_publish_is_forgotten() {
        let s = seen(10);
        let t0 = Instant::now();
        let Check::Fresh(claim) = s.check(key("ab"), t0, t0 + WINDOW) else {
            panic!("fresh");
        };
        // An identical request meanwhile is told to retry, not published beside it.
        assert!(matches!(
            s.check(key("ab"), t0, t0 + WINDOW),
            Check::InFlight
        ));
        drop(claim);
        assert!(s.is_empty());
        publish(&s, key("ab"), t0, t0 + WINDOW);
        assert!(is_replay(&s, key("ab"), t0));
    }

    #[test]
    fn when_full_the_entry_closest_to_expiry_is_evicted_and_counted() {
        let metrics = Metrics::new();
        let s = Seen::new(WINDOW, 3, metrics.clone());
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        publish(&s, key("a"), t0, t0 + secs(30));
        publish(&s, key("b"), t0, t0 + secs(10));
        publish(&s, key("c"), t0, t0 + secs(20));
        publish(&s, key("d"), t0, t0 + secs(40));
        assert_eq!(s.len(), 3, "capacity holds");
        assert_eq!(metrics.replay_evictions_total.get(), 1);
        // "b" went first; checking it re-adds it and evicts the next closest, "c".
        assert!(!is_replay(&s, key("b"), t0));
        assert_eq!(metrics.replay_evictions_total.get(), 2);
        assert!(is_replay(&s, key("a"), t0));
        assert!(is_replay(&s, key("d"), t0));
        assert!(!is_replay(&s, key("c"), t0));
    }

    #[test]
    fn expired_entries_make_room_without_counting_evictions() {
        let metrics = Metrics::new();
        let s = Seen::new(WINDOW, 2, metrics.clone());
        let t0 = Instant::now();
        publish(&s, key("a"), t0, t0 + Duration::from_secs(1));
        publish(&s, key("b"), t0, t0 + Duration::from_secs(2));
        let later = t0 + Duration::from_secs(3);
        publish(&s, key("c"), later, later + WINDOW);
        assert_eq!(s.len(), 1);
        assert_eq!(metrics.replay_evictions_total.get(), 0);
    }

    #[test]
    fn the_set_never_grows_past_its_capacity() {
        let s = seen(1000);
        let t0 = Instant::now();
        for i in 0..10_000 {
            publish(&s, key(&format!("{i:x}")), t0, t0 + WINDOW);
            assert!(s.len() <= 1000);
        }
        let inner = s.lock();
        assert_eq!(inner.entries.len(), inner.by_expiry.len());
    }

    #[test]
    fn an_evicted_claim_neither_marks_nor_removes_a_later_entry() {
        let s = seen(1);
        let t0 = Instant::now();
        let Check::Fresh(first) = s.check(key("a"), t0, t0 + WINDOW) else {
            panic!("fresh");
        };
        // Evicts the in-flight "a", then "a" comes again and is published by someone else.
        publish(&s, key("b"), t0, t0 + WINDOW);
        let Check::Fresh(second) = s.check(key("a"), t0, t0 + WINDOW) else {
            panic!("fresh");
        };
        drop(first);
        assert!(matches!(
            s.check(key("a"), t0, t0 + WINDOW),
            Check::InFlight
        ));
        second.published();
        assert!(is_replay(&s, key("a"), t0));
    }

    #[test]
    fn lifetime_follows_the_signed_timestamp() {
        let s = seen(1);
        let now = 1_700_000_000_000;
        let window = WINDOW.as_millis() as u64;
        assert_eq!(s.lifetime(Some(now), now), WINDOW + MARGIN);
        assert_eq!(
            s.lifetime(Some(now - 20_000), now),
            WINDOW - Duration::from_secs(20) + MARGIN
        );
        assert_eq!(s.lifetime(Some(now - window - 5), now), MARGIN);
        // From the future: never longer than two windows.
        assert_eq!(s.lifetime(Some(u64::MAX), now), 2 * WINDOW + MARGIN);
        assert_eq!(s.lifetime(None, now), WINDOW + MARGIN);
    }

    #[test]
    fn capacity_is_rate_times_whole_seconds() {
        assert_eq!(capacity(100, Duration::from_secs(120)), 12_000);
        assert_eq!(capacity(100, Duration::from_millis(1500)), 200);
        assert_eq!(capacity(u32::MAX, Duration::MAX), u64::MAX);
    }
}
