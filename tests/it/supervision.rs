//! Supervised tasks, through the fault-injection points of the `failpoints` feature (which
//! `./test` turns on): a target's worker that panics is restarted, counted and, while it keeps
//! dying, named by `/readyz`; the message it held is handed back to the bus and delivered once
//! the fault is gone. The other targets never notice.

use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

const SECRET: &str = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The target whose worker the fault kills; only this test uses the name.
const VICTIM: &str = "failpoint-victim";

/// Waits until `/readyz` answers `status`, returning its body.
async fn readyz(app: &TestApp, status: u16) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = app.get_admin("/readyz").await;
        if res.status() == status {
            return res.json().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_panicking_worker_is_restarted_and_its_message_delivered_once() {
    for engine in Engine::all() {
        let farm = RobotFarm::start().await;
        let victim = farm.add(Robot::dingtalk("victim").with_secret(SECRET));
        let other = farm.add(Robot::dingtalk("other").with_secret(SECRET));
        let toml = format!(
            "{}\n[notify]\nack_wait = \"2s\"\n\n\
             [targets.{VICTIM}]\nkind = \"dingtalk_robot\"\nurl = \"{victim}\"\nsecret = \"{SECRET}\"\n\n\
             [targets.other]\nkind = \"dingtalk_robot\"\nurl = \"{other}\"\nsecret = \"{SECRET}\"\n",
            engine.toml()
        );
        let app = TestApp::start(&toml_with(&toml)).await;
        app.wait_ready().await;
        fail::cfg("notify-worker", &format!("return({VICTIM})")).unwrap();
        let post = |target: &'static str, text: &'static str| {
            app.http
                .post(app.url(&format!("/notify/{target}")))
                .json(&serde_json::json!({ "text": text, "format": "text" }))
                .timeout(WAIT)
                .send()
        };
        assert_eq!(post(VICTIM, "held").await.unwrap().status(), 202);
        // It keeps dying on the message it is handed again and again: readyz names it.
        let body = readyz(&app, 503).await;
        let task = format!("notify_worker:{VICTIM}");
        assert_eq!(
            body["failing"],
            serde_json::json!([task]),
            "{}",
            engine.name()
        );
        let restarts = app
            .metrics
            .task_restarts_total
            .with_label_values(&[&task])
            .get();
        assert!(restarts >= 3, "{}: {restarts} restarts", engine.name());
        // Another target is not held up meanwhile.
        assert_eq!(post("other", "unaffected").await.unwrap().status(), 202);
        farm.wait_accepted("other", 1, WAIT).await;
        assert!(farm.accepted("victim").is_empty());
        // The fault is gone: the message it held arrives, once.
        fail::remove("notify-worker");
        farm.wait_accepted("victim", 1, WAIT).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(farm.accepted("victim").len(), 1, "{}", engine.name());
        app.stop().await;
    }
}
