//! Per-target rate limits that are a promise: never more than N requests in any sliding window
//! W, across every replica of the daemon.
//!
//! The algorithm is a sliding log: each target keeps the times of its recent sends. A send at
//! time t is allowed when, for every limit (N, W), fewer than N logged sends fall in (t − W, t];
//! so the earliest allowed time is the N-th most recent send plus W. Unlike a token bucket,
//! which lets about 2N through in some window, a log cannot exceed N in any window. The log also
//! holds the "paused until" time set when a platform answers "too fast".
//!
//! Keys are targets (named by the configuration) and, for app targets with per-recipient
//! limits, members (one per recipient id a message names, so as many as the input wants).
//! Every store forgets a log once its windows have passed, so what it holds is bounded by the
//! keys used within a window, never by all the keys ever seen.
//!
//! Three stores:
//! - `Local`: in this process, for the memory bus or a single replica.
//! - `NatsKv`: one entry per key in a JetStream stream keeping the last message per subject
//!   (the key-value pattern, written directly so it works with every JetStream server), updated
//!   with compare-and-set (`Nats-Expected-Last-Subject-Sequence`), so two replicas can never
//!   both take the last slot of a window: the loser of the race re-reads and waits. Times are the replicas' wall clocks (keep them NTP-synchronised);
//!   `notify.rate_limit_margin` is added to every window to absorb clock differences and the
//!   jitter between taking a slot and the request reaching the platform.
//! - `KafkaLog`: on Kafka, one replica at a time owns a target (its notify topic has one
//!   partition), so the log lives in that replica; what must survive is the handover. Every
//!   slot taken is written to a log topic (key = target, value = the target's whole log)
//!   before the request is sent, every replica follows that topic, and after each partition
//!   assignment no slot is taken until this replica has read the topic up to its end. The new
//!   owner of a target therefore knows every send of the old one, even one that died.

mod kafka;
mod local;
mod logs;
mod nats;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::settings::{LimiterStore, NotifySettings};
use crate::bus::{self, Bus};
use crate::platform::Limit;
use crate::shutdown::Shutdown;

/// The shared log of one target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    /// Send times in ms since the epoch, oldest first.
    #[serde(default)]
    pub sends: Vec<u64>,
    /// No sends before this time (ms since the epoch).
    #[serde(default)]
    pub paused_until: u64,
    /// How many sends the limits can see (the largest N); older ones are forgotten. Kept in the
    /// log so a replica merging another's log prunes it the same way without knowing the
    /// target's limits.
    #[serde(default)]
    pub keep: usize,
    /// How long (ms) after its latest send the log still decides anything: the longest window
    /// plus the margin. Kept in the log, like `keep`, so any replica can forget it in time.
    /// 0 in logs written before it was kept: see [`Log::expires_at`].
    #[serde(default)]
    pub horizon: u64,
}

impl Log {
    /// The earliest time (ms) at or after `now` when a send is allowed.
    pub fn next_slot(&self, limits: &[Limit], margin_ms: u64, now: u64) -> u64 {
        let mut slot = now.max(self.paused_until);
        for limit in limits {
            let n = limit.max as usize;
            if self.sends.len() >= n {
                let nth_latest = self.sends[self.sends.len() - n];
                let window = limit.window.as_millis() as u64;
                slot = slot.max(nth_latest.saturating_add(window).saturating_add(margin_ms));
            }
        }
        slot
    }

    /// The time (ms) from which this log allows a send at once under any limits it was
    /// recorded with: forgetting it then changes no decision. A log without a horizon (written
    /// by an older replica) is kept for [`UNKNOWN_HORIZON`], as long as the NATS store keeps it.
    pub fn expires_at(&self) -> u64 {
        let horizon = if self.horizon == 0 {
            UNKNOWN_HORIZON
        } else {
            self.horizon
        };
        let last = self.sends.last().map_or(0, |&t| t.saturating_add(horizon));
        last.max(self.paused_until)
    }

    /// Adds what another replica logged: the sends of both, as many of the latest as a limit
    /// can see, and the later pause.
    pub fn merge(&mut self, other: &Log) {
        self.keep = self.keep.max(other.keep);
        self.horizon = self.horizon.max(other.horizon);
        self.sends.extend_from_slice(&other.sends);
        self.sends.sort_unstable();
        self.sends.dedup();
        let drop = self.sends.len().saturating_sub(self.keep);
        self.sends.drain(..drop);
        self.paused_until = self.paused_until.max(other.paused_until);
    }

    /// Takes back the send recorded at `at` (its record could not be shared).
    pub fn unrecord(&mut self, at: u64) {
        if let Some(i) = self.sends.iter().rposition(|&t| t == at) {
            self.sends.remove(i);
        }
    }

    /// Records a send at `now` and forgets sends no limit can see any more.
    pub fn record(&mut self, limits: &[Limit], margin_ms: u64, now: u64) {
        self.sends.push(now);
        let horizon = limits
            .iter()
            .map(|l| l.window.as_millis() as u64 + margin_ms)
            .max()
            .unwrap_or(0);
        let keep = limits.iter().map(|l| l.max as usize).max().unwrap_or(0);
        self.keep = keep;
        self.horizon = horizon;
        let old = self
            .sends
            .iter()
            .take_while(|&&t| t.saturating_add(horizon) <= now)
            .count();
        // Never keep more than the largest N: older entries cannot decide anything.
        let drop = old.max(self.sends.len().saturating_sub(keep));
        self.sends.drain(..drop);
    }
}

/// How long the kafka_log topic keeps a record: a day covers every window and every pause,
/// like the NATS store's target entries. The topic is compacted too (only a key's latest log
/// counts), so a new owner reads at most a day of keys, each once.
pub const LOG_RETENTION: Duration = Duration::from_secs(86_400);

/// The NATS store's member stream's name: the bucket's, with this suffix.
pub const MEMBERS_SUFFIX: &str = "_members";

/// How long a log whose horizon is unknown is kept: a day covers every window and pause.
pub const UNKNOWN_HORIZON: u64 = 86_400_000;

/// Why a slot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("shutting down")]
    Shutdown,
    #[error("waited past the deadline")]
    Deadline,
}

/// Why the shared store could not be read or written (the limiter waits and tries again).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("NATS: {0}")]
    Nats(#[source] async_nats::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("no delivery report within the publish timeout")]
    NoReport,
}

/// What a key counts, which decides how long a shared store keeps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A target, or the app it sends through: named by the configuration; may be paused.
    Target,
    /// One recipient of an app: as many as the ids messages name, so kept only within its
    /// windows; never paused.
    Member,
}

/// One key a send must take a slot of, under its limits.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub name: &'a str,
    pub scope: Scope,
    pub limits: &'a [Limit],
}

/// Where the logs are kept.
pub enum Limiter {
    Local(local::Local),
    NatsKv(Box<nats::KvLimiter>),
    KafkaLog(Box<kafka::KafkaLog>),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long to wait after a store error before trying again.
const STORE_RETRY: Duration = Duration::from_millis(200);

impl Limiter {
    /// The store `notify.limiter` chose, on the bus that offers it (configuration validation
    /// made them agree; a store its bus does not offer falls back to this process).
    /// `member_windows`: the longest window of any target's per-member limits, for how long
    /// the NATS store keeps a member's entry.
    pub fn start(
        settings: &NotifySettings,
        member_windows: Duration,
        bus: &Bus,
        prefix: &str,
        shutdown: Shutdown,
    ) -> Result<Limiter, StoreError> {
        let limiter = match (settings.limiter, bus.nats(), bus.kafka()) {
            (LimiterStore::NatsKv, Some(nats), _) => {
                let (storage, replicas) = nats.storage();
                let js = nats.jetstream().clone();
                // One margin as in every window, one more for the server's clock (which
                // expires entries) against the replicas' (which time the sends).
                let member_age = member_windows + 2 * settings.rate_limit_margin;
                let bucket = &settings.limiter_bucket;
                let kv = nats::KvLimiter::new(js, bucket, storage, replicas, member_age);
                Limiter::NatsKv(Box::new(kv))
            }
            (LimiterStore::KafkaLog, _, Some(kafka)) => {
                Limiter::KafkaLog(Box::new(kafka::KafkaLog::start(
                    kafka.client_config(),
                    &bus::with_prefix(prefix, &settings.limiter_bucket),
                    kafka.settings().publish_timeout,
                    kafka.assignments(),
                    shutdown,
                )?))
            }
            _ => Limiter::local(),
        };
        Ok(limiter)
    }

    pub fn local() -> Self {
        Limiter::Local(local::Local::default())
    }

    /// Waits until every key may send under its limits, and records the send for all of them
    /// (an app message counts for the app and for each recipient). Returns how long it waited;
    /// gives up at `deadline` (the message's own wait bound) or on shutdown.
    ///
    /// All keys are tried at once; when one is not free, the slots the others took stay
    /// recorded, and all are taken again once it is. A slot recorded without a send only costs
    /// throughput, while one recorded earlier than its send could let a later send break a
    /// window: so a pass that took longer than `margin` (a slow store) is taken again too, and
    /// every record is within `margin` of the send that follows.
    pub async fn acquire_all(
        &self,
        keys: &[Key<'_>],
        margin: Duration,
        deadline: SystemTime,
        shutdown: &Shutdown,
    ) -> Result<Duration, LimiterError> {
        let started = std::time::Instant::now();
        let margin_ms = margin.as_millis() as u64;
        let deadline_ms = deadline
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        loop {
            let pass = now_ms();
            if pass > deadline_ms {
                return Err(LimiterError::Deadline);
            }
            let takes = keys
                .iter()
                .map(|key| self.try_take(key, margin_ms, now_ms()));
            let mut next: Option<u64> = None;
            for (key, taken) in keys.iter().zip(futures::future::join_all(takes).await) {
                let slot = match taken {
                    Ok(None) => continue,
                    Ok(Some(slot)) => slot,
                    Err(e) => {
                        tracing::warn!(key = key.name, error = %e, "rate-limit store unavailable; waiting");
                        now_ms() + STORE_RETRY.as_millis() as u64
                    }
                };
                next = Some(next.map_or(slot, |n| n.max(slot)));
            }
            let Some(slot) = next else {
                if keys.len() > 1 && now_ms().saturating_sub(pass) > margin_ms {
                    continue;
                }
                return Ok(started.elapsed());
            };
            if slot > deadline_ms {
                return Err(LimiterError::Deadline);
            }
            let wait = Duration::from_millis(slot.saturating_sub(now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Err(LimiterError::Shutdown),
            }
        }
    }

    /// Takes a slot now if one is free (`None`), or tells when the next one is (`Some(ms)`).
    async fn try_take(
        &self,
        key: &Key<'_>,
        margin_ms: u64,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Limiter::Local(local) => Ok(local.try_take(key.name, key.limits, margin_ms, now)),
            Limiter::NatsKv(kv) => kv.try_take(key, margin_ms).await,
            Limiter::KafkaLog(k) => k.try_take(key.name, key.limits, margin_ms).await,
        }
    }

    /// No sends for `target` until `until` (a platform said "too fast").
    pub async fn pause(&self, target: &str, until: SystemTime) {
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match self {
            Limiter::Local(local) => local.pause(target, until_ms, now_ms()),
            Limiter::KafkaLog(k) => k.pause(target, until_ms).await,
            Limiter::NatsKv(kv) => kv.pause(target, until_ms).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim(n: u32, ms: u64) -> Limit {
        Limit::new(n, Duration::from_millis(ms))
    }

    #[test]
    fn nth_latest_send_decides() {
        let limits = [lim(2, 1000)];
        let mut log = Log::default();
        assert_eq!(log.next_slot(&limits, 0, 0), 0);
        log.record(&limits, 0, 0);
        assert_eq!(log.next_slot(&limits, 0, 10), 10);
        log.record(&limits, 0, 10);
        // The third send must wait until the first leaves the window.
        assert_eq!(log.next_slot(&limits, 0, 20), 1000);
        assert_eq!(log.next_slot(&limits, 50, 20), 1050);
    }

    #[test]
    fn several_limits_and_pause() {
        let limits = [lim(2, 100), lim(3, 1000)];
        let mut log = Log::default();
        for t in [0, 1, 200] {
            assert!(log.next_slot(&limits, 0, t) <= t);
            log.record(&limits, 0, t);
        }
        // 2/100ms allows t=201, but 3/1000ms needs the send at 0 to be 1000 ms old.
        assert_eq!(log.next_slot(&limits, 0, 201), 1000);
        log.paused_until = 5000;
        assert_eq!(log.next_slot(&limits, 0, 201), 5000);
    }

    #[test]
    fn merged_logs_know_both_replicas_sends() {
        let limits = [lim(3, 1000)];
        let mut a = Log::default();
        a.record(&limits, 0, 100);
        a.record(&limits, 0, 200);
        let mut b = Log::default();
        b.record(&limits, 0, 150);
        b.record(&limits, 0, 200);
        b.paused_until = 900;
        a.merge(&b);
        assert_eq!(a.sends, vec![100, 150, 200]);
        assert_eq!(a.paused_until, 900);
        let mut c = Log::default();
        c.record(&limits, 0, 250);
        a.merge(&c);
        assert_eq!(a.sends, vec![150, 200, 250], "only the latest N are kept");
        a.unrecord(200);
        assert_eq!(a.sends, vec![150, 250]);
    }

    proptest! {
        /// Whatever the request times, sends taken through the log never exceed N in any
        /// window of W.
        #[test]
        fn never_more_than_n_in_any_window(
            arrivals in proptest::collection::vec(0u64..5000, 1..200),
            n in 1u32..6,
            w in 1u64..1000,
        ) {
            let limits = [lim(n, w)];
            let mut arrivals = arrivals;
            arrivals.sort_unstable();
            let mut log = Log::default();
            let mut sent = Vec::new();
            let mut clock = 0;
            for a in arrivals {
                clock = clock.max(a);
                let slot = log.next_slot(&limits, 0, clock);
                clock = slot;
                log.record(&limits, 0, clock);
                sent.push(clock);
            }
            for (i, &t) in sent.iter().enumerate() {
                let in_window = sent[i..].iter().take_while(|&&u| u < t + w).count();
                prop_assert!(in_window <= n as usize, "{} sends in [{}, {})", in_window, t, t + w);
            }
        }
    }
}
