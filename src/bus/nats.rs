//! NATS JetStream. On start the inbound stream is created or updated; a publish carries the
//! CloudEvents headers and `Nats-Msg-Id` = `ce-id` (so JetStream's duplicate window drops
//! platform retries) and returns only after the PubAck.
//!
//! The client reconnects forever with a capped backoff. While it is disconnected, or the stream
//! is not in place, [`NatsBus::is_ready`] is false and publishes fail at once, so the platform
//! gets a 503 and retries instead of waiting out its own deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use tokio::sync::Notify;

use super::{Ack, BusError, ConsumerSpec, Delivery, Layout, Message};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shutdown::Shutdown;

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_ready: Arc<AtomicBool>,
    /// Wakes the stream keeper to (re)create the stream.
    recheck: Arc<Notify>,
    publish_timeout: Duration,
    max_delay: Duration,
    memory_storage: bool,
    replicas: usize,
}

/// `[bus.nats]`, validated.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub client_name: String,
    pub credentials_file: Option<String>,
    pub user_password: Option<(String, Secret)>,
    pub token: Option<Secret>,
    pub stream: String,
    pub memory_storage: bool,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    pub publish_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect_max_delay: Duration,
}

impl NatsBus {
    /// Connects (in the background: a server that is down is retried forever) and keeps the
    /// streams and consumers of `layout` in place.
    pub async fn start(
        settings: &NatsSettings,
        layout: &Layout,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> Result<Self, BusError> {
        let recheck = Arc::new(Notify::new());
        let stream_ready = Arc::new(AtomicBool::new(false));
        let max_delay = settings.reconnect_max_delay;
        let options = connect_options(settings, &metrics, &recheck, &stream_ready).await?;
        metrics.bus_connected("nats", false);
        let servers = server_addrs(&settings.url).map_err(BusError::Unavailable)?;
        let client = options
            .connect(servers)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.publish_timeout);
        let kept = Kept {
            streams: stream_configs(settings, layout),
            consumers: layout
                .consumers
                .iter()
                .map(|c| (c.stream.clone(), consumer_config(c)))
                .collect(),
        };
        tokio::spawn(keep_streams(
            client.clone(),
            js.clone(),
            kept,
            stream_ready.clone(),
            recheck.clone(),
            max_delay,
            shutdown,
        ));
        recheck.notify_one();
        Ok(NatsBus {
            client,
            js,
            stream_ready,
            recheck,
            publish_timeout: settings.publish_timeout,
            max_delay,
            memory_storage: settings.memory_storage,
            replicas: settings.replicas,
        })
    }

    /// The JetStream context, for the key-value limiter.
    /// The core client: request/reply (the API gateway) needs no stream.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Storage and replicas configured for streams, reused for the limiter's bucket.
    pub fn storage(&self) -> (stream::StorageType, usize) {
        let storage = if self.memory_storage {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        };
        (storage, self.replicas)
    }

    /// Runs the durable pull consumer shared by all replicas, forwarding its messages to `tx`,
    /// and re-creates it after any failure (disconnect, consumer deleted, server restart).
    pub fn consume(
        &self,
        spec: &ConsumerSpec,
        tx: tokio::sync::mpsc::Sender<Delivery>,
        placed: tokio::sync::watch::Sender<bool>,
        shutdown: Shutdown,
    ) {
        let js = self.js.clone();
        let client = self.client.clone();
        let ready = self.stream_ready.clone();
        let stream_name = spec.stream.clone();
        let config = consumer_config(spec);
        let max_delay = self.max_delay;
        tokio::spawn(async move {
            let mut attempt = 1;
            loop {
                if client.connection_state() == State::Connected && ready.load(Ordering::SeqCst) {
                    match run_consumer(&js, &stream_name, config.clone(), &tx, &placed, &shutdown)
                        .await
                    {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::warn!(stream = %stream_name, error = %e, "consumer interrupted; restarting it");
                        }
                    }
                }
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt.min(8), max_delay).max(Duration::from_millis(100))) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    pub fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
            && self.stream_ready.load(Ordering::SeqCst)
    }

    pub async fn publish(&self, msg: &Message) -> Result<Ack, BusError> {
        if self.client.connection_state() != State::Connected {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        if !self.stream_ready.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("stream not ready".into()));
        }
        let mut headers = async_nats::HeaderMap::new();
        // Checked again here, for every header whatever made it: the client panics on a
        // control character.
        for (k, v) in &msg.headers {
            headers.insert(k.as_str(), &*super::clean_header_value(v));
        }
        headers.insert("Nats-Msg-Id", &*super::clean_header_value(&msg.id));
        let publish = async {
            self.js
                .publish_with_headers(msg.subject.clone(), headers, msg.payload.clone())
                .await?
                .await
        };
        match tokio::time::timeout(self.publish_timeout, publish).await {
            Ok(Ok(ack)) => Ok(Ack {
                duplicate: ack.duplicate,
            }),
            Ok(Err(e)) => {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    // Someone deleted the stream, or the server lost it: put it back.
                    self.stream_ready.store(false, Ordering::SeqCst);
                    self.recheck.notify_one();
                    return Err(BusError::Unavailable("stream not found".into()));
                }
                if e.kind() == PublishErrorKind::TimedOut {
                    return Err(BusError::Timeout(self.publish_timeout));
                }
                Err(BusError::Publish(e.to_string()))
            }
            Err(_) => Err(BusError::Timeout(self.publish_timeout)),
        }
    }

    pub async fn close(&self) {
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "flushing NATS connection at shutdown");
        }
    }
}

/// A message's headers as (name, value) pairs, every value of a repeated name kept.
pub fn header_pairs(headers: Option<&async_nats::HeaderMap>) -> Vec<(String, String)> {
    headers
        .map(|h| {
            h.iter()
                .flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (k.to_string(), v.as_str().to_owned()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The servers of `url`: one URL, or a cluster's as a comma-separated list (the client picks
/// one and fails over to the others, and learns the rest of the cluster from the one it
/// reaches).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{u:?} is not a NATS server URL: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|addrs| match addrs.is_empty() {
            true => Err("names no server".into()),
            false => Ok(addrs),
        })
}

/// Credentials, reconnection, and the connection events that drive readiness: after every
/// (re)connect the streams are checked again, since the server may have restarted without
/// them (memory storage).
async fn connect_options(
    settings: &NatsSettings,
    metrics: &Metrics,
    recheck: &Arc<Notify>,
    stream_ready: &Arc<AtomicBool>,
) -> Result<async_nats::ConnectOptions, BusError> {
    let max_delay = settings.reconnect_max_delay;
    let events = {
        let metrics = metrics.clone();
        let recheck = recheck.clone();
        let stream_ready = stream_ready.clone();
        move |event: async_nats::Event| {
            let metrics = metrics.clone();
            let recheck = recheck.clone();
            let stream_ready = stream_ready.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        metrics.bus_connected("nats", true);
                        stream_ready.store(false, Ordering::SeqCst);
                        recheck.notify_one();
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting");
                        metrics.bus_connected("nats", false);
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        }
    };
    let mut options = match &settings.credentials_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| BusError::Unavailable(format!("reading credentials file: {e}")))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some((user, password)) = &settings.user_password {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    Ok(options
        .name(&settings.client_name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(settings.connect_timeout)
        .reconnect_delay_callback(move |attempts| backoff(attempts, max_delay))
        .event_callback(events))
}

/// The inbound stream and the layout's others, with the configured storage, replicas,
/// duplicate window and age.
fn stream_configs(settings: &NatsSettings, layout: &Layout) -> Vec<stream::Config> {
    let storage = if settings.memory_storage {
        stream::StorageType::Memory
    } else {
        stream::StorageType::File
    };
    let base = stream::Config {
        storage,
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        max_age: settings.max_age,
        ..Default::default()
    };
    let inbound = stream::Config {
        name: settings.stream.clone(),
        subjects: layout.inbound.clone(),
        ..base.clone()
    };
    let others = layout.streams.iter().map(|s| stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        retention: if s.interest {
            stream::RetentionPolicy::Interest
        } else {
            stream::RetentionPolicy::Limits
        },
        ..base.clone()
    });
    std::iter::once(inbound).chain(others).collect()
}

/// Reconnect delay: 0 for the first attempt, then doubling from 100 ms up to `max`.
fn backoff(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(16) as u32;
    Duration::from_millis(100u64.saturating_mul(1 << exp)).min(max)
}

/// What the daemon keeps in place on the server: streams, and durable consumers by stream.
struct Kept {
    streams: Vec<stream::Config>,
    consumers: Vec<(String, jetstream::consumer::pull::Config)>,
}

fn consumer_config(spec: &ConsumerSpec) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(spec.durable.clone()),
        filter_subject: spec.filter.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: -1,
        // Per consumer, across all replicas: with one consumer per target, a flooded target
        // can only fill its own slots.
        max_ack_pending: spec.max_pending as i64,
        deliver_policy: if spec.new_only {
            jetstream::consumer::DeliverPolicy::New
        } else {
            jetstream::consumer::DeliverPolicy::All
        },
        ..Default::default()
    }
}

/// Pulls from the durable consumer until shutdown (Ok) or an error (Err, to be restarted).
async fn run_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    config: jetstream::consumer::pull::Config,
    tx: &tokio::sync::mpsc::Sender<Delivery>,
    placed: &tokio::sync::watch::Sender<bool>,
    shutdown: &Shutdown,
) -> Result<(), async_nats::Error> {
    use futures::StreamExt;
    let stream = js.get_stream(stream_name).await?;
    let name = config.durable_name.clone().unwrap_or_default();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_or_create_consumer(&name, config).await?;
    placed.send_replace(true);
    let mut messages = consumer.messages().await?;
    tracing::info!(stream = stream_name, consumer = %name, "consumer running");
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = tokio::time::sleep(STALL_CHECK) => {
                stalled(&mut consumer).await?;
                continue;
            }
            _ = shutdown.cancelled() => return Ok(()),
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(e.into()),
            None => return Err("message stream ended".into()),
        };
        let (published, delivered) = match msg.info() {
            Ok(i) => (
                std::time::UNIX_EPOCH
                    + Duration::from_nanos(i.published.unix_timestamp_nanos().max(0) as u64),
                i.delivered.max(1) as u64,
            ),
            Err(_) => (std::time::SystemTime::now(), 1),
        };
        let delivery = Delivery {
            subject: msg.subject.to_string(),
            headers: header_pairs(msg.headers.as_ref()),
            payload: msg.payload.clone(),
            published,
            delivered,
            acker: super::Acker::Nats(Box::new(msg)),
        };
        if tx.send(delivery).await.is_err() {
            return Ok(());
        }
    }
}

/// Creates or updates the streams whenever asked (on start, after each reconnect, after a
/// publish found one missing) and retries until it succeeds.
async fn keep_streams(
    client: async_nats::Client,
    js: jetstream::Context,
    layout: Kept,
    ready: Arc<AtomicBool>,
    recheck: Arc<Notify>,
    max_delay: Duration,
    shutdown: Shutdown,
) {
    // The configuration is applied once; afterwards (a reconnect, a publish finding no
    // stream) a stream that exists is left as it is. Updating is a request to the JetStream
    // meta leader, which a cluster that just lost a node may not have for a while, when the
    // streams themselves (their own leaders) already take publishes again.
    let mut applied = false;
    loop {
        tokio::select! {
            _ = recheck.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut attempt = 1;
        while !ready.load(Ordering::SeqCst) {
            if client.connection_state() == State::Connected {
                let mut all = true;
                for config in &layout.streams {
                    match keep_stream(&js, config, applied).await {
                        Ok(info) => {
                            tracing::info!(stream = %info.config.name, subjects = ?info.config.subjects, "JetStream stream ready");
                        }
                        Err(e) => {
                            tracing::warn!(stream = %config.name, error = %e, "cannot create or update JetStream stream; retrying");
                            all = false;
                            break;
                        }
                    }
                }
                applied |= all;
                // A stream with interest retention keeps a message only while some consumer
                // is interested, so the consumers must exist before anything may be published.
                if all {
                    all = keep_consumers(&js, &layout.consumers).await;
                }
                if all {
                    ready.store(true, Ordering::SeqCst);
                    break;
                }
            } else if attempt % 10 == 1 {
                // Not ready and waiting on the connection: said, so that a replica stuck here
                // is not silent (every tenth wait, the waits being capped by max_delay).
                tracing::warn!(attempt, state = ?client.connection_state(), "streams not in place: waiting for the NATS connection");
            }
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt, max_delay).max(Duration::from_millis(100))) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// How long a consumer may receive nothing before the server is asked whether it should have.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// An error when the server holds messages for this consumer that it could take (fewer
/// unacknowledged than its limit) and none came for [`STALL_CHECK`]: after a leader change in
/// a cluster, a pull can be left waiting on a leader that is gone, with no error and no
/// missed heartbeat to show it (seen with a three-node cluster losing the stream's leader).
/// The caller then pulls again.
async fn stalled(
    consumer: &mut jetstream::consumer::PullConsumer,
) -> Result<(), async_nats::Error> {
    let info = consumer.info().await?;
    let limit = info.config.max_ack_pending;
    let room = limit <= 0 || (info.num_ack_pending as i64) < limit;
    if info.num_pending > 0 && room {
        return Err(format!(
            "{} messages pending and none delivered for {STALL_CHECK:?}",
            info.num_pending
        )
        .into());
    }
    Ok(())
}

/// Creates or updates the stream (`applied`: only creates it if it is missing).
async fn keep_stream(
    js: &jetstream::Context,
    config: &stream::Config,
    applied: bool,
) -> Result<stream::Info, async_nats::Error> {
    if applied {
        if let Ok(stream) = js.get_stream(&config.name).await {
            return Ok(stream.cached_info().clone());
        }
    }
    Ok(js.create_or_update_stream(config.clone()).await?)
}

/// Creates the durable consumers that do not exist yet; `false` when one could not be.
async fn keep_consumers(
    js: &jetstream::Context,
    consumers: &[(String, jetstream::consumer::pull::Config)],
) -> bool {
    for (stream_name, config) in consumers {
        let stream = match js.get_stream(stream_name).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(stream = %stream_name, error = %e, "cannot read stream; retrying");
                return false;
            }
        };
        let name = config.durable_name.clone().unwrap_or_default();
        let created: Result<jetstream::consumer::PullConsumer, _> =
            stream.get_or_create_consumer(&name, config.clone()).await;
        if let Err(e) = created {
            tracing::warn!(consumer = %name, error = %e, "cannot create consumer; retrying");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(1, max), Duration::ZERO);
        assert_eq!(backoff(2, max), Duration::from_millis(100));
        assert_eq!(backoff(3, max), Duration::from_millis(200));
        assert_eq!(backoff(10, max), max);
        assert_eq!(backoff(usize::MAX, max), max);
    }

    #[test]
    fn a_cluster_is_a_comma_separated_list_of_urls() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        let three = server_addrs("nats://a:4222, nats://b:4222,nats://c:4222").unwrap();
        assert_eq!(three.len(), 3);
        assert!(server_addrs("nats://a:4222,nats://b:notaport")
            .unwrap_err()
            .contains("nats://b:notaport"));
        assert!(server_addrs(" , ").is_err());
    }
}
