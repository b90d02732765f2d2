//! Recipients are chosen only through the guard: a raw body naming people, a send to everyone
//! on a target that does not allow broadcasts, and a message to more than
//! `notify.max_recipients` people are refused, over HTTP (422 naming the field, counted,
//! nothing published) and on the bus (dead-lettered with the reason, never sent).

use std::time::Duration;

use serde_json::json;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

/// `quiet` takes no broadcast; `loud` does. At most three people per message.
async fn start(engine: &Engine, farm: &RobotFarm) -> TestApp {
    let quiet = farm.add(Robot::wecom(&format!("quiet-{}", engine.name())));
    let loud = farm.add(Robot::wecom(&format!("loud-{}", engine.name())));
    let app = TestApp::start(&toml_with(&format!(
        "{}\n[notify]\nmax_recipients = 3\nretry_initial = \"50ms\"\n\n\
         [targets.quiet]\nkind = \"wecom_robot\"\nurl = \"{quiet}\"\n\n\
         [targets.loud]\nkind = \"wecom_robot\"\nurl = \"{loud}\"\nallow_broadcast = true\n",
        engine.toml()
    )))
    .await;
    app.wait_ready().await;
    app
}

/// Bodies each refused on `quiet`, with the code and the field its refusal names.
fn refused() -> Vec<(serde_json::Value, &'static str, &'static str)> {
    vec![
        (
            json!({"raw": {"msgtype": "text", "text": {"content": "x", "mentioned_list": ["lisi"]}}}),
            "embedded_recipients",
            "raw.text.mentioned_list",
        ),
        (
            json!({"raw": {"msgtype": "text", "text": {"content": "x"}, "touser": "lisi"}}),
            "embedded_recipients",
            "raw.touser",
        ),
        (
            json!({"raw": {"msgtype": "text", "text": {"content": "x"}, "toparty": "1|2"}}),
            "broadcast_forbidden",
            "raw.toparty",
        ),
        (
            json!({"text": "everyone!", "mentions": {"all": true}}),
            "broadcast_forbidden",
            "mentions.all",
        ),
        (
            json!({"text": "hi <@lisi>"}),
            "embedded_recipients",
            "text (<@…> markup)",
        ),
        (
            json!({"text": "x", "mentions": {"user_ids": ["a", "b"], "mobiles": ["1", "2"]}}),
            "too_many_recipients",
            "notify.max_recipients (3)",
        ),
    ]
}

#[tokio::test]
async fn raw_recipients_broadcasts_and_crowds_are_refused_with_422() {
    let engine = Engine::Memory;
    let farm = RobotFarm::start().await;
    let app = start(&engine, &farm).await;
    for (body, code, field) in refused() {
        for wait in ["", "?wait=true"] {
            let url = app.url(&format!("/notify/quiet{wait}"));
            let (status, answer) = post_json(&app.http, url, body.clone()).await;
            assert_eq!(status, 422, "{body} {wait}: {answer}");
            assert_eq!(answer["code"], code, "{body}: {answer}");
            let message = answer["message"].as_str().unwrap();
            assert!(message.contains(field), "{field} not named: {message}");
        }
        let counted = app
            .metrics
            .notify_requests_total
            .with_label_values(&["quiet", code])
            .get();
        assert!(counted >= 2, "{code} counted {counted} times");
    }
    // The same broadcasts go where they are allowed.
    let loud = format!("loud-{}", engine.name());
    for body in [
        json!({"text": "everyone!", "mentions": {"all": true}}),
        json!({"raw": {"msgtype": "text", "text": {"content": "y", "mentioned_list": ["@all"]}}}),
    ] {
        let (status, answer) = post_json(&app.http, app.url("/notify/loud"), body).await;
        assert_eq!(status, 202, "{answer}");
    }
    let got = farm.wait_accepted(&loud, 2, WAIT).await;
    assert!(got
        .iter()
        .all(|r| r.body["text"]["mentioned_list"] == json!(["@all"])));
    // Nothing refused was published: the next message on `quiet` is the first it sends.
    let quiet = format!("quiet-{}", engine.name());
    let (status, _) = post_json(&app.http, app.url("/notify/quiet"), json!({"text": "ok"})).await;
    assert_eq!(status, 202);
    farm.wait_accepted(&quiet, 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(farm.requests(&quiet), 1);
    app.stop().await;
}

#[tokio::test]
async fn bus_notifications_naming_recipients_are_dead_lettered_never_sent() {
    for engine in [Engine::Memory, Engine::nats()] {
        let name = engine.name();
        let farm = RobotFarm::start().await;
        let app = start(&engine, &farm).await;
        let mut letters = engine.watch(&app, "dlq.notify.quiet");
        let cases = refused();
        for (body, _, _) in &cases {
            let payload = serde_json::to_vec(body).unwrap();
            engine.publish(Some(&app), "notify.quiet", &payload).await;
        }
        let got = letters.next(&engine, cases.len()).await;
        for (body, code, field) in &cases {
            let payload = serde_json::to_vec(body).unwrap();
            let letter = got
                .iter()
                .find(|l| l.payload == payload)
                .unwrap_or_else(|| panic!("{name}: {body} not dead-lettered"));
            assert_eq!(letter.header("imbridge-dlq-reason"), Some(*code), "{name}");
            assert_eq!(letter.header("imbridge-dlq-attempts"), Some("0"), "{name}");
            let answer = letter.header("imbridge-dlq-answer").unwrap();
            assert!(
                answer.contains(field),
                "{name}: {field} not named: {answer}"
            );
        }
        assert_eq!(farm.requests(&format!("quiet-{name}")), 0, "{name}: sent");
        app.stop().await;
    }
}
