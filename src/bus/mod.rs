//! The message bus: one small interface, one engine per file.
//!
//! Every engine carries the same contract (DESIGN.md §1): subject `<platform>.<event_type>`
//! (optionally prefixed), the platform's payload as the body, CloudEvents attributes as headers,
//! and a publish that returns only once the bus has the message. `ce-id` is the dedupe key.

pub mod kafka;
pub mod lease;
pub mod memory;
pub mod nats;
pub mod tail;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// Why a publish failed. Every variant means "not stored": the platform must be told to retry.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Not connected, or the stream is not (yet) in place.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// No acknowledgement within the publish timeout; the message may or may not be stored,
    /// and a retry with the same id is deduplicated.
    #[error("publish not acknowledged within {0:?}")]
    Timeout(std::time::Duration),
    /// The bus refused or lost the publish.
    #[error("publish failed: {0}")]
    Publish(String),
}

impl BusError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            BusError::Unavailable(_) => "unavailable",
            BusError::Timeout(_) => "timeout",
            BusError::Publish(_) => "error",
        }
    }
}

/// CloudEvents 1.0 attributes of one event plus the bridge's own two (app and tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    /// Stable across platform retries; the dedupe key.
    pub id: String,
    /// `<platform>/<app>`.
    pub source: String,
    /// The subject without prefix, e.g. `dingtalk.bpms_instance_change`.
    pub ty: String,
    pub time: SystemTime,
    pub content_type: &'static str,
    /// The configured app name.
    pub app: String,
    /// The platform's tenant id (DingTalk corpId, WeCom corpId, Lark tenant_key) when known.
    pub tenant: Option<String>,
}

/// Header names of the bridge's own attributes, the same on every engine.
pub const HEADER_APP: &str = "imbridge-app";
pub const HEADER_TENANT: &str = "imbridge-tenant";
/// On an event fetched from a platform's list of what it failed to push: `true`.
pub const HEADER_RECOVERED: &str = "imbridge-recovered";

impl CloudEvent {
    /// The headers in CloudEvents binary content mode. `ce_prefix` is `ce-` for NATS (and the
    /// memory engine, which mirrors it) and `ce_` for Kafka's protocol binding.
    pub fn headers(&self, ce_prefix: &str) -> Vec<(String, String)> {
        let mut h = vec![
            (format!("{ce_prefix}specversion"), "1.0".to_owned()),
            (format!("{ce_prefix}id"), self.id.clone()),
            (format!("{ce_prefix}source"), self.source.clone()),
            (format!("{ce_prefix}type"), self.ty.clone()),
            (
                format!("{ce_prefix}time"),
                humantime::format_rfc3339_millis(self.time).to_string(),
            ),
            ("content-type".to_owned(), self.content_type.to_owned()),
            (HEADER_APP.to_owned(), self.app.clone()),
        ];
        if let Some(t) = &self.tenant {
            h.push((HEADER_TENANT.to_owned(), t.clone()));
        }
        for (_, value) in &mut h {
            if let Cow::Owned(clean) = clean_header_value(value) {
                *value = clean;
            }
        }
        h
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Full subject, prefix included.
    pub subject: String,
    /// The dedupe key (`Nats-Msg-Id` on NATS, the record key on Kafka).
    pub id: String,
    /// Headers, in the NATS spelling (`ce-id`, …); the Kafka engine writes `ce_id`.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Message {
    /// A CloudEvent in binary content mode.
    pub fn event(subject: String, event: &CloudEvent, payload: Bytes) -> Message {
        Message {
            subject,
            id: event.id.clone(),
            headers: event.headers("ce-"),
            payload,
        }
    }
}

/// A message handed to a consumer. It stays on the bus until acknowledged; a negative
/// acknowledgement (or a replica dying) brings it back later.
pub struct Delivery {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    /// When the bus received it, for end-to-end latency.
    pub published: SystemTime,
    /// How many times the bus has handed it out (1 the first time).
    pub delivered: u64,
    acker: Acker,
}

enum Acker {
    Memory(memory::Requeue),
    Nats(Box<async_nats::jetstream::Message>),
    Kafka(Box<kafka::consumer::KafkaAck>),
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Hands a copy back to the consumer's queue after `delay`, for the engines whose negative
    /// acknowledgement is local (memory, Kafka).
    fn redeliver_later(&self, acker: Acker, tx: mpsc::Sender<Delivery>, delay: Duration) {
        let again = Delivery {
            subject: self.subject.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
            published: self.published,
            delivered: self.delivered + 1,
            acker,
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(again).await;
        });
    }

    /// The headers a copy of this message carries (a forward, a dead letter): all but the
    /// bus's own control headers (message id, expected sequences, TTL, rollup), which belonged
    /// to the original and would make a new publish fail or misbehave.
    pub fn copied_headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("nats-"))
            .cloned()
            .collect()
    }

    /// The publisher's message id (`ce-id`, or `Nats-Msg-Id`), when it gave one.
    pub fn id(&self) -> Option<&str> {
        self.header("ce-id").or_else(|| self.header("Nats-Msg-Id"))
    }

    /// Whether this replica still owns the message. On Kafka, a record whose partition moved to
    /// another replica is that replica's to deliver: sending it here too would exceed the
    /// target's limit and deliver it twice.
    pub fn is_current(&self) -> bool {
        match &self.acker {
            Acker::Kafka(k) => k.tracker.is_owned(),
            Acker::Memory(_) | Acker::Nats(_) => true,
        }
    }

    /// Done with it: delivered or dead-lettered.
    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Memory(_) => Ok(()),
            Acker::Kafka(k) => {
                k.tracker.done(k.offset);
                Ok(())
            }
            Acker::Nats(m) => m.ack().await.map_err(|e| BusError::Publish(e.to_string())),
        }
    }

    /// Not now: hand it out again after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        match &self.acker {
            Acker::Memory(r) => {
                r.requeue(self, delay);
                Ok(())
            }
            Acker::Kafka(k) => {
                k.requeue(self, delay);
                Ok(())
            }
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| BusError::Publish(e.to_string())),
        }
    }

    /// Still working on it: keeps the bus from redelivering it to another replica.
    pub async fn progress(&self) -> Result<(), BusError> {
        match &self.acker {
            // Kafka hands a record out once per assignment; only a rebalance takes it away.
            Acker::Memory(_) | Acker::Kafka(_) => Ok(()),
            Acker::Nats(m) => m
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(|e| BusError::Publish(e.to_string())),
        }
    }
}

/// A durable consumer: the bus creates it (before it reports ready, so no message published
/// afterwards finds nobody interested) and [`Bus::consume`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub durable: String,
    /// Subject filter, prefix included.
    pub filter: String,
    /// Messages handed out and not yet acknowledged, across all replicas.
    pub max_pending: usize,
    /// The stream it reads (NATS).
    pub stream: String,
    /// Redelivered when not acknowledged (nor kept alive with progress acks) within this.
    pub ack_wait: Duration,
    /// A reader of inbound events: start, when first created, with the messages stored from
    /// then on rather than all the stream holds (the in-process bus only ever has new ones):
    /// a reader added to a stream that keeps history must not act on the past. On Kafka such
    /// a reader is a consumer group of its own, since other readers read the same topics.
    pub new_only: bool,
}

/// What the bus keeps in place for the daemon, told by the daemon as neutral specs: the bus
/// itself knows nothing of what its users do with them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Subjects of the inbound stream (NATS: `bus.nats.stream`), prefix included.
    pub inbound: Vec<String>,
    /// Further streams (NATS).
    pub streams: Vec<StreamSpec>,
    /// Topics that must exist before the daemon is ready (Kafka; one partition each, so that
    /// one replica at a time owns each).
    pub topics: Vec<String>,
    /// Topics (among `topics`) that keep only the latest record of each key, each for at
    /// most the given time (Kafka: `cleanup.policy = compact,delete`, `retention.ms`), set
    /// when the bus creates them.
    pub compacted: Vec<(String, Duration)>,
    /// The durable consumers the daemon reads; created before the bus reports ready.
    pub consumers: Vec<ConsumerSpec>,
    /// Subject prefixes (without the bus prefix) whose records are keyed by the rest of the
    /// subject (Kafka): all the records of one name in one partition, in order.
    pub keyed_by_name: Vec<String>,
}

/// A stream (NATS) for some of the daemon's subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    /// Prefix included.
    pub subjects: Vec<String>,
    /// Keep a message only until every consumer interested in it acknowledged it (else until
    /// the stream's age and size limits).
    pub interest: bool,
}

/// The deliveries of one subscription, whatever the engine.
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    placed: tokio::sync::watch::Receiver<bool>,
}

impl Consumer {
    /// Completes once the bus holds this subscription, so that what is published from then
    /// on reaches it (a NATS durable is created in the background; the other engines register
    /// at once). A reload waits for this before it hands the new target its messages.
    pub fn placed(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut placed = self.placed.clone();
        async move { placed.wait_for(|p| *p).await.is_ok() }
    }

    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Stops receiving and hands back, at once, what was already received but not yet taken,
    /// so that another replica gets it without waiting for `ack_wait`.
    pub async fn close(&mut self) {
        self.rx.close();
        while let Ok(d) = self.rx.try_recv() {
            let _ = d.nak(Duration::ZERO).await;
        }
    }
}

/// A publish the bus has acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The bus already had a message with this id inside its duplicate window.
    pub duplicate: bool,
}

/// The bus the daemon publishes to: the configured engine plus the metrics every publish
/// records, whatever the engine.
pub struct Bus {
    engine: Engine,
    metrics: Metrics,
}

/// Where events go: the subject prefix and the engine with its settings.
#[derive(Debug, Clone)]
pub struct BusSettings {
    pub subject_prefix: String,
    pub engine: EngineSettings,
}

#[derive(Debug, Clone)]
pub enum EngineSettings {
    Memory(memory::MemorySettings),
    Nats(Box<nats::NatsSettings>),
    Kafka(Box<kafka::KafkaSettings>),
}

/// The engines. A small enum, not a trait object: there are few and they are known.
pub enum Engine {
    Memory(Box<memory::MemoryBus>),
    Nats(Box<nats::NatsBus>),
    Kafka(Arc<kafka::KafkaBus>),
}

impl Bus {
    /// Starts the configured engine. Remote engines connect in the background and report
    /// readiness through [`Bus::is_ready`]; starting never waits for a broker.
    pub async fn start(
        settings: &BusSettings,
        layout: &Layout,
        metrics: Metrics,
        supervisor: &Supervisor,
        shutdown: Shutdown,
    ) -> Result<Bus, BusError> {
        let engine = match &settings.engine {
            EngineSettings::Memory(m) => {
                Engine::Memory(Box::new(memory::MemoryBus::new(m, layout, metrics.clone())))
            }
            EngineSettings::Nats(n) => Engine::Nats(Box::new(
                nats::NatsBus::start(n, layout, metrics.clone(), shutdown).await?,
            )),
            EngineSettings::Kafka(k) => Engine::Kafka(kafka::KafkaBus::start(
                k,
                layout,
                &settings.subject_prefix,
                metrics.clone(),
                supervisor,
                shutdown,
            )?),
        };
        Ok(Bus { engine, metrics })
    }

    /// Reads the durable consumer `spec`, shared by every replica: each message goes to one of
    /// them and stays on the bus until acknowledged.
    pub fn consume(&self, spec: &ConsumerSpec, shutdown: Shutdown) -> Consumer {
        let (tx, rx) = mpsc::channel(spec.max_pending.max(1));
        let (placed_tx, placed) = tokio::sync::watch::channel(false);
        match &self.engine {
            Engine::Memory(b) => {
                b.queue(&spec.filter, tx);
                placed_tx.send_replace(true);
            }
            Engine::Nats(b) => b.consume(spec, tx, placed_tx, shutdown),
            Engine::Kafka(b) => {
                b.consume(spec, tx);
                placed_tx.send_replace(true);
            }
        }
        Consumer { rx, placed }
    }

    /// The NATS engine, for what only it offers (the key-value limiter).
    pub fn nats(&self) -> Option<&nats::NatsBus> {
        match &self.engine {
            Engine::Nats(b) => Some(b),
            _ => None,
        }
    }

    /// The Kafka engine, for what only it offers (the log limiter).
    pub fn kafka(&self) -> Option<&Arc<kafka::KafkaBus>> {
        match &self.engine {
            Engine::Kafka(b) => Some(b),
            _ => None,
        }
    }

    pub fn engine(&self) -> &'static str {
        match &self.engine {
            Engine::Memory(_) => "memory",
            Engine::Nats(_) => "nats",
            Engine::Kafka(_) => "kafka",
        }
    }

    /// The in-process engine, for in-process subscribers.
    pub fn memory(&self) -> Option<&memory::MemoryBus> {
        match &self.engine {
            Engine::Memory(m) => Some(m.as_ref()),
            _ => None,
        }
    }

    /// Publishes and waits for the bus to acknowledge it.
    pub async fn publish(&self, msg: &Message) -> Result<Ack, BusError> {
        let started = std::time::Instant::now();
        let result = match &self.engine {
            Engine::Memory(b) => b.publish(msg),
            // Boxed, each its own size: inline, every caller's future would be as large as the
            // largest engine's (Kafka's, about 2.4 KiB, twice NATS's), whichever engine runs.
            Engine::Nats(b) => Box::pin(b.publish(msg)).await,
            Engine::Kafka(b) => Box::pin(b.publish(msg)).await,
        };
        let outcome = match &result {
            Ok(Ack { duplicate: false }) => "stored",
            Ok(Ack { duplicate: true }) => "duplicate",
            Err(e) => e.label(),
        };
        self.metrics
            .bus_published(self.engine(), outcome, started.elapsed());
        result
    }

    /// Publishes, retrying with backoff while the bus refuses; `false` when `shutdown` came
    /// first. For copies made while handling a delivery (forwards, dead letters): retried here
    /// rather than by handing the delivery back, since a redelivery would repeat what was
    /// already done for it (a send to the platform, say).
    pub async fn publish_until_stored(&self, msg: &Message, shutdown: &Shutdown) -> bool {
        let mut attempt = 0;
        loop {
            match self.publish(msg).await {
                Ok(_) => return true,
                Err(e) => {
                    attempt += 1;
                    tracing::error!(subject = %msg.subject, error = %e, attempt, "cannot publish yet; retrying");
                    if !crate::backoff::republish_wait(attempt, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// A live tail of what is published on subjects matching `pattern` (prefix included), at
    /// most `capacity` messages behind (see [`tail`]).
    pub async fn tail(&self, pattern: &str, capacity: usize) -> Result<tail::Tail, BusError> {
        tail::start(&self.engine, pattern, capacity).await
    }

    /// Connected and ready to store (streams in place).
    pub fn is_ready(&self) -> bool {
        match &self.engine {
            Engine::Memory(_) => true,
            Engine::Nats(b) => b.is_ready(),
            Engine::Kafka(b) => b.is_ready(),
        }
    }

    /// Flushes what is buffered; called once at the end of a shutdown.
    pub async fn close(&self) {
        match &self.engine {
            Engine::Memory(_) => {}
            Engine::Nats(b) => b.close().await,
            Engine::Kafka(b) => b.close().await,
        }
    }
}

/// A header value as every engine can carry it: control characters (CR and LF above all,
/// which would split a header, and which the NATS client refuses with a panic) become spaces.
/// Values derived from what a platform sent (its tenant id) pass through here.
pub fn header_value(value: &str) -> String {
    clean_header_value(value).into_owned()
}

/// [`header_value`] without a copy when there is nothing to replace, as for nearly every
/// value: every event publishes about ten headers.
pub fn clean_header_value(value: &str) -> Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(
        value
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

/// A valid subject token and Kafka topic part: non-empty `[A-Za-z0-9_-]`.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Makes a platform event type safe as subject tokens: characters outside `[A-Za-z0-9_.-]`
/// become `_`, and empty tokens (leading, trailing or doubled dots) are dropped, so that
/// `im.message.receive_v1` stays as it is and `a b..c*` becomes `a_b.c_`.
pub fn sanitize_event_type(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let joined = mapped
        .split('.')
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    if joined.is_empty() {
        "unknown".to_owned()
    } else {
        joined
    }
}

/// Prepends the configured prefix (if any) with a dot.
pub fn with_prefix(prefix: &str, subject: &str) -> String {
    if prefix.is_empty() {
        subject.to_owned()
    } else {
        format!("{prefix}.{subject}")
    }
}

/// NATS subject matching: `*` matches one token, `>` one or more trailing tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_carry_no_control_characters() {
        assert_eq!(header_value("ding1\r\nX-Evil: 1\0"), "ding1  X-Evil: 1 ");
        assert_eq!(header_value("企业 ok"), "企业 ok");
        assert!(matches!(clean_header_value("企业 ok"), Cow::Borrowed(_)));
    }

    #[test]
    fn sanitizes_event_types() {
        assert_eq!(
            sanitize_event_type("bpms_instance_change"),
            "bpms_instance_change"
        );
        assert_eq!(
            sanitize_event_type("im.message.receive_v1"),
            "im.message.receive_v1"
        );
        assert_eq!(sanitize_event_type("a b..c*"), "a_b.c_");
        assert_eq!(sanitize_event_type(".>."), "_");
        assert_eq!(sanitize_event_type(""), "unknown");
        assert_eq!(sanitize_event_type("..."), "unknown");
        assert_eq!(sanitize_event_type("审批"), "__");
    }

    #[test]
    fn matches_subjects_like_nats() {
        assert!(subject_matches("dingtalk.>", "dingtalk.user_add_org"));
        assert!(subject_matches("dingtalk.>", "dingtalk.a.b"));
        assert!(!subject_matches("dingtalk.>", "dingtalk"));
        assert!(subject_matches("*.user_add_org", "dingtalk.user_add_org"));
        assert!(!subject_matches("dingtalk.*", "dingtalk.a.b"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }

    #[test]
    fn cloudevent_headers_in_both_spellings() {
        let ev = CloudEvent {
            id: "id1".into(),
            source: "dingtalk/main".into(),
            ty: "dingtalk.user_add_org".into(),
            time: std::time::UNIX_EPOCH,
            content_type: "application/json",
            app: "main".into(),
            tenant: Some("dingcorp".into()),
        };
        let h = ev.headers("ce-");
        assert!(h.contains(&("ce-id".into(), "id1".into())));
        assert!(h.contains(&("ce-time".into(), "1970-01-01T00:00:00.000Z".into())));
        assert!(h.contains(&(HEADER_TENANT.into(), "dingcorp".into())));
        assert!(ev
            .headers("ce_")
            .contains(&("ce_type".into(), "dingtalk.user_add_org".into())));
    }
}
