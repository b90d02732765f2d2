//! Long-lived tasks under supervision. A panic in a target's worker, a bus consumer or a
//! keeper must not leave a target silent while the daemon reports itself ready: the panic is
//! caught, counted (`imbridge_task_restarts_total{task}`) and logged, the task is started again
//! after a backoff, and a task that keeps dying turns `/readyz` red with its name.
//!
//! What the task held is released by its owners' `Drop`s as the panic unwinds (a held bus
//! message is handed back for redelivery, see `notify::in_flight`), so the restarted task
//! begins clean.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Panics in a row (each within [`STEADY_AFTER`] of its start) after which a task is reported
/// failing. It is still restarted: a poison message may be dead-lettered by then, or a broker
/// come back.
pub const FAILING_AFTER: u32 = 3;

/// A run this long counts as recovered: its next panic starts the count again.
pub const STEADY_AFTER: Duration = Duration::from_secs(60);

/// Backoff between restarts: from this…
const RESTART_INITIAL: Duration = Duration::from_millis(100);
/// …doubling up to this.
const RESTART_MAX: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Supervisor {
    metrics: Metrics,
    /// Tasks that have failed [`FAILING_AFTER`] times in a row and not yet recovered.
    failing: Arc<Mutex<BTreeSet<String>>>,
}

impl Supervisor {
    pub fn new(metrics: Metrics) -> Self {
        Supervisor {
            metrics,
            failing: Arc::default(),
        }
    }

    /// Runs the task `make` builds until it returns (it returns on `shutdown`, or when its
    /// source ends); builds and runs it again after each panic. `task` names it in logs,
    /// metrics and `/readyz`: a kind and a configured name (`notify_worker:ops`), never input.
    pub fn spawn<F, Fut>(&self, task: String, shutdown: Shutdown, mut make: F) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let mut run = tokio::spawn(make());
                let steady = tokio::time::sleep(STEADY_AFTER);
                tokio::pin!(steady);
                let ended = loop {
                    tokio::select! {
                        ended = &mut run => break ended,
                        // Running well for long enough: whatever failed before has passed.
                        _ = &mut steady, if failures > 0 => {
                            failures = 0;
                            this.recovered(&task);
                        }
                    }
                };
                let panic = match ended {
                    Ok(()) => {
                        this.recovered(&task);
                        return;
                    }
                    Err(e) if e.is_panic() => describe(e.into_panic()),
                    // Cancelled: the runtime is going away.
                    Err(_) => return,
                };
                failures += 1;
                this.metrics.task_restart(&task);
                tracing::error!(task, panic = %panic, failures, "task panicked; restarting it");
                if failures >= FAILING_AFTER {
                    this.lock().insert(task.clone());
                }
                let delay = crate::backoff::delay(failures, RESTART_INITIAL, RESTART_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    }

    /// The tasks that keep dying, for `/readyz`.
    pub fn failing(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn recovered(&self, task: &str) {
        self.lock().remove(task);
    }

    /// A set of names stays consistent whatever panicked while holding it.
    fn lock(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.failing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A fault-injection point for tests, compiled in only with the `failpoints` feature: while
/// `point` is configured as `return(<name>)` (see the `fail` crate), the task working for
/// `name` panics here.
#[allow(unused_variables)]
pub fn failpoint(point: &str, name: &str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(point, |victim: Option<String>| {
        if victim.as_deref() == Some(name) {
            panic!("failpoint {point} for {name}");
        }
    });
}

/// The panic's message, when it has one.
fn describe(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => match panic.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_counted_and_reported_until_it_recovers() {
        let metrics = Metrics::new();
        let supervisor = Supervisor::new(metrics.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let counted = runs.clone();
        let handle = supervisor.spawn("t:x".into(), Shutdown::new(), move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let tx = tx.clone();
            async move {
                if n <= FAILING_AFTER {
                    panic!("run {n} fails");
                }
                // The last run reports it is up, then ends normally.
                let _ = tx.send(()).await;
            }
        });
        rx.recv()
            .await
            .expect("the task ran again after its panics");
        handle.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), FAILING_AFTER + 1);
        let restarts = metrics
            .task_restarts_total
            .with_label_values(&["t:x"])
            .get();
        assert_eq!(restarts, u64::from(FAILING_AFTER));
        assert!(supervisor.failing().is_empty(), "it ended well");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_keeps_dying_is_reported_failing() {
        let supervisor = Supervisor::new(Metrics::new());
        let shutdown = Shutdown::new();
        let handle = supervisor.spawn("t:y".into(), shutdown.clone(), || async {
            panic!("always");
        });
        for _ in 0..100 {
            if !supervisor.failing().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(supervisor.failing(), ["t:y"]);
        shutdown.trigger();
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_running_steadily_again_is_no_longer_failing() {
        let supervisor = Supervisor::new(Metrics::new());
        let shutdown = Shutdown::new();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let stop = shutdown.clone();
        let handle = supervisor.spawn("t:z".into(), shutdown.clone(), move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let stop = stop.clone();
            async move {
                if n <= FAILING_AFTER {
                    panic!("run {n} fails");
                }
                stop.cancelled().await;
            }
        });
        while runs.load(Ordering::SeqCst) <= FAILING_AFTER {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(supervisor.failing(), ["t:z"]);
        tokio::time::sleep(STEADY_AFTER + Duration::from_secs(1)).await;
        assert!(supervisor.failing().is_empty());
        shutdown.trigger();
        handle.await.unwrap();
    }
}
