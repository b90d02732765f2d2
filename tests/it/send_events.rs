//! Seeing and testing: `imbridge send` as a process, through a daemon's internal listener (with
//! and without `--wait`), with `--direct` and no daemon, and against no daemon at all; and
//! `GET /events`, the live tail of the bus, on the in-process bus, NATS and Kafka.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm, Scripted};
use crate::common::*;

/// What a run of the command gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `imbridge send --config <config> <args>`, `IMBRIDGE_TOKEN` set to `token` if any.
async fn send<A: AsRef<std::ffi::OsStr>>(config: &Path, args: &[A], token: Option<&str>) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_imbridge"));
    command
        .arg("send")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("IMBRIDGE_TOKEN")
        .kill_on_drop(true);
    if let Some(token) = token {
        command.env("IMBRIDGE_TOKEN", token);
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

/// A fake DingTalk robot `robot` as target `robot`, and the configuration file naming it.
struct Scene {
    farm: RobotFarm,
    config: PathBuf,
    toml: String,
    _dir: tempfile::TempDir,
}

/// A client that may send only to `ops-*` targets (there are none).
const NARROW_TOKEN: &str = "narrow-client-token-0123456789";

async fn scene(engine: &Engine) -> Scene {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::dingtalk("robot"));
    let toml = toml_with(&format!(
        "{}\n[notify]\nmax_attempts = 1\n\n[targets.robot]\nkind = \"dingtalk_robot\"\nurl = \"{url}\"\n\n\
         [clients.narrow]\ntoken = \"{NARROW_TOKEN}\"\ntargets = [\"ops-*\"]\n",
        engine.toml()
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imbridge.toml");
    std::fs::write(&config, allow_insecure_http(&toml)).unwrap();
    Scene {
        farm,
        config,
        toml,
        _dir: dir,
    }
}

fn text(r: &crate::common::fakes::Received) -> String {
    let b = &r.body;
    b["text"]["content"]
        .as_str()
        .or(b["markdown"]["text"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn send_through_the_daemon_with_and_without_wait() {
    for engine in [Engine::Memory, Engine::nats()] {
        send_through_the_daemon(engine).await;
    }
}

async fn send_through_the_daemon(engine: Engine) {
    let scene = scene(&engine).await;
    let app = TestApp::start(&scene.toml).await;
    app.wait_ready().await;
    let url = format!("http://{}", app.internal.unwrap());
    let with_url = |extra: &[&'static str]| -> Vec<String> {
        ["--target", "robot", "--url", url.as_str()]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    };

    let run = send(&scene.config, &with_url(&[]), Some(CLIENT_TOKEN)).await;
    assert_eq!(run.code, 0, "{} / {}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("accepted: id "), "{}", run.stdout);
    let got = scene.farm.wait_accepted("robot", 1, WAIT).await;
    assert!(
        text(&got[0]).starts_with("imbridge test message from "),
        "{:?}",
        got[0].body
    );

    let run = send(
        &scene.config,
        &with_url(&["--wait", "--text", "hello from the test"]),
        Some(CLIENT_TOKEN),
    )
    .await;
    assert_eq!(run.code, 0, "{} / {}", run.stdout, run.stderr);
    assert!(run.stdout.contains("delivered to robot"), "{}", run.stdout);
    assert!(run.stdout.contains("code 0"), "{}", run.stdout);
    let got = scene.farm.wait_accepted("robot", 2, WAIT).await;
    assert_eq!(text(&got[1]), "hello from the test");

    // The platform refuses: 65, with its code.
    scene.farm.script("robot", vec![Scripted::ErrCode(310000)]);
    let run = send(&scene.config, &with_url(&["--wait"]), Some(CLIENT_TOKEN)).await;
    assert_eq!(run.code, 65, "{} / {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("310000"), "{}", run.stderr);

    // A token the daemon does not know: a usage problem, and the token is not echoed.
    let run = send(
        &scene.config,
        &with_url(&[]),
        Some("wrong-token-0123456789ab"),
    )
    .await;
    assert_eq!(run.code, 64, "{} / {}", run.stdout, run.stderr);
    assert!(!run.stderr.contains("wrong-token"), "{}", run.stderr);

    // A client not allowed this target: refused (403), nothing sent.
    let before = scene.farm.requests("robot");
    let run = send(&scene.config, &with_url(&[]), Some(NARROW_TOKEN)).await;
    assert_eq!(run.code, 64, "{} / {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("target_forbidden"), "{}", run.stderr);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(scene.farm.requests("robot"), before);
    app.stop().await;
}

#[tokio::test]
async fn send_direct_needs_no_daemon() {
    let scene = scene(&Engine::Memory).await;
    let args = ["--target", "robot", "--direct", "--text", "direct hello"];
    let run = send(&scene.config, &args, None).await;
    assert_eq!(run.code, 0, "{} / {}", run.stdout, run.stderr);
    assert!(run.stdout.contains("delivered to robot"), "{}", run.stdout);
    assert!(
        run.stdout.contains("not through a daemon"),
        "{}",
        run.stdout
    );
    let got = scene.farm.wait_accepted("robot", 1, WAIT).await;
    assert_eq!(text(&got[0]), "direct hello");

    scene.farm.script("robot", vec![Scripted::ErrCode(310000)]);
    let run = send(&scene.config, &args, None).await;
    assert_eq!(run.code, 65, "{} / {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("310000"), "{}", run.stderr);

    let run = send(&scene.config, &["--target", "nope", "--direct"], None).await;
    assert_eq!(run.code, 64, "{} / {}", run.stdout, run.stderr);
}

#[tokio::test]
async fn send_to_an_unreachable_daemon_exits_69() {
    let scene = scene(&Engine::Memory).await;
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let args = ["--target", "robot", "--wait", "--url", &url];
    let run = send(&scene.config, &args, Some(CLIENT_TOKEN)).await;
    assert_eq!(run.code, 69, "{} / {}", run.stdout, run.stderr);
    assert!(scene.farm.accepted("robot").is_empty());
}

/// One `GET /events` response, read event by event.
struct Sse {
    response: reqwest::Response,
    buf: String,
}

/// One SSE event's fields (`comment` for a comment line).
type Fields = Vec<(String, String)>;

impl Sse {
    async fn open(app: &TestApp, query: &str) -> Sse {
        let response = get_events(app, query, &app.http).await;
        assert_eq!(response.status(), 200);
        let mut sse = Sse {
            response,
            buf: String::new(),
        };
        // The subscription is in place once this comes.
        let first = sse.next().await.expect("a first event");
        assert_eq!(first, vec![("comment".to_owned(), "subscribed".to_owned())]);
        sse
    }

    /// The next event other than a keep-alive; `None` when the stream ended.
    async fn next(&mut self) -> Option<Fields> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let fields: Fields = block
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| match l.strip_prefix(':') {
                        Some(c) => ("comment".to_owned(), c.trim().to_owned()),
                        None => {
                            let (k, v) = l.split_once(':').unwrap_or((l, ""));
                            (k.to_owned(), v.trim_start().to_owned())
                        }
                    })
                    .collect();
                if fields.iter().all(|(k, v)| k == "comment" && v.is_empty()) {
                    continue;
                }
                return Some(fields);
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an event or the end of the stream in time");
            match chunk {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn get_events(app: &TestApp, query: &str, http: &reqwest::Client) -> reqwest::Response {
    let url = format!("http://{}/events?{query}", app.internal.unwrap());
    tokio::time::timeout(WAIT, http.get(url).send())
        .await
        .expect("answered in time")
        .unwrap()
}

async fn events_on(engine: Engine) {
    let app = TestApp::start(&toml_with(&format!("{}\n{MAIN_APP}", engine.toml()))).await;
    app.wait_ready().await;
    let mut full = Sse::open(&app, "subject=dingtalk.>").await;
    let mut bare = Sse::open(&app, "subject=dingtalk.*&bodies=false").await;
    let instance = format!("events-{}", engine.name());
    let res = DingTalk::main()
        .callback(&approval_event(&instance))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200, "{}", engine.name());

    let e = full.next().await.expect("the callback's event");
    assert_eq!(field(&e, "event"), Some("dingtalk.bpms_instance_change"));
    let id = field(&e, "id").expect("an id");
    let data: serde_json::Value = serde_json::from_str(field(&e, "data").unwrap()).unwrap();
    assert_eq!(data["subject"], "dingtalk.bpms_instance_change");
    assert_eq!(data["headers"]["ce-id"], id, "{data}");
    assert_eq!(
        data["body"]["processInstanceId"],
        instance.as_str(),
        "{data}"
    );

    let e = bare.next().await.expect("the callback's event");
    let data: serde_json::Value = serde_json::from_str(field(&e, "data").unwrap()).unwrap();
    assert_eq!(data["headers"]["ce-id"], id, "{data}");
    assert!(data.get("body").is_none(), "bodies=false: {data}");

    // A stream opened later starts after what the bus holds (on Kafka: at the end of a topic
    // that exists by now).
    let mut late = Sse::open(&app, "subject=dingtalk.>").await;
    let second = format!("{instance}-second");
    let res = DingTalk::main()
        .callback(&approval_event(&second))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200, "{}", engine.name());
    let e = late.next().await.expect("the second callback's event");
    let data: serde_json::Value = serde_json::from_str(field(&e, "data").unwrap()).unwrap();
    assert_eq!(data["body"]["processInstanceId"], second.as_str(), "{data}");

    // Shutdown ends the streams (else the drain would wait for them).
    app.stop().await;
    for mut stream in [full, bare, late] {
        let mut rest = Vec::new();
        while let Some(e) = stream.next().await {
            rest.push(e);
        }
        // What was published after each stream's last read, then the end.
        assert!(rest.len() <= 1, "{}: {rest:?}", engine.name());
    }
}

#[tokio::test]
async fn events_tail_the_memory_bus() {
    events_on(Engine::Memory).await;
}

#[tokio::test]
async fn events_tail_nats() {
    events_on(Engine::nats()).await;
}

#[tokio::test]
async fn events_tail_kafka() {
    events_on(Engine::kafka()).await;
}

#[tokio::test]
async fn events_are_for_clients_with_valid_patterns_and_limited_per_client() {
    let app = TestApp::start(&toml_with("max_event_streams = 2")).await;
    app.wait_ready().await;
    let anonymous = reqwest::Client::new();
    let res = get_events(&app, "subject=dingtalk.>", &anonymous).await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");

    for bad in [
        "",
        "subject=",
        "subject=dingtalk.",
        "subject=a.>.b",
        "subject=a%20b",
    ] {
        let res = get_events(&app, bad, &app.http).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(body["code"].is_string(), "{body}");
    }

    let _one = Sse::open(&app, "subject=dingtalk.>").await;
    let _two = Sse::open(&app, "subject=wecom.>").await;
    let res = get_events(&app, "subject=lark.>", &app.http).await;
    assert_eq!(res.status(), 429);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "too_many_streams");
    app.stop().await;
}

/// The internal listener notices a client hanging up in the middle of its stream: the stream
/// ends and its slot is free again long before the next keep-alive comment would have failed
/// to write (15 s).
#[tokio::test]
async fn a_client_leaving_its_event_stream_frees_its_slot_at_once() {
    let app = TestApp::start(&toml_with("max_event_streams = 1")).await;
    app.wait_ready().await;
    let one = Sse::open(&app, "subject=dingtalk.>").await;
    drop(one);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let res = get_events(&app, "subject=dingtalk.>", &app.http).await;
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the slot of a stream whose client left was not freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
