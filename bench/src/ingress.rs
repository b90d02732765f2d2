//! Ingress: DingTalk callbacks (1 KiB events) through the daemon to JetStream (file storage)
//! and to Kafka (tansu), against the baselines measured in the same run with the same load
//! generator and concurrency: (a) a trivial hyper server answering 200 to the same requests,
//! (b) the raw publish with acknowledgement from a Rust client (async-nats; rdkafka with
//! acks=all, idempotent). Then memory: RSS idle and with 10,000 callbacks in flight.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::callbacks::{self, Maker};
use crate::load::{closed_loop, Stats};
use crate::procs::{self, Daemon, Proc};
use crate::wire;

pub const CONCURRENCY: [usize; 3] = [16, 64, 256];
const WARMUP: Duration = Duration::from_secs(1);

/// One measured point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// "nats" or "kafka".
    pub bus: String,
    /// "ok_server" (baseline a), "raw_publish" (baseline b) or "imbridge".
    pub scenario: String,
    pub concurrency: usize,
    pub stats: Stats,
    /// CPU the daemon used during the measured time, in % of one core (imbridge only).
    pub daemon_cpu_percent: Option<f64>,
    /// The serving process's CPU per answered request, in µs: the daemon's for imbridge, the
    /// trivial server's for baseline (a).
    #[serde(default)]
    pub daemon_cpu_us: Option<f64>,
    /// The load generator's CPU per request, in µs: for the baselines (b) the client's whole
    /// cost.
    #[serde(default)]
    pub generator_cpu_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub idle_rss_kib: u64,
    /// Callbacks the daemon held at the peak (its in-flight gauge).
    pub in_flight: u64,
    pub peak_rss_kib: u64,
    pub kib_per_in_flight: f64,
    /// All answered once the bus came back.
    pub answered_ok: u64,
}

/// Baseline (a): answers 200 with a short body to every request, after reading the body.
pub async fn ok_server(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                    b"{\"ok\":true}",
                ))))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Callbacks made before a load point, so encrypting them does not take the measured
/// machine's CPU from the daemon (on two cores it would: the load generator runs beside it).
/// Each is a whole request, ready to write.
struct Pool {
    requests: Vec<Vec<u8>>,
    next: std::sync::atomic::AtomicUsize,
    /// Whether a request may be sent again once all were: yes to the trivial server, never
    /// to the daemon, which would answer a repeated callback from its dedupe window.
    reuse: bool,
}

impl Pool {
    fn new(n: usize, reuse: bool) -> Arc<Pool> {
        let maker = Maker::new();
        Arc::new(Pool {
            requests: (0..n)
                .map(|_| {
                    let cb = maker.make();
                    wire::post(
                        &format!("/callbacks/dingtalk/bench?{}", cb.query),
                        "application/json",
                        cb.body.as_bytes(),
                    )
                })
                .collect(),
            next: Default::default(),
            reuse,
        })
    }

    fn used_up(&self) -> bool {
        !self.reuse && self.next.load(std::sync::atomic::Ordering::Relaxed) >= self.requests.len()
    }

    fn take(&self) -> Option<&[u8]> {
        let mut i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.reuse {
            i %= self.requests.len();
        }
        self.requests.get(i).map(Vec::as_slice)
    }
}

/// Callbacks prepared per second of a daemon load point (warm-up included): the fastest point
/// seen did 36,000/s. A point that uses them up says so, and its rate is then understated.
/// The trivial server, faster, goes round a smaller pool.
const POOL_PER_SECOND: f64 = 50_000.0;
const REUSED_POOL: usize = 20_000;

/// What a load point measured, and the CPU of the processes under it, taken over the whole
/// loop (warm-up included) and divided by every operation in it.
struct Load {
    stats: Stats,
    generator_cpu_us: f64,
    server: Option<ServerCpu>,
}

/// The serving process's CPU during a load point (the daemon's, or the trivial server's).
#[derive(Clone, Copy)]
struct ServerCpu {
    /// Of one core, over the point's wall time.
    percent: f64,
    /// Per answered callback.
    per_op_us: f64,
}

/// CPU per operation in µs.
fn per_op(cpu: Duration, stats: &Stats) -> f64 {
    cpu.as_secs_f64() * 1e6 / stats.all_ok().max(1) as f64
}

/// Who answers a load point's callbacks.
#[derive(Clone, Copy)]
enum Server<'a> {
    /// Baseline (a) on its port, which does not deduplicate: its callbacks may be sent again.
    Trivial(&'a Proc, u16),
    Daemon(&'a Daemon),
}

/// Posts callbacks to `server` from a closed loop, each worker on its own kept-alive
/// connection, and measures the server's CPU as well.
async fn callbacks_load(server: Server<'_>, concurrency: usize, d: Duration) -> Load {
    let (proc, port, reuse) = match server {
        Server::Trivial(proc, port) => (proc, port, true),
        Server::Daemon(daemon) => (&daemon.proc, daemon.ingress, false),
    };
    let size = if reuse {
        REUSED_POOL
    } else {
        ((WARMUP + d).as_secs_f64() * POOL_PER_SECOND) as usize
    };
    let pool = Pool::new(size, reuse);
    let used = pool.clone();
    let conns: Arc<Vec<tokio::sync::Mutex<wire::Conn>>> = Arc::new(
        (0..concurrency)
            .map(|_| tokio::sync::Mutex::new(wire::Conn::new(port)))
            .collect(),
    );
    let started = Instant::now();
    let generator = procs::cpu_time_of(std::process::id());
    let server_before = proc.cpu_time();
    let stats = closed_loop(concurrency, WARMUP, d, move |w| {
        let (pool, conns) = (pool.clone(), conns.clone());
        async move {
            // An exhausted pool counts as errors, never as repeated (deduplicated) callbacks.
            let Some(request) = pool.take() else {
                return false;
            };
            // Only worker `w` uses connection `w`: the lock is never contended.
            let mut conn = conns[w].lock().await;
            matches!(conn.send(request).await, Ok(200))
        }
    })
    .await;
    let generator = procs::cpu_time_of(std::process::id()).saturating_sub(generator);
    if used.used_up() {
        eprintln!("  the {size} prepared callbacks were used up: this point's rate is understated");
    }
    let cpu = proc.cpu_time().saturating_sub(server_before);
    let server = ServerCpu {
        percent: 100.0 * cpu.as_secs_f64() / started.elapsed().as_secs_f64(),
        per_op_us: per_op(cpu, &stats),
    };
    Load {
        generator_cpu_us: per_op(generator, &stats),
        stats,
        server: Some(server),
    }
}

/// A baseline (b) client's run, with its own CPU: this process's, since nothing else runs here.
async fn client_load(
    run: impl std::future::Future<Output = anyhow::Result<Stats>>,
) -> anyhow::Result<Load> {
    let before = procs::cpu_time_of(std::process::id());
    let stats = run.await?;
    let cpu = procs::cpu_time_of(std::process::id()).saturating_sub(before);
    Ok(Load {
        generator_cpu_us: per_op(cpu, &stats),
        stats,
        server: None,
    })
}

fn point(bus: &str, scenario: &str, c: usize, load: Load) -> Point {
    let Load {
        stats,
        generator_cpu_us,
        server,
    } = load;
    eprintln!(
        "  {bus:5} {scenario:11} c={c:3}: {:8.0}/s p50 {:6.2} ms p99 {:6.2} ms p99.9 {:6.2} ms errors {} \
         generator {generator_cpu_us:.0} µs/op server {:.0} µs/op",
        stats.rate,
        stats.p50_ms,
        stats.p99_ms,
        stats.p999_ms,
        stats.errors,
        server.map_or(0.0, |s| s.per_op_us)
    );
    Point {
        bus: bus.into(),
        scenario: scenario.into(),
        concurrency: c,
        stats,
        daemon_cpu_percent: server.map(|s| s.percent),
        daemon_cpu_us: server.map(|s| s.per_op_us),
        generator_cpu_us: Some(generator_cpu_us),
    }
}

/// The daemon's own work on one callback without any I/O, in µs of CPU: the query, the
/// signature and replay window, the decryption, the event's JSON and id, and the encrypted
/// reply. With the CPU of baseline (a)'s server and (b)'s client it makes the sum of the
/// parts a callback costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnWork {
    pub us_per_callback: f64,
}

fn own_work() -> anyhow::Result<OwnWork> {
    use imbridge::platform::dingtalk::callback;
    const N: usize = 20_000;
    let maker = Maker::new();
    let crypt = imbridge::platform::msgcrypt::MsgCrypt::new(
        callbacks::TOKEN,
        callbacks::AES_KEY,
        callbacks::CORP_ID,
    )?;
    let made: Vec<_> = (0..N).map(|_| maker.make()).collect();
    let window = Some(Duration::from_secs(3600));
    // This thread's CPU, so that the other work on a shared machine does not count.
    let before = procs::thread_cpu_time();
    for cb in &made {
        let query = imbridge::ingress::parse_query(&cb.query)
            .map_err(|_| anyhow::anyhow!("the bench's query did not parse"))?;
        let params = callback::Params::from_query(&query)?;
        let now = imbridge::platform::now_ms();
        let event = callback::open(&crypt, &params, cb.body.as_bytes(), now, window)?;
        let id = imbridge::ingress::dingtalk::event_id("bench", &event.plaintext);
        let reply = serde_json::to_vec(&callback::reply(&crypt, now))?;
        std::hint::black_box((event, id, reply));
    }
    let cpu = procs::thread_cpu_time().saturating_sub(before);
    let work = OwnWork {
        us_per_callback: cpu.as_secs_f64() * 1e6 / N as f64,
    };
    eprintln!(
        "  the daemon's own work without I/O: {:.1} µs per callback",
        work.us_per_callback
    );
    Ok(work)
}

pub async fn run(out: &Path, d: Duration) -> anyhow::Result<()> {
    raise_fd_limit();
    let mut points = Vec::new();

    eprintln!("ingress: the daemon's own work on a callback");
    crate::save(out, "own_work", &own_work()?)?;

    eprintln!("ingress: baseline (a), trivial hyper server");
    let ok_port = procs::free_port();
    let ok = procs::own_mode(&["ok-server", "--port", &ok_port.to_string()]).await?;
    wait_listening(ok_port).await?;
    let mut ok_points = Vec::new();
    for c in CONCURRENCY {
        let load = callbacks_load(Server::Trivial(&ok, ok_port), c, d).await;
        ok_points.push(point("any", "ok_server", c, load));
    }
    drop(ok);
    for p in &ok_points {
        points.push(Point {
            bus: "nats".into(),
            ..p.clone()
        });
        points.push(Point {
            bus: "kafka".into(),
            ..p.clone()
        });
    }

    eprintln!("ingress: NATS JetStream (file storage)");
    let (nats, nats_port) = procs::nats_server()?;
    let url = format!("nats://127.0.0.1:{nats_port}");
    for c in CONCURRENCY {
        let load = client_load(jetstream_raw(&url, c, d)).await?;
        points.push(point("nats", "raw_publish", c, load));
    }
    let daemon = Daemon::start(&format!(
        "{}\n[bus]\nkind = \"nats\"\n[bus.nats]\nurl = \"{url}\"\nstorage = \"file\"\n\
         [notify]\nenabled = false\n",
        callbacks::app_toml()
    ))
    .await?;
    for c in CONCURRENCY {
        let load = callbacks_load(Server::Daemon(&daemon), c, d).await;
        points.push(point("nats", "imbridge", c, load));
    }
    drop(daemon);

    measure_memory(out, &nats, &url).await?;
    drop(nats);

    eprintln!("ingress: Kafka (tansu)");
    let (_tansu, kafka_port) = procs::tansu().await?;
    let brokers = format!("127.0.0.1:{kafka_port}");
    for c in CONCURRENCY {
        let load = client_load(kafka_raw(&brokers, c, d)).await?;
        points.push(point("kafka", "raw_publish", c, load));
    }
    let daemon = Daemon::start(&format!(
        "{}\n[bus]\nkind = \"kafka\"\n[bus.kafka]\nbrokers = \"{brokers}\"\n\
         [notify]\nenabled = false\n",
        callbacks::app_toml()
    ))
    .await?;
    for c in CONCURRENCY {
        let load = callbacks_load(Server::Daemon(&daemon), c, d).await;
        points.push(point("kafka", "imbridge", c, load));
    }
    crate::save(out, "ingress", &points)
}

/// Baseline (b) on NATS: a 1 KiB publish to a file-storage stream, waiting for the PubAck.
pub async fn jetstream_raw(url: &str, concurrency: usize, d: Duration) -> anyhow::Result<Stats> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let stream = format!("RAW{concurrency}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("raw{concurrency}.>")],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("creating the raw stream")?;
    let payload = Bytes::from(vec![b'x'; callbacks::EVENT_BYTES]);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let subject = format!("raw{concurrency}.bpms_instance_change");
    Ok(closed_loop(concurrency, WARMUP, d, move |_| {
        let (js, payload, next, subject) =
            (js.clone(), payload.clone(), next.clone(), subject.clone());
        async move {
            // A message id, as the daemon sends one, so the server does the same dedupe work.
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("raw-{n}").as_str());
            match js.publish_with_headers(subject, headers, payload).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await)
}

/// Baseline (b) on Kafka: a 1 KiB idempotent produce with acks=all, waiting for the delivery
/// report.
async fn kafka_raw(brokers: &str, concurrency: usize, d: Duration) -> anyhow::Result<Stats> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let topic = format!("raw{concurrency}.bpms_instance_change");
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let _ = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(-1))],
            &AdminOptions::new(),
        )
        .await;
    let producer: FutureProducer = config
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The daemon's own default (src/bus/kafka/mod.rs), so both batch alike.
        .set("linger.ms", "1")
        .create()?;
    let payload = Arc::new(vec![b'x'; callbacks::EVENT_BYTES]);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    Ok(closed_loop(concurrency, WARMUP, d, move |_| {
        let (producer, payload, next, topic) = (
            producer.clone(),
            payload.clone(),
            next.clone(),
            topic.clone(),
        );
        async move {
            let key = next
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_string();
            let record = FutureRecord::to(&topic)
                .key(&key)
                .payload(payload.as_slice());
            producer.send(record, Duration::from_secs(5)).await.is_ok()
        }
    })
    .await)
}

/// The memory scenario on a JetStream server of its own.
pub async fn run_memory(out: &Path) -> anyhow::Result<()> {
    raise_fd_limit();
    let (nats, port) = procs::nats_server()?;
    measure_memory(out, &nats, &format!("nats://127.0.0.1:{port}")).await
}

async fn measure_memory(out: &Path, nats: &Proc, url: &str) -> anyhow::Result<()> {
    eprintln!("memory: idle and with 10,000 callbacks in flight");
    let memory = memory(nats, url).await?;
    eprintln!(
        "  idle {} KiB, {} in flight at {} KiB: {:.1} KiB each, {} answered 200",
        memory.idle_rss_kib,
        memory.in_flight,
        memory.peak_rss_kib,
        memory.kib_per_in_flight,
        memory.answered_ok
    );
    crate::save(out, "memory", &memory)
}

/// RSS idle, then with 10,000 callbacks held: the bus is stalled (SIGSTOP), so every callback
/// waits for its publish; then the bus comes back and every one is answered.
async fn memory(nats: &Proc, url: &str) -> anyhow::Result<Memory> {
    const HELD: usize = 10_000;
    let daemon = Daemon::start(&format!(
        "{}\n[bus]\nkind = \"nats\"\n[bus.nats]\nurl = \"{url}\"\nstorage = \"file\"\n\
         publish_timeout = \"120s\"\n[notify]\nenabled = false\n",
        callbacks::app_toml()
    ))
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = daemon.proc.rss_kib();
    let maker = Maker::new();
    let requests: Vec<_> = (0..HELD).map(|_| maker.make()).collect();
    nats.signal(libc::SIGSTOP);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(HELD)
        .timeout(Duration::from_secs(180))
        .build()?;
    let base = format!(
        "http://127.0.0.1:{}/callbacks/dingtalk/bench",
        daemon.ingress
    );
    let sends: Vec<_> = requests
        .into_iter()
        .map(|cb| {
            let req = http
                .post(format!("{base}?{}", cb.query))
                .header("content-type", "application/json")
                .body(cb.body);
            tokio::spawn(async move { matches!(req.send().await, Ok(r) if r.status() == 200) })
        })
        .collect();
    // Wait until the daemon holds them all (or stops gaining), sampling its RSS.
    let metrics = format!("http://127.0.0.1:{}/metrics", daemon.admin);
    let (mut peak, mut held, mut last_change) = (idle, 0u64, Instant::now());
    while last_change.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(daemon.proc.rss_kib());
        let now = in_flight(&metrics).await.unwrap_or(held);
        if now > held {
            held = now;
            last_change = Instant::now();
        }
        if held >= HELD as u64 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(daemon.proc.rss_kib());
            break;
        }
    }
    nats.signal(libc::SIGCONT);
    let mut answered_ok = 0;
    for s in sends {
        if s.await.unwrap_or(false) {
            answered_ok += 1;
        }
    }
    Ok(Memory {
        idle_rss_kib: idle,
        in_flight: held,
        peak_rss_kib: peak,
        kib_per_in_flight: peak.saturating_sub(idle) as f64 / held.max(1) as f64,
        answered_ok,
    })
}

/// `imbridge_requests_in_flight` from the admin port.
async fn in_flight(metrics_url: &str) -> Option<u64> {
    let text = reqwest::get(metrics_url).await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with("imbridge_requests_in_flight "))?
        .split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// 10,000 connections at once need as many descriptors.
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
