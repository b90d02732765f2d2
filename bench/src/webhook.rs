//! Webhook forwarding: how fast the daemon delivers notifications to a webhook target against
//! a raw HTTP client posting the same bodies to the same receiver. The receiver is a hyper
//! server in the load generator's process answering 200. The daemon (in-process bus, notify
//! on, one webhook target with `concurrency` = the baseline's) gets its messages from
//! publishers on `POST /notify/<target>` kept ahead of it; its rate is what the receiver saw
//! between the first and the last of the measured messages. Writes `results/webhook.json`.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::load::{self, Stats};
use crate::procs::Daemon;

const CONCURRENCY: [usize; 2] = [4, 16];
const CLIENT_TOKEN: &str = "bench-webhook-client-token-0123456789";
/// The body both send: a small notification.
const BODY: &str =
    r#"{"text":"build 1234 passed","title":"CI","url":"https://ci.example.com/1234"}"#;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookPoint {
    pub concurrency: usize,
    /// The raw client's closed loop against the receiver.
    pub raw: Stats,
    /// Deliveries per second the receiver saw from the daemon.
    pub daemon_rate: f64,
    pub delivered: u64,
    /// The daemon's CPU per delivery (the publishes on `POST /notify` included).
    pub daemon_cpu_us: f64,
}

/// Counts what it receives and answers 200.
async fn receiver(listener: tokio::net::TcpListener, got: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let got = got.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let got = got.clone();
                async move {
                    let _ = req.into_body().collect().await;
                    got.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn raw(url: &str, c: usize, d: Duration) -> Stats {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()
        .expect("client");
    let url = Arc::new(url.to_owned());
    load::closed_loop(c, Duration::from_secs(1), d, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let sent = http
                .post(url.as_str())
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .await;
            sent.is_ok_and(|r| r.status().is_success())
        }
    })
    .await
}

/// How far the publishers keep ahead of the deliveries: enough that the target never waits
/// for work, under the daemon's queue so that it never refuses.
const LEAD: u64 = 2_000;

/// Posts `n` notifications to the daemon from 32 publishers, at most [`LEAD`] ahead of what
/// `delivered` counts; returns when all were accepted.
async fn publish(
    daemon: &Daemon,
    n: u64,
    delivered: impl Fn() -> u64 + Clone + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let url = format!(
        "http://127.0.0.1:{}/notify/hook",
        daemon.internal.expect("an internal listener")
    );
    let http = reqwest::Client::new();
    let left = Arc::new(AtomicU64::new(n));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (http, url, left) = (http.clone(), url.clone(), left.clone());
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                let published = n - left.load(Ordering::Relaxed);
                while published.saturating_sub(delivered()) > LEAD {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                loop {
                    let res = http
                        .post(&url)
                        .bearer_auth(CLIENT_TOKEN)
                        .header("content-type", "application/json")
                        .body(BODY)
                        .send()
                        .await?;
                    match res.status().as_u16() {
                        202 => break,
                        // The in-process queue is full: the publishers are ahead, as meant.
                        503 => tokio::time::sleep(Duration::from_millis(2)).await,
                        s => anyhow::bail!("POST /notify answered {s}"),
                    }
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn through_daemon(
    hook: &str,
    got: &Arc<AtomicU64>,
    c: usize,
    d: Duration,
) -> anyhow::Result<(f64, u64, f64)> {
    // A limit that does not bind (100,000/s, no margin): the forwarding's cost, not a wait.
    let toml = format!(
        "[clients.bench]\ntoken = \"{CLIENT_TOKEN}\"\ntargets = [\"hook\"]\n\
         [targets.hook]\nkind = \"webhook\"\nurl = \"{hook}\"\nallow_insecure_http = true\n\
         concurrency = {c}\nrate_limit = \"1000/10ms\"\n\
         [notify]\nqueue_capacity = 4096\nrate_limit_margin = \"0s\"\n"
    );
    let daemon = Daemon::start_internal(&toml).await?;
    let n = 20_000u64;
    let before = got.load(Ordering::Relaxed);
    let cpu = daemon.proc.cpu_time();
    let started = Instant::now();
    let counter = got.clone();
    publish(&daemon, n, move || counter.load(Ordering::Relaxed) - before).await?;
    let deadline = started + d * 12 + Duration::from_secs(60);
    while got.load(Ordering::Relaxed) - before < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the daemon did not deliver {n} in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = daemon.proc.cpu_time().saturating_sub(cpu);
    Ok((n as f64 / took, n, cpu.as_secs_f64() * 1e6 / n as f64))
}

pub async fn run(out: &Path, d: Duration) -> anyhow::Result<()> {
    eprintln!("webhook: forwarding against a raw HTTP client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let got = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(receiver(listener, got.clone()));
    let mut points = Vec::new();
    for c in CONCURRENCY {
        let raw = raw(&hook, c, d).await;
        let (daemon_rate, delivered, daemon_cpu_us) = through_daemon(&hook, &got, c, d).await?;
        points.push(WebhookPoint {
            concurrency: c,
            raw,
            daemon_rate,
            delivered,
            daemon_cpu_us,
        });
    }
    task.abort();
    crate::save(out, "webhook", &points)
}
