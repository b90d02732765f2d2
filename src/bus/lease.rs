//! Leases: one replica at a time does a job that must not run twice at once (polling a
//! platform for what it failed to push, which hands each entry out once). The holder keeps its
//! lease by renewing it well within its time to live; a holder that dies or hangs loses it
//! when that time runs out, and another replica takes over.
//!
//! - In-process bus: one process, always the holder.
//! - NATS: an entry of a JetStream key-value bucket whose `max_age` is the time to live,
//!   taken with `create` (only if absent) and renewed with `update` at the revision held
//!   (compare-and-set). The server removes an entry nobody renews: no clocks are compared.
//! - Kafka: membership of a consumer group on a topic of one partition: the member the
//!   partition is assigned to holds the lease. The group coordinator moves it when a member
//!   leaves or stops polling (`session.timeout.ms`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
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
    bucket_config: kv::Config,
    store: Option<kv::Store>,
    /// The revision of our entry while we hold it.
    revision: Option<u64>,
    holder: String,
}

/// The key of the holder's entry in a lease's NATS bucket.
const NATS_KEY: &str = "holder";

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
                // A bucket per lease, as each has its own time to live.
                bucket_config: kv::Config {
                    bucket: format!("imbridge_lease_{}", name.replace(['.', ' '], "_")),
                    description: "imbridge leases: which replica does what only one may".into(),
                    history: 1,
                    max_age: ttl,
                    storage,
                    num_replicas: replicas,
                    ..Default::default()
                },
                store: None,
                revision: None,
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
            Inner::Nats(lease) => {
                let NatsLease {
                    js,
                    bucket_config,
                    store,
                    revision,
                    holder,
                } = lease.as_mut();
                let name = self.name.as_str();
                let key = NATS_KEY;
                let kv = match store {
                    Some(kv) => kv,
                    None => match open_bucket(js, bucket_config).await {
                        Ok(kv) => store.insert(kv),
                        Err(e) => {
                            tracing::warn!(lease = name, error = %e, "cannot open the lease bucket");
                            *revision = None;
                            return false;
                        }
                    },
                };
                let value = bytes::Bytes::from(holder.clone());
                let result = match *revision {
                    Some(r) => kv.update(key, value, r).await.map_err(|e| e.to_string()),
                    None => kv.create(key, value).await.map_err(|e| e.to_string()),
                };
                match result {
                    Ok(r) => {
                        if revision.is_none() {
                            tracing::info!(lease = name, "lease taken");
                        }
                        *revision = Some(r);
                        true
                    }
                    Err(e) => {
                        if revision.take().is_some() {
                            tracing::warn!(lease = name, error = %e, "lease lost");
                        }
                        false
                    }
                }
            }
        }
    }

    /// Gives the lease up at once (shutdown), so another replica need not wait out its time
    /// to live.
    pub async fn release(&mut self) {
        if let Inner::Nats(lease) = &mut self.inner {
            let NatsLease {
                store: Some(kv),
                revision,
                ..
            } = lease.as_mut()
            else {
                return;
            };
            if let Some(r) = revision.take() {
                let _ = kv.purge_expect_revision(NATS_KEY, Some(r)).await;
            }
        }
    }
}

/// The lease's bucket: made when missing, or the one there (made by a replica whose time to
/// live may differ: the first one made stands until the bucket is deleted).
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    config: &kv::Config,
) -> Result<kv::Store, String> {
    match js.create_key_value(config.clone()).await {
        Ok(kv) => Ok(kv),
        Err(created) => js
            .get_key_value(config.bucket.clone())
            .await
            .map_err(|e| format!("{created}; {e}")),
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
