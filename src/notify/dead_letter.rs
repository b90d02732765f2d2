//! The end of every bus message: acknowledged once delivered, dead-lettered to
//! `dlq.notify.<target>` (with why, how many attempts, and the platform's last answer) once it
//! cannot be, or handed back to the bus for another replica.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::verdict::{Reason, Verdict};
use crate::bus::{self, Bus, Delivery, Message};
use crate::metrics::{Metrics, UNKNOWN_APP};
use crate::secret::redact;
use crate::shutdown::Shutdown;

/// Headers a dead letter carries besides the original ones.
pub const DLQ_REASON: &str = "imbridge-dlq-reason";
pub const DLQ_ATTEMPTS: &str = "imbridge-dlq-attempts";
pub const DLQ_ANSWER: &str = "imbridge-dlq-answer";
pub const DLQ_TARGET: &str = "imbridge-dlq-target";
/// The HTTP status of the last answer, when one came.
pub const DLQ_STATUS: &str = "imbridge-dlq-status";

/// The last answer a dead letter reports: its HTTP status (0 when none came) and text.
struct Last<'a> {
    status: u16,
    answer: &'a str,
}

/// Settles bus messages: ack, nak or dead letter.
pub struct DeadLetters {
    pub bus: Arc<Bus>,
    pub prefix: String,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

impl DeadLetters {
    /// Acks a delivered message, dead-letters a failed one, or hands it back on shutdown.
    pub async fn settle(&self, target: &str, delivery: &Delivery, verdict: Verdict) {
        match verdict {
            Verdict::Delivered { .. } => {
                let latency = SystemTime::now()
                    .duration_since(delivery.published)
                    .unwrap_or_default();
                self.metrics.notify_sent(target, latency);
                if let Err(e) = delivery.ack().await {
                    // Delivered but not acked: it will come again (at least once).
                    tracing::warn!(target, error = %e, "ack failed after delivery");
                }
            }
            Verdict::Failed {
                reason: Reason::Shutdown | Reason::Moved,
                ..
            } => {
                let _ = delivery.nak(Duration::ZERO).await;
            }
            Verdict::Failed {
                reason,
                attempts,
                answer,
            } => {
                let status = answer.as_ref().map_or(0, |a| a.status);
                let detail = answer.map(|a| a.detail).unwrap_or_default();
                let last = Last {
                    status,
                    answer: &detail,
                };
                self.store_answered(delivery, target, reason, attempts, last)
                    .await;
            }
        }
    }

    /// Dead-letters, then acks; if the dead letter cannot be stored, the message stays on the
    /// bus.
    pub async fn store(
        &self,
        delivery: &Delivery,
        target: &str,
        reason: Reason,
        attempts: u32,
        answer: &str,
    ) {
        let last = Last { status: 0, answer };
        self.store_answered(delivery, target, reason, attempts, last)
            .await
    }

    /// [`DeadLetters::store`], with the HTTP status of the last answer.
    async fn store_answered(
        &self,
        delivery: &Delivery,
        target: &str,
        reason: Reason,
        attempts: u32,
        last: Last<'_>,
    ) {
        // Header values are one line of printable text; an answer or a compose error may quote
        // a URL, whose credentials stay here.
        let answer = bus::header_value(&redact(last.answer));
        let mut msg = self.letter(delivery, target, reason, attempts, &answer);
        if last.status != 0 {
            msg.headers
                .push((DLQ_STATUS.into(), last.status.to_string()));
        }
        if !self.bus.publish_until_stored(&msg, &self.shutdown).await {
            let _ = delivery.nak(Duration::ZERO).await;
            return;
        }
        // Unknown targets share one label so arbitrary subjects cannot create series.
        let label = if reason == Reason::UnknownTarget {
            UNKNOWN_APP
        } else {
            target
        };
        self.metrics.notify_dead_letter(label, reason.label());
        tracing::warn!(target, reason = reason.label(), attempts, answer = %answer, "notification dead-lettered");
        if let Err(e) = delivery.ack().await {
            tracing::warn!(target, error = %e, "ack failed after dead-lettering");
        }
    }

    /// The dead letter: the original body and headers, plus why.
    fn letter(
        &self,
        delivery: &Delivery,
        target: &str,
        reason: Reason,
        attempts: u32,
        answer: &str,
    ) -> Message {
        let mut headers = delivery.copied_headers();
        headers.push((DLQ_REASON.into(), reason.label().into()));
        headers.push((DLQ_ATTEMPTS.into(), attempts.to_string()));
        headers.push((DLQ_TARGET.into(), target.into()));
        headers.push((DLQ_ANSWER.into(), answer.into()));
        let id = match delivery.id() {
            Some(id) => format!("{id}.dlq"),
            None => format!("dlq-{}", hex::encode(rand::random::<[u8; 16]>())),
        };
        let token = if bus::is_valid_token(target) {
            target
        } else {
            "_invalid"
        };
        Message {
            subject: bus::with_prefix(&self.prefix, &format!("dlq.notify.{token}")),
            id,
            headers,
            payload: Bytes::clone(&delivery.payload),
        }
    }
}
