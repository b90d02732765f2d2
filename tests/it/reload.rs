//! Reloading the configuration of a running daemon (a process): SIGHUP and `--watch`. A reload
//! adding a target, changing a template and removing a user takes effect while a stream of
//! messages goes through, each delivered once, those prepared before it under the old
//! template and those after under the new; an invalid file leaves the daemon serving with
//! what it had.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::daemon::Daemon;
use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::receiver::Receiver;
use crate::common::{client_with_token, post_json, toml_with, CLIENT_TOKEN, WAIT};

const SECRET: &str = "reload-hook-secret";

/// The configuration before (`v1`) and after (`v2`) the reload: v2 changes the hook's
/// template, removes user lisi, and adds target `group2` and route `fanout` to it.
fn config(engine: &Engine, hook: &str, group: &str, group2: Option<&str>, v: &str) -> String {
    let mut extra = format!(
        "{}\n[log]\nformat = \"json\"\n\n\
         [targets.hook]\nkind = \"webhook\"\nurl = \"{hook}\"\nsecret = \"{SECRET}\"\n\
         template = \"t\"\n\n\
         [templates.t]\ntext = \"{v} {{{{ seq }}}}\"\n\n\
         [targets.group]\nkind = \"dingtalk_robot\"\nurl = \"{group}\"\n\n\
         [users.zhangsan]\ndingtalk = \"zs1\"\n\n",
        engine.toml()
    );
    match group2 {
        Some(url) => {
            extra += &format!("[targets.group2]\nkind = \"dingtalk_robot\"\nurl = \"{url}\"\n\n");
            extra += "[routes.fanout]\ntargets = [\"group2\"]\n\n";
        }
        None => extra += "[users.lisi]\ndingtalk = \"ls1\"\n\n",
    }
    toml_with(&extra)
}

/// The value of an unlabelled counter on the daemon's `/metrics`.
async fn counter(daemon: &Daemon, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{}/metrics", daemon.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} ")));
    line.and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn wait_counter(daemon: &Daemon, name: &str, at_least: u64) {
    let deadline = Instant::now() + WAIT;
    while counter(daemon, name).await < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hangup(daemon: &Daemon) {
    crate::common::signal(&daemon.child, "-HUP");
}

async fn post(daemon: &Daemon, target: &str, body: serde_json::Value) -> u16 {
    let url = format!(
        "http://{}/notify/{target}",
        daemon.internal.as_ref().unwrap()
    );
    post_json(&client_with_token(CLIENT_TOKEN), url, body)
        .await
        .0
}

/// Each `seq` the hook got, with the text it was rendered with.
fn texts(receiver: &Receiver) -> BTreeMap<u64, Vec<String>> {
    let mut by_seq: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for got in receiver.got() {
        got.verify(SECRET);
        let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        let text = body["text"].as_str().unwrap().to_owned();
        let seq = text.split(' ').nth(1).unwrap().parse().unwrap();
        by_seq.entry(seq).or_default().push(text);
    }
    by_seq
}

#[tokio::test]
async fn a_reload_during_a_stream_of_messages_loses_and_repeats_none() {
    const MESSAGES: u64 = 60;
    for engine in [Engine::Memory, Engine::nats()] {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let group = robots.add(Robot::dingtalk(&format!("reload-{name}")));
        let group2 = robots.add(Robot::dingtalk(&format!("reload2-{name}")));
        // Slower than the stream: at the reload, messages prepared under v1 are queued.
        let receiver = Receiver::slow(vec![], Duration::from_millis(30)).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imbridge.toml");
        std::fs::write(&path, config(&engine, &receiver.url, &group, None, "v1")).unwrap();
        let daemon = Daemon::start(&path, &[]);
        daemon.wait_ready().await;
        let to_both =
            serde_json::json!({"text": "hi", "mentions": {"users": ["zhangsan", "lisi"]}});
        assert_eq!(
            post(&daemon, "group2", to_both.clone()).await,
            404,
            "{name}"
        );

        // A stream of messages, the reload in the middle of it.
        for seq in 0..MESSAGES {
            if seq == MESSAGES / 3 {
                let v2 = config(&engine, &receiver.url, &group, Some(&group2), "v2");
                std::fs::write(&path, v2).unwrap();
                hangup(&daemon);
            }
            let status = post(&daemon, "hook", serde_json::json!({ "seq": seq })).await;
            assert_eq!(status, 202, "{name}: message {seq}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_counter(&daemon, "imbridge_config_reloads_total", 1).await;
        receiver.wait_for(MESSAGES as usize).await;
        // Time for a duplicate to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let by_seq = texts(&receiver);
        assert_eq!(
            by_seq.len() as u64,
            MESSAGES,
            "{name}: every message arrived"
        );
        let repeated: Vec<_> = by_seq.iter().filter(|(_, t)| t.len() > 1).collect();
        assert!(repeated.is_empty(), "{name}: delivered twice: {repeated:?}");
        // One worker, in order: the old template up to a point, the new one after it.
        let versions: Vec<&str> = by_seq.values().map(|t| &t[0][..2]).collect();
        let switch = versions
            .iter()
            .position(|v| *v == "v2")
            .expect("some under v2");
        assert!(switch > 0, "{name}: some under v1");
        assert!(
            versions[switch..].iter().all(|v| *v == "v2"),
            "{name}: {versions:?}"
        );

        // The added target, with lisi no longer bound: only zhangsan is mentioned.
        assert_eq!(
            post(&daemon, "group2", to_both.clone()).await,
            202,
            "{name}"
        );
        let sent = &robots
            .wait_accepted(&format!("reload2-{name}"), 1, WAIT)
            .await[0];
        assert_eq!(
            sent.body["at"]["atUserIds"],
            serde_json::json!(["zs1"]),
            "{name}: {}",
            sent.body
        );
        // The added route forwards to the added target.
        let routed = serde_json::json!({"text": "routed"});
        assert_eq!(post(&daemon, "fanout", routed).await, 202, "{name}");
        let got = robots
            .wait_accepted(&format!("reload2-{name}"), 2, WAIT)
            .await;
        assert_eq!(got[1].body["markdown"]["text"], "routed", "{name}");
        assert_eq!(robots.violations(), Vec::<String>::new(), "{name}");

        // An invalid file: refused, counted, and the daemon goes on as it was.
        std::fs::write(&path, "[targets.broken]\nkind = \"carrier-pigeon\"\n").unwrap();
        hangup(&daemon);
        wait_counter(&daemon, "imbridge_config_reload_failures_total", 1).await;
        assert_eq!(counter(&daemon, "imbridge_config_reloads_total").await, 1);
        let status = post(&daemon, "hook", serde_json::json!({ "seq": MESSAGES })).await;
        assert_eq!(status, 202, "{name}");
        assert_eq!(post(&daemon, "group2", to_both).await, 202, "{name}");
        let got = receiver.wait_for(MESSAGES as usize + 1).await;
        let last: serde_json::Value = serde_json::from_slice(&got.last().unwrap().body).unwrap();
        assert_eq!(last["text"], format!("v2 {MESSAGES}"), "{name}");
        assert!(
            daemon_logged(&daemon, "configuration reload refused"),
            "{name}: the refusal is logged"
        );
    }
}

/// Whether the daemon logged a line containing `text` (reads what it logged so far).
fn daemon_logged(daemon: &Daemon, text: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match daemon.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(text) => return true,
            _ => {}
        }
    }
    false
}

/// `--watch`: a change of the file is a reload; a listener address that changed is reported
/// as needing a restart, and the rest applies.
#[tokio::test]
async fn watch_reloads_when_the_file_changes() {
    let receiver = Receiver::start(vec![]).await;
    let robots = RobotFarm::start().await;
    let group = robots.add(Robot::dingtalk("watched"));
    let group2 = robots.add(Robot::dingtalk("watched2"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    let engine = Engine::Memory;
    std::fs::write(&path, config(&engine, &receiver.url, &group, None, "v1")).unwrap();
    let daemon = Daemon::start_with(&path, &["--watch"], &[]);
    daemon.wait_ready().await;
    let v2 = config(&engine, &receiver.url, &group, Some(&group2), "v2").replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:1\"",
    );
    replace_atomically(&path, &v2);
    wait_counter(&daemon, "imbridge_config_reloads_total", 1).await;
    let body = serde_json::json!({"text": "watched"});
    assert_eq!(post(&daemon, "group2", body).await, 202);
    robots.wait_accepted("watched2", 1, WAIT).await;
    assert!(daemon_logged(&daemon, "takes effect only after a restart"));
}

/// As Kubernetes updates a mounted ConfigMap: the new file is written aside and renamed over.
fn replace_atomically(path: &Path, content: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, content).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A long-connection app whose secret was wrong is fixed by a reload: a new registration with
/// the new secret, a connection, readiness; removing the app by a reload closes it.
#[tokio::test]
async fn a_reload_restarts_the_long_connection_whose_credentials_changed() {
    use crate::common::stream_gateway::{Gateway, CLIENT_ID, CLIENT_SECRET};
    let gw = Gateway::start().await;
    let app = |secret: &str| {
        format!(
            "[apps.dingtalk.stream]\nmode = \"stream\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{secret}\"\napi_base = \"{}\"\nallow_insecure_http = true\n",
            gw.api_base()
        )
    };
    let toml = |apps: &str| {
        toml_with(&format!(
            "[log]\nformat = \"json\"\n\n[streams]\nreconnect_initial = \"20ms\"\n\
             reconnect_max = \"200ms\"\nauth_retry = \"500ms\"\n\n{apps}"
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    std::fs::write(&path, toml(&app("a-wrong-secret-0123456789"))).unwrap();
    let daemon = Daemon::start(&path, &[]);
    let readyz = || async {
        let url = format!("http://{}/readyz", daemon.admin);
        reqwest::get(url).await.unwrap().status()
    };
    // Refused: not ready.
    let deadline = Instant::now() + WAIT;
    while readyz().await != 503 {
        assert!(
            Instant::now() < deadline,
            "a refused app left the daemon ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    std::fs::write(&path, toml(&app(CLIENT_SECRET))).unwrap();
    hangup(&daemon);
    let conn = tokio::time::timeout(WAIT, gw.next_conn())
        .await
        .expect("a connection");
    daemon.wait_ready().await;

    // Removed: its connection is closed, and the daemon stays ready without it.
    std::fs::write(&path, toml("")).unwrap();
    hangup(&daemon);
    tokio::time::timeout(WAIT, gw.wait_closed(conn.index))
        .await
        .expect("the removed app's connection closes");
    wait_counter(&daemon, "imbridge_config_reloads_total", 2).await;
    assert_eq!(readyz().await, 200);
    assert_eq!(gw.violations(), Vec::<String>::new());
}
