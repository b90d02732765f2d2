//! Kafka test harness: a real Kafka-protocol broker (tansu, memory storage) per test on a random
//! loopback port, the `[bus]` section pointing the daemon at it, and rdkafka helpers to produce,
//! read back and count records. Every wait is bounded by [`WAIT`].
//!
//! tansu 0.6.0 must be built with its `dynostore` feature, which provides the `memory://`
//! storage engine (`./test` installs it that way).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;

use super::WAIT;

/// How many lines of the broker's output are kept for failure messages.
const LOG_TAIL: usize = 50;

/// A tansu broker owned by the test, killed on drop. Its storage is in memory, so a restart
/// starts from an empty broker (no topics, records, groups or producer ids).
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    /// Working directory of the broker: tansu loads `.env` files from its working directory
    /// and its parents, so it must not run inside the repository.
    dir: TempDir,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Tansu {
    /// Starts a broker on a free random port and waits until it answers metadata requests.
    pub fn start() -> Tansu {
        let mut tansu = Tansu {
            child: None,
            port: 0,
            bin: tansu_bin(),
            dir: tempfile::tempdir().unwrap(),
            log: Arc::default(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            // A port probed free can be taken by another process before tansu binds it; then
            // tansu exits and another port is tried.
            tansu.port = free_port();
            if tansu.spawn(deadline) {
                return tansu;
            }
        }
    }

    /// The bootstrap servers, `127.0.0.1:PORT`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (everything it stored is lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the broker: connections stay open but nothing is
    /// answered, like a stalled broker; nothing it stored is lost.
    pub fn signal(&self, sig: &str) {
        super::signal(self.child.as_ref().expect("running"), sig);
    }

    /// Starts an empty broker again on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + WAIT;
        // The port may still be held for a moment by the old process or its connections.
        while !self.spawn(deadline) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawns tansu on `self.port` and waits for it to answer. Returns false when it exited
    /// before answering (most likely the port was taken) and there is time to try again.
    fn spawn(&mut self, deadline: Instant) -> bool {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        self.log.lock().unwrap().clear();
        let mut child = super::dies_with_test(Command::new(&self.bin))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        drain(child.stdout.take().unwrap(), self.log.clone());
        drain(child.stderr.take().unwrap(), self.log.clone());
        let ready = wait_answering(&self.brokers(), &mut child, deadline);
        // A broker that failed to bind may have let the probe reach whoever holds the port:
        // only a broker still running after answering counts.
        if ready && child.try_wait().unwrap().is_none() {
            self.child = Some(child);
            return true;
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        // Give the drain threads a moment to collect the last lines for the message.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap().iter().cloned().collect::<Vec<_>>();
        let feature_missing = log.iter().any(|l| l.contains("FeatureNotEnabled"));
        assert!(
            !feature_missing && Instant::now() < deadline,
            "tansu on port {} did not answer within {WAIT:?} ({status}){}; output:\n{}",
            self.port,
            if feature_missing {
                "; it lacks the memory storage engine: reinstall it with \
                 `cargo install tansu --version 0.6.0 --locked --features dynostore --force` \
                 (see ./test)"
            } else {
                ""
            },
            log.join("\n")
        );
        false
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `tansu` on `PATH`, else in `$CARGO_HOME/bin` or `~/.cargo/bin`.
fn tansu_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from);
    let home_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"));
    std::env::split_paths(&path)
        .chain(
            cargo_home
                .into_iter()
                .chain(home_cargo)
                .map(|c| c.join("bin")),
        )
        .map(|dir| dir.join("tansu"))
        .find(|bin| bin.is_file())
        .expect(
            "tansu not found on PATH nor in ~/.cargo/bin: run ./test, or \
             `cargo install tansu --version 0.6.0 --locked --features dynostore`",
        )
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads `from` until it closes (so tansu never blocks on a full pipe), keeping the last lines.
fn drain(from: impl Read + Send + 'static, log: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap();
            if log.len() == LOG_TAIL {
                log.pop_front();
            }
            log.push_back(line);
        }
    });
}

/// Waits until the broker at `brokers` answers a Kafka metadata request, or `child` exits, or
/// the deadline passes. Returns whether it answered.
fn wait_answering(brokers: &str, child: &mut Child, deadline: Instant) -> bool {
    let addr: SocketAddr = brokers.parse().unwrap();
    // Cheap TCP probes first: an rdkafka client would back off between failed connections.
    loop {
        if child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client: BaseConsumer = config(brokers).create().unwrap();
    loop {
        if client
            .fetch_metadata(None, Duration::from_millis(1000))
            .is_ok()
        {
            return true;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
            return false;
        }
    }
}

/// The `[bus]` section for a test broker (the Kafka engine's configuration, fast timeouts).
pub fn kafka_bus(brokers: &str) -> String {
    format!(
        r#"
        [bus]
        kind = "kafka"
        [bus.kafka]
        brokers = "{brokers}"
        group_id = "imbridge-test"
        partitions = 1
        replication_factor = 1
        publish_timeout = "3s"
        [bus.kafka.properties]
        "session.timeout.ms" = "6000"
        "heartbeat.interval.ms" = "500"
        "topic.metadata.refresh.interval.ms" = "1000"
        "#
    )
}

/// A record as stored by the broker. Header values are read as UTF-8 (lossily).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Client configuration shared by the helpers.
pub fn config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        // Reconnect quickly to a restarted broker.
        .set("reconnect.backoff.max.ms", "500");
    c
}

/// The first `n` records of `topic` (all partitions, from the beginning, ordered by partition
/// then offset), waiting for the topic to exist and to hold them.
pub async fn records(brokers: &str, topic: &str, n: usize) -> Vec<Record> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let partitions = loop {
        let p = partitions(brokers, topic).await;
        if !p.is_empty() {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "topic {topic} does not exist after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Manual assignment: the group is never joined and nothing is committed, but librdkafka
    // refuses `assign` without a group id.
    let consumer: StreamConsumer = config(brokers)
        .set(
            "group.id",
            format!("harness-reader-{}", rand::random::<u64>()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::with_capacity(n);
    let mut last_error = None;
    while got.len() < n {
        let msg = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(msg)) => msg,
            // Errors such as a lost connection are transient: the client retries.
            Ok(Err(e)) => {
                last_error = Some(e);
                continue;
            }
            Err(_) => panic!(
                "topic {topic}: got {} of {n} records within {WAIT:?} (last error: {last_error:?}): \
                 {got:?}",
                got.len()
            ),
        };
        got.push(Record {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            headers: msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            payload: msg.payload().unwrap_or_default().to_vec(),
        });
    }
    got.sort_by_key(|r| (r.partition, r.offset));
    got
}

/// How many records `topic` holds now (sum over partitions of high - low watermark); 0 when
/// the topic does not exist.
pub async fn count(brokers: &str, topic: &str) -> usize {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    // rdkafka's metadata and watermark calls block: off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = config(&brokers).create().unwrap();
        partitions_of(&client, &topic)
            .into_iter()
            .map(|p| {
                let (low, high) = client
                    .fetch_watermarks(&topic, p, WAIT)
                    .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
                usize::try_from(high - low).unwrap()
            })
            .sum()
    })
    .await
    .unwrap()
}

/// The partition ids of `topic`, empty when it does not exist.
pub async fn partitions(brokers: &str, topic: &str) -> Vec<i32> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = config(&brokers).create().unwrap();
        partitions_of(&client, &topic)
    })
    .await
    .unwrap()
}

fn partitions_of(client: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = client
        .fetch_metadata(Some(topic), WAIT)
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    md.topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect()
}

/// Creates `topic` with one partition and replication factor 1; an existing topic is fine.
pub async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = config(brokers).create().unwrap();
    let options = AdminOptions::new().request_timeout(Some(WAIT));
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    let results = tokio::time::timeout(WAIT, admin.create_topics([&new], &options))
        .await
        .unwrap_or_else(|_| panic!("creating {topic} timed out"))
        .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("creating {t}: {e}"),
        }
    }
}

/// Produces one record (idempotent producer, acks=all) and waits for its delivery report.
/// The topic is created first when missing: tansu does not create topics on produce.
pub async fn produce(
    brokers: &str,
    topic: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    payload: &[u8],
) {
    create_topic(brokers, topic).await;
    let producer: FutureProducer = config(brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", WAIT.as_millis().to_string())
        .create()
        .unwrap();
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::to(topic).payload(payload).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    match tokio::time::timeout(WAIT, producer.send(record, WAIT)).await {
        Ok(Ok(_)) => {}
        Ok(Err((e, _))) => panic!("producing to {topic}: {e}"),
        Err(_) => panic!("producing to {topic} timed out"),
    }
}
