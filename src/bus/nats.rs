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

use super::{Ack, BusError, Message};
use crate::config::NatsSettings;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The platforms whose events the inbound stream holds.
pub const INBOUND_PLATFORMS: [&str; 3] = ["dingtalk", "wecom", "lark"];

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_ready: Arc<AtomicBool>,
    /// Wakes the stream keeper to (re)create the stream.
    recheck: Arc<Notify>,
    publish_timeout: Duration,
}

impl NatsBus {
    pub async fn start(
        settings: &NatsSettings,
        prefix: &str,
        metrics: Metrics,
        shutdown: Shutdown,
    ) -> Result<Self, BusError> {
        let recheck = Arc::new(Notify::new());
        let stream_ready = Arc::new(AtomicBool::new(false));
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
                            metrics.bus_connected.with_label_values(&["nats"]).set(1);
                            // The server may have restarted without the stream (memory storage).
                            stream_ready.store(false, Ordering::SeqCst);
                            recheck.notify_one();
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting");
                            metrics.bus_connected.with_label_values(&["nats"]).set(0);
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
        let options = options
            .name(&settings.client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(settings.connect_timeout)
            .reconnect_delay_callback(move |attempts| backoff(attempts, max_delay))
            .event_callback(events);
        metrics.bus_connected.with_label_values(&["nats"]).set(0);
        let client = options
            .connect(settings.url.as_str())
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(settings.publish_timeout);

        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: INBOUND_PLATFORMS
                .iter()
                .map(|p| super::with_prefix(prefix, &format!("{p}.>")))
                .collect(),
            storage: if settings.memory_storage {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            num_replicas: settings.replicas,
            duplicate_window: settings.duplicate_window,
            max_age: settings.max_age,
            ..Default::default()
        };
        tokio::spawn(keep_stream(
            client.clone(),
            js.clone(),
            config,
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
        })
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
        for (k, v) in msg.event.headers("ce-") {
            headers.insert(k.as_str(), v.as_str());
        }
        headers.insert("Nats-Msg-Id", msg.event.id.as_str());
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

/// Reconnect delay: 0 for the first attempt, then doubling from 100 ms up to `max`.
fn backoff(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempts - 2).min(16) as u32;
    Duration::from_millis(100u64.saturating_mul(1 << exp)).min(max)
}

/// Creates or updates the stream whenever asked (on start, after each reconnect, after a
/// publish found it missing) and retries until it succeeds.
async fn keep_stream(
    client: async_nats::Client,
    js: jetstream::Context,
    config: stream::Config,
    ready: Arc<AtomicBool>,
    recheck: Arc<Notify>,
    max_delay: Duration,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = recheck.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut attempt = 1;
        while !ready.load(Ordering::SeqCst) {
            if client.connection_state() == State::Connected {
                match js.create_or_update_stream(config.clone()).await {
                    Ok(info) => {
                        tracing::info!(stream = %info.config.name, subjects = ?info.config.subjects, "JetStream stream ready");
                        ready.store(true, Ordering::SeqCst);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(stream = %config.name, error = %e, "cannot create or update JetStream stream; retrying")
                    }
                }
            }
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt, max_delay).max(Duration::from_millis(100))) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
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
}
