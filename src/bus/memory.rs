//! The in-process engine: the embedded default, so `imbridge serve` is useful with no broker.
//! One node, not durable. Subscribers in the same process (and tests) receive what is
//! published; like JetStream, a message whose id was seen within the duplicate window is
//! acknowledged as a duplicate and not delivered again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use super::{Ack, BusError, Message};
use crate::config::MemorySettings;
use crate::metrics::Metrics;

/// A message as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct MemoryBus {
    tx: broadcast::Sender<Arc<Received>>,
    seen: Mutex<Seen>,
    window: Duration,
}

/// Ids published within the duplicate window, oldest first.
#[derive(Default)]
struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Seen {
    /// Records `id` at `now`; false when it was already seen within `window`.
    fn insert(&mut self, id: &str, now: Instant, window: Duration) -> bool {
        while let Some((t, _)) = self.order.front() {
            if now.duration_since(*t) < window {
                break;
            }
            let (t, old) = self.order.pop_front().expect("front exists");
            if self.ids.get(&old) == Some(&t) {
                self.ids.remove(&old);
            }
        }
        if window.is_zero() || self.ids.contains_key(id) {
            return window.is_zero();
        }
        self.ids.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        true
    }
}

impl MemoryBus {
    pub fn new(settings: &MemorySettings, metrics: Metrics) -> Self {
        metrics.bus_connected.with_label_values(&["memory"]).set(1);
        let (tx, _) = broadcast::channel(settings.capacity);
        MemoryBus {
            tx,
            seen: Mutex::new(Seen::default()),
            window: settings.duplicate_window,
        }
    }

    pub fn publish(&self, msg: &Message) -> Result<Ack, BusError> {
        let fresh = self.seen.lock().expect("not poisoned").insert(
            &msg.event.id,
            Instant::now(),
            self.window,
        );
        if fresh {
            // No subscriber is not an error: like a stream nobody reads yet.
            let _ = self.tx.send(Arc::new(Received {
                subject: msg.subject.clone(),
                headers: msg.event.headers("ce-"),
                payload: msg.payload.clone(),
            }));
        }
        Ok(Ack { duplicate: !fresh })
    }

    /// Receives every later message whose subject matches `pattern` (NATS wildcards).
    pub fn subscribe(&self, pattern: &str) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            pattern: pattern.to_owned(),
        }
    }
}

pub struct Subscription {
    rx: broadcast::Receiver<Arc<Received>>,
    pattern: String,
}

impl Subscription {
    /// The next matching message; `None` once the bus is gone.
    pub async fn next(&mut self) -> Option<Arc<Received>> {
        loop {
            match self.rx.recv().await {
                Ok(m) if super::subject_matches(&self.pattern, &m.subject) => return Some(m),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, pattern = %self.pattern, "in-process subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// A matching message already published, without waiting.
    pub fn try_next(&mut self) -> Option<Arc<Received>> {
        loop {
            match self.rx.try_recv() {
                Ok(m) if super::subject_matches(&self.pattern, &m.subject) => return Some(m),
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_window_expires() {
        let mut seen = Seen::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        assert!(seen.insert("a", t0, w));
        assert!(!seen.insert("a", t0 + Duration::from_secs(9), w));
        assert!(seen.insert("b", t0 + Duration::from_secs(9), w));
        assert!(seen.insert("a", t0 + Duration::from_secs(10), w));
        assert_eq!(seen.ids.len(), 2);
        // A zero window disables deduplication.
        assert!(seen.insert("a", t0, Duration::ZERO));
    }
}
