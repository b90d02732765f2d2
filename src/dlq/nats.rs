//! The dead letters on JetStream: the DLQ stream (`notify.dlq_stream`, `IMBRIDGE_DLQ` by
//! default) read with an ordered consumer filtered on `dlq.notify.<target>`: ephemeral,
//! acknowledging nothing, gone when the command ends, so it takes nothing from the daemon.
//! Letters are deleted one by one by sequence.

use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use super::{DlqError, OneOff};
use crate::bus::{self, nats::header_pairs};
use crate::config::Settings;
use crate::notify::dlq::{Filter, Letter};

/// How long one message of the stream may take to arrive before the read gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Store {
    pub bus: OneOff,
    js: jetstream::Context,
    stream: String,
    prefix: String,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> DlqError {
    DlqError::Unavailable(format!("{what}: {e}"))
}

impl Store {
    pub async fn new(bus: OneOff, settings: &Settings) -> Result<Store, DlqError> {
        let js = bus
            .bus
            .nats()
            .ok_or_else(|| DlqError::Usage("not a NATS bus".into()))?
            .jetstream()
            .clone();
        Ok(Store {
            bus,
            js,
            stream: settings.notify.dlq_stream.clone(),
            prefix: settings.bus.subject_prefix.clone(),
        })
    }

    /// The selected letters, oldest first, up to the filter's limit.
    pub async fn list(&self, target: &str, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        let subject = bus::with_prefix(&self.prefix, &format!("dlq.notify.{target}"));
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| unavailable("reading the DLQ stream", e))?;
        let config = consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| unavailable("creating a reader of the DLQ stream", e))?;
        let mut letters = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(letters);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("reading the DLQ stream", e))?;
        while letters.len() < filter.limit() {
            let msg = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(unavailable("reading the DLQ stream", e)),
                Ok(None) | Err(_) => {
                    return Err(DlqError::Unavailable(
                        "the DLQ stream stopped answering".into(),
                    ))
                }
            };
            let info = msg
                .info()
                .map_err(|e| unavailable("reading a dead letter", e))?;
            let time = UNIX_EPOCH
                + Duration::from_nanos(info.published.unix_timestamp_nanos().max(0) as u64);
            let letter = Letter::new(
                info.stream_sequence.to_string(),
                time,
                msg.subject.to_string(),
                header_pairs(msg.headers.as_ref()),
                &msg.payload,
            );
            let last = info.pending == 0;
            if filter.matches(&letter) {
                letters.push(letter);
            }
            if last {
                break;
            }
        }
        Ok(letters)
    }

    /// Deletes the letter from the stream.
    pub async fn remove(&self, letter: &Letter) -> Result<(), DlqError> {
        let seq: u64 = letter
            .id
            .parse()
            .map_err(|_| DlqError::Usage(format!("{}: not a sequence", letter.id)))?;
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| unavailable("reading the DLQ stream", e))?;
        stream
            .delete_message(seq)
            .await
            .map_err(|e| unavailable(&format!("deleting dead letter {seq}"), e))?;
        Ok(())
    }
}
