//! A three-node JetStream cluster on loopback ports, two daemon replicas with `replicas = 3`,
//! callbacks and notifications through both, and the inbound stream's leader SIGKILLed
//! mid-load, then started again. Every callback answered 200 must be stored (0 acknowledged
//! lost); the 503s while the cluster elects a new leader are the platform's to retry; the
//! robot's limit is never exceeded. The figures are printed (and, with
//! `IMBRIDGE_CLUSTER_RESULTS=<file>`, written as JSON for `bench/run`'s report).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::fakes::{Robot, RobotFarm};
use crate::common::{approval_event, start_nats, toml_with, DingTalk, TestApp, MAIN_APP, WAIT};

const STREAM: &str = "CLUSTER_EVENTS";
const NODES: usize = 3;

/// One node of the cluster: its config file, store, ports and process.
struct Node {
    name: String,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let mut command = Command::new("nats-server");
        command.arg("-c").arg(&self.config);
        let (child, port) = start_nats(command);
        assert_eq!(port, Some(self.port), "{} never ready", self.name);
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Free loopback ports (bound, then released for the servers to take).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn cluster(dir: &Path) -> Vec<Node> {
    let ports = free_ports(NODES * 2);
    let (clients, routes) = ports.split_at(NODES);
    let route_list: Vec<String> = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    (0..NODES)
        .map(|i| {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name);
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: imbridge, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    clients[i],
                    store.display(),
                    routes[i],
                    route_list.join(", ")
                ),
            )
            .unwrap();
            Node {
                name,
                config,
                port: clients[i],
                child: None,
            }
        })
        .collect()
}

/// The server leading `STREAM`, once there is one.
async fn leader(js: &async_nats::jetstream::Context) -> Option<String> {
    let mut stream = js.get_stream(STREAM).await.ok()?;
    let info = stream.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// The instance ids of the approvals the stream holds.
async fn stored(js: &async_nats::jetstream::Context) -> Vec<String> {
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut ids = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue;
        };
        let payload: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if let Some(id) = payload["processInstanceId"].as_str() {
            ids.push(id.to_owned());
        }
    }
    ids
}

#[derive(Default)]
struct Tally {
    ok: HashSet<String>,
    unavailable: usize,
    other: usize,
    /// When each 200 and each 503 came, since the start.
    ok_at: Vec<Duration>,
    unavailable_at: Vec<Duration>,
}

#[tokio::test]
async fn a_three_node_cluster_losing_its_stream_leader_loses_no_acknowledged_callback() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path());
    for node in &mut nodes {
        node.start();
    }
    let url: Vec<String> = nodes
        .iter()
        .map(|n| format!("nats://127.0.0.1:{}", n.port))
        .collect();
    let url = url.join(",");
    let robots = RobotFarm::start().await;
    let window = Duration::from_secs(2);
    let robot = robots.add(Robot::dingtalk("cluster").with_limits(vec![(5, window)]));
    let toml = toml_with(&format!(
        "[bus]\nkind = \"nats\"\n[bus.nats]\nurl = \"{url}\"\nstream = \"{STREAM}\"\n\
         replicas = 3\nduplicate_window = \"2m\"\npublish_timeout = \"2s\"\n\
         reconnect_max_delay = \"250ms\"\n\n{MAIN_APP}\n\
         [targets.cluster]\nkind = \"dingtalk_robot\"\nurl = \"{robot}\"\nrate_limit = \"5/2s\"\n"
    ));
    // One after the other: the first creates the replicated streams.
    let a = TestApp::start(&toml).await;
    a.wait_ready().await;
    let b = TestApp::start(&toml).await;
    b.wait_ready().await;
    let servers = imbridge::bus::nats::server_addrs(&url).unwrap();
    let nats = async_nats::connect(servers).await.unwrap();
    let js = async_nats::jetstream::new(nats);

    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let bases = [a.public_url(""), b.public_url("")];
    let load_for = Duration::from_secs(14);
    let mut workers = Vec::new();
    for w in 0..8 {
        let (tally, bases) = (tally.clone(), bases.clone());
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0;
            while started.elapsed() < load_for {
                let id = format!("cluster-{w}-{i}");
                i += 1;
                let res = DingTalk::main()
                    .callback(&approval_event(&id))
                    .post_to(&http, &bases[i % 2], "main")
                    .await;
                let mut t = tally.lock().unwrap();
                match res.status().as_u16() {
                    200 => {
                        t.ok.insert(id);
                        t.ok_at.push(started.elapsed());
                    }
                    503 => {
                        t.unavailable += 1;
                        t.unavailable_at.push(started.elapsed());
                    }
                    _ => t.other += 1,
                }
            }
        }));
    }
    // Notifications through both replicas, while the leader goes.
    let notifier = {
        let (a_url, b_url) = (a.url("/notify/cluster"), b.url("/notify/cluster"));
        let http = a.http.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let url = if i % 2 == 0 { &a_url } else { &b_url };
                let body = serde_json::json!({ "text": format!("notification {i}") });
                // A publish the bus could not take is the caller's to retry.
                loop {
                    let sent = http.post(url).json(&body).send().await;
                    if sent.is_ok_and(|r| r.status() == 202) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(4)).await;
    let leader = leader(&js).await.expect("the stream has a leader");
    let killed_at = started.elapsed();
    let node = nodes.iter_mut().find(|n| n.name == leader).unwrap();
    node.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    node.start();
    for w in workers {
        w.await.unwrap();
    }
    notifier.await.unwrap();

    // Everything answered 200 is in the stream, once the cluster is whole again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let (stored_ids, lost) = loop {
        let ids = stored(&js).await;
        let set: HashSet<&String> = ids.iter().collect();
        let lost: Vec<&String> = tally.ok.iter().filter(|id| !set.contains(id)).collect();
        if lost.is_empty() || Instant::now() > deadline {
            let lost: Vec<String> = lost.into_iter().cloned().collect();
            break (ids, lost);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let first_503 = tally.unavailable_at.iter().find(|t| **t >= killed_at);
    let recovered = first_503.and_then(|f| tally.ok_at.iter().find(|t| *t > f));
    let recovery = recovered.map(|r| *r - killed_at);
    let sent = robots.wait_accepted("cluster", 20, WAIT * 3).await;
    let figures = serde_json::json!({
        "answered_200": tally.ok.len(),
        "stored": stored_ids.len(),
        "stored_distinct": stored_ids.iter().collect::<HashSet<_>>().len(),
        "acknowledged_lost": lost.len(),
        "answered_503": tally.unavailable,
        "answered_other": tally.other,
        "recovery_seconds": recovery.map(|d| d.as_secs_f64()),
        "killed": leader,
        "notifications": sent.len(),
        "limit_violations": robots.violations().len(),
    });
    println!("cluster: {figures}");
    if let Some(path) = std::env::var_os("IMBRIDGE_CLUSTER_RESULTS") {
        std::fs::write(path, serde_json::to_string_pretty(&figures).unwrap()).unwrap();
    }
    assert!(lost.is_empty(), "answered 200 but not stored: {lost:?}");
    assert_eq!(tally.other, 0, "answers other than 200 and 503");
    assert_eq!(robots.violations(), Vec::<String>::new());
    assert!(tally.ok.len() > 100, "too little load to say anything");
    a.stop().await;
    b.stop().await;
}
