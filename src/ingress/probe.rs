//! Whether this replica is ready, and if not why: what `/readyz` answers and the status page
//! shows.

use std::sync::Arc;

use super::stream::{StreamReport, Streams};
use crate::bus::Bus;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// What `/readyz` (and the status page) look at.
#[derive(Clone)]
pub struct Probe {
    pub bus: Arc<Bus>,
    pub supervisor: Supervisor,
    pub streams: Streams,
    pub shutdown: Shutdown,
}

/// Whether the replica is ready, and if not, the first reason why.
pub struct Readiness {
    pub reason: Option<&'static str>,
    /// The supervised tasks that keep failing.
    pub failing: Vec<String>,
    pub streams: StreamReport,
}

impl Probe {
    pub fn check(&self) -> Readiness {
        let failing = self.supervisor.failing();
        let streams = self.streams.report();
        let reason = if self.shutdown.is_triggered() {
            Some("shutting down")
        } else if !self.bus.is_ready() {
            Some("bus not ready")
        } else if !failing.is_empty() {
            Some("tasks keep failing")
        } else if !streams.refused.is_empty() {
            Some("platform refuses app credentials")
        } else if streams.fails_readiness {
            Some("long connections down")
        } else {
            None
        };
        Readiness {
            reason,
            failing,
            streams,
        }
    }
}
