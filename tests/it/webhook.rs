//! The `webhook` target kind end to end: notifications posted to `/notify/<target>` reach a
//! local receiver that checks the CloudEvents headers and recomputes the signature, answers
//! from a script, and records when each request came.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::time::{Duration, Instant};

use figment::Jail;
use imbridge::platform::Endpoint;

use crate::common::engine::Engine;
use crate::common::receiver::Receiver;
use crate::common::*;

const SECRET: &str = "whsec-0123456789";

const NOTIFY: &str = r#"
[notify]
retry_initial = "50ms"
retry_max = "200ms"
max_attempts = 4
request_timeout = "2s"
rate_limit_margin = "50ms"
"#;

async fn start(receiver: &Receiver, extra: &str) -> TestApp {
    let app = TestApp::start(&toml_with(&format!(
        "{NOTIFY}\n[targets.hook]\nkind = \"webhook\"\nurl = \"{}\"\n{extra}\n",
        receiver.url
    )))
    .await;
    app.wait_ready().await;
    app
}

async fn notify(app: &TestApp, body: serde_json::Value) {
    let res = app
        .http
        .post(app.url("/notify/hook"))
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
}

fn sent(app: &TestApp) -> u64 {
    app.metrics
        .notify_sent_total
        .with_label_values(&["hook"])
        .get()
}

#[tokio::test]
async fn webhook_sends_signed_cloudevents_with_its_headers() {
    let receiver = Receiver::start(vec![]).await;
    let extra =
        format!("secret = \"{SECRET}\"\nheaders = {{ authorization = \"Bearer R3CEIVER\" }}");
    let app = start(&receiver, &extra).await;
    notify(&app, serde_json::json!({"title": "Deploy", "text": "done"})).await;
    let got = &receiver.wait_for(1).await[0];

    assert_eq!(got.header("ce-specversion"), Some("1.0"));
    assert_eq!(got.header("ce-type"), Some("imbridge.notification"));
    assert_eq!(got.header("ce-source"), Some("/imbridge/targets/hook"));
    assert!(!got.header("ce-id").unwrap_or_default().is_empty());
    assert!(got.header("ce-time").unwrap().ends_with('Z'));
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("authorization"), Some("Bearer R3CEIVER"));
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["title"], "Deploy");
    assert_eq!(body["text"], "done");

    // The receiver's side: recompute the HMAC over "t.body" and compare.
    let t = got.verify(SECRET);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t) < 60);
    app.stop().await;
}

#[tokio::test]
async fn webhook_retries_503_and_delivers_once() {
    let busy = (503, None, "busy".to_owned());
    let receiver = Receiver::start(vec![busy.clone(), busy]).await;
    let app = start(&receiver, "").await;
    notify(&app, serde_json::json!({"text": "once"})).await;
    let got = receiver.wait_for(3).await;
    let deadline = Instant::now() + WAIT;
    while sent(&app) < 1 {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing more comes: delivered exactly once, after three attempts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.got().len(), 3);
    assert_eq!(sent(&app), 1);
    // One event, one id: a receiver can tell a retry from a new event.
    let ids: Vec<_> = got.iter().map(|g| g.header("ce-id").unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    app.stop().await;
}

#[tokio::test]
async fn webhook_success_with_an_oversized_answer_is_delivered() {
    // Over the 64 KiB read cap: the body is not read, the status decides.
    let receiver = Receiver::start(vec![(200, None, "x".repeat(100_000))]).await;
    let app = start(&receiver, "").await;
    notify(&app, serde_json::json!({"text": "big answer"})).await;
    receiver.wait_for(1).await;
    let deadline = Instant::now() + WAIT;
    while sent(&app) < 1 {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn webhook_client_error_is_dead_lettered_with_status_and_redacted_excerpt() {
    let answer = format!(
        "invalid event; see https://x.test/?access_token=S3CRET {}",
        "x".repeat(10_000)
    );
    let receiver = Receiver::start(vec![(400, None, answer)]).await;
    let app = start(&receiver, "").await;
    let engine = Engine::Memory;
    let mut dlq = engine.watch(&app, "dlq.notify.hook");
    notify(&app, serde_json::json!({"text": "refused"})).await;
    let letter = &dlq.next(&engine, 1).await[0];
    assert_eq!(letter.header("imbridge-dlq-reason"), Some("permanent"));
    assert_eq!(letter.header("imbridge-dlq-status"), Some("400"));
    assert_eq!(letter.header("imbridge-dlq-attempts"), Some("1"));
    let excerpt = letter.header("imbridge-dlq-answer").unwrap();
    assert!(excerpt.starts_with("HTTP 400: invalid event"), "{excerpt}");
    assert!(!excerpt.contains("S3CRET"), "{excerpt}");
    assert!(excerpt.len() < 600, "{} bytes", excerpt.len());
    assert_eq!(letter.payload, br#"{"text":"refused"}"#);
    assert_eq!(receiver.got().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn webhook_concurrency_keeps_that_many_requests_in_flight() {
    let receiver = Receiver::slow(vec![], Duration::from_millis(200)).await;
    let app = start(&receiver, "concurrency = 8").await;
    let started = Instant::now();
    for i in 0..80 {
        notify(&app, serde_json::json!({ "text": format!("event {i}") })).await;
    }
    let deadline = Instant::now() + WAIT;
    while sent(&app) < 80 {
        assert!(Instant::now() < deadline, "only {} delivered", sent(&app));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let (done, max_in_flight) = {
        let st = receiver.state.lock().unwrap();
        (st.done, st.max_in_flight)
    };
    assert_eq!((done, max_in_flight), (80, 8));
    // 80 events, 8 at a time, 200 ms each: ten rounds.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(4000),
        "{took:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn webhook_honours_retry_after() {
    // Without Retry-After a 429 would pause the target for pause_on_rate_limit (1 minute).
    let receiver = Receiver::start(vec![(429, Some(1), String::new())]).await;
    let app = start(&receiver, "").await;
    notify(&app, serde_json::json!({"text": "later"})).await;
    let got = receiver.wait_for(2).await;
    let waited = got[1].at - got[0].at;
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    app.stop().await;
}

#[test]
fn webhook_config_errors_name_their_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "hooks.toml",
            r#"
            [targets.nourl]
            kind = "webhook"
            [targets.plain]
            kind = "webhook"
            url = "http://receiver.test/hook?token=PLAIN-TOKEN"
            [targets.codes]
            kind = "webhook"
            url = "https://receiver.test/"
            success = [200, 302]
            method = "GET"
            timeout = "soon"
            headers = { "ce-id" = "x" }
            concurrency = 0
            [targets.bot]
            kind = "webhook"
            url = "https://receiver.test/"
            mention = ["assignedTo"]
            "#,
        )?;
        let err = imbridge::config::load(Some(Path::new("hooks.toml"))).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "targets.nourl.url",
            "targets.plain.url",
            "targets.codes.success",
            "targets.codes.method",
            "targets.codes.timeout",
            "targets.codes.headers.ce-id",
            "targets.codes.concurrency",
            "targets.bot.mention",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        assert!(!err.to_string().contains("PLAIN-TOKEN"), "{err}");

        jail.create_file(
            "ok.toml",
            r#"
            [targets.plain]
            kind = "webhook"
            url = "http://receiver.test/hook"
            allow_insecure_http = true
            "#,
        )?;
        // A header's value, like any secret, may come from the environment.
        jail.set_env(
            "IMBRIDGE_TARGETS__PLAIN__HEADERS__AUTHORIZATION",
            "Bearer FROM-ENV",
        );
        let s = imbridge::config::load(Some(Path::new("ok.toml"))).expect("valid");
        let Endpoint::Webhook(hook) = &s.targets["plain"].endpoint else {
            panic!("not a webhook endpoint");
        };
        let headers: Vec<_> = hook
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(headers, [("authorization", "Bearer FROM-ENV")]);
        Ok(())
    });
}
