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
    /// Holds `d` until the returned guard is settled or dropped.
    pub fn hold(self: &Arc<Self>, d: Arc<Delivery>) -> Held {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, d.clone());
        Held {
            id,
            delivery: d,
            in_flight: self.clone(),
            settled: false,
        }
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

/// One held bus message. Settle it once it was acked, dead-lettered or handed back; dropped
/// unsettled (its task panicked, or was cancelled), it is handed back to the bus for
/// redelivery instead of being kept alive forever.
pub struct Held {
    id: u64,
    delivery: Arc<Delivery>,
    in_flight: Arc<InFlight>,
    settled: bool,
}

impl Held {
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// The message was settled on the bus: stop keeping it alive.
    pub fn settled(mut self) {
        self.settled = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.in_flight.lock().remove(&self.id);
        if !self.settled {
            let delivery = self.delivery.clone();
            // A drop cannot wait; without a runtime (the process is ending) the bus
            // redelivers once the ack wait runs out.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = delivery.nak(Duration::ZERO).await;
                });
            }
        }
    }
}
