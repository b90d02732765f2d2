//! The dead letters on Kafka: the topic `dlq.notify.<target>`, a log from which one record
//! cannot be deleted.
//!
//! Reading: a consumer with its partitions assigned by hand (no group join, so no rebalance
//! of the daemon's readers), a `group.id` of its own that is never committed, from the
//! beginning of each partition up to its high watermark at the start of the read.
//!
//! What was replayed or purged is marked in the compacted topic [`HANDLED_TOPIC`], keyed by
//! `<topic>/<partition>-<offset>`, and skipped by later reads. A compacted topic rather than
//! the committed offsets of a "handled" group: offsets mark a prefix of a partition as done,
//! while replays and purges pick letters anywhere in it (by reason, by id). The marker is
//! written after the replay's publish was acknowledged; a command stopped between the two
//! leaves the letter listed, and a second replay of it publishes it again (Kafka has no
//! duplicate window across processes; subscribers are idempotent on `ce-id`, which is the
//! same derived id both times).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::{DlqError, OneOff};
use crate::bus::kafka::record_headers;
use crate::bus::{self, Message};
use crate::notify::dlq::{Filter, Letter};

/// The markers' topic (prefixed like every subject).
pub const HANDLED_TOPIC: &str = "dlq.handled";
/// How long a marker is kept: longer than any sensible retention of the DLQ topics, past
/// which the letter it marks is gone too.
pub const HANDLED_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The header of a marker saying what was done.
const HANDLED_HEADER: &str = "imbridge-dlq-handled";

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Store {
    pub bus: OneOff,
    config: ClientConfig,
    prefix: String,
}

/// One record as read.
struct Record {
    partition: i32,
    offset: i64,
    time: SystemTime,
    key: Option<String>,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

impl Store {
    pub async fn new(bus: OneOff, prefix: &str) -> Result<Store, DlqError> {
        let kafka = bus
            .bus
            .kafka()
            .ok_or_else(|| DlqError::Usage("not a Kafka bus".into()))?;
        let mut config = kafka.client_config().clone();
        config
            // Never committed, never joined (partitions are assigned): reading leaves no trace.
            .set(
                "group.id",
                format!("imbridge-dlq-{}", hex::encode(rand::random::<[u8; 8]>())),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        Ok(Store {
            bus,
            config,
            prefix: prefix.to_owned(),
        })
    }

    fn topic(&self, target: &str) -> String {
        bus::with_prefix(&self.prefix, &format!("dlq.notify.{target}"))
    }

    pub async fn list(&self, target: &str, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        let (config, topic) = (self.config.clone(), self.topic(target));
        let handled = bus::with_prefix(&self.prefix, HANDLED_TOPIC);
        let read = tokio::task::spawn_blocking(move || {
            let done: HashSet<String> = read_all(&config, &handled)?
                .into_iter()
                .filter_map(|r| r.key)
                .collect();
            read_all(&config, &topic).map(|records| (topic, done, records))
        });
        let (topic, done, records) = read
            .await
            .map_err(|e| DlqError::Unavailable(e.to_string()))?
            .map_err(|e| DlqError::Unavailable(format!("reading the DLQ topic: {e}")))?;
        Ok(records
            .into_iter()
            .filter(|r| !done.contains(&marker_key(&topic, &letter_id(r))))
            .map(|r| Letter::new(letter_id(&r), r.time, topic.clone(), r.headers, &r.payload))
            .filter(|l| filter.matches(l))
            .take(filter.limit())
            .collect())
    }

    /// Marks the letter handled, so that it is listed no more.
    pub async fn remove(&self, target: &str, letter: &Letter) -> Result<(), DlqError> {
        let key = marker_key(&self.topic(target), &letter.id);
        let msg = Message {
            subject: bus::with_prefix(&self.prefix, HANDLED_TOPIC),
            id: key,
            headers: vec![(HANDLED_HEADER.into(), "true".into())],
            payload: Bytes::new(),
        };
        self.bus.bus.publish(&msg).await.map_err(|e| {
            DlqError::Unavailable(format!("marking dead letter {} handled: {e}", letter.id))
        })?;
        Ok(())
    }
}

/// The letter id of a record: `<partition>-<offset>`.
fn letter_id(r: &Record) -> String {
    format!("{}-{}", r.partition, r.offset)
}

fn marker_key(topic: &str, id: &str) -> String {
    format!("{topic}/{id}")
}

/// Every record `topic` holds now (none when it does not exist), partition by partition.
fn read_all(config: &ClientConfig, topic: &str) -> rdkafka::error::KafkaResult<Vec<Record>> {
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), TIMEOUT)?;
            if high > low {
                assignment.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
                ends.push((p.id(), high));
            }
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        records.push(record(&m));
        // Compaction may leave gaps: a partition is done once a record at or past its end
        // (as it was when the read began) came.
        ends.retain(|(p, high)| !(*p == m.partition() && m.offset() + 1 >= *high));
    }
    Ok(records)
}

fn record(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = record_headers(m);
    Record {
        partition: m.partition(),
        offset: m.offset(),
        time: m
            .timestamp()
            .to_millis()
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
            .unwrap_or(UNIX_EPOCH),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        headers,
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}
