//! The notify pipeline under a real limit: 10,000 DingTalk robot targets on the test suite's
//! fake robot farm (20 requests per 60 s each, every breach recorded as a violation), 60
//! messages each posted to `POST /notify/<target>`, and the sustained send rate measured in
//! the steady state against the legal ceiling, 10,000 × 20 / 60 s = 3,333/s.
//!
//! Timeline, from t0 = the first send the farm accepted: each robot's first 20 sends are a
//! burst allowed at once, so the first 60 s are warm-up; [t0 + 60 s, t0 + 120 s) is the
//! measured window, in which a target with a backlog can send exactly 20 more. The run stops
//! after the window without waiting for the remaining messages.

// The farm is the one the integration tests use, so the bench checks limits exactly as the
// test suite does; the bench needs only part of it.
#[allow(dead_code)]
#[path = "../../tests/it/common/fakes.rs"]
mod fakes;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::procs;

const TARGETS: usize = 10_000;
const PER_TARGET: usize = 60;
/// DingTalk's documented limit, which the farm enforces: 20 requests in any 60 s.
const LIMIT: u64 = 20;
const LIMIT_WINDOW: Duration = Duration::from_secs(60);
const PUBLISHERS: usize = 128;
/// The first 60 s after t0 are each robot's burst of 20, not the steady state.
const WARMUP: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(60);
/// How many violations the result quotes (all are counted).
const EXAMPLES: usize = 5;

/// What `results/notify.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotifyResult {
    pub targets: usize,
    pub messages: usize,
    pub publish_seconds: f64,
    pub window_seconds: f64,
    pub sends_in_window: u64,
    pub ceiling_in_window: u64,
    pub ratio: f64,
    pub violations: usize,
    pub violation_examples: Vec<String>,
    pub daemon_cpu_percent: f64,
    pub daemon_rss_peak_kib: u64,
    pub daemon_rss_end_kib: u64,
    /// Whether every message was posted before the window opened: if not, targets may have
    /// run dry in the window for want of messages rather than of sending capacity.
    pub backlog_ready_before_window: bool,
}

/// The token of the one client, `bench` (POST /notify is on the internal listener).
const CLIENT_TOKEN: &str = "bench-notify-client-token-0123456789";

/// Daemon settings besides the targets. `local` limiter: one replica, as on the memory bus.
const CONFIG: &str = r#"
[bus]
kind = "memory"

[clients.bench]
token = "bench-notify-client-token-0123456789"
targets = ["*"]

[notify]
queue_capacity = 100
max_wait = "30m"
request_timeout = "10s"
rate_limit_margin = "250ms"
limiter = "local"
"#;

pub async fn run(out: &Path) -> anyhow::Result<()> {
    let began = Instant::now();
    // 10,000 robots can all be sending at once: up to that many connections from the daemon
    // (which inherits the limit) to the farm in this process.
    raise_fd_limit();

    let farm = fakes::RobotFarm::start().await;
    let tokens: Arc<Vec<String>> = Arc::new((0..TARGETS).map(|i| format!("bench{i:05}")).collect());
    let mut toml = String::from(CONFIG);
    for (i, token) in tokens.iter().enumerate() {
        let url = farm.add(fakes::Robot::dingtalk(token));
        writeln!(
            toml,
            // The farm is a local http:// server, which a target reaches only when allowed.
            "\n[targets.r{i}]\nkind = \"dingtalk_robot\"\nurl = \"{url}\"\nallow_insecure_http = true"
        )?;
    }
    eprintln!("notify: starting the daemon with {TARGETS} DingTalk robot targets");
    let daemon = Arc::new(procs::Daemon::start_internal(&toml).await?);
    eprintln!(
        "notify: daemon ready after {:.1} s, RSS {} KiB",
        began.elapsed().as_secs_f64(),
        daemon.proc.rss_kib()
    );

    let published = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let publish_start = Instant::now();
    let internal = daemon.internal.expect("an internal listener");
    let publisher = tokio::spawn(publish(internal, published.clone(), refused.clone()));
    let (stop_sampler, stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample(
        daemon.clone(),
        farm.clone(),
        tokens.clone(),
        published.clone(),
        stopped,
    ));

    let t0_seen = match first_send(&farm, &tokens, &publisher).await {
        Ok(t) => t,
        Err(e) if publisher.is_finished() => {
            // Its own error says why.
            publisher.await??;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    eprintln!(
        "notify: first send accepted {:.3} s after publishing began",
        (t0_seen - publish_start).as_secs_f64()
    );

    tokio::time::sleep_until((t0_seen + WARMUP).into()).await;
    let (cpu_from, own_from, cpu_from_at) =
        (daemon.proc.cpu_time(), own_cpu_time(), Instant::now());
    // The window can use each target's messages 21 to 40: posted round-robin, that many per
    // target are there once 40 × targets are posted, finished or not.
    let backlog_ready = publisher.is_finished()
        || published.load(Ordering::Relaxed) / TARGETS >= 2 * LIMIT as usize;
    eprintln!(
        "notify: window opens; {} of {} messages posted{}",
        published.load(Ordering::Relaxed),
        TARGETS * PER_TARGET,
        if backlog_ready {
            String::new()
        } else {
            // Each target can send its messages 21 to 40 in the window; fewer than 40 posted
            // per target means it may run dry there.
            format!(
                " (publishing not finished: {} per target, the window can use up to {})",
                published.load(Ordering::Relaxed) / TARGETS,
                2 * LIMIT
            )
        }
    );
    tokio::time::sleep_until((t0_seen + WARMUP + WINDOW).into()).await;
    let (cpu_to, own_to, cpu_to_at) = (daemon.proc.cpu_time(), own_cpu_time(), Instant::now());
    let rss_end = daemon.proc.rss_kib();
    // One more second, so requests the daemon had sent just before the window closed are in
    // the farm's log too.
    tokio::time::sleep_until((t0_seen + WARMUP + WINDOW + Duration::from_secs(1)).into()).await;

    let _ = stop_sampler.send(());
    let rss_peak = sampler.await?.max(rss_end);
    // Publishing normally ends long before this; if it has not, its time is what it took so
    // far, and the window above already says it lacked backlog.
    let publish_seconds = if publisher.is_finished() {
        let done = publisher.await??;
        (done - publish_start).as_secs_f64()
    } else {
        publisher.abort();
        eprintln!(
            "notify: publishing unfinished at the end: {} of {} posted",
            published.load(Ordering::Relaxed),
            TARGETS * PER_TARGET
        );
        publish_start.elapsed().as_secs_f64()
    };
    let refusals = refused.load(Ordering::Relaxed);
    // Stop the daemon before reading the farm's logs, so they no longer change.
    drop(daemon);

    let sends: Vec<Vec<Instant>> = tokens
        .iter()
        .map(|t| farm.accepted(t).iter().map(|r| r.at).collect())
        .collect();
    // The exact t0 is the earliest accepted send of any robot; the one polled above looked at
    // the first robots only, and is used just to schedule the samples.
    let t0 = sends
        .iter()
        .filter_map(|s| s.first().copied())
        .min()
        .context("the farm accepted nothing")?;
    if t0_seen.duration_since(t0) > Duration::from_millis(100) {
        eprintln!(
            "notify: the first send was {:.3} s before the one polled: the CPU sample is \
             that much off the window",
            (t0_seen - t0).as_secs_f64()
        );
    }
    let from = t0 + WARMUP;
    let to = from + WINDOW;
    let in_window = accepted_between(&sends, from, to);
    let ceiling = TARGETS as u64 * LIMIT * WINDOW.as_secs() / LIMIT_WINDOW.as_secs();
    let total: usize = sends.iter().map(Vec::len).sum();
    let violations = farm.violations();
    let percent =
        |used: Duration| used.as_secs_f64() / (cpu_to_at - cpu_from_at).as_secs_f64() * 100.0;
    let cpu_percent = percent(cpu_to.saturating_sub(cpu_from));
    // The farm and the publishers run in this process, on the same cores as the daemon.
    let own_percent = percent(own_to.saturating_sub(own_from));

    // Where the sends fell in time, for the report's reader to see the burst, the steady
    // state and any dip.
    let mut timeline = String::new();
    for s in (0..WARMUP.as_secs() + WINDOW.as_secs()).step_by(10) {
        let a = t0 + Duration::from_secs(s);
        let n = accepted_between(&sends, a, a + Duration::from_secs(10));
        write!(timeline, " {s}s:{:.0}/s", n as f64 / 10.0)?;
    }
    eprintln!("notify: sends per second by 10 s from t0:{timeline}");
    // Robots short of their 20 in the window, and one of them in detail: which sends were late.
    let per_robot: Vec<u64> = sends
        .iter()
        .map(|s| accepted_between(std::slice::from_ref(s), from, to))
        .collect();
    let short = per_robot.iter().filter(|&&n| n < LIMIT).count();
    if let Some(i) = per_robot.iter().position(|&n| n < LIMIT) {
        let times: Vec<String> = sends[i]
            .iter()
            .map(|&at| format!("{:.1}", (at - t0).as_secs_f64()))
            .collect();
        eprintln!(
            "notify: {short} robots sent fewer than {LIMIT} in the window; r{i} sent {} at {}",
            per_robot[i],
            times.join(" ")
        );
    }
    eprintln!(
        "notify: {in_window} sends in [t0+60 s, t0+120 s) = {:.0}/s, {:.3} × the ceiling of \
         {ceiling}; {total} accepted in all; {} violations; daemon CPU {cpu_percent:.0}% of \
         one core in the window (this process: {own_percent:.0}%), RSS peak {rss_peak} KiB, end {rss_end} KiB; posting took \
         {publish_seconds:.1} s ({refusals} 503s retried); {:.0} s in all",
        in_window as f64 / WINDOW.as_secs_f64(),
        in_window as f64 / ceiling as f64,
        violations.len(),
        began.elapsed().as_secs_f64()
    );

    crate::save(
        out,
        "notify",
        &NotifyResult {
            targets: TARGETS,
            messages: TARGETS * PER_TARGET,
            publish_seconds,
            window_seconds: WINDOW.as_secs_f64(),
            sends_in_window: in_window,
            ceiling_in_window: ceiling,
            ratio: in_window as f64 / ceiling as f64,
            violations: violations.len(),
            violation_examples: violations.into_iter().take(EXAMPLES).collect(),
            daemon_cpu_percent: cpu_percent,
            daemon_rss_peak_kib: rss_peak,
            daemon_rss_end_kib: rss_end,
            backlog_ready_before_window: backlog_ready,
        },
    )
}

/// Accepted sends, across all robots, at an instant in `[from, to)`.
fn accepted_between(sends: &[Vec<Instant>], from: Instant, to: Instant) -> u64 {
    sends
        .iter()
        .map(|s| s.iter().filter(|&&at| at >= from && at < to).count() as u64)
        .sum()
}

/// Posts message k to every target before message k + 1, over `PUBLISHERS` keep-alive
/// connections; returns when the last was accepted. 503 (a target's in-process queue full)
/// is retried after a pause, as a client would, and counted.
async fn publish(
    port: u16,
    published: Arc<AtomicUsize>,
    refused: Arc<AtomicU64>,
) -> anyhow::Result<Instant> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(PUBLISHERS)
        .timeout(Duration::from_secs(30))
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..PUBLISHERS)
        .map(|_| {
            let (http, next, published, refused) = (
                http.clone(),
                next.clone(),
                published.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TARGETS * PER_TARGET {
                        return anyhow::Ok(());
                    }
                    let (target, k) = (i % TARGETS, i / TARGETS);
                    let url = format!("http://127.0.0.1:{port}/notify/r{target}");
                    let body =
                        format!(r#"{{"text":"bench message {k} for r{target}","format":"text"}}"#);
                    loop {
                        let r = http
                            .post(&url)
                            .bearer_auth(CLIENT_TOKEN)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .with_context(|| format!("POST {url}"))?;
                        match r.status().as_u16() {
                            202 => break,
                            503 => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            s => bail!("POST {url}: {s} {}", r.text().await.unwrap_or_default()),
                        }
                    }
                    published.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    Ok(Instant::now())
}

/// Waits for the farm's first accepted send, looking at the robots posted to first (the
/// publishers start with them), and returns when it was.
async fn first_send(
    farm: &fakes::RobotFarm,
    tokens: &[String],
    publisher: &tokio::task::JoinHandle<anyhow::Result<Instant>>,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let first = tokens[..PUBLISHERS]
            .iter()
            .filter_map(|t| farm.accepted(t).first().map(|r| r.at))
            .min();
        if let Some(at) = first {
            return Ok(at);
        }
        if publisher.is_finished() {
            bail!("publishing stopped before the farm accepted anything");
        }
        if Instant::now() > deadline {
            bail!(
                "the farm accepted nothing within 60 s of publishing; violations: {:?}",
                farm.violations()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Samples the daemon's RSS every second until told to stop, and returns the peak; every 10 s
/// prints progress.
async fn sample(
    daemon: Arc<procs::Daemon>,
    farm: fakes::RobotFarm,
    tokens: Arc<Vec<String>>,
    published: Arc<AtomicUsize>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> u64 {
    let start = Instant::now();
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        let rss = daemon.proc.rss_kib();
        peak = peak.max(rss);
        if n % 10 == 0 {
            let arrived: usize = tokens.iter().map(|t| farm.requests(t)).sum();
            // Open descriptors: mostly the daemon's connections to the farm.
            let fds = std::fs::read_dir(format!("/proc/{}/fd", daemon.proc.pid()))
                .map(|d| d.count())
                .unwrap_or(0);
            eprintln!(
                "notify: {:>4.0} s: {} posted, {arrived} sends arrived at the farm, daemon RSS \
                 {rss} KiB, CPU {:.1} s, {fds} fds",
                start.elapsed().as_secs_f64(),
                published.load(Ordering::Relaxed),
                daemon.proc.cpu_time().as_secs_f64()
            );
        }
    }
    peak
}

/// Raises this process's open-file limit to its hard limit (the daemon inherits it).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// User + system CPU time this process (farm and publishers) used so far.
fn own_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
