//! The logs a replica holds in memory (the `Local` store, and the `KafkaLog` store's copy of
//! its topic), by key. Keys come from input (one per recipient of an app message), so a log is
//! forgotten once it can no longer decide anything: the map holds only the keys used within
//! their windows, whatever ids the messages name.

use std::collections::HashMap;

use super::Log;

/// How often (ms) the map is swept for logs past their horizon. A log is never forgotten
/// early, so this only decides how long a spent one lingers.
const SWEEP_EVERY: u64 = 1_000;

/// A map this large (or larger) is also swept whenever it has doubled since the last sweep, so
/// a burst of keys holds at most about twice the keys still inside their windows, however
/// many keys a second bring. Each sweep costs its size once per doubling: O(1) per key.
const SWEEP_FROM: usize = 1_024;

#[derive(Default)]
pub struct Logs {
    map: HashMap<String, Log>,
    /// When (ms) the next sweep is due.
    next_sweep: u64,
    /// Logs left by the last sweep.
    swept_len: usize,
}

impl Logs {
    /// The log of `key`, empty when it has none; sweeps first when a sweep is due.
    pub fn entry(&mut self, key: &str, now: u64) -> &mut Log {
        self.sweep(now);
        self.map.entry(key.to_owned()).or_default()
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Log> {
        self.map.get_mut(key)
    }

    /// Adds what another replica logged for `key`; a log already spent is not even stored.
    pub fn merge(&mut self, key: String, log: &Log, now: u64) {
        self.sweep(now);
        if let Some(mine) = self.map.get_mut(&key) {
            mine.merge(log);
        } else if log.expires_at() > now {
            self.map.insert(key, log.clone());
        }
    }

    /// Forgets the logs past their horizon, once per [`SWEEP_EVERY`] or when the map doubled.
    fn sweep(&mut self, now: u64) {
        let doubled = self.map.len() >= SWEEP_FROM.max(2 * self.swept_len);
        if now < self.next_sweep && !doubled {
            return;
        }
        self.next_sweep = now.saturating_add(SWEEP_EVERY);
        self.map.retain(|_, log| log.expires_at() > now);
        self.swept_len = self.map.len();
        // A burst of keys must not pin its peak's table for the process's lifetime.
        if self.map.capacity() > 64 && self.map.len() < self.map.capacity() / 4 {
            self.map.shrink_to(self.map.len() * 2);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::platform::Limit;

    #[test]
    fn logs_are_forgotten_once_past_their_windows() {
        let limits = [Limit::new(1, Duration::from_millis(500))];
        let mut logs = Logs::default();
        let t0 = 1_000_000;
        for i in 0..10_000 {
            logs.entry(&format!("member_{i}"), t0)
                .record(&limits, 100, t0);
        }
        assert_eq!(logs.len(), 10_000);
        // Within the window (plus margin) every log still decides the next send.
        logs.entry("late", t0 + SWEEP_EVERY)
            .record(&limits, 100, t0 + SWEEP_EVERY);
        assert_eq!(
            logs.len(),
            1,
            "the 10,000 spent logs are gone, the new one stays"
        );
        assert!(logs.map.capacity() < 1_000, "the table shrank");
        // A pause keeps a log past its sends' horizon.
        logs.entry("paused", t0).paused_until = t0 + 10 * SWEEP_EVERY;
        logs.entry("x", t0 + 3 * SWEEP_EVERY);
        assert!(logs.get_mut("paused").is_some());
        assert!(logs.get_mut("late").is_none());
    }

    #[test]
    fn a_burst_is_swept_as_it_doubles_not_only_once_a_second() {
        let limits = [Limit::new(1, Duration::from_millis(10))];
        let mut logs = Logs::default();
        // 100,000 keys within one sweep interval, each spent 10 ms after its send.
        for i in 0..100_000u64 {
            let now = 1_000_000 + i / 100;
            logs.entry(&format!("member_{i}"), now)
                .record(&limits, 0, now);
            assert!(
                logs.len() <= 2 * SWEEP_FROM + 1_000,
                "{} logs at key {i}",
                logs.len()
            );
        }
        // All live at once: swept, and kept, as the map doubles.
        let mut live = Logs::default();
        for i in 0..10_000 {
            live.entry(&format!("m{i}"), 5).record(&limits, 0, 5);
        }
        assert_eq!(live.len(), 10_000);
    }

    #[test]
    fn logs_in_their_window_are_kept() {
        let limits = [Limit::new(2, Duration::from_millis(5_000))];
        let mut logs = Logs::default();
        logs.entry("a", 0).record(&limits, 0, 0);
        logs.entry("b", 4_999);
        assert_eq!(logs.entry("a", 4_999).next_slot(&limits, 0, 4_999), 4_999);
        logs.entry("a", 4_999).record(&limits, 0, 4_999);
        assert_eq!(logs.entry("a", 4_999).next_slot(&limits, 0, 4_999), 5_000);
    }

    #[test]
    fn spent_logs_of_other_replicas_are_not_stored() {
        let limits = [Limit::new(1, Duration::from_millis(100))];
        let mut spent = Log::default();
        spent.record(&limits, 0, 0);
        let mut logs = Logs::default();
        logs.merge("old".into(), &spent, 100);
        assert_eq!(logs.len(), 0);
        logs.merge("live".into(), &spent, 99);
        assert_eq!(logs.len(), 1);
        // Without a horizon (an older replica's log) it is kept for a day.
        let mut unknown = spent.clone();
        unknown.horizon = 0;
        logs.merge("unknown".into(), &unknown, 1_000);
        assert!(logs.get_mut("unknown").is_some());
        logs.entry("x", super::super::UNKNOWN_HORIZON + 1);
        assert_eq!(logs.len(), 1, "only x is left");
    }
}
