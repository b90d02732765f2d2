//! Long-connection ingress: events pushed by the test suite's fake DingTalk Stream gateway
//! over one WebSocket, each published by the daemon to JetStream and ACKed only once stored,
//! against the raw JetStream publish of the same size at the daemon's in-flight limit
//! (`streams.max_in_flight`, 64), measured in the same run. Writes `results/stream.json`.

// The gateway is the one the integration tests use (it checks registrations, tickets and
// every ACK's shape); the bench needs only part of it.
#[allow(dead_code)]
#[path = "../../tests/it/common/stream_gateway.rs"]
mod stream_gateway;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::load::Stats;
use crate::procs::{self, Daemon};
use stream_gateway::{event_frame, Gateway, CLIENT_ID, CLIENT_SECRET};

/// How long the gateway waits for the daemon to connect (its `next_conn`).
const WAIT: Duration = Duration::from_secs(30);
const EVENTS: usize = 20_000;
/// The daemon's default limit of frames in flight per connection, which the raw publish
/// matches.
const IN_FLIGHT: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamResult {
    pub events: usize,
    /// Events ACKed per second, from the first push to the last ACK.
    pub daemon_rate: f64,
    /// The raw JetStream publish at [`IN_FLIGHT`] concurrency.
    pub raw: Stats,
    pub daemon_cpu_us: f64,
    /// ACKs other than success, and the gateway's complaints (both must be none).
    pub failed_acks: usize,
    pub violations: usize,
}

pub async fn run(out: &Path, d: Duration) -> anyhow::Result<()> {
    eprintln!("stream: DingTalk Stream events against the raw publish");
    let (nats, port) = procs::nats_server()?;
    let url = format!("nats://127.0.0.1:{port}");
    let raw = crate::ingress::jetstream_raw(&url, IN_FLIGHT, d).await?;
    let gw = Gateway::start().await;
    let daemon = Daemon::start(&format!(
        "[apps.dingtalk.stream]\nmode = \"stream\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret = \"{CLIENT_SECRET}\"\napi_base = \"{}\"\nallow_insecure_http = true\n\
         [bus]\nkind = \"nats\"\n[bus.nats]\nurl = \"{url}\"\nstorage = \"file\"\n\
         [notify]\nenabled = false\n",
        gw.api_base()
    ))
    .await?;
    let conn = gw.next_conn().await;
    // Made before the clock starts; each a unique event of about 1 KiB.
    let pad = "x".repeat(900);
    let frames: Vec<String> = (0..EVENTS)
        .map(|i| {
            let data = format!(
                r#"{{"processInstanceId":"stream-bench-{i}","type":"finish","pad":"{pad}"}}"#
            );
            event_frame(
                &format!("m{i}"),
                &format!("e{i}"),
                "bpms_instance_change",
                &data,
            )
        })
        .collect();
    let cpu = daemon.proc.cpu_time();
    let started = Instant::now();
    for frame in frames {
        conn.send(frame);
    }
    let deadline = started + Duration::from_secs(300);
    while gw.ack_count() < EVENTS {
        anyhow::ensure!(Instant::now() < deadline, "only {} ACKs", gw.ack_count());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = daemon.proc.cpu_time().saturating_sub(cpu);
    let succeeded: std::collections::HashSet<String> = gw
        .acks()
        .into_iter()
        .filter(|a| a.data()["status"] == "SUCCESS")
        .filter_map(|a| a.frame["headers"]["messageId"].as_str().map(str::to_owned))
        .collect();
    let failed_acks = EVENTS - succeeded.len().min(EVENTS);
    let result = StreamResult {
        events: EVENTS,
        daemon_rate: EVENTS as f64 / took,
        raw,
        daemon_cpu_us: cpu.as_secs_f64() * 1e6 / EVENTS as f64,
        failed_acks,
        violations: gw.violations().len(),
    };
    drop(daemon);
    drop(nats);
    crate::save(out, "stream", &result)
}
