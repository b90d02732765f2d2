//! The `NatsKv` store: one entry per target in a JetStream stream keeping the last message per
//! subject, updated with compare-and-set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;

use super::{now_ms, Log, StoreError, STORE_RETRY};
use crate::platform::Limit;

pub struct KvLimiter {
    js: async_nats::jetstream::Context,
    config: stream::Config,
    /// Subject of a target's entry: `<bucket>.<target>`.
    bucket: String,
    ready: AtomicBool,
}

impl KvLimiter {
    pub fn new(
        js: async_nats::jetstream::Context,
        bucket: &str,
        storage: stream::StorageType,
        replicas: usize,
    ) -> Self {
        KvLimiter {
            js,
            config: stream::Config {
                name: bucket.to_owned(),
                description: Some("imbridge per-target rate-limit logs".into()),
                subjects: vec![format!("{bucket}.>")],
                max_messages_per_subject: 1,
                // Logs older than any window decide nothing; a day covers every pause.
                max_age: Duration::from_secs(86_400),
                storage,
                num_replicas: replicas,
                ..Default::default()
            },
            bucket: bucket.to_owned(),
            ready: AtomicBool::new(false),
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
    async fn stream(&self) -> Result<stream::Stream, StoreError> {
        if !self.ready.load(Ordering::SeqCst) {
            self.js
                .create_or_update_stream(self.config.clone())
                .await
                .map_err(|e| StoreError::Nats(e.into()))?;
            self.ready.store(true, Ordering::SeqCst);
        }
        self.js
            .get_stream(&self.config.name)
            .await
            .inspect_err(|_| self.ready.store(false, Ordering::SeqCst))
            .map_err(|e| StoreError::Nats(e.into()))
    }

    fn subject(&self, target: &str) -> String {
        format!("{}.{target}", self.bucket)
    }

    /// Reads the target's log; `(log, sequence)`, sequence 0 when there is none yet.
    async fn read(&self, target: &str) -> Result<(Log, u64), StoreError> {
        let stream = self.stream().await?;
        match stream
            .get_last_raw_message_by_subject(&self.subject(target))
            .await
        {
            Ok(m) => Ok((
                serde_json::from_slice(&m.payload).unwrap_or_default(),
                m.sequence,
            )),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                Ok((Log::default(), 0))
            }
            Err(e) => {
                self.ready.store(false, Ordering::SeqCst);
                Err(StoreError::Nats(e.into()))
            }
        }
    }

    /// Writes `log` if the entry is still at `sequence`; false when another replica won.
    async fn write(&self, target: &str, log: &Log, sequence: u64) -> Result<bool, StoreError> {
        let value = Bytes::from(serde_json::to_vec(log).expect("log serialises"));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            sequence.to_string().as_str(),
        );
        let ack = async {
            self.js
                .publish_with_headers(self.subject(target), headers, value)
                .await?
                .await
        };
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
            Err(e) => {
                self.ready.store(false, Ordering::SeqCst);
                Err(StoreError::Nats(e.into()))
            }
        }
    }

    pub(super) async fn try_take(
        &self,
        target: &str,
        limits: &[Limit],
        margin_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        loop {
            let (mut log, sequence) = self.read(target).await?;
            // The time is read after the store round-trip, so a slot is never recorded earlier
            // than it is taken, however long the compare-and-set races last.
            let now = now_ms();
            let slot = log.next_slot(limits, margin_ms, now);
            if slot > now {
                return Ok(Some(slot));
            }
            log.record(limits, margin_ms, now);
            if self.write(target, &log, sequence).await? {
                return Ok(None);
            }
            // Another replica took a slot in between: decide again on its log.
        }
    }

    async fn update(&self, target: &str, change: impl Fn(&mut Log)) -> Result<bool, StoreError> {
        let (mut log, sequence) = self.read(target).await?;
        change(&mut log);
        self.write(target, &log, sequence).await
    }
}
