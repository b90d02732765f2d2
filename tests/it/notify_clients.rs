//! Nobody sends as the company's bots without a credential: `POST /notify` is served only on
//! the internal listener, to `[clients.<name>]` with a token, each limited to its targets and
//! to the body fields it is allowed; the public listener answers 404 for it.

use std::time::Duration;

use figment::providers::Format as _;

use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

/// A client allowed only the `ops-*` targets and nothing but plain messages.
const OPS_TOKEN: &str = "ops-client-token-abcdef0123";

async fn start(farm: &RobotFarm) -> TestApp {
    let ops = farm.add(Robot::wecom("ops"));
    let dev = farm.add(Robot::wecom("dev"));
    let app = TestApp::start(&toml_with(&format!(
        "[clients.ops]\ntoken = \"{OPS_TOKEN}\"\ntargets = [\"ops-*\"]\n\n\
         [targets.ops-wecom]\nkind = \"wecom_robot\"\nurl = \"{ops}\"\n\n\
         [targets.dev-wecom]\nkind = \"wecom_robot\"\nurl = \"{dev}\"\n"
    )))
    .await;
    app.wait_ready().await;
    app
}

fn requests(app: &TestApp, target: &str, outcome: &str) -> u64 {
    app.metrics
        .notify_requests_total
        .with_label_values(&[target, outcome])
        .get()
}

#[tokio::test]
async fn the_public_listener_does_not_serve_notify() {
    let farm = RobotFarm::start().await;
    let app = start(&farm).await;
    let url = app.public_url("/notify/ops-wecom");
    let (status, _) = post_json(&app.http, url, serde_json::json!({"text": "x"})).await;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(farm.accepted("ops").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_and_nothing_is_sent() {
    let farm = RobotFarm::start().await;
    let app = start(&farm).await;
    let anonymous = reqwest::Client::new();
    let res = anonymous
        .post(app.url("/notify/ops-wecom"))
        .json(&serde_json::json!({"text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "token_missing");
    let wrong = client_with_token("not-the-token-0123456789");
    let (status, body) = post_json(
        &wrong,
        app.url("/notify/ops-wecom"),
        serde_json::json!({"text": "x"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("token_invalid"))
    );
    assert!(!body.to_string().contains("not-the-token"), "{body}");
    assert_eq!(requests(&app, "ops-wecom", "token_missing"), 1);
    assert_eq!(requests(&app, "ops-wecom", "token_invalid"), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(farm.accepted("ops").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_client_uses_only_its_targets_and_fields() {
    let farm = RobotFarm::start().await;
    let app = start(&farm).await;
    let ops = client_with_token(OPS_TOKEN);
    let url = |t: &str| app.url(&format!("/notify/{t}"));
    let plain = serde_json::json!({"text": "deploy done"});
    // Not its target, configured or not: the same 403, so it learns nothing about names.
    for other in ["dev-wecom", "nosuch"] {
        let (status, body) = post_json(&ops, url(other), plain.clone()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("target_forbidden"))
        );
    }
    let refused = [
        (
            serde_json::json!({"text": "x", "to": {"user_ids": ["boss"]}}),
            "recipients_forbidden",
        ),
        (
            serde_json::json!({"text": "x", "mentions": {"user_ids": ["u1"]}}),
            "recipients_forbidden",
        ),
        (
            serde_json::json!({"text": "x", "mentions": {"mobiles": ["13800000000"]}}),
            "recipients_forbidden",
        ),
        (
            serde_json::json!({"raw": {"msgtype": "text", "text": {"content": "x"}}}),
            "raw_forbidden",
        ),
    ];
    for (body, code) in refused {
        let (status, answer) = post_json(&ops, url("ops-wecom"), body).await;
        assert_eq!((status, answer["code"].as_str()), (403, Some(code)));
    }
    let (status, _) = post_json(&ops, url("ops-wecom"), plain.clone()).await;
    assert_eq!(status, 202);
    farm.wait_accepted("ops", 1, WAIT).await;
    // The client allowed everything may name recipients and send raw bodies.
    let raw = serde_json::json!({"raw": {"msgtype": "text", "text": {"content": "raw"}}});
    let (status, _) = post_json(&app.http, url("dev-wecom"), raw).await;
    assert_eq!(status, 202);
    farm.wait_accepted("dev", 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(farm.accepted("ops").len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_sender_may_pass_its_token_in_the_query() {
    let farm = RobotFarm::start().await;
    let app = start(&farm).await;
    let res = reqwest::Client::new()
        .post(app.url(&format!("/notify/ops-wecom?token={OPS_TOKEN}")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("objectType=bug&objectID=1&action=opened&actor=zhangsan&text=a+bug")
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body = res.text().await.unwrap();
    assert!(!body.contains(OPS_TOKEN), "the token is not echoed: {body}");
    farm.wait_accepted("ops", 1, WAIT).await;
    app.stop().await;
}

#[tokio::test]
async fn an_internal_listener_needs_a_client_unless_anonymous_is_explicit() {
    let problems = |toml: &str| -> Vec<String> {
        match imbridge::config::from_figment(figment::Figment::from(
            figment::providers::Toml::string(toml),
        )) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.key.clone()).collect(),
        }
    };
    let open = "[server]\ninternal_listen = \"127.0.0.1:0\"\n";
    assert_eq!(problems(open), ["server.internal_listen"]);
    assert!(problems(&format!("{open}allow_anonymous = true\n")).is_empty());
    let short = "[clients.x]\ntoken = \"short\"\ntargets = [\"*\"]\n";
    assert_eq!(problems(&format!("{short}{open}")), ["clients.x.token"]);
    let placeholder = "[clients.x]\ntoken = \"replace-with-a-random-secret\"\ntargets = [\"*\"]\n";
    assert_eq!(
        problems(&format!("{placeholder}{open}")),
        ["clients.x.token"]
    );
    let typo = "[clients.x]\ntoken = \"0123456789abcdef0\"\ntargets = [\"opz\"]\n";
    assert_eq!(problems(&format!("{typo}{open}")), ["clients.x.targets"]);
}

#[tokio::test]
async fn anonymous_requests_work_only_where_allowed_explicitly() {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::wecom("open"));
    let app = TestApp::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         internal_listen = \"127.0.0.1:0\"\nallow_anonymous = true\n\n\
         [targets.open]\nkind = \"wecom_robot\"\nurl = \"{url}\"\n"
    ))
    .await;
    app.wait_ready().await;
    let (status, _) = post_json(
        &reqwest::Client::new(),
        app.url("/notify/open"),
        serde_json::json!({"text": "x"}),
    )
    .await;
    assert_eq!(status, 202);
    farm.wait_accepted("open", 1, WAIT).await;
    // A wrong token is still refused.
    let wrong = client_with_token("wrong-token-0123456789");
    let (status, _) = post_json(
        &wrong,
        app.url("/notify/open"),
        serde_json::json!({"text": "y"}),
    )
    .await;
    assert_eq!(status, 401);
    app.stop().await;
}

/// Sends a request's head and the start of its body, and returns the answer as it arrives
/// while the rest of the body never comes.
async fn trickled_body(addr: std::net::SocketAddr, authorization: &str) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /notify/ops-wecom HTTP/1.1\r\nHost: i\r\n{authorization}\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"text\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut answer))
        .await
        .expect("no answer")
        .unwrap();
    (
        String::from_utf8_lossy(&answer[..n]).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_stranger_is_refused_before_its_body_is_read() {
    let farm = RobotFarm::start().await;
    let app = start(&farm).await;
    let internal = app.internal.unwrap();
    // No token: refused at once, without waiting for a body that never finishes.
    let (answer, took) = trickled_body(internal, "").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        took < Duration::from_secs(2),
        "the refusal waited {took:?} for the body"
    );
    let (answer, took) =
        trickled_body(internal, "Authorization: Bearer wrong-token-0123456789\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        took < Duration::from_secs(2),
        "the refusal waited {took:?} for the body"
    );
    // A known client's body is read, and waited for up to server.body_timeout (10 s here).
    let auth = format!("Authorization: Bearer {OPS_TOKEN}\r\n");
    let (answer, took) = trickled_body(internal, &auth).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took >= Duration::from_secs(9), "{took:?}");
    app.stop().await;
}
