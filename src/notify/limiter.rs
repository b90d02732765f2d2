//! Per-target rate limits that are a promise: never more than N requests in any sliding window
//! W, across every replica of the daemon.
//!
//! The algorithm is a sliding log: each target keeps the times of its recent sends. A send at
//! time t is allowed when, for every limit (N, W), fewer than N logged sends fall in (t − W, t];
//! so the earliest allowed time is the N-th most recent send plus W. Unlike a token bucket,
//! which lets about 2N through in some window, a log cannot exceed N in any window. The log also
//! holds the "paused until" time set when a platform answers "too fast".
//!
//! Three stores:
//! - `Local`: in this process, for the memory bus or a single replica.
//! - `NatsKv`: one entry per target in a JetStream stream keeping the last message per subject
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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::atomic::Ordering;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Limit;
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

    /// Adds what another replica logged: the sends of both, as many of the latest as a limit
    /// can see, and the later pause.
    pub fn merge(&mut self, other: &Log) {
        self.keep = self.keep.max(other.keep);
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

/// Why a slot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error("shutting down")]
    Shutdown,
    #[error("waited past the deadline")]
    Deadline,
}

pub enum Limiter {
    Local(Mutex<HashMap<String, Log>>),
    NatsKv(Box<KvLimiter>),
    KafkaLog(Box<kafka_log::KafkaLog>),
}

pub struct KvLimiter {
    js: async_nats::jetstream::Context,
    config: stream::Config,
    /// Subject of a target's entry: `<bucket>.<target>`.
    bucket: String,
    ready: std::sync::atomic::AtomicBool,
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
    pub fn local() -> Self {
        Limiter::Local(Mutex::new(HashMap::new()))
    }

    pub fn nats_kv(
        js: async_nats::jetstream::Context,
        bucket: &str,
        storage: stream::StorageType,
        replicas: usize,
    ) -> Self {
        Limiter::NatsKv(Box::new(KvLimiter {
            js,
            config: stream::Config {
                name: bucket.to_owned(),
                description: Some("imbridge per-target rate-limit logs".into()),
                subjects: vec![format!("{bucket}.>")],
                max_messages_per_subject: 1,
                // Logs older than any window decide nothing; a day covers every pause.
                max_age: Duration::from_secs(86_400),
                storage,
                num_replicas: replicas,
                ..Default::default()
            },
            bucket: bucket.to_owned(),
            ready: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Waits until `target` may send under `limits` and records the send. Returns how long it
    /// waited. Gives up at `deadline` (the message's own wait bound) or on shutdown.
    pub async fn acquire(
        &self,
        target: &str,
        limits: &[Limit],
        margin: Duration,
        deadline: SystemTime,
        shutdown: &Shutdown,
    ) -> Result<Duration, LimiterError> {
        self.acquire_all(&[(target, limits)], margin, deadline, shutdown)
            .await
    }

    /// Waits until every key may send under its limits, and records the send for all of them
    /// (an app message counts for the app and for each recipient).
    ///
    /// All keys are tried at once; when one is not free, the slots the others took stay
    /// recorded, and all are taken again once it is. A slot recorded without a send only costs
    /// throughput, while one recorded earlier than its send could let a later send break a
    /// window: so a pass that took longer than `margin` (a slow store) is taken again too, and
    /// every record is within `margin` of the send that follows.
    pub async fn acquire_all(
        &self,
        keys: &[(&str, &[Limit])],
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
                .map(|(key, limits)| self.try_take(key, limits, margin_ms, now_ms()));
            let mut next: Option<u64> = None;
            for ((key, _), taken) in keys.iter().zip(futures::future::join_all(takes).await) {
                let slot = match taken {
                    Ok(None) => continue,
                    Ok(Some(slot)) => slot,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "rate-limit store unavailable; waiting");
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
        target: &str,
        limits: &[Limit],
        margin_ms: u64,
        now: u64,
    ) -> Result<Option<u64>, String> {
        match self {
            Limiter::Local(logs) => {
                let mut logs = logs.lock().expect("not poisoned");
                let log = logs.entry(target.to_owned()).or_default();
                let slot = log.next_slot(limits, margin_ms, now);
                if slot > now {
                    return Ok(Some(slot));
                }
                log.record(limits, margin_ms, now);
                Ok(None)
            }
            Limiter::NatsKv(kv) => kv.try_take(target, limits, margin_ms).await,
            Limiter::KafkaLog(k) => k.try_take(target, limits, margin_ms).await,
        }
    }

    /// No sends for `target` until `until` (a platform said "too fast").
    pub async fn pause(&self, target: &str, until: SystemTime) {
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match self {
            Limiter::Local(logs) => {
                let mut logs = logs.lock().expect("not poisoned");
                let log = logs.entry(target.to_owned()).or_default();
                log.paused_until = log.paused_until.max(until_ms);
            }
            Limiter::KafkaLog(k) => k.pause(target, until_ms).await,
            Limiter::NatsKv(kv) => {
                for attempt in 1..=10 {
                    match kv
                        .update(target, |log| {
                            log.paused_until = log.paused_until.max(until_ms);
                        })
                        .await
                    {
                        Ok(true) => return,
                        Ok(false) if attempt < 10 => continue,
                        Ok(false) => {
                            tracing::warn!(target, "could not record the pause (too much contention); other replicas may send before it ends");
                        }
                        Err(e) => {
                            tracing::warn!(target, error = %e, "cannot record pause in the rate-limit store");
                            tokio::time::sleep(STORE_RETRY).await;
                        }
                    }
                }
            }
        }
    }
}

impl KvLimiter {
    /// The stream, created (or updated) on first use and again after any store error.
    async fn stream(&self) -> Result<stream::Stream, String> {
        if !self.ready.load(Ordering::SeqCst) {
            self.js
                .create_or_update_stream(self.config.clone())
                .await
                .map_err(|e| e.to_string())?;
            self.ready.store(true, Ordering::SeqCst);
        }
        self.js
            .get_stream(&self.config.name)
            .await
            .inspect_err(|_| self.ready.store(false, Ordering::SeqCst))
            .map_err(|e| e.to_string())
    }

    fn subject(&self, target: &str) -> String {
        format!("{}.{target}", self.bucket)
    }

    /// Reads the target's log; `(log, sequence)`, sequence 0 when there is none yet.
    async fn read(&self, target: &str) -> Result<(Log, u64), String> {
        let stream = self.stream().await?;
        match stream
            .get_last_raw_message_by_subject(&self.subject(target))
            .await
        {
            Ok(m) => Ok((
                serde_json::from_slice(&m.payload).unwrap_or_default(),
                m.sequence,
            )),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                Ok((Log::default(), 0))
            }
            Err(e) => {
                self.ready.store(false, Ordering::SeqCst);
                Err(e.to_string())
            }
        }
    }

    /// Writes `log` if the entry is still at `sequence`; false when another replica won.
    async fn write(&self, target: &str, log: &Log, sequence: u64) -> Result<bool, String> {
        let value = Bytes::from(serde_json::to_vec(log).expect("log serialises"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            sequence.to_string().as_str(),
        );
        let ack = async {
            self.js
                .publish_with_headers(self.subject(target), headers, value)
                .await?
                .await
        };
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => {
                self.ready.store(false, Ordering::SeqCst);
                Err(e.to_string())
            }
        }
    }

    async fn try_take(
        &self,
        target: &str,
        limits: &[Limit],
        margin_ms: u64,
    ) -> Result<Option<u64>, String> {
        loop {
            let (mut log, sequence) = self.read(target).await?;
            // The time is read after the store round-trip, so a slot is never recorded earlier
            // than it is taken, however long the compare-and-set races last.
            let now = now_ms();
            let slot = log.next_slot(limits, margin_ms, now);
            if slot > now {
                return Ok(Some(slot));
            }
            log.record(limits, margin_ms, now);
            if self.write(target, &log, sequence).await? {
                return Ok(None);
            }
            // Another replica took a slot in between: decide again on its log.
        }
    }

    async fn update(&self, target: &str, change: impl Fn(&mut Log)) -> Result<bool, String> {
        let (mut log, sequence) = self.read(target).await?;
        change(&mut log);
        self.write(target, &log, sequence).await
    }
}

pub mod kafka_log {
    //! The `KafkaLog` store: the slot log shared through a Kafka topic.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::StreamExt;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};

    use super::{now_ms, Log};
    use crate::config::Limit;
    use crate::shutdown::Shutdown;

    /// How long a slot waits for the topic to be read up to its end before asking again.
    const CATCH_UP_POLL: u64 = 50;

    pub struct KafkaLog {
        logs: Arc<Mutex<HashMap<String, Log>>>,
        producer: FutureProducer,
        topic: String,
        timeout: Duration,
        /// Partition assignments of the notify consumer so far.
        assignments: Arc<AtomicU64>,
        /// The assignment count the follower has caught up with.
        synced: Arc<AtomicU64>,
    }

    impl KafkaLog {
        /// Starts following `topic`. `assignments` is the notify consumer's assignment count.
        pub fn start(
            config: &ClientConfig,
            topic: &str,
            timeout: Duration,
            assignments: Arc<AtomicU64>,
            shutdown: Shutdown,
        ) -> Result<Self, String> {
            let mut producer_config = config.clone();
            producer_config
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", timeout.as_millis().to_string());
            let producer: FutureProducer = producer_config.create().map_err(|e| e.to_string())?;
            let logs = Arc::new(Mutex::new(HashMap::new()));
            let synced = Arc::new(AtomicU64::new(0));
            let mut consumer_config = config.clone();
            consumer_config
                .set("group.id", "imbridge-limiter")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false");
            let consumer: StreamConsumer = consumer_config.create().map_err(|e| e.to_string())?;
            tokio::spawn(follow(
                Arc::new(consumer),
                topic.to_owned(),
                logs.clone(),
                assignments.clone(),
                synced.clone(),
                shutdown,
            ));
            Ok(KafkaLog {
                logs,
                producer,
                topic: topic.to_owned(),
                timeout,
                assignments,
                synced,
            })
        }

        pub(super) async fn try_take(
            &self,
            target: &str,
            limits: &[Limit],
            margin_ms: u64,
        ) -> Result<Option<u64>, String> {
            let now = now_ms();
            if self.synced.load(Ordering::SeqCst) < self.assignments.load(Ordering::SeqCst) {
                // A target may have just moved here: not before the old owner's sends are known.
                return Ok(Some(now + CATCH_UP_POLL));
            }
            let snapshot = {
                let mut logs = self.logs.lock().expect("not poisoned");
                let log = logs.entry(target.to_owned()).or_default();
                let slot = log.next_slot(limits, margin_ms, now);
                if slot > now {
                    return Ok(Some(slot));
                }
                log.record(limits, margin_ms, now);
                log.clone()
            };
            if let Err(e) = self.write(target, &snapshot).await {
                if let Some(log) = self.logs.lock().expect("not poisoned").get_mut(target) {
                    log.unrecord(now);
                }
                return Err(e);
            }
            Ok(None)
        }

        pub(super) async fn pause(&self, target: &str, until_ms: u64) {
            let snapshot = {
                let mut logs = self.logs.lock().expect("not poisoned");
                let log = logs.entry(target.to_owned()).or_default();
                log.paused_until = log.paused_until.max(until_ms);
                log.clone()
            };
            if let Err(e) = self.write(target, &snapshot).await {
                tracing::warn!(target, error = %e, "cannot share the pause; other replicas learn it only from the platform");
            }
        }

        /// Writes the target's log and waits until every in-sync replica has it.
        async fn write(&self, target: &str, log: &Log) -> Result<(), String> {
            let value = serde_json::to_vec(log).expect("log serialises");
            let record = FutureRecord::to(&self.topic).key(target).payload(&value);
            match tokio::time::timeout(
                self.timeout + Duration::from_secs(1),
                self.producer.send(record, self.timeout),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.to_string()),
                Err(_) => Err("no delivery report".into()),
            }
        }
    }

    /// Reads the log topic from the beginning and merges every record into `logs`; after each
    /// assignment, marks `synced` once it has read up to the end the topic had then.
    async fn follow(
        consumer: Arc<StreamConsumer>,
        topic: String,
        logs: Arc<Mutex<HashMap<String, Log>>>,
        assignments: Arc<AtomicU64>,
        synced: Arc<AtomicU64>,
        shutdown: Shutdown,
    ) {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(&topic, 0, Offset::Beginning);
        if let Err(e) = consumer.assign(&tpl) {
            tracing::error!(error = %e, topic, "cannot follow the rate-limit log");
            return;
        }
        let position = Arc::new(AtomicI64::new(0));
        // (assignment count, end offset to reach) of the catch-up in progress.
        let mut goal: Option<(u64, i64)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(CATCH_UP_POLL));
        let mut stream = consumer.stream();
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(m)) => {
                        let target = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                        let log = m.payload().and_then(|p| serde_json::from_slice::<Log>(p).ok());
                        if let (Some(target), Some(log)) = (target, log) {
                            logs.lock().expect("not poisoned").entry(target).or_default().merge(&log);
                        }
                        position.store(m.offset() + 1, Ordering::SeqCst);
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "reading the rate-limit log"),
                    None => return,
                },
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let wanted = assignments.load(Ordering::SeqCst);
            if synced.load(Ordering::SeqCst) >= wanted {
                continue;
            }
            match goal {
                Some((count, end)) if count == wanted => {
                    if position.load(Ordering::SeqCst) >= end {
                        synced.store(count, Ordering::SeqCst);
                        goal = None;
                    }
                }
                _ => {
                    let c = consumer.clone();
                    let t = topic.clone();
                    let end = tokio::task::spawn_blocking(move || {
                        c.fetch_watermarks(&t, 0, Duration::from_secs(2))
                    })
                    .await;
                    match end {
                        Ok(Ok((_, high))) => goal = Some((wanted, high)),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "reading the rate-limit log's end")
                        }
                        Err(_) => {}
                    }
                }
            }
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
