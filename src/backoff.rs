//! Retry delays shared by everything that retries: sends to a platform, publishes the bus
//! refused.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter in its upper half: `initial × 2^(n−1)`, capped, then
/// a random point between half and all of it, so replicas retrying together spread out.
/// `n` counts from 1.
pub fn delay(n: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(max);
    let half = exp / 2;
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=half.as_nanos().max(1) as u64))
}

/// Waits out the delay of attempt `n` of a publish the bus refused (200 ms doubling to 10 s);
/// `false` when `shutdown` came first.
pub async fn republish_wait(n: u32, shutdown: &crate::shutdown::Shutdown) -> bool {
    let delay = delay(n, Duration::from_millis(200), Duration::from_secs(10));
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..100 {
            let d1 = delay(1, i, m);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = delay(3, i, m);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d30 = delay(30, i, m);
            assert!(d30 >= Duration::from_secs(1) && d30 <= m);
        }
    }
}
