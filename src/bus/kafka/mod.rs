//! Kafka, through librdkafka. The topic is the subject (`dingtalk.bpms_instance_change`), the
//! headers are the CloudEvents Kafka binding (`ce_id`, `ce_type`, …) plus `content-type` and
//! the bridge's own, and the record key is `ce-id` unless `bus.kafka.keys` names a business
//! key. The producer is idempotent with `acks=all`, and a publish returns only after the
//! delivery report, so "stored" means every in-sync replica has it.
//!
//! Readiness: a keeper fetches the cluster metadata every second. While the brokers cannot be
//! reached [`KafkaBus::is_ready`] is false and publishes fail at once, so the platform gets a
//! 503 and retries instead of waiting out its own deadline.
//!
//! Consumers ([`consumer`]): one consumer group for every replica, subscribed by regex to the
//! layout's wildcard consumers (the daemon's `notify.>`). Each record goes to exactly one of
//! the layout's consumers (its topic's, or the wildcard one for topics nobody names). Offsets
//! are stored only up to the first record not yet finished, so a replica that dies leaves
//! every unfinished record to the next owner (at least once). A consumer whose queue is full
//! has its partition paused, never the others. The layout's topics are created with one
//! partition and keyed by name, so one replica at a time owns a name (a notify target); when
//! its partition moves, the records the old owner still holds are dropped there (not
//! acknowledged) and the new owner delivers them.
//!
//! A reader of inbound events (a route's `from` pattern, [`ConsumerSpec::new_only`]) reads
//! what other readers read too, so it is a consumer group of its own, subscribed by the regex
//! of its pattern; new, it starts after what the topics already hold.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio::sync::mpsc;

pub(in crate::bus) mod consumer;

use super::memory::Seen;
use super::{Ack, BusError, ConsumerSpec, Delivery, Layout, Message};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// How often the keeper checks the brokers while they answer, and while they don't.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the consumer stores finished offsets and refills paused partitions' queues.
const TICK: Duration = Duration::from_millis(100);

pub struct KafkaBus {
    producer: RwLock<Arc<FutureProducer>>,
    config: ClientConfig,
    admin: AdminClient<DefaultClientContext>,
    settings: KafkaSettings,
    prefix: String,
    /// Subject prefixes whose records are keyed by the rest of the subject (see [`Layout`]).
    keyed_by_name: Vec<String>,
    /// Compacted topics and their retention (see [`Layout`]).
    compacted: Vec<(String, Duration)>,
    /// The brokers answered the last metadata request.
    connected: Arc<AtomicBool>,
    /// The topics the daemon needs at start exist.
    topics_ready: Arc<AtomicBool>,
    /// Readers of inbound events not yet placed (a new one after what the topics hold): an
    /// event published before would be skipped by them.
    readers_unplaced: Arc<AtomicUsize>,
    /// Topics known to exist (created or seen in metadata).
    known: Mutex<HashSet<String>>,
    /// ce-ids stored recently by this replica, per stream as on NATS, so a platform retry is
    /// not stored twice.
    seen: Mutex<Seen>,
    /// Where the records of the daemon's own group go.
    routes: Arc<consumer::Routes>,
    /// Where each reader of inbound events (a group of its own) hands its records, by durable.
    readers: HashMap<String, Arc<consumer::Routes>>,
    /// Bumped on every partition assignment of the notify consumer (see [`KafkaBus::assignments`]).
    assignments: Arc<AtomicU64>,
    closing: Shutdown,
    consumer_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// When the producer was last replaced.
    renewed: Mutex<Option<Instant>>,
}

/// `[bus.kafka]`, validated.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub client_id: String,
    /// librdkafka properties, keys normalised (`_` → `.`); values may be secrets.
    pub properties: Vec<(String, Secret)>,
    pub create_topics: bool,
    pub partitions: i32,
    pub replication_factor: i32,
    pub publish_timeout: Duration,
    pub duplicate_window: Duration,
    /// (subject pattern, JSON pointer) pairs choosing record keys, most specific first.
    pub keys: Vec<(String, String)>,
}

impl KafkaBus {
    /// Creates the clients and starts the keeper (brokers, the layout's topics) and, when the
    /// layout has consumers, the group consumer. Never waits for a broker.
    pub fn start(
        settings: &KafkaSettings,
        layout: &Layout,
        prefix: &str,
        metrics: Metrics,
        supervisor: &Supervisor,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, BusError> {
        let config = client_config(settings);
        let producer = producer(&config, settings)?;
        let admin: AdminClient<DefaultClientContext> = config
            .create()
            .map_err(|e| BusError::Unavailable(format!("creating the Kafka admin client: {e}")))?;
        metrics.bus_connected("kafka", false);
        // One partition each, so that one replica at a time owns what a topic carries.
        let needed: Vec<(String, i32)> = layout.topics.iter().map(|t| (t.clone(), 1)).collect();
        let consumers = &layout.consumers;
        let bus = Arc::new(KafkaBus {
            producer: RwLock::new(Arc::new(producer)),
            config,
            admin,
            settings: settings.clone(),
            prefix: prefix.to_owned(),
            keyed_by_name: layout.keyed_by_name.clone(),
            compacted: layout.compacted.clone(),
            connected: Arc::new(AtomicBool::new(false)),
            topics_ready: Arc::new(AtomicBool::new(false)),
            readers_unplaced: Arc::new(AtomicUsize::new(
                consumers.iter().filter(|c| c.new_only).count(),
            )),
            known: Mutex::new(HashSet::new()),
            seen: Mutex::new(Seen::new(layout)),
            routes: Arc::new(consumer::Routes::new(
                consumers.iter().filter(|c| !c.new_only).count(),
            )),
            readers: consumers
                .iter()
                .filter(|c| c.new_only)
                .map(|c| (c.durable.clone(), Arc::new(consumer::Routes::new(1))))
                .collect(),
            // Starts at 1, so the kafka_log limiter catches up before the first send even when
            // nothing has been assigned yet (a `?wait=true` send needs no assignment).
            assignments: Arc::new(AtomicU64::new(1)),
            closing: Shutdown::new(),
            consumer_tasks: Mutex::new(Vec::new()),
            renewed: Mutex::new(None),
        });
        let (inbound, own): (Vec<&ConsumerSpec>, Vec<&ConsumerSpec>) =
            consumers.iter().partition(|c| c.new_only);
        let mut groups = Vec::new();
        if !own.is_empty() {
            let own: Vec<ConsumerSpec> = own.into_iter().cloned().collect();
            groups.push(consumer::Group {
                config: bus.config.clone(),
                id: settings.group_id.clone(),
                pattern: consumer::subscription(&own),
                routes: bus.routes.clone(),
                assignments: bus.assignments.clone(),
                inbound: None,
                unplaced: None,
                placed: AtomicBool::new(false),
            });
        }
        for spec in inbound {
            groups.push(consumer::Group {
                config: bus.config.clone(),
                // The durable's name already tells the reader (and its filter) apart.
                id: format!("{}-{}", settings.group_id, spec.durable),
                pattern: consumer::subscription(std::slice::from_ref(spec)),
                routes: bus.readers[&spec.durable].clone(),
                assignments: Arc::new(AtomicU64::new(0)),
                inbound: Some(spec.filter.clone()),
                unplaced: Some(bus.readers_unplaced.clone()),
                placed: AtomicBool::new(false),
            });
        }
        for group in groups {
            let (group, stop, closing) = (Arc::new(group), shutdown.clone(), bus.closing.clone());
            // A new group member after a panic: the partitions are assigned again, and what
            // was handed out and not finished is read again from the stored offsets.
            let name = format!("kafka_consumer:{}", group.id);
            let task = supervisor.spawn(name, shutdown.clone(), move || {
                consumer::run_consumer(group.clone(), stop.clone(), closing.clone())
            });
            bus.consumer_tasks.lock().expect("not poisoned").push(task);
        }
        let keeper = bus.clone();
        let stop = shutdown.clone();
        supervisor.spawn("kafka_keeper".into(), shutdown, move || {
            keep(
                keeper.clone(),
                needed.clone(),
                metrics.clone(),
                stop.clone(),
            )
        });
        Ok(bus)
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.read().expect("not poisoned").clone()
    }

    /// Replaces the producer when it cannot recover by itself: after a fatal error, or when a
    /// message timed out although the brokers answer. The latter is an idempotent producer
    /// whose producer id the broker forgot (a broker restarted without persistent storage):
    /// librdkafka retries every message forever without raising a fatal error. At most once
    /// per publish timeout, so a burst of timeouts renews it once.
    fn renew_stuck_producer(&self, code: Option<RDKafkaErrorCode>) {
        let current = self.producer();
        let why = match current.client().fatal_error() {
            Some((code, reason)) => format!("fatal error {code:?}: {reason}"),
            None if code == Some(RDKafkaErrorCode::MessageTimedOut)
                && self.connected.load(Ordering::SeqCst) =>
            {
                "a message timed out while the brokers answer".to_owned()
            }
            None => return,
        };
        let mut last = self.renewed.lock().expect("not poisoned");
        if last.is_some_and(|t| t.elapsed() < self.settings.publish_timeout) {
            return;
        }
        let mut slot = self.producer.write().expect("not poisoned");
        if Arc::ptr_eq(&slot, &current) {
            tracing::warn!(reason = %why, "replacing the Kafka producer");
            match producer(&self.config, &self.settings) {
                Ok(p) => {
                    *slot = Arc::new(p);
                    *last = Some(Instant::now());
                }
                Err(e) => tracing::error!(error = %e, "cannot start a new Kafka producer"),
            }
        }
    }

    /// Creates the topics that do not exist yet.
    async fn ensure_topics(&self, topics: &[(String, i32)]) -> Result<(), TopicError> {
        let missing: Vec<&(String, i32)> = {
            let known = self.known.lock().expect("not poisoned");
            topics.iter().filter(|(t, _)| !known.contains(t)).collect()
        };
        if missing.is_empty() || !self.settings.create_topics {
            return Ok(());
        }
        let retention: Vec<Option<String>> = missing
            .iter()
            .map(|(name, _)| {
                let compacted = self.compacted.iter().find(|(t, _)| t == name);
                compacted.map(|(_, keep)| keep.as_millis().to_string())
            })
            .collect();
        let new: Vec<NewTopic> = missing
            .iter()
            .zip(&retention)
            .map(|((name, partitions), retention)| {
                let topic = NewTopic::new(
                    name,
                    *partitions,
                    TopicReplication::Fixed(self.settings.replication_factor),
                );
                match retention {
                    // Segments roll as often as records expire, or retention could only
                    // delete a segment once it was full or a week old.
                    Some(ms) => topic
                        .set("cleanup.policy", "compact,delete")
                        .set("retention.ms", ms)
                        .set("segment.ms", ms),
                    None => topic,
                }
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(CHECK_TIMEOUT))
            .request_timeout(Some(CHECK_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new, &options)
            .await
            .map_err(TopicError::Admin)?;
        let mut known = self.known.lock().expect("not poisoned");
        for result in results {
            match result {
                Ok(name) => {
                    tracing::info!(topic = %name, "Kafka topic created");
                    known.insert(name);
                }
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(name);
                }
                Err((name, code)) => return Err(TopicError::Refused { name, code }),
            }
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.topics_ready.load(Ordering::SeqCst)
            && self.readers_unplaced.load(Ordering::SeqCst) == 0
    }

    /// Bumped whenever this replica is assigned notify partitions.
    pub fn assignments(&self) -> Arc<AtomicU64> {
        self.assignments.clone()
    }

    /// The client configuration, for the kafka_log limiter's own clients.
    pub fn client_config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// The subject prefix, which topics carry too.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Registers one of the pipeline's consumers: records of topic `spec.filter` (or, for the
    /// `notify.>` spec, of every other notify topic; for a reader of inbound events, of every
    /// topic its group reads) go to `tx`.
    pub fn consume(&self, spec: &ConsumerSpec, tx: mpsc::Sender<Delivery>) {
        match self.readers.get(&spec.durable) {
            Some(reader) => reader.register(spec, tx),
            None => self.routes.register(spec, tx),
        }
    }

    pub async fn publish(&self, msg: &Message) -> Result<Ack, BusError> {
        if !self.connected.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("Kafka brokers unreachable".into()));
        }
        if !self.topics_ready.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("Kafka topics not ready".into()));
        }
        if self.readers_unplaced.load(Ordering::SeqCst) > 0 {
            return Err(BusError::Unavailable(
                "Kafka readers of inbound events not placed yet".into(),
            ));
        }
        let window = self.settings.duplicate_window;
        if self.seen.lock().expect("not poisoned").contains(
            &msg.subject,
            &msg.id,
            Instant::now(),
            window,
        ) {
            return Ok(Ack { duplicate: true });
        }
        // A stalled broker must not hold the callback past the publish timeout here either.
        let timeout = self.settings.publish_timeout;
        let topic = [(msg.subject.clone(), self.settings.partitions)];
        match tokio::time::timeout(timeout, self.ensure_topics(&topic)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BusError::Unavailable(e.to_string())),
            Err(_) => return Err(BusError::Timeout(timeout)),
        }
        let key = record_key(&self.prefix, &self.keyed_by_name, &self.settings.keys, msg);
        let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
        for (name, value) in &msg.headers {
            let name = kafka_header_name(name);
            headers = headers.insert(Header {
                key: &name,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(&msg.subject)
            .key(key.as_bytes())
            .payload(msg.payload.as_ref())
            .headers(headers);
        let producer = self.producer();
        // librdkafka fails the message itself after message.timeout.ms (= publish_timeout);
        // the outer bound only guards against a report that never comes.
        let sent = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            producer.send(record, timeout),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                self.seen.lock().expect("not poisoned").insert(
                    &msg.subject,
                    &msg.id,
                    Instant::now(),
                    window,
                );
                Ok(Ack { duplicate: false })
            }
            Ok(Err((e, _))) => {
                self.renew_stuck_producer(e.rdkafka_error_code());
                Err(match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::MessageTimedOut) => BusError::Timeout(timeout),
                    Some(RDKafkaErrorCode::QueueFull) => {
                        BusError::Unavailable("Kafka producer queue is full".into())
                    }
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                        // Deleted behind our back: create it again next time.
                        self.known
                            .lock()
                            .expect("not poisoned")
                            .remove(&msg.subject);
                        BusError::Unavailable(format!("topic {} does not exist", msg.subject))
                    }
                    _ => BusError::Publish(e.to_string()),
                })
            }
            Err(_) => Err(BusError::Timeout(timeout)),
        }
    }

    /// Stops the consumer (storing and committing what was finished) and flushes the producer.
    pub async fn close(&self) {
        self.closing.trigger();
        let tasks = std::mem::take(&mut *self.consumer_tasks.lock().expect("not poisoned"));
        // The groups commit and leave side by side, within one bound.
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!("Kafka consumers did not stop in time");
        }
        let producer = self.producer();
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "flushing the Kafka producer at shutdown");
        }
    }
}

/// Checks the brokers every second and creates the topics the daemon needs; runs until
/// shutdown.
async fn keep(
    bus: Arc<KafkaBus>,
    needed: Vec<(String, i32)>,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    loop {
        let producer = bus.producer();
        let reachable = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, CHECK_TIMEOUT)
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| t.name().to_owned())
                        .collect::<Vec<_>>()
                })
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        match reachable {
            Ok(topics) => {
                if !bus.connected.swap(true, Ordering::SeqCst) {
                    tracing::info!(brokers = %bus.settings.brokers, "connected to Kafka");
                }
                metrics.bus_connected("kafka", true);
                // Replaced, not extended: a broker that lost its topics (restarted without
                // persistent storage, or topics deleted) gets them created again.
                *bus.known.lock().expect("not poisoned") = topics.into_iter().collect();
                match bus.ensure_topics(&needed).await {
                    Ok(()) => bus.topics_ready.store(true, Ordering::SeqCst),
                    Err(e) => {
                        bus.topics_ready.store(false, Ordering::SeqCst);
                        tracing::warn!(error = %e, "cannot create Kafka topics; retrying");
                    }
                }
            }
            Err(e) => {
                if bus.connected.swap(false, Ordering::SeqCst) {
                    tracing::warn!(error = %e, "Kafka brokers unreachable");
                }
                metrics.bus_connected("kafka", false);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The settings every client shares: brokers, client id, and the user's properties.
fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", &settings.client_id);
    for (key, value) in &settings.properties {
        config.set(key, value.expose());
    }
    config
}

fn producer(config: &ClientConfig, settings: &KafkaSettings) -> Result<FutureProducer, BusError> {
    producer_config(config, settings.publish_timeout)
        .create()
        .map_err(|e| BusError::Unavailable(format!("creating the Kafka producer: {e}")))
}

fn producer_config(config: &ClientConfig, publish_timeout: Duration) -> ClientConfig {
    let mut config = config.clone();
    // Every callback waits for its delivery report before the platform is answered, so
    // librdkafka's default 5 ms of lingering for a batch is 5 ms added to each answer (bench/,
    // 16 connections to tansu: p50 7.4 ms against 3.8 ms with none). No lingering at all is
    // worse under load: librdkafka then wakes its broker thread for every record, and that
    // thread's poll() and clock reads took 40 % of the daemon's CPU (perf). With 1 ms, same
    // run, 16/64/256 connections: 7,630/20,963/35,443 callbacks/s against 5,227/13,044/27,383
    // with 0, p50 lower at each, daemon CPU per callback 77/42/33 µs against 142/66/42.
    // A configured linger wins.
    if config.get("linger.ms").is_none() && config.get("queue.buffering.max.ms").is_none() {
        config.set("linger.ms", "1");
    }
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            publish_timeout.as_millis().to_string(),
        );
    config
}

/// Why a topic could not be created.
#[derive(Debug, thiserror::Error)]
enum TopicError {
    #[error("the admin request failed: {0}")]
    Admin(#[source] KafkaError),
    #[error("creating topic {name}: {code}")]
    Refused {
        name: String,
        code: RDKafkaErrorCode,
    },
}

/// The record key: the rest of the subject after a `keyed_by_name` prefix (the daemon's own
/// per-name topics: one name, one partition, one replica), the business key of the first `keys` pattern (most specific
/// first, see the configuration) matching the subject whose JSON pointer finds a string or
/// number in the body, or else `ce-id`.
fn record_key(
    prefix: &str,
    keyed_by_name: &[String],
    keys: &[(String, String)],
    msg: &Message,
) -> String {
    let subject = match prefix {
        "" => msg.subject.as_str(),
        p => msg
            .subject
            .strip_prefix(p)
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(&msg.subject),
    };
    for by_name in keyed_by_name {
        if let Some(name) = subject.strip_prefix(by_name.as_str()) {
            return name.to_owned();
        }
    }
    for (pattern, pointer) in keys {
        if super::subject_matches(pattern, subject) {
            let value = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()
                .and_then(|v| v.pointer(pointer).cloned());
            match value {
                Some(serde_json::Value::String(s)) if !s.is_empty() => return s,
                Some(v @ serde_json::Value::Number(_)) => return v.to_string(),
                _ => {}
            }
        }
    }
    msg.id.clone()
}

/// CloudEvents' Kafka binding spells attributes `ce_id`; the other engines `ce-id`.
fn kafka_header_name(name: &str) -> String {
    match name.strip_prefix("ce-") {
        Some(attr) => format!("ce_{attr}"),
        None => name.to_owned(),
    }
}

/// A record's headers as the pipeline reads them: names in the `ce-` spelling, values as text.
pub fn record_headers<M: rdkafka::message::Message>(m: &M) -> Vec<(String, String)> {
    use rdkafka::message::Headers as _;
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        internal_header_name(h.key),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pipeline reads the `ce-` spelling whatever the engine.
pub fn internal_header_name(name: &str) -> String {
    match name.strip_prefix("ce_") {
        Some(attr) => format!("ce-{attr}"),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_lingers_1_ms_unless_configured() {
        let timeout = Duration::from_secs(5);
        let plain = producer_config(&ClientConfig::new(), timeout);
        assert_eq!(plain.get("linger.ms"), Some("1"));
        assert_eq!(plain.get("acks"), Some("all"));
        assert_eq!(plain.get("enable.idempotence"), Some("true"));
        assert_eq!(plain.get("message.timeout.ms"), Some("5000"));

        let mut own = ClientConfig::new();
        own.set("linger.ms", "20");
        assert_eq!(producer_config(&own, timeout).get("linger.ms"), Some("20"));
        // The older name of the same setting counts as configuring it.
        let mut old = ClientConfig::new();
        old.set("queue.buffering.max.ms", "0");
        let old = producer_config(&old, timeout);
        assert_eq!(old.get("linger.ms"), None);
        assert_eq!(old.get("queue.buffering.max.ms"), Some("0"));
    }

    #[test]
    fn record_keys() {
        let by_name = ["notify.".to_owned(), "dlq.notify.".to_owned()];
        let keys = vec![
            (
                "dingtalk.bpms_instance_change".to_owned(),
                "/processInstanceId".to_owned(),
            ),
            ("dingtalk.*".to_owned(), "/processInstanceId".to_owned()),
            ("dingtalk.>".to_owned(), "/corpId".to_owned()),
        ];
        let msg = |subject: &str, body: &str| Message {
            subject: subject.into(),
            id: "ce1".into(),
            headers: Vec::new(),
            payload: bytes::Bytes::copy_from_slice(body.as_bytes()),
        };
        let approval = r#"{"processInstanceId":"p-1","corpId":"ding1"}"#;
        let change = "dingtalk.bpms_instance_change";
        assert_eq!(
            record_key("", &by_name, &keys, &msg(change, approval)),
            "p-1"
        );
        assert_eq!(
            record_key(
                "prod",
                &by_name,
                &keys,
                &msg(&format!("prod.{change}"), approval)
            ),
            "p-1"
        );
        assert_eq!(
            record_key(
                "",
                &by_name,
                &keys,
                &msg("dingtalk.bpms_task_change", approval)
            ),
            "p-1"
        );
        // The patterns that match find nothing until the last one.
        assert_eq!(
            record_key("", &by_name, &keys, &msg(change, r#"{"corpId":7}"#)),
            "7"
        );
        assert_eq!(
            record_key("", &by_name, &keys, &msg("lark.im.message", approval)),
            "ce1"
        );
        assert_eq!(
            record_key(
                "",
                &by_name,
                &keys,
                &msg("dingtalk.user_add_org", "not json")
            ),
            "ce1"
        );
        assert_eq!(
            record_key("", &by_name, &keys, &msg("notify.ops", approval)),
            "ops"
        );
        assert_eq!(
            record_key("prod", &by_name, &keys, &msg("prod.dlq.notify.ops", "")),
            "ops"
        );
    }

    #[test]
    fn header_names_follow_the_kafka_binding() {
        assert_eq!(kafka_header_name("ce-id"), "ce_id");
        assert_eq!(kafka_header_name("content-type"), "content-type");
        assert_eq!(internal_header_name("ce_type"), "ce-type");
        assert_eq!(internal_header_name("imbridge-app"), "imbridge-app");
    }
}
