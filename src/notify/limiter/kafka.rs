//! The `KafkaLog` store: the slot log shared through a Kafka topic.
//!
//! The copy every replica rebuilds from the topic forgets a log once its windows have passed
//! (see [`Logs`]), and the topic itself is compacted with a retention (see
//! [`super::LOG_RETENTION`]), so neither grows with the number of member ids ever seen.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::logs::Logs;
use super::{now_ms, Log, StoreError};
use crate::platform::Limit;
use crate::shutdown::Shutdown;

/// How long a slot waits for the topic to be read up to its end before asking again.
const CATCH_UP_POLL: u64 = 50;

pub struct KafkaLog {
    logs: Arc<Mutex<Logs>>,
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
    ) -> Result<Self, StoreError> {
        let mut producer_config = config.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string());
        let producer: FutureProducer = producer_config.create()?;
        let logs = Arc::new(Mutex::new(Logs::default()));
        let synced = Arc::new(AtomicU64::new(0));
        let mut consumer_config = config.clone();
        consumer_config
            .set("group.id", "imbridge-limiter")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        let consumer: StreamConsumer = consumer_config.create()?;
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
    ) -> Result<Option<u64>, StoreError> {
        let now = now_ms();
        if self.synced.load(Ordering::SeqCst) < self.assignments.load(Ordering::SeqCst) {
            // A target may have just moved here: not before the old owner's sends are known.
            return Ok(Some(now + CATCH_UP_POLL));
        }
        let snapshot = {
            let mut logs = lock(&self.logs);
            let log = logs.entry(target, now);
            let slot = log.next_slot(limits, margin_ms, now);
            if slot > now {
                return Ok(Some(slot));
            }
            log.record(limits, margin_ms, now);
            log.clone()
        };
        if let Err(e) = self.write(target, &snapshot).await {
            if let Some(log) = lock(&self.logs).get_mut(target) {
                log.unrecord(now);
            }
            return Err(e);
        }
        Ok(None)
    }

    pub(super) async fn pause(&self, target: &str, until_ms: u64) {
        let snapshot = {
            let mut logs = lock(&self.logs);
            let log = logs.entry(target, now_ms());
            log.paused_until = log.paused_until.max(until_ms);
            log.clone()
        };
        if let Err(e) = self.write(target, &snapshot).await {
            tracing::warn!(target, error = %e, "cannot share the pause; other replicas learn it only from the platform");
        }
    }

    /// Writes the target's log and waits until every in-sync replica has it.
    async fn write(&self, target: &str, log: &Log) -> Result<(), StoreError> {
        let value = serde_json::to_vec(log).expect("log serialises");
        let record = FutureRecord::to(&self.topic).key(target).payload(&value);
        match tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.producer.send(record, self.timeout),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(StoreError::Kafka(e)),
            Err(_) => Err(StoreError::NoReport),
        }
    }
}

/// Every change to the logs is whole (a merge, a record): a panic elsewhere leaves them usable.
fn lock(logs: &Mutex<Logs>) -> MutexGuard<'_, Logs> {
    logs.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads the log topic from the beginning and merges every record into `logs`; after each
/// assignment, marks `synced` once it has read up to the end the topic had then.
async fn follow(
    consumer: Arc<StreamConsumer>,
    topic: String,
    logs: Arc<Mutex<Logs>>,
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
                        lock(&logs).merge(target, &log, now_ms());
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
