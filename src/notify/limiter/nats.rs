//! The `NatsKv` store: one entry per key in a JetStream stream keeping the last message per
//! subject, updated with compare-and-set.
//!
//! Targets and members live in two streams. A target's entry may hold a pause, so its stream
//! keeps entries for a day. Member keys come from input (every recipient an app message
//! names), so their stream's `max_age` is the longest member window plus margins: the server
//! itself removes an entry once it can no longer decide anything, whatever ids are sent, and
//! with no clean-up task on any replica. (Per-message TTLs would let one stream do both, but
//! need nats-server 2.11; `max_age` works on every JetStream server.)

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;

use super::{now_ms, Key, Log, Scope, StoreError, MEMBERS_SUFFIX, STORE_RETRY};

/// How long a target's entry is kept after its last change: a day covers every window and
/// every pause a platform asks for.
const TARGET_MAX_AGE: Duration = Duration::from_secs(86_400);

pub struct KvLimiter {
    js: async_nats::jetstream::Context,
    targets: Store,
    members: Store,
    /// Replicated streams (`replicas` > 1): each write is conditional on the whole stream's
    /// last sequence rather than on its subject's. A clustered stream checks
    /// `Nats-Expected-Last-Subject-Sequence` against what its leader has applied, not against
    /// writes still being replicated, so two replicas taking the same slot at once can both
    /// succeed (nats-server#4320, seen here as a robot getting 6 sends in a window of 5 with a
    /// three-node cluster). The stream-level condition is checked against every write the
    /// leader has accepted. It serialises all keys of a store: about one write per round
    /// trip across all targets, plenty for chat platforms' limits.
    clustered: bool,
}

/// A store's entry for one key, and what a write replacing it must find.
struct Entry {
    log: Log,
    /// The entry's own sequence (0: none).
    sequence: u64,
    /// The stream's last sequence when the entry was read (clustered stores).
    stream_last: u64,
}

/// The seed of a clustered store: a stream never written to has last sequence 0, which the
/// server takes as "no condition".
const SEED: &str = "_imbridge_seed";

/// One stream of entries, its subjects `<name>.<key>`.
struct Store {
    config: stream::Config,
    /// The stream, once created (or updated); dropped after any store error, so the next use
    /// puts it in place again (a server that lost it, say).
    stream: Mutex<Option<stream::Stream<()>>>,
}

impl Store {
    fn new(name: String, description: &str, max_age: Duration, template: &stream::Config) -> Self {
        Store {
            config: stream::Config {
                subjects: vec![format!("{name}.>")],
                name,
                description: Some(description.into()),
                max_messages_per_subject: 1,
                max_age,
                ..template.clone()
            },
            stream: Mutex::new(None),
        }
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.config.name)
    }

    /// The stream may be read and written from a panicking task's leftovers: it is only ever
    /// replaced whole.
    fn lock(&self) -> MutexGuard<'_, Option<stream::Stream<()>>> {
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forget(&self) {
        *self.lock() = None;
    }
}

impl KvLimiter {
    /// `member_age`: how long a member's entry must outlive its last send (the longest member
    /// window plus margins); unused when no target limits members.
    pub fn new(
        js: async_nats::jetstream::Context,
        bucket: &str,
        storage: stream::StorageType,
        replicas: usize,
        member_age: Duration,
    ) -> Self {
        let template = stream::Config {
            storage,
            num_replicas: replicas,
            ..Default::default()
        };
        KvLimiter {
            js,
            clustered: replicas > 1,
            targets: Store::new(
                bucket.to_owned(),
                "imbridge per-target rate-limit logs",
                TARGET_MAX_AGE,
                &template,
            ),
            members: Store::new(
                format!("{bucket}{MEMBERS_SUFFIX}"),
                "imbridge per-recipient rate-limit logs, each kept only within its windows",
                member_age.max(Duration::from_secs(1)),
                &template,
            ),
        }
    }

    fn store(&self, scope: Scope) -> &Store {
        match scope {
            Scope::Target => &self.targets,
            Scope::Member => &self.members,
        }
    }

    /// Records a pause, retrying while other replicas win the compare-and-set.
    pub(super) async fn pause(&self, target: &str, until_ms: u64) {
        for attempt in 1..=10 {
            match self
                .update(target, |log| {
                    log.paused_until = log.paused_until.max(until_ms);
                })
                .await
            {
                Ok(true) => return,
                Ok(false) if attempt < 10 => continue,
                Ok(false) => {
                    tracing::warn!(target, "could not record the pause (too much contention); other replicas may send before it ends");
                }
                Err(e) => {
                    tracing::warn!(target, error = %e, "cannot record pause in the rate-limit store");
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }

    /// The stream, created (or updated) on first use and again after any store error.
    async fn stream(&self, store: &Store) -> Result<stream::Stream<()>, StoreError> {
        let cached = store.lock().clone();
        if let Some(stream) = cached {
            return Ok(stream);
        }
        self.js
            .create_or_update_stream(store.config.clone())
            .await
            .map_err(|e| StoreError::Nats(e.into()))?;
        // Without its info: each key's read is then one round trip, not two.
        let stream = self
            .js
            .get_stream_no_info(&store.config.name)
            .await
            .map_err(|e| StoreError::Nats(e.into()))?;
        *store.lock() = Some(stream.clone());
        Ok(stream)
    }

    /// Reads the key's entry (sequence 0 when there is none yet, or it expired). For a
    /// clustered store the stream's last sequence is read first: a write landing in between
    /// then makes the condition fail rather than pass on a stale entry.
    async fn read(&self, store: &Store, key: &str) -> Result<Entry, StoreError> {
        let stream = self.stream(store).await?;
        let fail = |e: async_nats::Error| {
            store.forget();
            StoreError::Nats(e)
        };
        let stream_last = match self.clustered {
            true => self.stream_last(store, &stream).await.map_err(fail)?,
            false => 0,
        };
        match stream
            .get_last_raw_message_by_subject(&store.subject(key))
            .await
        {
            Ok(m) => Ok(Entry {
                log: serde_json::from_slice(&m.payload).unwrap_or_default(),
                sequence: m.sequence,
                stream_last,
            }),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Entry {
                log: Log::default(),
                sequence: 0,
                stream_last,
            }),
            Err(e) => Err(fail(e.into())),
        }
    }

    /// The stream's last sequence, seeding a stream that has none.
    async fn stream_last(
        &self,
        store: &Store,
        stream: &stream::Stream<()>,
    ) -> Result<u64, async_nats::Error> {
        let last = stream.get_info().await?.state.last_sequence;
        if last > 0 {
            return Ok(last);
        }
        // Every replica may seed at once: the message id makes it one message.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", SEED);
        let subject = store.subject(SEED);
        self.js
            .publish_with_headers(subject, headers, Bytes::new())
            .await?
            .await?;
        Ok(stream.get_info().await?.state.last_sequence)
    }

    /// Writes `log` if the entry (clustered: the whole stream) is still as read; false when
    /// another replica wrote first.
    async fn write(
        &self,
        store: &Store,
        key: &str,
        log: &Log,
        read: &Entry,
    ) -> Result<bool, StoreError> {
        let value = Bytes::from(serde_json::to_vec(log).expect("log serialises"));
        let mut headers = async_nats::HeaderMap::new();
        match self.clustered {
            true => headers.insert(
                "Nats-Expected-Last-Sequence",
                read.stream_last.to_string().as_str(),
            ),
            false => headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                read.sequence.to_string().as_str(),
            ),
        }
        let ack = async {
            self.js
                .publish_with_headers(store.subject(key), headers, value)
                .await?
                .await
        };
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => {
                store.forget();
                Err(StoreError::Nats(e.into()))
            }
        }
    }

    pub(super) async fn try_take(
        &self,
        key: &Key<'_>,
        margin_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let store = self.store(key.scope);
        loop {
            let mut entry = self.read(store, key.name).await?;
            // The time is read after the store round-trip, so a slot is never recorded earlier
            // than it is taken, however long the compare-and-set races last.
            let now = now_ms();
            let slot = entry.log.next_slot(key.limits, margin_ms, now);
            if slot > now {
                return Ok(Some(slot));
            }
            entry.log.record(key.limits, margin_ms, now);
            if self.write(store, key.name, &entry.log, &entry).await? {
                return Ok(None);
            }
            // Another replica took a slot in between: decide again on its log.
        }
    }

    async fn update(&self, target: &str, change: impl Fn(&mut Log)) -> Result<bool, StoreError> {
        let mut entry = self.read(&self.targets, target).await?;
        change(&mut entry.log);
        self.write(&self.targets, target, &entry.log, &entry).await
    }
}
