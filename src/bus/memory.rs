//! The in-process engine: the embedded default, so `imbridge serve` is useful with no broker.
//! One node, not durable. Subscribers in the same process (and tests) receive what is
//! published; like JetStream, a message whose id was seen within the duplicate window (in the
//! same stream) is acknowledged as a duplicate and not delivered again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use super::{Ack, BusError, Delivery, Layout, Message};
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

/// `[bus.memory]`, validated.
#[derive(Debug, Clone)]
pub struct MemorySettings {
    pub capacity: usize,
    pub duplicate_window: Duration,
}

pub struct MemoryBus {
    tx: broadcast::Sender<Arc<Received>>,
    /// Queue subscriptions: each matching message goes to exactly one of them, and a full
    /// queue refuses the publish (back-pressure instead of loss).
    queues: Mutex<Queues>,
    seen: Mutex<Seen>,
    window: Duration,
    /// What the layout's limits-retention streams (the dead letters) keep, for `/dlq`.
    kept: Mutex<Kept>,
    metrics: Metrics,
}

/// Messages kept at most per subject of a limits-retention stream: past it the oldest is
/// evicted (and counted), so a target failing for days costs a bounded amount of memory.
/// The in-process bus is not durable anyway; a deployment that must keep every dead letter
/// runs on NATS or Kafka.
pub const KEPT_PER_SUBJECT: usize = 1000;

/// A message a limits-retention stream keeps.
#[derive(Debug, Clone)]
pub struct KeptMessage {
    /// Increasing over the bus's life, never reused: the id `imbridge dlq` names it by.
    pub seq: u64,
    pub time: std::time::SystemTime,
    pub received: Arc<Received>,
}

#[derive(Default)]
struct Kept {
    /// Subject patterns of the streams that keep what they get (not interest-based).
    patterns: Vec<String>,
    by_subject: HashMap<String, VecDeque<KeptMessage>>,
    next_seq: u64,
    evicted: u64,
}

type QueueTx = tokio::sync::mpsc::Sender<Delivery>;

/// Queue subscriptions by pattern. Most are one subject each (a notify target's), so those are
/// found by a map lookup: scanning thousands of targets' patterns for every publish made the
/// publish cost grow with the number of targets.
#[derive(Default)]
struct Queues {
    exact: HashMap<String, Vec<QueueTx>>,
    wildcard: Vec<(String, QueueTx)>,
}

/// Ids remembered at most: past it the oldest are forgotten first, so a flood of distinct ids
/// costs a bounded amount of memory (about 150 bytes each) and at worst lets a platform's
/// retry of an old event be stored twice, which at-least-once delivery allows.
pub(super) const SEEN_CAPACITY: usize = 200_000;

/// Ids published within the duplicate window, oldest first, per duplicate namespace.
///
/// JetStream drops a duplicate id only within one stream; the engines without streams mirror
/// that: an id is remembered under the stream its subject would belong to (the inbound one,
/// one of the layout's others, or none of them), so an id chosen by a notify client can never
/// hide a platform's callback, nor the reverse.
#[derive(Default)]
pub(super) struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
    /// Subject patterns of each stream: the inbound one first, then the layout's others.
    streams: Vec<Vec<String>>,
}

impl Seen {
    pub(super) fn new(layout: &Layout) -> Self {
        let others = layout.streams.iter().map(|s| s.subjects.clone());
        Seen {
            streams: std::iter::once(layout.inbound.clone())
                .chain(others)
                .collect(),
            ..Seen::default()
        }
    }

    /// The key `id` is remembered under: its namespace's number, then the id (the number has
    /// no `:` in it, so different pairs never make the same key).
    fn key(&self, subject: &str, id: &str) -> String {
        let namespace = self
            .streams
            .iter()
            .position(|patterns| patterns.iter().any(|p| super::subject_matches(p, subject)))
            .unwrap_or(self.streams.len());
        format!("{namespace}:{id}")
    }

    fn forget(&mut self, subject: &str, id: &str) {
        let key = self.key(subject, id);
        self.ids.remove(&key);
    }

    /// Forgets ids older than `window`.
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((t, _)) = self.order.front() {
            if now.duration_since(*t) < window {
                break;
            }
            let (t, old) = self.order.pop_front().expect("front exists");
            if self.ids.get(&old) == Some(&t) {
                self.ids.remove(&old);
            }
        }
    }

    /// Whether `id` was recorded on `subject`'s stream within `window` before `now`.
    pub(super) fn contains(
        &mut self,
        subject: &str,
        id: &str,
        now: Instant,
        window: Duration,
    ) -> bool {
        self.expire(now, window);
        !window.is_zero() && self.ids.contains_key(&self.key(subject, id))
    }

    /// Records `id` on `subject`'s stream at `now`; false when it was already seen there
    /// within `window`.
    pub(super) fn insert(
        &mut self,
        subject: &str,
        id: &str,
        now: Instant,
        window: Duration,
    ) -> bool {
        self.expire(now, window);
        let key = self.key(subject, id);
        if window.is_zero() || self.ids.contains_key(&key) {
            return window.is_zero();
        }
        if self.order.len() >= SEEN_CAPACITY {
            if let Some((t, oldest)) = self.order.pop_front() {
                if self.ids.get(&oldest) == Some(&t) {
                    self.ids.remove(&oldest);
                }
            }
        }
        self.ids.insert(key.clone(), now);
        self.order.push_back((now, key));
        true
    }
}

impl MemoryBus {
    pub fn new(settings: &MemorySettings, layout: &Layout, metrics: Metrics) -> Self {
        metrics.bus_connected("memory", true);
        let (tx, _) = broadcast::channel(settings.capacity);
        MemoryBus {
            tx,
            seen: Mutex::new(Seen::new(layout)),
            window: settings.duplicate_window,
            queues: Mutex::new(Queues::default()),
            kept: Mutex::new(Kept {
                patterns: layout
                    .streams
                    .iter()
                    .filter(|s| !s.interest)
                    .flat_map(|s| s.subjects.clone())
                    .collect(),
                ..Kept::default()
            }),
            metrics,
        }
    }

    /// Keeps `msg` when a limits-retention stream would (JetStream keeps such messages until
    /// deleted; here, until deleted or evicted).
    fn keep(&self, msg: &Arc<Received>) {
        let mut kept = self.kept.lock().expect("not poisoned");
        if !kept
            .patterns
            .iter()
            .any(|p| super::subject_matches(p, &msg.subject))
        {
            return;
        }
        kept.next_seq += 1;
        let seq = kept.next_seq;
        let queue = kept.by_subject.entry(msg.subject.clone()).or_default();
        queue.push_back(KeptMessage {
            seq,
            time: std::time::SystemTime::now(),
            received: msg.clone(),
        });
        if queue.len() > KEPT_PER_SUBJECT {
            queue.pop_front();
            kept.evicted += 1;
            self.metrics.dead_letter_evicted();
            tracing::warn!(subject = %msg.subject, "in-process dead letter evicted: {KEPT_PER_SUBJECT} kept at most per target");
        }
    }

    /// What is kept on `subject`, oldest first.
    pub fn kept(&self, subject: &str) -> Vec<KeptMessage> {
        let kept = self.kept.lock().expect("not poisoned");
        kept.by_subject
            .get(subject)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes the kept message `seq` of `subject`; false when there is none (any more).
    pub fn delete_kept(&self, subject: &str, seq: u64) -> bool {
        let mut kept = self.kept.lock().expect("not poisoned");
        let Some(queue) = kept.by_subject.get_mut(subject) else {
            return false;
        };
        let before = queue.len();
        queue.retain(|m| m.seq != seq);
        before != queue.len()
    }

    /// Kept messages evicted to stay within [`KEPT_PER_SUBJECT`] (also counted in
    /// `imbridge_dead_letter_evictions_total`).
    /// `imbridge_dead_letter_evictions_total`).
    pub fn evicted(&self) -> u64 {
        self.kept.lock().expect("not poisoned").evicted
    }

    /// Registers a queue subscription for `pattern`.
    pub fn queue(&self, pattern: &str, tx: tokio::sync::mpsc::Sender<Delivery>) {
        let mut queues = self.queues.lock().expect("not poisoned");
        if pattern.split('.').any(|t| t == "*" || t == ">") {
            queues.wildcard.push((pattern.to_owned(), tx));
        } else {
            queues.exact.entry(pattern.to_owned()).or_default().push(tx);
        }
    }

    /// Gives the message to every queue subscription whose pattern matches (as with an
    /// interest-based stream, each subscription sees it), or to none if one of them is full.
    fn enqueue(&self, msg: &Message) -> Result<(), BusError> {
        let queues = self.queues.lock().expect("not poisoned");
        let exact = queues.exact.get(&msg.subject).into_iter().flatten();
        let wildcard = queues
            .wildcard
            .iter()
            .filter(|(p, _)| super::subject_matches(p, &msg.subject))
            .map(|(_, tx)| tx);
        let matching: Vec<_> = exact.chain(wildcard).filter(|tx| !tx.is_closed()).collect();
        if matching.iter().any(|tx| tx.capacity() == 0) {
            return Err(BusError::Unavailable("in-process queue is full".into()));
        }
        for tx in matching {
            let delivery = Delivery {
                subject: msg.subject.clone(),
                headers: msg.headers.clone(),
                payload: msg.payload.clone(),
                published: std::time::SystemTime::now(),
                delivered: 1,
                acker: super::Acker::Memory(Requeue { tx: tx.clone() }),
            };
            tx.try_send(delivery)
                .map_err(|_| BusError::Unavailable("in-process queue is full".into()))?;
        }
        Ok(())
    }

    pub fn publish(&self, msg: &Message) -> Result<Ack, BusError> {
        let fresh = self.seen.lock().expect("not poisoned").insert(
            &msg.subject,
            &msg.id,
            Instant::now(),
            self.window,
        );
        if fresh {
            self.enqueue(msg).inspect_err(|_| {
                // Refused, so a retry with the same id must not be taken for a duplicate.
                self.seen
                    .lock()
                    .expect("not poisoned")
                    .forget(&msg.subject, &msg.id);
            })?;
            let received = Arc::new(Received {
                subject: msg.subject.clone(),
                headers: msg.headers.clone(),
                payload: msg.payload.clone(),
            });
            self.keep(&received);
            // No subscriber is not an error: like a stream nobody reads yet.
            let _ = self.tx.send(received);
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

/// Hands a delivery back to its queue after a delay (the in-process "negative ack").
pub struct Requeue {
    tx: tokio::sync::mpsc::Sender<Delivery>,
}

impl Requeue {
    pub(super) fn requeue(&self, d: &Delivery, delay: std::time::Duration) {
        let acker = super::Acker::Memory(Requeue {
            tx: self.tx.clone(),
        });
        d.redeliver_later(acker, self.tx.clone(), delay);
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
        assert!(seen.insert("s", "a", t0, w));
        assert!(!seen.insert("s", "a", t0 + Duration::from_secs(9), w));
        assert!(seen.insert("s", "b", t0 + Duration::from_secs(9), w));
        assert!(seen.insert("s", "a", t0 + Duration::from_secs(10), w));
        assert_eq!(seen.ids.len(), 2);
        // A zero window disables deduplication.
        assert!(seen.insert("s", "a", t0, Duration::ZERO));
    }

    fn layout() -> Layout {
        Layout {
            inbound: vec!["dingtalk.>".into(), "wecom.>".into()],
            streams: vec![super::super::StreamSpec {
                name: "notify".into(),
                subjects: vec!["notify.>".into()],
                interest: true,
            }],
            ..Layout::default()
        }
    }

    #[test]
    fn each_stream_is_its_own_duplicate_namespace() {
        let mut seen = Seen::new(&layout());
        let (t0, w) = (Instant::now(), Duration::from_secs(10));
        assert!(seen.insert("dingtalk.user_add_org", "id1", t0, w));
        assert!(
            seen.insert("notify.ops", "id1", t0, w),
            "a notification apart"
        );
        assert!(
            seen.insert("other.x", "id1", t0, w),
            "outside every stream, apart too"
        );
        // Within one stream, whatever the subject, a duplicate as on JetStream.
        assert!(!seen.insert("wecom.change_contact", "id1", t0, w));
        assert!(!seen.insert("notify.dev", "id1", t0, w));
        assert!(seen.contains("notify.ops", "id1", t0, w));
        assert!(!seen.contains("notify.ops", "id2", t0, w));
        // An id with the separator in it cannot pass for another namespace's.
        assert!(seen.insert("dingtalk.a", "1:x", t0, w));
        assert!(seen.insert("notify.ops", "x", t0, w));
    }

    #[test]
    fn a_flood_of_ids_is_bounded() {
        let mut seen = Seen::new(&layout());
        let (t0, w) = (Instant::now(), Duration::from_secs(3600));
        for i in 0..SEEN_CAPACITY + 1000 {
            assert!(seen.insert("dingtalk.x", &i.to_string(), t0, w));
        }
        assert_eq!(seen.ids.len(), SEEN_CAPACITY);
        assert_eq!(seen.order.len(), SEEN_CAPACITY);
        assert!(
            !seen.contains("dingtalk.x", "999", t0, w),
            "the oldest went first"
        );
        assert!(seen.contains("dingtalk.x", "1000", t0, w));
    }

    #[test]
    fn limits_streams_keep_a_bounded_ring_per_subject() {
        let mut layout = layout();
        layout.streams.push(super::super::StreamSpec {
            name: "dlq".into(),
            subjects: vec!["dlq.notify.>".into()],
            interest: false,
        });
        let settings = MemorySettings {
            capacity: 16,
            duplicate_window: Duration::from_secs(60),
        };
        let bus = MemoryBus::new(&settings, &layout, Metrics::new());
        let msg = |subject: &str, id: String| Message {
            subject: subject.into(),
            id,
            headers: Vec::new(),
            payload: Bytes::from_static(b"{}"),
        };
        for i in 0..KEPT_PER_SUBJECT + 5 {
            bus.publish(&msg("dlq.notify.ops", format!("a{i}")))
                .unwrap();
        }
        bus.publish(&msg("dlq.notify.dev", "b".into())).unwrap();
        // Interest-based streams keep nothing here: their consumers have the messages.
        bus.publish(&msg("notify.ops", "c".into())).unwrap();
        let ops = bus.kept("dlq.notify.ops");
        assert_eq!(ops.len(), KEPT_PER_SUBJECT);
        assert_eq!(bus.evicted(), 5);
        assert_eq!(ops[0].seq, 6, "the oldest went first");
        assert_eq!(bus.kept("dlq.notify.dev").len(), 1);
        assert!(bus.kept("notify.ops").is_empty());
        assert!(bus.delete_kept("dlq.notify.dev", bus.kept("dlq.notify.dev")[0].seq));
        assert!(bus.kept("dlq.notify.dev").is_empty());
        assert!(!bus.delete_kept("dlq.notify.dev", 1));
    }
}
