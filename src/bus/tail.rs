//! A live tail of what is published on subjects matching a pattern (`GET /events`), whatever
//! the engine, leaving no trace on the bus: the in-process engine's broadcast, a core NATS
//! subscription (JetStream publishes are core messages too, so nothing is created on the
//! server), and on Kafka a consumer that joins no group, commits nothing and is assigned every
//! matching topic's partitions from their end (a topic created later, from its beginning:
//! all it holds is new).
//!
//! Bounded: the reader gets a channel of fixed capacity; when it falls that far behind, the
//! tail stops rather than buffering more, and says so ([`Tail::overflowed`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{subject_matches, BusError, Engine};

/// One message seen by a tail.
#[derive(Debug, Clone)]
pub struct Tailed {
    pub subject: String,
    /// Names in the `ce-` spelling, whatever the engine.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Tailed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The messages of one tail; dropping it stops the tail (and its subscription).
pub struct Tail {
    rx: mpsc::Receiver<Tailed>,
    overflowed: Arc<AtomicBool>,
}

impl Tail {
    /// The next message; `None` once the tail stopped (the reader fell behind, or the bus went
    /// away).
    pub async fn next(&mut self) -> Option<Tailed> {
        self.rx.recv().await
    }

    /// Whether the tail stopped because the reader fell `capacity` messages behind.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::SeqCst)
    }
}

/// The sending half a tail's task holds.
struct Feed {
    tx: mpsc::Sender<Tailed>,
    overflowed: Arc<AtomicBool>,
}

impl Feed {
    /// Hands `m` on; `false` when the tail must stop: the reader is gone or too far behind.
    fn offer(&self, m: Tailed) -> bool {
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::SeqCst);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Is `pattern` a NATS subject pattern a tail can follow: dot-separated tokens, each a valid
/// token or `*`, and `>` only as the last one.
pub fn is_valid_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| *t == "*" || (*t == ">" && i + 1 == tokens.len()) || super::is_valid_token(t))
}

/// Starts tailing `pattern` (prefix included) on `engine`; returns once the subscription is in
/// place, so what is published after it returns is seen.
pub(super) async fn start(
    engine: &Engine,
    pattern: &str,
    capacity: usize,
) -> Result<Tail, BusError> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    let feed = Feed {
        tx,
        overflowed: overflowed.clone(),
    };
    match engine {
        Engine::Memory(b) => memory(b.subscribe(pattern), feed),
        Engine::Nats(b) => nats(b.client(), pattern, feed).await?,
        Engine::Kafka(b) => kafka(b.client_config().clone(), pattern, feed).await?,
    }
    Ok(Tail { rx, overflowed })
}

fn memory(sub: super::memory::Subscription, feed: Feed) {
    let messages = futures::stream::unfold(sub, |mut sub| async move {
        let m = sub.next().await?;
        let m = Tailed {
            subject: m.subject.clone(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
        };
        Some((m, sub))
    });
    pump(Box::pin(messages), feed);
}

/// Hands what `messages` yields to the feed until it ends, the reader is gone or falls too
/// far behind; then drops `messages` (for NATS, which unsubscribes).
fn pump(mut messages: impl futures::Stream<Item = Tailed> + Send + Unpin + 'static, feed: Feed) {
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = messages.next() => m,
                _ = feed.tx.closed() => None,
            };
            let Some(m) = m else { return };
            if !feed.offer(m) {
                return;
            }
        }
    });
}

async fn nats(client: &async_nats::Client, pattern: &str, feed: Feed) -> Result<(), BusError> {
    let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
    let sub = client
        .subscribe(pattern.to_owned())
        .await
        .map_err(|e| unavailable(&e))?;
    // The server has the subscription once the flush returns: what is published next is seen.
    // Bounded: while disconnected the flush would wait for the reconnection.
    tokio::time::timeout(ANSWER_TIMEOUT, client.flush())
        .await
        .map_err(|e| unavailable(&e))?
        .map_err(|e| unavailable(&e))?;
    let messages = sub.map(|m| Tailed {
        subject: m.subject.to_string(),
        headers: super::nats::header_pairs(m.headers.as_ref()),
        payload: m.payload,
    });
    pump(messages, feed);
    Ok(())
}

/// How often the Kafka tail looks for new matching topics.
const KAFKA_RESCAN: Duration = Duration::from_secs(1);
/// How long a broker (or the NATS server) may take to answer while a tail starts.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

async fn kafka(
    mut config: rdkafka::ClientConfig,
    pattern: &str,
    feed: Feed,
) -> Result<(), BusError> {
    config
        // Never committed, never joined (partitions are assigned): tailing leaves no trace.
        .set(
            "group.id",
            format!("imbridge-tail-{}", hex::encode(rand::random::<[u8; 8]>())),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let pattern = pattern.to_owned();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || kafka_loop(&config, &pattern, &feed, ready_tx));
    match ready_rx.await {
        Ok(result) => result.map_err(|e| BusError::Unavailable(e.to_string())),
        Err(_) => Err(BusError::Unavailable("the Kafka tail stopped".into())),
    }
}

/// The blocking side of the Kafka tail: assigns matching topics (those there at the start from
/// their end, later ones from their beginning) and polls until the reader is gone.
fn kafka_loop(
    config: &rdkafka::ClientConfig,
    pattern: &str,
    feed: &Feed,
    ready: tokio::sync::oneshot::Sender<rdkafka::error::KafkaResult<()>>,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::{Message as _, Offset, TopicPartitionList};
    let consumer: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => return drop(ready.send(Err(e))),
    };
    let mut assigned = std::collections::HashSet::new();
    let mut assignment = TopicPartitionList::new();
    let mut scan = |first: bool| -> rdkafka::error::KafkaResult<bool> {
        let metadata = consumer.fetch_metadata(None, ANSWER_TIMEOUT)?;
        let mut added = false;
        for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
            if t.name().starts_with("__") || !subject_matches(pattern, t.name()) {
                continue;
            }
            for p in t.partitions() {
                if !assigned.insert((t.name().to_owned(), p.id())) {
                    continue;
                }
                let offset = if first {
                    let (_, high) = consumer.fetch_watermarks(t.name(), p.id(), ANSWER_TIMEOUT)?;
                    Offset::Offset(high)
                } else {
                    Offset::Beginning
                };
                assignment.add_partition_offset(t.name(), p.id(), offset)?;
                added = true;
            }
        }
        if added {
            consumer.assign(&assignment)?;
        }
        Ok(added)
    };
    if let Err(e) = scan(true) {
        return drop(ready.send(Err(e)));
    }
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut scanned = std::time::Instant::now();
    while !feed.tx.is_closed() {
        if scanned.elapsed() >= KAFKA_RESCAN {
            if let Err(e) = scan(false) {
                tracing::debug!(error = %e, "Kafka tail: topic scan failed; retrying");
            }
            scanned = std::time::Instant::now();
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = Tailed {
            subject: m.topic().to_owned(),
            headers: super::kafka::record_headers(&m),
            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        };
        if !feed.offer(m) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_too_far_behind_is_dropped_not_buffered_for() {
        let memory = super::super::memory::MemoryBus::new(
            &super::super::memory::MemorySettings {
                capacity: 16,
                duplicate_window: Duration::ZERO,
            },
            &super::super::Layout::default(),
            crate::metrics::Metrics::new(),
        );
        let engine = Engine::Memory(Box::new(memory));
        let mut tail = start(&engine, "dingtalk.>", 2).await.unwrap();
        let Engine::Memory(bus) = &engine else {
            unreachable!()
        };
        for i in 0..4 {
            let msg = super::super::Message {
                subject: "dingtalk.x".into(),
                id: format!("m{i}"),
                headers: vec![("ce-id".into(), format!("m{i}"))],
                payload: Bytes::from_static(b"{}"),
            };
            bus.publish(&msg).unwrap();
            tokio::task::yield_now().await;
        }
        let mut seen = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), tail.next()).await {
            seen.push(m.header("ce-id").unwrap().to_owned());
        }
        assert_eq!(seen, ["m0", "m1"]);
        assert!(tail.overflowed());
    }

    #[test]
    fn patterns() {
        for ok in [
            "dingtalk.>",
            "dingtalk.*",
            "a.b",
            "*.user_add_org",
            ">",
            "ims.dingtalk.*.x",
        ] {
            assert!(is_valid_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            "dingtalk.",
            ".>",
            "a..b",
            "a.>.b",
            "a b",
            "dingtalk>",
            "a.b*",
            "ä",
        ] {
            assert!(!is_valid_pattern(bad), "{bad}");
        }
    }
}
