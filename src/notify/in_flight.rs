//! Every bus message this replica holds, queued or being delivered, so that they are kept
//! alive on the bus while they wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::bus::Delivery;
use crate::shutdown::Shutdown;

/// The held deliveries by a number of their own (deliveries have no cheap identity).
#[derive(Default)]
pub struct InFlight {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<Delivery>>>,
}

impl InFlight {
    pub fn insert(&self, d: Arc<Delivery>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, d);
        id
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn all(&self) -> Vec<Arc<Delivery>> {
        self.lock().values().cloned().collect()
    }

    /// A panic elsewhere while holding the lock leaves the map as consistent as before it.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Delivery>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends progress acks for every held message every third of `ack_wait`, so the bus does
    /// not redeliver a message that is only waiting for its target's rate limit to another
    /// replica.
    pub async fn keep_alive(&self, ack_wait: Duration, shutdown: Shutdown) {
        let every = (ack_wait / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            for d in self.all() {
                if let Err(e) = d.progress().await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        }
    }
}
