//! Routes on inbound events (`[routes.<name>] from = [...]`): a platform callback reaches a
//! group robot and a webhook through a route reading the inbound events, on the in-process
//! bus, a real `nats-server -js` and tansu; events outside `from` or the rules send nothing; a
//! redelivered event is forwarded again but sent once; a daemon killed with events in hand
//! delivers each of them after its restart.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::common::daemon::Daemon;
use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::receiver::Receiver;
use crate::common::*;

const SECRET: &str = "whsec-route-0123456789";

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
    for engine in Engine::all() {
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

/// A route added to a system whose bus already holds events acts only on those that come
/// after it; started again, it goes on where it stopped.
#[tokio::test]
async fn a_new_route_starts_after_the_events_already_stored() {
    for engine in Engine::durable() {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let token = format!("new-route-{name}");
        let robot = robots.add(Robot::dingtalk(&token));
        let without_route = toml_with(&format!(
            "{}\n{MAIN_APP}\n[apps.dingtalk.main.subjects]\n\
             bpms_instance_change = [\"/processCode\", \"/type\"]\n",
            engine.toml()
        ));
        let app = TestApp::start(&without_route).await;
        app.wait_ready().await;
        post(&app, &approval_event(&format!("before-{name}"))).await;
        app.stop().await;

        let app = TestApp::start(&config(&engine, &robot, "")).await;
        app.wait_ready().await;
        post(&app, &approval_event(&format!("after-{name}"))).await;
        let got = robots.wait_accepted(&token, 1, WAIT).await;
        assert!(got[0].body.to_string().contains(&format!("after-{name}")));
        app.stop().await;

        let app = TestApp::start(&config(&engine, &robot, "")).await;
        app.wait_ready().await;
        post(&app, &approval_event(&format!("again-{name}"))).await;
        let got = robots.wait_accepted(&token, 2, WAIT).await;
        assert!(got[1].body.to_string().contains(&format!("again-{name}")));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let all: Vec<String> = robots
            .accepted(&token)
            .iter()
            .map(|r| r.body.to_string())
            .collect();
        assert_eq!(all.len(), 2, "{name}: {all:?}");
        assert!(
            !all.iter().any(|b| b.contains("before-")),
            "{name}: {all:?}"
        );
        app.stop().await;
    }
}

/// One route, two rules: approvals go to a group robot (rendered, naming the approver by the
/// user bindings) and, unchanged, to a webhook.
fn both_config(engine: &Engine, robot: &str, hook: &str, extra: &str) -> String {
    toml_with(&format!(
        "{}\n{extra}\n{MAIN_APP}\n\
         [apps.dingtalk.main.subjects]\n\
         bpms_instance_change = [\"/processCode\", \"/type\"]\n\n\
         [targets.group]\nkind = \"dingtalk_robot\"\nurl = \"{robot}\"\n\n\
         [targets.hr]\nkind = \"webhook\"\nurl = \"{hook}\"\nsecret = \"{SECRET}\"\n\n\
         [users.lisi]\nname = \"李四\"\ndingtalk = \"manager75\"\n\n\
         [routes.approvals]\n\
         from = [\"dingtalk.bpms_instance_change.*.finish\"]\n\n\
         [[routes.approvals.rules]]\n\
         targets = [\"group\"]\n\
         match = {{ result = [\"agree\"] }}\n\
         template = \"approval\"\n\n\
         [[routes.approvals.rules]]\n\
         targets = [\"hr\"]\n\n\
         [templates.approval]\n\
         text = \"{{{{ title }}}} approved by {{{{ person(staffId, 'dingtalk') }}}}\"\n",
        engine.toml()
    ))
}

/// One signed, encrypted approval callback reaches, on every engine: the bus on its business
/// subject, byte for byte; a webhook receiver, as a signed CloudEvent carrying the event; and
/// a group robot, rendered from the event.
#[tokio::test]
async fn one_approval_reaches_the_bus_a_webhook_and_a_robot() {
    for engine in Engine::all() {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let robot = robots.add(Robot::dingtalk(&format!("both-{name}")));
        let receiver = Receiver::start(vec![]).await;
        let app = TestApp::start(&both_config(&engine, &robot, &receiver.url, "")).await;
        app.wait_ready().await;
        let subject = "dingtalk.bpms_instance_change.PROC-EXAMPLE.finish";
        let mut watch = engine.watch(&app, subject);

        let event = approval_event(&format!("both-{name}"));
        post(&app, &event).await;

        let stored = &watch.next(&engine, 1).await[0];
        assert_eq!(stored.payload, event.as_bytes(), "{name}");
        let ce_type = stored.header(&engine.ce("type"));
        assert_eq!(ce_type, Some("dingtalk.bpms_instance_change"), "{name}");
        let event_id = stored.header(&engine.ce("id")).unwrap().to_owned();

        let got = &receiver.wait_for(1).await[0];
        got.verify(SECRET);
        assert_eq!(got.header("ce-specversion"), Some("1.0"), "{name}");
        // The event's own type and source, as a bus subscriber sees them.
        let ty = got.header("ce-type");
        assert_eq!(ty, Some("dingtalk.bpms_instance_change"), "{name}");
        assert_eq!(got.header("ce-source"), Some("dingtalk/main"), "{name}");
        let hook_id = format!("{event_id}.approvals.hr");
        assert_eq!(got.header("ce-id"), Some(hook_id.as_str()), "{name}");
        let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        let sent: serde_json::Value = serde_json::from_str(&event).unwrap();
        assert_eq!(body, sent, "{name}: the webhook gets the event itself");

        let token = format!("both-{name}");
        let text = robots.wait_accepted(&token, 1, WAIT).await[0]
            .body
            .to_string();
        assert!(
            text.contains("张三提交的请假 approved by 李四"),
            "{name}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(receiver.got().len(), 1, "{name}");
        assert_eq!(robots.accepted(&token).len(), 1, "{name}");
        app.stop().await;
    }
}

/// The daemon is SIGKILLed with approvals in the route's and the webhook's hands, then
/// started again on the same broker: every event reaches the webhook; counted by `ce-id`, as
/// a receiver that deduplicates would, each exactly once. The copies a receiver that does not
/// deduplicate would see again are printed (at least once allows them).
#[tokio::test]
async fn a_daemon_killed_with_events_in_hand_delivers_each_after_restart() {
    const EVENTS: usize = 30;
    for engine in Engine::durable() {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let robot = robots.add(Robot::dingtalk(&format!("killed-{name}")));
        // 50 ms per request, one at a time: the kill finds most copies still queued.
        let receiver = Receiver::slow(vec![], Duration::from_millis(50)).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("imbridge.toml");
        // The robot's limit would make this slow; only the webhook is counted here.
        let config = both_config(&engine, &robot, &receiver.url, "[log]\nformat = \"json\"\n")
            .replace(
                "match = { result = [\"agree\"] }",
                "match = { result = [\"none\"] }",
            );
        std::fs::write(&path, config).unwrap();
        let mut daemon = Daemon::start(&path, &[]);
        daemon.wait_ready().await;
        let http = reqwest::Client::new();
        let mut ids = HashSet::new();
        for i in 0..EVENTS {
            let event = approval_event(&format!("killed-{name}-{i}"));
            let res = DingTalk::main()
                .callback(&event)
                .post_to(&http, &daemon.public_url(), "main")
                .await;
            assert_eq!(res.status(), 200, "{name}");
            ids.insert(format!("killed-{name}-{i}"));
        }
        // Some delivered, the rest in the route's or the target's hands.
        receiver.wait_for(3).await;
        daemon.kill();
        let before = receiver.got().len();
        assert!(
            before < EVENTS,
            "{name}: all {before} delivered before the kill"
        );

        let daemon = Daemon::start(&path, &[]);
        daemon.wait_ready().await;
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        let by_id = loop {
            let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
            for got in receiver.got() {
                let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
                let instance = body["processInstanceId"].as_str().unwrap().to_owned();
                assert!(ids.contains(&instance), "{name}: {instance}");
                *by_id
                    .entry(got.header("ce-id").unwrap().to_owned())
                    .or_default() += 1;
            }
            if by_id.len() == EVENTS {
                break by_id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {} of {EVENTS} events delivered",
                by_id.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let duplicates: usize = by_id.values().map(|n| n - 1).sum();
        eprintln!(
            "{name}: {EVENTS} events, {before} delivered before SIGKILL, {duplicates} delivered \
             again after the restart (dropped by a receiver deduplicating by ce-id)"
        );
        drop(daemon);
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
