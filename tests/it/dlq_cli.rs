//! `imbridge dlq list|show|replay|purge` as an operator runs it: the command as a process
//! against a daemon whose target answered a permanent error, on the in-process bus (through
//! the daemon's internal listener), a real nats-server and a real Kafka-protocol broker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm, Scripted};
use crate::common::*;

const SECRET: &str = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

const NOTIFY: &str = r#"
[notify]
retry_initial = "50ms"
retry_max = "200ms"
max_attempts = 2
request_timeout = "1s"
ack_wait = "2s"
"#;

/// What a run of the command gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().filter(|l| !l.is_empty()).collect()
    }
}

/// Runs `imbridge dlq <args> --config <config> --target perm` (plus, on the in-process bus,
/// the internal listener and the token).
async fn dlq(scene: &Scene, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imbridge"));
    command
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(&scene.config)
        .args(["--target", "perm"])
        .env_remove("IMBRIDGE_TOKEN")
        .kill_on_drop(true);
    if let Some(internal) = scene.app.internal {
        if scene.memory {
            command
                .args(["--url", &format!("http://{internal}")])
                .env("IMBRIDGE_TOKEN", CLIENT_TOKEN);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command ends")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Scene {
    app: TestApp,
    farm: RobotFarm,
    config: PathBuf,
    memory: bool,
    _dir: tempfile::TempDir,
}

async fn scene(engine: &Engine) -> Scene {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::dingtalk("perm").with_secret(SECRET));
    let toml = toml_with(&format!(
        "{}\n{NOTIFY}\n[targets.perm]\nkind = \"dingtalk_robot\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n",
        engine.toml()
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imbridge.toml");
    std::fs::write(&config, allow_insecure_http(&toml)).unwrap();
    let app = TestApp::start(&toml).await;
    app.wait_ready().await;
    Scene {
        app,
        farm,
        config,
        memory: matches!(engine, Engine::Memory),
        _dir: dir,
    }
}

/// Posts a notification the robot refuses for good, and waits until it is a dead letter.
async fn dead_letter(scene: &Scene, text: &str, expect: usize) {
    scene.farm.script("perm", vec![Scripted::ErrCode(310000)]);
    let response = scene
        .app
        .http
        .post(scene.app.url("/notify/perm"))
        .json(&serde_json::json!({ "text": text }))
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    wait_listed(scene, expect).await;
}

async fn wait_listed(scene: &Scene, n: usize) -> Run {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let run = dlq(scene, &["list"]).await;
        if run.code == 0 && run.lines().len() == n {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} letters expected: {} / {}",
            run.stdout,
            run.stderr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for `text` to be accepted by the robot, then a little more, and counts it.
async fn accepted(scene: &Scene, text: &str) -> usize {
    let count = || {
        scene
            .farm
            .accepted("perm")
            .iter()
            .filter(|r| r.body.to_string().contains(text))
            .count()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    count()
}

fn id_of(run: &Run, text_line: usize) -> &str {
    run.lines()[text_line].split('\t').next().unwrap()
}

async fn list_show_replay_purge(engine: Engine) {
    let name = engine.name();
    let scene = scene(&engine).await;
    dead_letter(&scene, "first", 1).await;
    dead_letter(&scene, "second", 2).await;

    let listed = dlq(&scene, &["list"]).await;
    for line in listed.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 6, "{name}: {line}");
        assert_eq!(fields[2], "permanent", "{name}: {line}");
        assert_eq!(fields[3], "1", "{name}: attempts: {line}");
    }
    let filtered = |args: &'static [&'static str], n: usize| {
        let scene = &scene;
        async move {
            let run = dlq(scene, args).await;
            assert_eq!(run.code, 0, "{name} {args:?}: {}", run.stderr);
            assert_eq!(run.lines().len(), n, "{name} {args:?}: {}", run.stdout);
        }
    };
    filtered(&["list", "--reason", "permanent"], 2).await;
    filtered(&["list", "--reason", "expired"], 0).await;
    filtered(&["list", "--since", "1h"], 2).await;
    filtered(&["list", "--since", "2999-01-01T00:00:00Z"], 0).await;
    filtered(&["list", "--limit", "1"], 1).await;

    let first = id_of(&listed, 0).to_owned();
    let show = dlq(&scene, &["show", "--id", &first]).await;
    assert_eq!(show.code, 0, "{name}: {}", show.stderr);
    assert!(
        show.stdout.contains(r#"{"text":"first"}"#),
        "{name}: {}",
        show.stdout
    );
    assert!(
        show.stdout.contains("imbridge-dlq-reason: permanent"),
        "{name}: {}",
        show.stdout
    );

    // The robot answers OK from now on: the replay is delivered, once, even run twice.
    let replay = dlq(&scene, &["replay", "--id", &first]).await;
    assert_eq!(replay.code, 0, "{name}: {}", replay.stderr);
    assert!(
        replay.stdout.starts_with("replayed\t"),
        "{name}: {}",
        replay.stdout
    );
    let again = dlq(&scene, &["replay", "--id", &first]).await;
    assert_eq!(again.code, 0, "{name}: {}", again.stderr);
    assert_eq!(accepted(&scene, "first").await, 1, "{name}");
    let left = wait_listed(&scene, 1).await;
    assert_ne!(
        id_of(&left, 0),
        first,
        "{name}: the replayed letter is gone"
    );

    let refused = dlq(&scene, &["purge"]).await;
    assert_eq!(refused.code, 64, "{name}: purge without a filter nor --all");
    let purged = dlq(&scene, &["purge", "--all"]).await;
    assert_eq!(purged.code, 0, "{name}: {}", purged.stderr);
    assert_eq!(purged.lines().len(), 1, "{name}: {}", purged.stdout);
    wait_listed(&scene, 0).await;
    assert_eq!(
        accepted(&scene, "second").await,
        0,
        "{name}: purged, not sent"
    );
    scene.app.stop().await;
}

#[tokio::test]
async fn memory_list_show_replay_purge() {
    list_show_replay_purge(Engine::Memory).await;
}

#[tokio::test]
async fn nats_list_show_replay_purge() {
    list_show_replay_purge(Engine::nats()).await;
}

#[tokio::test]
async fn kafka_list_show_replay_purge() {
    list_show_replay_purge(Engine::kafka()).await;
}

/// A replay that cannot be published (the broker stalled) fails with 69 and leaves the
/// letter where it was.
#[tokio::test]
async fn a_replay_the_bus_does_not_take_leaves_the_letter() {
    for engine in Engine::durable() {
        let name = engine.name();
        let scene = scene(&engine).await;
        dead_letter(&scene, "stays", 1).await;
        engine.signal("-STOP");
        let replay = dlq(&scene, &["replay"]).await;
        engine.signal("-CONT");
        assert_eq!(
            replay.code, 69,
            "{name}: {} / {}",
            replay.stdout, replay.stderr
        );
        wait_listed(&scene, 1).await;
        scene.app.stop().await;
    }
}

/// The in-process bus's letters are the daemon's: only a client allowed the target sees them.
#[tokio::test]
async fn internal_dlq_endpoints_need_a_client_token() {
    let scene = scene(&Engine::Memory).await;
    dead_letter(&scene, "secret", 1).await;
    let internal = scene.app.internal.unwrap();
    let anonymous = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::GET, "/dlq/perm"),
        (reqwest::Method::POST, "/dlq/perm/1/replay"),
        (reqwest::Method::DELETE, "/dlq/perm/1"),
    ] {
        for token in [None, Some("wrong")] {
            let mut req = anonymous.request(method.clone(), format!("http://{internal}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let response = req.timeout(WAIT).send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} {token:?}");
        }
    }
    // With the token: the letters as JSON, `since` as on the command line.
    let listed: serde_json::Value = scene
        .app
        .http
        .get(format!("http://{internal}/dlq/perm?since=1h"))
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(listed[0]["body"].as_str().unwrap().contains("secret"));
    let bad = scene
        .app
        .http
        .get(format!("http://{internal}/dlq/perm?since=someday"))
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // The command without a token is refused as a usage problem, and nothing changed.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imbridge"));
    let out = command
        .args(["dlq", "purge", "--all", "--target", "perm", "--config"])
        .arg(Path::new(&scene.config))
        .args(["--url", &format!("http://{internal}")])
        .env_remove("IMBRIDGE_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    wait_listed(&scene, 1).await;
    scene.app.stop().await;
}
