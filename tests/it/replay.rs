//! Replay protection at the callback listener: an exact repeat of a published callback is
//! answered as the platform expects for a success and not published again, on every platform,
//! whatever the bus's duplicate window; a callback refused with 503 is not remembered; Lark's
//! signed timestamp is held to the replay window; the memory of published callbacks is bounded.
//! The configuration side (unsigned Lark apps, the window against the duplicate window) is at
//! the end.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use crate::common::*;
use async_nats::jetstream;
use figment::Jail;
use imbridge::config;
use imbridge::platform::lark::callback as lark;
use imbridge::platform::msgcrypt::MsgCrypt;

/// The three platforms' apps; the Lark app `plain` has no encrypt key.
fn apps() -> String {
    format!(
        r#"{MAIN_APP}
        [apps.wecom.main]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        [apps.lark.main]
        verification_token = "{LARK_TOKEN}"
        encrypt_key = "{LARK_KEY}"
        [apps.lark.plain]
        verification_token = "{LARK_TOKEN}"
        allow_unsigned = true
        "#
    )
}

/// A daemon on the in-process bus with its duplicate window off, so that only the replay
/// check can keep a repeat from being published. `server` goes into `[server]`.
async fn memory_app(server: &str) -> TestApp {
    let toml = format!(
        "{server}\n[bus.memory]\nduplicate_window = \"0\"\n{}",
        apps()
    );
    TestApp::start(&toml_with(&toml)).await
}

/// A signed WeCom push, ready to be sent (again).
fn wecom_push(xml: &str) -> (Vec<(String, String)>, String) {
    let crypt = MsgCrypt::new(WECOM_TOKEN, WECOM_KEY, WECOM_CORP).unwrap();
    let encrypt = crypt.encrypt_fresh(xml.as_bytes());
    let ts = (imbridge::platform::now_ms() / 1000).to_string();
    let nonce = "1372623149";
    let query = vec![
        (
            "msg_signature".into(),
            crypt.signature(&ts, nonce, &encrypt),
        ),
        ("timestamp".into(), ts),
        ("nonce".into(), nonce.into()),
    ];
    let body = format!("<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>");
    (query, body)
}

/// A Lark request: headers and body. Encrypted and signed at `ts` (seconds) with `key`, or
/// plain without one.
struct LarkRequest {
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl LarkRequest {
    fn signed(plaintext: &str, ts: u64) -> Self {
        let encrypt = lark::encrypt_with_iv(LARK_KEY, rand::random(), plaintext.as_bytes());
        let body = serde_json::json!({ "encrypt": encrypt }).to_string();
        let ts = ts.to_string();
        let nonce = "13341";
        let signature = lark::signature(&ts, nonce, LARK_KEY, body.as_bytes());
        LarkRequest {
            headers: vec![
                (lark::TIMESTAMP_HEADER, ts),
                (lark::NONCE_HEADER, nonce.into()),
                (lark::SIGNATURE_HEADER, signature),
            ],
            body,
        }
    }

    async fn post(&self, app: &TestApp, name: &str) -> reqwest::Response {
        let mut req = app
            .http
            .post(app.url(&format!("/callbacks/lark/{name}")))
            .header("content-type", "application/json")
            .body(self.body.clone())
            .timeout(WAIT);
        for (name, value) in &self.headers {
            req = req.header(*name, value);
        }
        req.send().await.unwrap()
    }
}

fn now_s() -> u64 {
    imbridge::platform::now_ms() / 1000
}

fn lark_event(event_id: &str) -> String {
    format!(
        r#"{{"schema":"2.0","header":{{"event_id":"{event_id}","token":"{LARK_TOKEN}","event_type":"im.message.receive_v1","tenant_key":"t1"}},"event":{{}}}}"#
    )
}

async fn post_wecom(app: &TestApp, push: &(Vec<(String, String)>, String)) -> reqwest::Response {
    app.http
        .post(app.url("/callbacks/wecom/main"))
        .query(&push.0)
        .body(push.1.clone())
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
}

/// Everything published so far on the in-process bus.
async fn published(sub: &mut imbridge::bus::memory::Subscription) -> usize {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut n = 0;
    while sub.try_next().is_some() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn replayed_callbacks_are_answered_as_success_and_published_once() {
    let app = memory_app("").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");

    // DingTalk: the encrypted "success" again, also for an upper-cased copy of the signature
    // (the platforms compare hex case-insensitively).
    let dt = DingTalk::main();
    let cb = dt.callback(&approval_event("replayed"));
    for _ in 0..2 {
        let res = cb.post(&app, "main").await;
        assert_eq!(res.status(), 200);
        dt.check_reply(&res.json().await.unwrap());
    }
    let mut upper = cb.clone();
    let signature = cb.query[0].1.to_uppercase();
    upper.set("msg_signature", &signature);
    assert_eq!(upper.post(&app, "main").await.status(), 200);
    assert_eq!(app.platform_callbacks("dingtalk", "main", "published"), 1);
    assert_eq!(app.platform_callbacks("dingtalk", "main", "replay"), 2);

    // WeCom: an empty 200 again.
    let push = wecom_push("<xml><MsgType>event</MsgType><Event>change_contact</Event></xml>");
    for _ in 0..2 {
        let res = post_wecom(&app, &push).await;
        assert_eq!(res.status(), 200);
        assert!(res.bytes().await.unwrap().is_empty());
    }
    assert_eq!(app.platform_callbacks("wecom", "main", "published"), 1);
    assert_eq!(app.platform_callbacks("wecom", "main", "replay"), 1);

    // Lark, signed and (allowed) unsigned: 200 with the same body again.
    let signed = LarkRequest::signed(&lark_event("ev-signed"), now_s());
    let unsigned = LarkRequest {
        headers: Vec::new(),
        body: lark_event("ev-unsigned"),
    };
    for (name, request) in [("main", &signed), ("plain", &unsigned)] {
        for _ in 0..2 {
            let res = request.post(&app, name).await;
            assert_eq!(res.status(), 200, "{name}");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body, serde_json::json!({"msg": "success"}));
        }
        assert_eq!(
            app.platform_callbacks("lark", name, "published"),
            1,
            "{name}"
        );
        assert_eq!(app.platform_callbacks("lark", name, "replay"), 1, "{name}");
    }

    assert_eq!(published(&mut sub).await, 4, "one event per platform app");
    // A fresh signature on the same event is the platform's retry, not a replay: the bus's
    // duplicate window (off here) is what decides about it.
    assert_eq!(
        dt.callback(&approval_event("replayed"))
            .post(&app, "main")
            .await
            .status(),
        200
    );
    assert_eq!(published(&mut sub).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_identical_callbacks_are_published_once() {
    let app = memory_app("").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");
    let cb = DingTalk::main().callback(&approval_event("concurrent"));
    let answers =
        futures::future::join_all((0..16).map(|_| async { cb.post(&app, "main").await })).await;
    for res in answers {
        match res.status().as_u16() {
            200 => {}
            409 => {
                let body: serde_json::Value = res.json().await.unwrap();
                assert_eq!(body["code"], "replay_in_flight");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(published(&mut sub).await, 1);
    assert_eq!(app.platform_callbacks("dingtalk", "main", "published"), 1);
    app.stop().await;
}

#[tokio::test]
async fn replay_protection_off_publishes_every_repeat() {
    // The control for the tests above: with the window at 0 nothing is remembered.
    let app = memory_app("replay_window = \"0\"").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");
    let cb = DingTalk::main().callback(&approval_event("unprotected"));
    for _ in 0..2 {
        assert_eq!(cb.post(&app, "main").await.status(), 200);
    }
    assert_eq!(published(&mut sub).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn lark_signed_timestamp_outside_the_window_is_refused() {
    let app = memory_app("").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");
    for (i, skew) in [-600i64, 600].into_iter().enumerate() {
        let ts = now_s().checked_add_signed(skew).unwrap();
        let res = LarkRequest::signed(&lark_event(&format!("stale-{i}")), ts)
            .post(&app, "main")
            .await;
        assert_eq!(res.status(), 400);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "stale_timestamp", "{body}");
    }
    // A correctly signed timestamp that is no number.
    let mut request = LarkRequest::signed(&lark_event("nan"), 0);
    let signature = lark::signature("soon", "13341", LARK_KEY, request.body.as_bytes());
    request.headers = vec![
        (lark::TIMESTAMP_HEADER, "soon".into()),
        (lark::NONCE_HEADER, "13341".into()),
        (lark::SIGNATURE_HEADER, signature),
    ];
    let res = request.post(&app, "main").await;
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "invalid_timestamp");
    assert_eq!(app.platform_callbacks("lark", "main", "stale_timestamp"), 2);
    assert_eq!(published(&mut sub).await, 0);
    // Inside the window it goes through.
    let res = LarkRequest::signed(&lark_event("fresh"), now_s() - 60)
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(published(&mut sub).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_memory_of_published_callbacks_is_bounded_and_evictions_counted() {
    // 1 callback a second for 2 seconds: room for two.
    let app = memory_app("replay_window = \"2s\"\nmax_callback_rate = 1").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");
    let dt = DingTalk::main();
    let mut callbacks = Vec::new();
    for i in 0..3 {
        // Signed a few milliseconds apart, so that the first one is the oldest.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cb = dt.callback(&approval_event(&format!("bounded-{i}")));
        assert_eq!(cb.post(&app, "main").await.status(), 200);
        callbacks.push(cb);
    }
    assert_eq!(app.metrics.replay_evictions_total.get(), 1);
    let metrics = app.get_admin("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("imbridge_replay_evictions_total 1"),
        "{metrics}"
    );
    // The two kept are replays; the evicted one, forgotten, is published again (here, with
    // the bus's duplicate window off; a real bus would drop it by its ce-id).
    for cb in &callbacks[1..] {
        assert_eq!(cb.post(&app, "main").await.status(), 200);
    }
    assert_eq!(app.platform_callbacks("dingtalk", "main", "replay"), 2);
    assert_eq!(published(&mut sub).await, 3);
    assert_eq!(callbacks[0].post(&app, "main").await.status(), 200);
    assert_eq!(published(&mut sub).await, 1);
    app.stop().await;
}

/// `[bus]` for a NATS server with a one-second duplicate window.
fn short_dedupe_nats(url: &str) -> String {
    format!(
        r#"
        [bus]
        kind = "nats"
        [bus.nats]
        url = "{url}"
        stream = "TEST_EVENTS"
        duplicate_window = "1s"
        publish_timeout = "1s"
        reconnect_max_delay = "250ms"
        [notify]
        enabled = false
        "#
    )
}

async fn stored(server: &NatsServer) -> u64 {
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream("TEST_EVENTS").await.expect("stream exists");
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn on_nats_a_replay_past_the_duplicate_window_is_not_stored_and_a_refused_one_is_retried() {
    let mut server = NatsServer::start();
    let app = TestApp::start(&toml_with(&format!(
        "{}\n{MAIN_APP}",
        short_dedupe_nats(&server.url())
    )))
    .await;
    app.wait_ready().await;
    let dt = DingTalk::main();
    let cb = dt.callback(&approval_event("nats-replay"));
    assert_eq!(cb.post(&app, "main").await.status(), 200);
    // Past JetStream's duplicate window, only the replay check stands in the way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let res = cb.post(&app, "main").await;
    assert_eq!(res.status(), 200);
    dt.check_reply(&res.json().await.unwrap());
    assert_eq!(app.callbacks("main", "replay"), 1);
    assert_eq!(stored(&server).await, 1);

    // Refused with 503 while the server is down: not remembered, so the platform's retry of
    // the very same request is stored once the server is back.
    let refused = dt.callback(&approval_event("nats-outage"));
    server.stop();
    let res = refused.post(&app, "main").await;
    assert_eq!(res.status(), 503);
    server.restart();
    app.wait_ready().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while refused.post(&app, "main").await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.callbacks("main", "published"), 2);
    assert_eq!(stored(&server).await, 2);
    // And from then on it is a replay.
    assert_eq!(refused.post(&app, "main").await.status(), 200);
    assert_eq!(app.callbacks("main", "replay"), 2);
    assert_eq!(stored(&server).await, 2);
    app.stop().await;
}

// ---- configuration ----

fn problem_keys(err: &config::ConfigError) -> Vec<&str> {
    err.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn lark_apps_without_an_encrypt_key_are_refused_unless_allow_unsigned() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "lark.toml",
            r#"
            [apps.lark.token_only]
            verification_token = "t"
            [apps.lark.empty_key]
            verification_token = "t"
            encrypt_key = ""
            [apps.lark.signed]
            verification_token = "t"
            encrypt_key = "k"
            "#,
        )?;
        let err = config::load(Some(std::path::Path::new("lark.toml"))).unwrap_err();
        assert_eq!(
            problem_keys(&err),
            [
                "apps.lark.empty_key.encrypt_key",
                "apps.lark.token_only.encrypt_key"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("allow_unsigned"), "{err}");

        jail.set_env("IMBRIDGE_APPS__LARK__TOKEN_ONLY__ALLOW_UNSIGNED", "true");
        jail.set_env("IMBRIDGE_APPS__LARK__EMPTY_KEY__ALLOW_UNSIGNED", "true");
        jail.set_env("IMBRIDGE_APPS__LARK__SIGNED__ALLOW_UNSIGNED", "true");
        let s = config::load(Some(std::path::Path::new("lark.toml"))).expect("allowed explicitly");
        assert!(!s.lark_apps["token_only"].is_signed());
        let warned: Vec<_> = s.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            warned,
            [
                "apps.lark.empty_key.allow_unsigned",
                "apps.lark.signed.allow_unsigned",
                "apps.lark.token_only.allow_unsigned"
            ]
        );
        Ok(())
    });
}

fn warnings_for(jail: &mut Jail, toml: &str) -> Vec<String> {
    jail.create_file("w.toml", toml).unwrap();
    let s = config::load(Some(std::path::Path::new("w.toml"))).expect("valid");
    s.warnings.iter().map(|w| w.to_string()).collect()
}

#[test]
fn a_replay_window_longer_than_the_bus_duplicate_window_is_warned_about() {
    Jail::expect_with(|jail| {
        // The defaults agree: 2 minutes each on the in-process bus.
        assert!(warnings_for(jail, "").is_empty());
        let warned = warnings_for(jail, "[server]\nreplay_window = \"5m\"");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0]
                .starts_with("server.replay_window: is longer than bus.memory.duplicate_window"),
            "{warned:?}"
        );
        // NATS keeps ten minutes by default.
        let nats = "[bus]\nkind = \"nats\"\n[server]\nreplay_window = \"5m\"";
        assert!(warnings_for(jail, nats).is_empty());
        let kafka = "[bus]\nkind = \"kafka\"\n[bus.kafka]\nduplicate_window = \"0\"";
        let warned = warnings_for(jail, kafka);
        assert!(
            warned[0].contains("bus.kafka.duplicate_window"),
            "{warned:?}"
        );
        let off = warnings_for(jail, "[server]\nreplay_window = \"0\"");
        assert!(off[0].contains("replayed at any time"), "{off:?}");
        Ok(())
    });
}

#[test]
fn the_replay_memory_is_sized_from_the_rate_under_a_ceiling() {
    Jail::expect_with(|jail| {
        jail.set_env("IMBRIDGE_SERVER__MAX_CALLBACK_RATE", "500");
        jail.set_env("IMBRIDGE_SERVER__REPLAY_WINDOW", "90s");
        let s = config::load(None).expect("valid");
        assert_eq!(s.server.replay_capacity, 45_000);

        jail.set_env("IMBRIDGE_SERVER__MAX_CALLBACK_RATE", "0");
        let err = config::load(None).unwrap_err();
        assert_eq!(problem_keys(&err), ["server.max_callback_rate"]);
        jail.set_env("IMBRIDGE_SERVER__MAX_CALLBACK_RATE", "100000");
        jail.set_env("IMBRIDGE_SERVER__REPLAY_WINDOW", "1h");
        let err = config::load(None).unwrap_err();
        assert!(err.to_string().contains("ceiling"), "{err}");
        Ok(())
    });
}

#[test]
fn check_config_prints_warnings_and_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("imbridge.toml");
    std::fs::write(&file, "[server]\nreplay_window = \"1h\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: server.replay_window: is longer than"),
        "{stderr}"
    );

    std::fs::write(&file, "[apps.lark.open]\nverification_token = \"t\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("apps.lark.open.encrypt_key"));
}
