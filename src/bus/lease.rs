//! Leases: one replica at a time does a job that must not run twice at once (polling a
//! platform for what it failed to push, which hands each entry out once). The holder keeps its
//! lease by renewing it well within its time to live; a holder that dies or hangs loses it
//! when that time runs out, and another replica takes over.
//!
//! - In-process bus: one process, always the holder.
//! - NATS: the one message of a JetStream stream whose `max_age` is the time to live, taken
//!   by publishing it only if there is none (`Nats-Expected-Last-Subject-Sequence: 0`) and
//!   renewed by publishing again at the sequence held (compare-and-set), as the `nats_kv`
//!   limiter keeps its logs. The server removes a message nobody renews: no clocks are
//!   compared.
//! - Kafka: membership of a consumer group on a topic of one partition: the member the
//!   partition is assigned to holds the lease. The group coordinator moves it when a member
//!   leaves or stops polling (`session.timeout.ms`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use super::Bus;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// How a lease is kept.
pub struct Lease {
    name: String,
    inner: Inner,
}

enum Inner {
    Memory,
    Nats(Box<NatsLease>),
    Kafka { held: Arc<AtomicBool> },
}

struct NatsLease {
    js: async_nats::jetstream::Context,
    config: stream::Config,
    /// The stream is in place.
    ready: bool,
    /// The sequence of our message while we hold the lease.
    sequence: Option<u64>,
    holder: String,
}

impl Lease {
    /// A lease named `name` (e.g. `recover.dingtalk.main`), lost `ttl` after its last renewal.
    /// On Kafka it starts the group member at once, supervised, until `shutdown`; its topic
    /// ([`topic`]) must be in the bus's layout.
    pub fn new(
        bus: &Bus,
        name: &str,
        ttl: Duration,
        supervisor: &Supervisor,
        shutdown: &Shutdown,
    ) -> Lease {
        let holder = format!("{}-{}", hostname(), std::process::id());
        let inner = if let Some(nats) = bus.nats() {
            let (storage, replicas) = nats.storage();
            Inner::Nats(Box::new(NatsLease {
                js: nats.jetstream().clone(),
                // A stream per lease, as each has its own time to live.
                config: stream::Config {
                    name: format!("imbridge_lease_{}", name.replace(['.', ' '], "_")),
                    subjects: vec![format!("imbridge_lease.{name}")],
                    description: Some(
                        "an imbridge lease: which replica does what only one may".into(),
                    ),
                    max_messages_per_subject: 1,
                    max_age: ttl,
                    storage,
                    num_replicas: replicas,
                    ..Default::default()
                },
                ready: false,
                sequence: None,
                holder,
            }))
        } else if let Some(kafka) = bus.kafka() {
            let held = Arc::new(AtomicBool::new(false));
            let topic = super::with_prefix(kafka.prefix(), &topic(name));
            let group = format!("{}-lease-{name}", kafka.settings().group_id);
            let mut config = kafka.client_config().clone();
            let session = session_ms(ttl);
            config
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("session.timeout.ms", session.to_string())
                .set("heartbeat.interval.ms", (session / 3).to_string());
            let (held2, stop) = (held.clone(), shutdown.clone());
            // A new group member after a panic: the coordinator assigns the partition again.
            supervisor.spawn(format!("kafka_lease:{name}"), shutdown.clone(), move || {
                let (config, topic, held, stop) =
                    (config.clone(), topic.clone(), held2.clone(), stop.clone());
                async move {
                    let member =
                        tokio::task::spawn_blocking(move || member(config, topic, held, stop));
                    if let Err(e) = member.await {
                        if e.is_panic() {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                }
            });
            Inner::Kafka { held }
        } else {
            Inner::Memory
        };
        Lease {
            name: name.to_owned(),
            inner,
        }
    }

    /// Whether this replica holds the lease now, taking or renewing it as it can. Call it
    /// more often than the time to live (before each step of the job).
    pub async fn hold(&mut self) -> bool {
        match &mut self.inner {
            Inner::Memory => true,
            Inner::Kafka { held } => held.load(Ordering::SeqCst),
            Inner::Nats(lease) => lease.hold(&self.name).await,
        }
    }

    /// Gives the lease up at once (shutdown), so another replica need not wait out its time
    /// to live.
    pub async fn release(&mut self) {
        if let Inner::Nats(lease) = &mut self.inner {
            if lease.sequence.take().is_some() {
                let subject = lease.config.subjects[0].clone();
                if let Ok(stream) = lease.js.get_stream(&lease.config.name).await {
                    let _ = stream.purge().filter(subject).await;
                }
            }
        }
    }
}

impl NatsLease {
    async fn hold(&mut self, name: &str) -> bool {
        if !self.ready {
            match self.js.create_or_update_stream(self.config.clone()).await {
                Ok(_) => self.ready = true,
                Err(e) => {
                    tracing::warn!(lease = name, error = %e, "cannot put the lease's stream in place");
                    self.sequence = None;
                    return false;
                }
            }
        }
        let mut headers = async_nats::HeaderMap::new();
        let expected = self.sequence.unwrap_or(0).to_string();
        headers.insert("Nats-Expected-Last-Subject-Sequence", expected.as_str());
        let subject = self.config.subjects[0].clone();
        let value = bytes::Bytes::from(self.holder.clone());
        let ack = async {
            self.js
                .publish_with_headers(subject, headers, value)
                .await?
                .await
        };
        match ack.await {
            Ok(ack) => {
                if self.sequence.is_none() {
                    tracing::info!(lease = name, "lease taken");
                }
                self.sequence = Some(ack.sequence);
                true
            }
            Err(e) => {
                if e.kind() != PublishErrorKind::WrongLastSequence {
                    tracing::warn!(lease = name, error = %e, "cannot renew the lease");
                    // The stream may be gone (a server that lost it): put it back next time.
                    self.ready = false;
                }
                if self.sequence.take().is_some() {
                    tracing::warn!(lease = name, "lease lost");
                }
                false
            }
        }
    }
}

/// The Kafka topic (without the bus prefix) whose one partition is the lease `name`: the
/// daemon puts it in the bus layout, so it exists before anyone joins.
pub fn topic(name: &str) -> String {
    format!("imbridge.lease.{name}")
}

/// The group session timeout: the lease's time to live, within what brokers accept by default
/// (`group.min.session.timeout.ms` 6 s; 5 min here, well below the 30 min maximum).
fn session_ms(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(6_000, 300_000) as u64
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "imbridge".to_owned())
}

/// The Kafka group member: polls (which keeps it in the group) and says whether the lease
/// topic's partition is assigned to it; leaves the group at `shutdown`.
fn member(config: ClientConfig, topic: String, held: Arc<AtomicBool>, shutdown: Shutdown) {
    {
        let consumer: BaseConsumer = loop {
            match config.create() {
                Ok(c) => break c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the Kafka lease member; retrying");
                    if shutdown.is_triggered() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        if let Err(e) = consumer.subscribe(&[&topic]) {
            tracing::error!(error = %e, topic, "cannot join the Kafka lease group");
            return;
        }
        while !shutdown.is_triggered() {
            // Records are not read (nothing is published there): polling serves the group
            // protocol and its heartbeats.
            let _ = consumer.poll(Duration::from_millis(200));
            let assigned = consumer
                .assignment()
                .map(|a| a.count() > 0)
                .unwrap_or(false);
            if held.swap(assigned, Ordering::SeqCst) != assigned {
                tracing::info!(topic, held = assigned, "Kafka lease changed hands");
            }
        }
        held.store(false, Ordering::SeqCst);
        consumer.unsubscribe();
    }
}
