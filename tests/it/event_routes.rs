//! Routes on inbound events (`[routes.<name>] from = [...]`): a platform callback reaches a
//! group robot through a route reading the inbound stream, on the in-process bus and a real
//! `nats-server -js`; events outside `from` or the rules send nothing; a redelivered event is
//! forwarded again but sent once. Kafka is refused by `check-config` (see `config.rs`).

use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

/// Business subjects put the approval's process code and state into the subject, so the
/// route picks finished approvals by subject and approved ones by the event's `result`.
fn config(engine: &Engine, robot: &str, extra: &str) -> String {
    toml_with(&format!(
        "{}\n{extra}\n{MAIN_APP}\n\
         [apps.dingtalk.main.subjects]\n\
         bpms_instance_change = [\"/processCode\", \"/type\"]\n\n\
         [targets.group]\nkind = \"dingtalk_robot\"\nurl = \"{robot}\"\n\n\
         [routes.approvals]\n\
         from = [\"dingtalk.bpms_instance_change.*.finish\"]\n\
         targets = [\"group\"]\n\
         match = {{ result = [\"agree\"] }}\n\
         template = \"approval\"\n\n\
         [templates.approval]\n\
         text = \"{{{{ title }}}} approved by {{{{ staffId }}}}\"\n\
         url = \"https://oa.example.com/approvals/{{{{ processInstanceId }}}}\"\n",
        engine.toml()
    ))
}

async fn post(app: &TestApp, event: &str) {
    let res = DingTalk::main().callback(event).post(app, "main").await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_finished_approval_reaches_the_group_through_a_route_on_events() {
    for engine in [Engine::Memory, Engine::nats()] {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let robot = robots.add(Robot::dingtalk(&format!("approvals-{name}")));
        let app = TestApp::start(&config(&engine, &robot, "")).await;
        app.wait_ready().await;

        // Not in `from` (still running), then not matching the rule (refused): nothing.
        let running = approval_event(&format!("running-{name}")).replace("finish", "start");
        post(&app, &running).await;
        let refused = approval_event(&format!("refused-{name}")).replace("agree", "refuse");
        post(&app, &refused).await;
        post(&app, &approval_event(&format!("approved-{name}"))).await;

        let token = format!("approvals-{name}");
        let got = robots.wait_accepted(&token, 1, WAIT).await;
        let body = got[0].body.to_string();
        assert!(
            body.contains("张三提交的请假 approved by manager75"),
            "{name}: {body}"
        );
        assert!(
            body.contains(&format!("https://oa.example.com/approvals/approved-{name}")),
            "{name}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(robots.accepted(&token).len(), 1, "{name}");
        // A route on events reads no notifications: POST /notify/<route> is no such target.
        let res = app
            .http
            .post(app.url("/notify/approvals"))
            .json(&serde_json::json!({ "text": "hello" }))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{name}");
        app.stop().await;
    }
}

/// The route's task dies after forwarding and before acknowledging, again and again: the
/// event comes back each time and is forwarded again with the same ids, and the robot still
/// gets it once.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_redelivered_event_is_sent_once() {
    let engine = Engine::nats();
    let robots = RobotFarm::start().await;
    let robot = robots.add(Robot::dingtalk("approvals-redelivered"));
    let app = TestApp::start(&config(&engine, &robot, "[notify]\nack_wait = \"1s\"\n")).await;
    app.wait_ready().await;
    // Only this test configures the point; its victim is this route's name.
    fail::cfg("notify-route", "return(approvals)").unwrap();
    post(&app, &approval_event("redelivered")).await;
    robots.wait_accepted("approvals-redelivered", 1, WAIT).await;
    let task = "notify_route:approvals:dingtalk.bpms_instance_change.*.finish";
    let deadline = tokio::time::Instant::now() + WAIT;
    while app
        .metrics
        .task_restarts_total
        .with_label_values(&[task])
        .get()
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline, "never redelivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fail::remove("notify-route");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(robots.accepted("approvals-redelivered").len(), 1);
    app.stop().await;
}

/// `imbridge render --route <name>` previews, for an event on stdin, what each target of a
/// route on events would get: the example's approval route renders the group robot's message.
#[test]
fn render_previews_a_route_on_events() {
    use std::io::Write;
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("imbridge.example.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["render", "--route", "approvals", "--config"])
        .arg(example)
        // The config tests in this process set IMBRIDGE_ variables inside their jails.
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let event = approval_event("rendered");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(event.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.starts_with("# ops-dingtalk: "), "{stdout}");
    assert!(
        stdout.contains("张三提交的请假 approved by manager75"),
        "{stdout}"
    );
    assert!(stdout.contains("procInstId=rendered"), "{stdout}");
}
