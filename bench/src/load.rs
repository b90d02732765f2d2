//! The closed-loop load generator every scenario and baseline shares: `concurrency` workers,
//! each doing one operation at a time (one connection, one in-flight publish), for a fixed
//! time after a warm-up, recording every latency.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Successful operations in the measured time.
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Successful operations per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Successful operations during the warm-up: with `ok`, what CPU measured over the whole
    /// loop is divided by.
    #[serde(default)]
    pub warmup_ok: u64,
}

impl Stats {
    /// Every successful operation, warm-up included.
    pub fn all_ok(&self) -> u64 {
        self.ok + self.warmup_ok
    }
}

/// Runs `op(worker)` in a loop on `concurrency` tasks; `op` returns whether it succeeded.
/// Operations that finish during the warm-up are not counted.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> Stats
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + warmup;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (op, stop) = (op.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut lat, mut errors, mut warm) = (Vec::with_capacity(4096), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = op(w).await;
                    if t < start {
                        warm += u64::from(ok);
                    } else if !stop.load(Ordering::Relaxed) {
                        if ok {
                            lat.push(t.elapsed().as_micros() as u32);
                        } else {
                            errors += 1;
                        }
                    }
                    // An operation that fails at once (nothing listening, a pool used up)
                    // never waits: without this the workers would hold every runtime thread
                    // and the timer ending the run would never fire.
                    if !ok {
                        tokio::task::yield_now().await;
                    }
                }
                (lat, errors, warm)
            })
        })
        .collect();
    tokio::time::sleep_until((start + duration).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let (mut errors, mut warmup_ok) = (0, 0);
    for w in workers {
        let (lat, e, warm) = w.await.expect("worker");
        all.extend(lat);
        errors += e;
        warmup_ok += warm;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    let seconds = duration.as_secs_f64();
    Stats {
        ok: all.len() as u64,
        errors,
        seconds,
        rate: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        warmup_ok,
    }
}
