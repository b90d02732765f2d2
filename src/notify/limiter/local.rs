//! The `Local` store: the logs in this process, for the memory bus or a single replica.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::logs::Logs;
use crate::platform::Limit;

#[derive(Default)]
pub struct Local {
    logs: Mutex<Logs>,
}

impl Local {
    pub(super) fn try_take(
        &self,
        target: &str,
        limits: &[Limit],
        margin_ms: u64,
        now: u64,
    ) -> Option<u64> {
        let mut logs = self.lock();
        let log = logs.entry(target, now);
        let slot = log.next_slot(limits, margin_ms, now);
        if slot > now {
            return Some(slot);
        }
        log.record(limits, margin_ms, now);
        None
    }

    pub(super) fn pause(&self, target: &str, until_ms: u64, now: u64) {
        let mut logs = self.lock();
        let log = logs.entry(target, now);
        log.paused_until = log.paused_until.max(until_ms);
    }

    /// Every change is one assignment: a panic elsewhere cannot leave a log half-written.
    fn lock(&self) -> MutexGuard<'_, Logs> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
