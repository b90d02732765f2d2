//! The last delivery result of each target, for the status page: when, how it ended, and the
//! platform's code. Keyed by configured target names only (a reload drops the removed ones),
//! so it cannot grow with input.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use super::verdict::{Reason, Verdict};

/// How one target's latest delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastSend {
    pub at: SystemTime,
    /// `delivered`, or the reason it was not (`attempts_exhausted`, `rate_limited`, …).
    pub outcome: &'static str,
    /// The platform's error code, when its last answer had one.
    pub code: Option<i64>,
    /// The HTTP status of the last answer; 0 when none came.
    pub status: u16,
}

impl LastSend {
    pub fn delivered(&self) -> bool {
        self.outcome == "delivered"
    }
}

#[derive(Default)]
pub struct Recent {
    sends: Mutex<BTreeMap<String, LastSend>>,
}

impl Recent {
    /// Records how a delivery to `target` ended; a delivery that merely stopped (shutdown, or
    /// the message moved to another replica) says nothing about the target and is left out.
    pub fn record(&self, target: &str, verdict: &Verdict) {
        let (outcome, answer) = match verdict {
            Verdict::Delivered { answer, .. } => ("delivered", Some(answer)),
            Verdict::Failed {
                reason: Reason::Shutdown | Reason::Moved,
                ..
            } => return,
            Verdict::Failed { reason, answer, .. } => (reason.label(), answer.as_ref()),
        };
        let last = LastSend {
            at: SystemTime::now(),
            outcome,
            code: answer.and_then(|a| a.code),
            status: answer.map_or(0, |a| a.status),
        };
        let mut sends = self.sends.lock().unwrap_or_else(PoisonError::into_inner);
        match sends.get_mut(target) {
            Some(slot) => *slot = last,
            None => {
                sends.insert(target.to_owned(), last);
            }
        }
    }

    pub fn last(&self, target: &str) -> Option<LastSend> {
        let sends = self.sends.lock().unwrap_or_else(PoisonError::into_inner);
        sends.get(target).cloned()
    }

    /// Forgets the targets a reload removed.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut sends = self.sends.lock().unwrap_or_else(PoisonError::into_inner);
        sends.retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::outbound::{Answer, Class};

    fn answer(code: Option<i64>, status: u16) -> Answer {
        Answer {
            class: Class::Ok,
            code,
            status,
            detail: String::new(),
        }
    }

    #[test]
    fn the_latest_result_wins_and_stops_say_nothing() {
        let recent = Recent::default();
        let ok = Verdict::Delivered {
            parts: 1,
            answer: answer(Some(0), 200),
        };
        recent.record("ops", &ok);
        assert!(recent.last("ops").unwrap().delivered());
        let failed = Verdict::Failed {
            reason: Reason::RateLimited,
            attempts: 3,
            answer: Some(answer(Some(130101), 200)),
        };
        recent.record("ops", &failed);
        let last = recent.last("ops").unwrap();
        assert_eq!((last.outcome, last.code), ("rate_limited", Some(130101)));
        let stopped = Verdict::Failed {
            reason: Reason::Shutdown,
            attempts: 0,
            answer: None,
        };
        recent.record("ops", &stopped);
        assert_eq!(recent.last("ops").unwrap().outcome, "rate_limited");
        recent.retain(|name| name != "ops");
        assert_eq!(recent.last("ops"), None);
    }
}
