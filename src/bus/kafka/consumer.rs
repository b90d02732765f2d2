//! The group consumers every replica runs for the layout's consumers: one group for the
//! daemon's own topics (one regex subscription, each record handed to the consumer of its
//! topic or the wildcard one), and a group of its own for each reader of inbound events (which
//! other readers read too); offsets stored only up to the first record not yet finished, a
//! full queue pausing its partition only.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{record_headers, CHECK_EVERY, TICK};
use crate::bus::{ConsumerSpec, Delivery};
use crate::shutdown::Shutdown;

/// The group consumer's regex subscription: the subjects of the consumers that read many
/// topics (a filter with a wildcard), NATS-style patterns turned into regexes (`*` one token,
/// `>` the rest), or the exact topics when none has a wildcard.
pub(in crate::bus) fn subscription(consumers: &[ConsumerSpec]) -> String {
    let wildcards: Vec<&str> = consumers
        .iter()
        .map(|c| c.filter.as_str())
        .filter(|f| is_pattern(f))
        .collect();
    let patterns: Vec<&str> = if wildcards.is_empty() {
        consumers.iter().map(|c| c.filter.as_str()).collect()
    } else {
        wildcards
    };
    patterns
        .iter()
        .map(|p| {
            // A trailing `>` matches to the end already.
            let end = if p.ends_with('>') { "" } else { "$" };
            format!("^{}{end}", subject_regex(p))
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn is_pattern(filter: &str) -> bool {
    filter.split('.').any(|t| t == "*" || t == ">")
}

/// A NATS-style subject pattern as a regex (without anchors).
fn subject_regex(pattern: &str) -> String {
    pattern
        .split('.')
        .map(|token| match token {
            "*" => "[^.]+".to_owned(),
            ">" => ".+".to_owned(),
            t => regex_escape(t),
        })
        .collect::<Vec<_>>()
        .join("\\.")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where the consumer hands records: one sender per target topic, and the catch-all.
pub(in crate::bus) struct Routes {
    expected: usize,
    map: Mutex<RouteMap>,
    complete: tokio::sync::Notify,
}

#[derive(Default)]
struct RouteMap {
    targets: HashMap<String, mpsc::Sender<Delivery>>,
    catch_all: Option<mpsc::Sender<Delivery>>,
}

impl RouteMap {
    fn len(&self) -> usize {
        self.targets.len() + usize::from(self.catch_all.is_some())
    }
}

impl Routes {
    pub(in crate::bus) fn new(expected: usize) -> Self {
        Routes {
            expected,
            map: Mutex::new(RouteMap::default()),
            complete: tokio::sync::Notify::new(),
        }
    }

    /// Records of topic `spec.filter` go to `tx`; with a wildcard filter (`notify.>`, or a
    /// group's only reader), every record no other consumer names.
    pub(in crate::bus) fn register(&self, spec: &ConsumerSpec, tx: mpsc::Sender<Delivery>) {
        let mut map = self.map.lock().expect("not poisoned");
        if is_pattern(&spec.filter) {
            map.catch_all = Some(tx);
        } else {
            map.targets.insert(spec.filter.clone(), tx);
        }
        if map.len() >= self.expected {
            self.complete.notify_one();
        }
    }

    fn is_complete(&self) -> bool {
        self.map.lock().expect("not poisoned").len() >= self.expected
    }

    fn sender(&self, topic: &str) -> Option<mpsc::Sender<Delivery>> {
        let map = self.map.lock().expect("not poisoned");
        // A closed sender is a consumer a reload stopped (its target removed): its topic's
        // records are the catch-all's again.
        let own = map.targets.get(topic).filter(|tx| !tx.is_closed());
        own.or(map.catch_all.as_ref()).cloned()
    }
}

/// What this replica holds of one assigned partition: the offsets handed out and not yet
/// finished, so the stored offset never passes one of them.
pub(in crate::bus) struct Tracker {
    topic: String,
    partition: i32,
    /// False once the partition is revoked: its records belong to another replica now.
    owned: AtomicBool,
    state: Mutex<TrackState>,
}

#[derive(Default)]
struct TrackState {
    pending: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The position last stored (or to store).
    stored: i64,
    dirty: bool,
}

impl Tracker {
    fn new(topic: &str, partition: i32) -> Self {
        Tracker {
            topic: topic.to_owned(),
            partition,
            owned: AtomicBool::new(true),
            state: Mutex::new(TrackState::default()),
        }
    }

    fn received(&self, offset: i64) {
        let mut s = self.state.lock().expect("not poisoned");
        s.pending.insert(offset);
        s.next = s.next.max(offset + 1);
    }

    /// The record at `offset` is delivered or dead-lettered.
    pub(in crate::bus) fn done(&self, offset: i64) {
        let mut s = self.state.lock().expect("not poisoned");
        if s.pending.remove(&offset) {
            let position = s.pending.first().copied().unwrap_or(s.next);
            if position > s.stored {
                s.stored = position;
                s.dirty = true;
            }
        }
    }

    pub(in crate::bus) fn is_owned(&self) -> bool {
        self.owned.load(Ordering::SeqCst)
    }

    /// The position to store, if it moved since the last call.
    fn take_position(&self) -> Option<i64> {
        let mut s = self.state.lock().expect("not poisoned");
        std::mem::take(&mut s.dirty).then_some(s.stored)
    }
}

type Trackers = Arc<Mutex<HashMap<(String, i32), Arc<Tracker>>>>;

/// Follows rebalances: fresh trackers for assigned partitions; revoked ones are disowned (their
/// records are dropped here and redelivered to the new owner) after storing what was finished,
/// which librdkafka commits before giving the partitions up.
struct GroupContext {
    trackers: Trackers,
    assignments: Arc<AtomicU64>,
    /// The group's name in logs.
    label: String,
    /// Readers of inbound events: mark where each newly assigned partition starts (see
    /// [`mark_starts`]).
    mark_starts: bool,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let group = self.label.as_str();
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut trackers = self.trackers.lock().expect("not poisoned");
                let mut positions = TopicPartitionList::new();
                for elem in tpl.elements() {
                    let key = (elem.topic().to_owned(), elem.partition());
                    if let Some(t) = trackers.remove(&key) {
                        t.owned.store(false, Ordering::SeqCst);
                        if let Some(p) = t.take_position() {
                            let _ = positions.add_partition_offset(
                                &t.topic,
                                t.partition,
                                Offset::Offset(p),
                            );
                        }
                    }
                }
                if positions.count() > 0 {
                    if let Err(e) = consumer.store_offsets(&positions) {
                        tracing::warn!(group, error = %e, "storing offsets of revoked partitions");
                    }
                }
                tracing::info!(group, partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(group, error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if self.mark_starts && tpl.count() > 0 {
                mark_starts(consumer, tpl, &self.label);
            }
            let mut trackers = self.trackers.lock().expect("not poisoned");
            for elem in tpl.elements() {
                trackers.insert(
                    (elem.topic().to_owned(), elem.partition()),
                    Arc::new(Tracker::new(elem.topic(), elem.partition())),
                );
            }
            self.assignments.fetch_add(1, Ordering::SeqCst);
            let group = self.label.as_str();
            tracing::info!(group, partitions = tpl.count(), "partitions assigned");
        }
    }
}

/// How long a reader of inbound events waits for the brokers' answers when it decides where
/// it starts.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A reader of inbound events reads a partition it never read before from its start (a topic
/// that appears after the reader does holds nothing older than the reader), and commits that
/// start at once: otherwise, killed before its first commit, it would look brand new when it
/// comes back ([`start_at_end`]) and skip what it had not finished.
fn mark_starts<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
    group: &str,
) {
    let committed = match consumer.committed_offsets(tpl.clone(), START_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(group, error = %e, "cannot read the committed offsets of new partitions");
            return;
        }
    };
    let mut starts = TopicPartitionList::new();
    for elem in committed.elements() {
        if elem.offset() == Offset::Invalid {
            // 0 even where retention has removed the first records: the consumer's
            // `auto.offset.reset = earliest` moves it to the first one left.
            let _ = starts.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(0));
        }
    }
    if starts.count() > 0 {
        if let Err(e) = consumer.commit(&starts, CommitMode::Sync) {
            tracing::warn!(group, error = %e, "cannot commit where new partitions start");
        }
    }
}

/// A reader of inbound events that has never read anything (its group has no committed
/// offset on any topic its filter matches) starts after what the topics hold now: a route
/// added to a running system must not act on the past. Its starts are committed before it
/// joins the group. Fails when the brokers do not answer, to be tried again.
fn start_at_end(config: &ClientConfig, filter: &str, group: &str) -> KafkaResult<()> {
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(None, START_TIMEOUT)?;
    let mut matching = TopicPartitionList::new();
    for topic in metadata.topics() {
        if topic.error().is_none() && crate::bus::subject_matches(filter, topic.name()) {
            for p in topic.partitions() {
                matching.add_partition(topic.name(), p.id());
            }
        }
    }
    if matching.count() == 0 {
        return Ok(());
    }
    let committed = consumer.committed_offsets(matching.clone(), START_TIMEOUT)?;
    if committed
        .elements()
        .iter()
        .any(|e| e.offset() != Offset::Invalid)
    {
        return Ok(());
    }
    let mut ends = TopicPartitionList::new();
    for elem in matching.elements() {
        let (_, high) = consumer.fetch_watermarks(elem.topic(), elem.partition(), START_TIMEOUT)?;
        ends.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(high))?;
    }
    consumer.commit(&ends, CommitMode::Sync)?;
    tracing::info!(
        group,
        partitions = ends.count(),
        "new reader of inbound events starts after what the topics hold"
    );
    Ok(())
}

/// Records waiting for room in a full target queue, by partition; the partition is paused
/// meanwhile, so only that target waits.
type Backlogs = HashMap<(String, i32), (mpsc::Sender<Delivery>, VecDeque<Delivery>)>;

/// One consumer group this replica is a member of.
pub(in crate::bus) struct Group {
    pub(in crate::bus) config: ClientConfig,
    pub(in crate::bus) id: String,
    /// The regex subscription.
    pub(in crate::bus) pattern: String,
    pub(in crate::bus) routes: Arc<Routes>,
    pub(in crate::bus) assignments: Arc<AtomicU64>,
    /// For a reader of inbound events: its subject filter. It gets a group of its own, starts
    /// after what the topics hold when it is new, and finds new topics within seconds.
    pub(in crate::bus) inbound: Option<String>,
    /// Counted down once this reader of inbound events is placed (its start found), the
    /// first time only: the bus takes no publish before every reader is.
    pub(in crate::bus) unplaced: Option<Arc<AtomicUsize>>,
    pub(in crate::bus) placed: AtomicBool,
}

/// Finds where a reader of inbound events starts ([`start_at_end`]), retrying while the
/// brokers do not answer; `false` when closing came first.
async fn place(group: &Group, config: &ClientConfig, filter: &str, closing: &Shutdown) -> bool {
    let label = group.id.as_str();
    loop {
        let (c, f, g) = (config.clone(), filter.to_owned(), group.id.clone());
        match tokio::task::spawn_blocking(move || start_at_end(&c, &f, &g)).await {
            Ok(Ok(())) => {
                // A restart after a panic finds its start in the committed offsets.
                if !group.placed.swap(true, Ordering::SeqCst) {
                    if let Some(unplaced) = &group.unplaced {
                        unplaced.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                return true;
            }
            Ok(Err(e)) => {
                tracing::warn!(group = label, error = %e, "cannot find where a reader of inbound events starts; retrying")
            }
            Err(e) => {
                tracing::warn!(group = label, error = %e, "finding where a reader of inbound events starts")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = closing.cancelled() => return false,
        }
    }
}

/// Reads the group's topics until `closing`: dispatches records, stores finished offsets,
/// and at the end commits them.
pub(in crate::bus) async fn run_consumer(group: Arc<Group>, shutdown: Shutdown, closing: Shutdown) {
    let Group {
        config,
        id: group_id,
        pattern,
        routes,
        assignments,
        inbound,
        ..
    } = group.as_ref();
    let label = group_id.as_str();
    // Everything is registered before the first record is read, so none finds no consumer.
    while !routes.is_complete() {
        tokio::select! {
            _ = routes.complete.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = closing.cancelled() => return,
        }
    }
    let trackers: Trackers = Arc::default();
    let mut config = config.clone();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        // Incremental rebalances: a new notify topic (a new target, or a message for an
        // unknown one) moves only its own partition, instead of taking every target away from
        // every replica and restarting what they were delivering.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "false");
    if let Some(filter) = inbound {
        // Inbound topics appear with their first event (a new event type, a new business
        // key); librdkafka's default looks for them every five minutes.
        config.set("topic.metadata.refresh.interval.ms", "1000");
        if !place(&group, &config, filter, &closing).await {
            return;
        }
    }
    let consumer: StreamConsumer<GroupContext> = loop {
        match config.create_with_context(GroupContext {
            trackers: trackers.clone(),
            assignments: assignments.clone(),
            label: group_id.clone(),
            mark_starts: inbound.is_some(),
        }) {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(group = label, error = %e, "cannot create a Kafka consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                    _ = closing.cancelled() => return,
                }
            }
        }
    };
    if let Err(e) = consumer.subscribe(&[pattern]) {
        tracing::error!(group = label, error = %e, pattern, "cannot subscribe");
        return;
    }
    tracing::info!(group = label, pattern, "Kafka consumer running");
    let mut backlogs: Backlogs = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    {
        let mut stream = consumer.stream();
        loop {
            tokio::select! {
                m = stream.next(), if !shutdown.is_triggered() => match m {
                    Some(Ok(m)) => dispatch(&consumer, routes, &trackers, &mut backlogs, &m),
                    Some(Err(e)) => tracing::warn!(group = label, error = %e, "Kafka consumer error"),
                    None => break,
                },
                _ = tick.tick() => {
                    refill(&consumer, &mut backlogs, &trackers);
                    store_positions(&consumer, &trackers);
                }
                _ = closing.cancelled() => break,
            }
        }
    }
    store_positions(&consumer, &trackers);
    let consumer = Arc::new(consumer);
    let committing = consumer.clone();
    let committed =
        tokio::task::spawn_blocking(move || committing.commit_consumer_state(CommitMode::Sync))
            .await;
    match committed {
        Ok(Ok(())) | Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
        Ok(Err(e)) => tracing::warn!(group = label, error = %e, "committing offsets at shutdown"),
        Err(e) => tracing::warn!(group = label, error = %e, "committing offsets at shutdown"),
    }
    // Leaving the group (in a blocking thread: it waits for the coordinator).
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

fn dispatch(
    consumer: &StreamConsumer<GroupContext>,
    routes: &Routes,
    trackers: &Trackers,
    backlogs: &mut Backlogs,
    m: &rdkafka::message::BorrowedMessage<'_>,
) {
    let key = (m.topic().to_owned(), m.partition());
    let Some(tracker) = trackers.lock().expect("not poisoned").get(&key).cloned() else {
        // Not (or no longer) ours: the owner reads it from the committed offset.
        return;
    };
    let Some(tx) = routes.sender(m.topic()) else {
        return;
    };
    tracker.received(m.offset());
    let headers = record_headers(m);
    let published = m
        .timestamp()
        .to_millis()
        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .unwrap_or_else(SystemTime::now);
    let delivery = Delivery {
        subject: m.topic().to_owned(),
        headers,
        payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        published,
        delivered: 1,
        acker: crate::bus::Acker::Kafka(Box::new(KafkaAck {
            tracker,
            offset: m.offset(),
            tx: tx.clone(),
        })),
    };
    if let Some((_, queue)) = backlogs.get_mut(&key) {
        queue.push_back(delivery);
        return;
    }
    match tx.try_send(delivery) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(d)) => {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::debug!(error = %e, "pausing a partition");
            }
            backlogs.insert(key, (tx, VecDeque::from([d])));
        }
        // The pipeline stopped taking records: leave it for whoever reads it next.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Moves backlogged records into queues that have room, resuming partitions that caught up.
fn refill(consumer: &StreamConsumer<GroupContext>, backlogs: &mut Backlogs, trackers: &Trackers) {
    let owned = trackers.lock().expect("not poisoned");
    backlogs.retain(|key, (tx, queue)| {
        if !owned.contains_key(key) {
            // Revoked: these records are the new owner's now.
            return false;
        }
        while let Some(d) = queue.pop_front() {
            match tx.try_send(d) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d)) => {
                    queue.push_front(d);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::debug!(error = %e, "resuming a partition");
        }
        false
    });
}

/// Stores (for the next commit) the position of every partition whose position moved.
fn store_positions<C: rdkafka::consumer::Consumer<GroupContext>>(
    consumer: &C,
    trackers: &Trackers,
) {
    let mut tpl = TopicPartitionList::new();
    for t in trackers.lock().expect("not poisoned").values() {
        if let Some(p) = t.take_position() {
            let _ = tpl.add_partition_offset(&t.topic, t.partition, Offset::Offset(p));
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "storing offsets");
        }
    }
}

/// How a Kafka delivery is finished: its offset marked done, or handed to the queue again.
pub(in crate::bus) struct KafkaAck {
    pub(in crate::bus) tracker: Arc<Tracker>,
    pub(in crate::bus) offset: i64,
    pub(in crate::bus) tx: mpsc::Sender<Delivery>,
}

impl KafkaAck {
    /// Kafka has no negative acknowledgement: the record stays pending (its offset is not
    /// stored) and comes back to the same queue after `delay`, unless the partition moved.
    pub(in crate::bus) fn requeue(&self, d: &Delivery, delay: Duration) {
        if !self.tracker.is_owned() {
            return;
        }
        let acker = crate::bus::Acker::Kafka(Box::new(KafkaAck {
            tracker: self.tracker.clone(),
            offset: self.offset,
            tx: self.tx.clone(),
        }));
        d.redeliver_later(acker, self.tx.clone(), delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stored_only_up_to_the_first_unfinished() {
        let t = Tracker::new("notify.a", 0);
        for o in 5..10 {
            t.received(o);
        }
        t.done(7);
        assert_eq!(t.take_position(), Some(5), "5 and 6 are not finished");
        t.done(5);
        assert_eq!(t.take_position(), Some(6));
        assert_eq!(t.take_position(), None, "unchanged");
        t.done(6);
        assert_eq!(t.take_position(), Some(8));
        t.done(9);
        t.done(8);
        assert_eq!(t.take_position(), Some(10));
        t.done(8);
        assert_eq!(t.take_position(), None, "a second ack changes nothing");
    }

    #[test]
    fn subscriptions_follow_the_wildcard_consumers() {
        let spec = |filter: &str| ConsumerSpec {
            durable: "d".into(),
            filter: filter.into(),
            max_pending: 1,
            stream: "s".into(),
            ack_wait: Duration::from_secs(1),
            new_only: false,
        };
        let specs = [spec("notify.a"), spec("notify.>")];
        assert_eq!(subscription(&specs), "^notify\\..+");
        let specs = [spec("prod.notify.a"), spec("prod.notify.>")];
        assert_eq!(subscription(&specs), "^prod\\.notify\\..+");
        let specs = [spec("dingtalk.*.x"), spec("notify.>")];
        assert_eq!(subscription(&specs), "^dingtalk\\.[^.]+\\.x$|^notify\\..+");
        assert_eq!(subscription(&[spec("a.b")]), "^a\\.b$");
    }

    #[test]
    fn subscription_pattern_escapes_the_prefix() {
        assert_eq!(regex_escape("prod.eu-1."), "prod\\.eu\\-1\\.");
    }
}
