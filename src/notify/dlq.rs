//! Dead letters as an operator sees them: what `imbridge dlq` and the internal listener's
//! `/dlq/<target>` list, filter, print and replay, whatever the engine that keeps them.
//!
//! A replay is a new publish to `notify.<target>` whose id is derived from the letter's:
//! `<original ce-id>.replay.<letter id>` (the letter id is the JetStream sequence, the Kafka
//! `<partition>-<offset>`, or the in-process sequence). The same letter replayed twice thus
//! carries the same id, and the bus's duplicate window drops the second publish.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::dead_letter::{DLQ_ATTEMPTS, DLQ_REASON, DLQ_STATUS};
use crate::bus::{self, Message};

/// The header naming the letter a replayed notification came from.
pub const REPLAY_OF: &str = "imbridge-replay-of";

/// One dead letter, as read back from the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    /// Where the bus keeps it: a JetStream sequence, a Kafka `<partition>-<offset>`, or the
    /// in-process sequence. What `--id` names and replay ids are derived from.
    pub id: String,
    /// When the bus stored it, as RFC 3339.
    pub time: String,
    pub subject: String,
    /// Names in the `ce-` spelling whatever the engine.
    pub headers: Vec<(String, String)>,
    /// The original body; bodies are JSON notifications, so text (lossy if not UTF-8).
    pub body: String,
}

impl Letter {
    pub fn new(
        id: String,
        time: SystemTime,
        subject: String,
        headers: Vec<(String, String)>,
        payload: &[u8],
    ) -> Letter {
        Letter {
            id,
            time: humantime::format_rfc3339_millis(time).to_string(),
            subject,
            headers,
            body: String::from_utf8_lossy(payload).into_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn stored_at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.time).ok()
    }

    /// One line: id, time, reason, attempts, status, the original ce-id (tab-separated, `-`
    /// for what the letter does not say).
    pub fn summary(&self) -> String {
        let get = |name| self.header(name).unwrap_or("-");
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            self.id,
            self.time,
            get(DLQ_REASON),
            get(DLQ_ATTEMPTS),
            get(DLQ_STATUS),
            get("ce-id"),
        )
    }

    /// Everything: the summary fields, every header, a blank line, the body. Answers were
    /// redacted when the letter was written, so it is printed as it is.
    pub fn full(&self) -> String {
        let mut out = format!(
            "id: {}\ntime: {}\nsubject: {}\n",
            self.id, self.time, self.subject
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&self.body);
        out.push('\n');
        out
    }

    /// The notification to publish again: to `notify.<target>`, with the original headers
    /// less the dead-letter ones, `ce-id` the derived replay id, and [`REPLAY_OF`] saying
    /// which letter it was.
    pub fn replay(&self, prefix: &str, target: &str) -> Message {
        let original = self.header("ce-id").unwrap_or("dlq").to_owned();
        let id = format!("{original}.replay.{}", self.id);
        let mut headers: Vec<(String, String)> = self
            .headers
            .iter()
            .filter(|(k, _)| {
                let k = k.to_ascii_lowercase();
                !k.starts_with("imbridge-dlq-")
                    && !k.starts_with("nats-")
                    && k != "ce-id"
                    && k != REPLAY_OF
            })
            .cloned()
            .collect();
        headers.push(("ce-id".into(), id.clone()));
        headers.push((
            REPLAY_OF.into(),
            bus::header_value(&format!("{}/{}", self.subject, self.id)),
        ));
        Message {
            subject: bus::with_prefix(prefix, &format!("notify.{target}")),
            id,
            headers,
            payload: Bytes::from(self.body.clone().into_bytes()),
        }
    }
}

/// Which letters a command acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Only this `imbridge-dlq-reason` (e.g. `permanent`).
    pub reason: Option<String>,
    /// Only letters stored at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only the letter with this id.
    pub id: Option<String>,
    /// At most this many (oldest first).
    pub limit: Option<usize>,
}

/// Letters listed when no `--limit` is given.
pub const DEFAULT_LIMIT: usize = 100;

/// A filter the command line could not make sense of.
#[derive(Debug, thiserror::Error)]
#[error("--since {0:?}: neither a duration (30m, 2h) nor an RFC 3339 time")]
pub struct BadSince(pub String);

impl Filter {
    /// `--since` as given: a duration back from `now`, or an RFC 3339 time.
    pub fn parse_since(raw: &str, now: SystemTime) -> Result<String, BadSince> {
        if let Ok(d) = humantime::parse_duration(raw) {
            let at = now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH);
            return Ok(humantime::format_rfc3339_millis(at).to_string());
        }
        humantime::parse_rfc3339_weak(raw)
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .map_err(|_| BadSince(raw.to_owned()))
    }

    /// Whether anything narrows the selection (purge refuses to act on everything otherwise).
    pub fn narrows(&self) -> bool {
        self.reason.is_some() || self.since.is_some() || self.id.is_some()
    }

    pub fn since_time(&self) -> Option<SystemTime> {
        self.since
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
    }

    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT)
    }

    /// Whether `letter` is selected (the limit aside).
    pub fn matches(&self, letter: &Letter) -> bool {
        let reason = self
            .reason
            .as_deref()
            .is_none_or(|r| letter.header(DLQ_REASON) == Some(r));
        let id = self.id.as_deref().is_none_or(|i| letter.id == i);
        let since = match (self.since_time(), letter.stored_at()) {
            (Some(since), Some(at)) => at + Duration::from_millis(1) > since,
            _ => true,
        };
        reason && id && since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> Letter {
        Letter::new(
            "7".into(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            "dlq.notify.ops".into(),
            vec![
                ("ce-id".into(), "abc".into()),
                (DLQ_REASON.into(), "permanent".into()),
                (DLQ_ATTEMPTS.into(), "1".into()),
                ("imbridge-dlq-answer".into(), "errcode 310000".into()),
            ],
            br#"{"text":"hi"}"#,
        )
    }

    #[test]
    fn replay_has_a_derived_id_and_no_dead_letter_headers() {
        let msg = letter().replay("prod", "ops");
        assert_eq!(msg.subject, "prod.notify.ops");
        assert_eq!(msg.id, "abc.replay.7");
        assert!(msg
            .headers
            .contains(&("ce-id".into(), "abc.replay.7".into())));
        assert!(!msg
            .headers
            .iter()
            .any(|(k, _)| k.starts_with("imbridge-dlq")));
        assert_eq!(msg.payload.as_ref(), br#"{"text":"hi"}"#);
        // The same letter, the same id: the duplicate window drops a second replay.
        assert_eq!(letter().replay("prod", "ops").id, msg.id);
    }

    #[test]
    fn filters() {
        let l = letter();
        assert!(Filter::default().matches(&l));
        let reason = |r: &str| Filter {
            reason: Some(r.into()),
            ..Filter::default()
        };
        assert!(reason("permanent").matches(&l));
        assert!(!reason("expired").matches(&l));
        let since = |s: &str| Filter {
            since: Some(s.into()),
            ..Filter::default()
        };
        assert!(since("1970-01-12T13:46:40Z").matches(&l));
        assert!(!since("1970-01-12T13:46:41Z").matches(&l));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_060);
        assert_eq!(
            Filter::parse_since("2m", now).unwrap(),
            "1970-01-12T13:45:40.000Z"
        );
        assert!(Filter::parse_since("yesterday", now).is_err());
        assert!(!Filter::default().narrows());
        assert!(reason("x").narrows());
    }

    #[test]
    fn summary_line() {
        assert_eq!(
            letter().summary(),
            "7\t1970-01-12T13:46:40.000Z\tpermanent\t1\t-\tabc"
        );
    }
}
