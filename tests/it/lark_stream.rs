//! Lark / Feishu long connection (`mode = "websocket"`) against a fake gateway
//! ([`lark_gateway`]) that speaks STREAMS.md §B and checks every ping and answer: events reach
//! the same subjects with the same bodies and headers as HTTP callbacks on every engine, are
//! answered `{"code":200}` only once the bus has them, fragments are reassembled and bounded,
//! and the connection survives everything a gateway or a network does to it.
//!
//! Metric label values these tests rely on beyond the issue's text are the DingTalk Stream
//! ones, so that one dashboard reads both platforms: reconnect reasons `dropped`,
//! `ping_timeout`, `open_failed` (an endpoint call that failed and is retried); invalid frame
//! reason `oversize`; ACK status `success`; dropped fragment sets under reasons starting with
//! `fragments_` (`fragments_expired` for the deadline).

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use imbridge::platform::lark::ws::Frame;
use serde_json::{json, Value};

use crate::common::engine::{Engine, Stored};
use crate::common::lark_gateway::{
    event_v1, event_v2, fast_config, EndpointReply, Gateway, HandshakeRefusal, APP_ID, APP_SECRET,
    CODE_REFUSED,
};
use crate::common::*;

const PLATFORM: &str = "lark";
/// The websocket-mode app every test configures.
const APP: &str = "ws";

/// The websocket-mode app `ws` on `gw`.
fn ws_app(gw: &Gateway) -> String {
    format!(
        r#"
        [apps.lark.ws]
        mode = "websocket"
        app_id = "{APP_ID}"
        app_secret = "{APP_SECRET}"
        domain = "{}"
        allow_insecure_http = true
        "#,
        gw.domain()
    )
}

/// An http-mode app on the same daemon, to compare the two paths.
const HOOK_APP: &str = r#"
[apps.lark.hook]
verification_token = "lark-verification-token"
allow_unsigned = true
"#;

/// `[streams]` for tests. Pings and reconnect waits come from the gateway's ClientConfig
/// ([`fast_config`]); these bound the rest.
const FAST: &str = r#"
[streams]
reconnect_initial = "20ms"
reconnect_max = "200ms"
auth_retry = "1s"
connect_timeout = "2s"
max_frame_bytes = 8192
"#;

fn toml(gw: &Gateway, extra: &str) -> String {
    toml_with(&format!("{extra}\n{}", ws_app(gw)))
}

/// The daemon with `bus` (a `[bus]` section or nothing), FAST and the app on `gw`, ready.
async fn start(gw: &Gateway, bus: &str) -> TestApp {
    let app = TestApp::start(&toml(gw, &format!("{bus}\n{FAST}"))).await;
    app.wait_ready().await;
    app
}

/// A NATS bus whose publishes wait out a paused broker rather than time out.
fn patient(engine: &Engine) -> String {
    engine
        .toml()
        .replace("publish_timeout = \"2s\"", "publish_timeout = \"10s\"")
}

fn reconnects(app: &TestApp, reason: &str) -> u64 {
    app.metrics
        .stream_reconnects_total
        .with_label_values(&[PLATFORM, APP, reason])
        .get()
}

fn frames(app: &TestApp, kind: &str) -> u64 {
    app.metrics
        .stream_frames_total
        .with_label_values(&[PLATFORM, APP, kind])
        .get()
}

fn connected(app: &TestApp) -> i64 {
    app.metrics
        .stream_connected
        .with_label_values(&[PLATFORM, APP])
        .get()
}

/// Every series of `metric` for the Lark app, by the value of `label`, as `/metrics` shows
/// them: for the checks that must not depend on one label value's spelling.
async fn series(app: &TestApp, metric: &str, label: &str) -> BTreeMap<String, u64> {
    let text = app.get_admin("/metrics").await.text().await.unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let labels: BTreeMap<&str, &str> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.get("platform") != Some(&PLATFORM) || labels.get("app") != Some(&APP) {
            continue;
        }
        let value: f64 = value.trim().parse().unwrap_or_default();
        if let Some(l) = labels.get(label) {
            out.insert((*l).to_owned(), value as u64);
        }
    }
    out
}

async fn invalid_reasons(app: &TestApp) -> BTreeMap<String, u64> {
    series(app, "imbridge_stream_invalid_frames_total", "reason").await
}

async fn reconnect_reasons(app: &TestApp) -> BTreeMap<String, u64> {
    series(app, "imbridge_stream_reconnects_total", "reason").await
}

/// Fragment sets dropped (expired or evicted), whatever the reason is called past its prefix.
async fn fragment_drops(app: &TestApp) -> u64 {
    invalid_reasons(app)
        .await
        .iter()
        .filter(|(reason, _)| reason.starts_with("fragments_"))
        .map(|(_, n)| n)
        .sum()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/readyz`: status and body.
async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app.get_admin("/readyz").await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or_default())
}

/// Waits until `/readyz` says `key` (`refused`, `down`) of the streams is exactly `apps`.
async fn wait_readyz(app: &TestApp, key: &str, apps: Value) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = readyz(app).await;
        if body["streams"][key] == apps {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never had streams.{key} = {apps}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts a plaintext Lark callback to the http-mode app `hook`.
async fn post_hook(app: &TestApp, body: &str) -> reqwest::Response {
    app.http
        .post(app.url("/callbacks/lark/hook"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
}

/// The header names in which an event through the long connection may differ from the same
/// event through an HTTP callback: its id and the app it came through (and the time).
fn differs_by_app(name: &str) -> bool {
    let name = name.to_ascii_lowercase().replace('_', "-");
    matches!(
        name.as_str(),
        "ce-id" | "ce-source" | "ce-time" | "imbridge-app" | "nats-msg-id"
    )
}

fn find<'a>(messages: &'a [Stored], engine: &Engine, id: &str) -> &'a Stored {
    messages
        .iter()
        .find(|m| m.header(&engine.ce("id")) == Some(id))
        .unwrap_or_else(|| panic!("no message with ce-id {id} in {messages:?}"))
}

/// The event through the long connection is the event through HTTP, but for its app and id.
fn same_but_app(ws: &Stored, http: &Stored, engine: &Engine) {
    let name = engine.name();
    assert_eq!(ws.subject, http.subject, "{name}");
    assert_eq!(ws.header(&engine.ce("source")), Some("lark/ws"), "{name}");
    assert_eq!(
        http.header(&engine.ce("source")),
        Some("lark/hook"),
        "{name}"
    );
    assert_eq!(ws.header("imbridge-app"), Some("ws"), "{name}");
    let names = |m: &Stored| {
        let mut v: Vec<String> = m.headers.iter().map(|(k, _)| k.to_lowercase()).collect();
        v.sort();
        v
    };
    assert_eq!(names(ws), names(http), "{name}: the same headers");
    for (k, v) in &ws.headers {
        if !differs_by_app(k) {
            assert_eq!(http.header(k), Some(v.as_str()), "{name}: header {k}");
        }
    }
}

#[tokio::test]
async fn events_reach_the_bus_as_http_callbacks_do_on_every_engine_and_are_answered() {
    for engine in Engine::all() {
        let name = engine.name();
        let gw = Gateway::start().await;
        let app = start(&gw, &format!("{}\n{HOOK_APP}", engine.toml())).await;
        let conn = gw.next_conn().await;
        let mut v2 = engine.watch(&app, "lark.im.message.receive_v1");
        let mut v1 = engine.watch(&app, "lark.p2p_chat_create");

        let ws2 = event_v2(&format!("ev-ws-{name}"), "你好 long connection");
        let ws1 = event_v1(&format!("uuid-ws-{name}"));
        conn.send(&conn.event("m-v2", ws2.as_bytes()));
        conn.send(&conn.event("m-v1", ws1.as_bytes()));
        for id in ["m-v2", "m-v1"] {
            let answer = gw.answer(id).await;
            assert_eq!(
                (answer.conn, answer.code()),
                (conn.index, 200),
                "{name} {id}"
            );
        }

        // The same events (their own ids, so that the bus does not take them for repeats)
        // through an HTTP callback.
        let http2 = event_v2(&format!("ev-http-{name}"), "你好 long connection");
        let http1 = event_v1(&format!("uuid-http-{name}"));
        for body in [&http2, &http1] {
            assert_eq!(post_hook(&app, body).await.status(), 200, "{name}");
        }

        let got = v2.next(&engine, 2).await;
        let ws = find(&got, &engine, &format!("ev-ws-{name}"));
        let http = find(&got, &engine, &format!("ev-http-{name}"));
        assert_eq!(ws.payload, ws2.as_bytes(), "{name}: byte for byte");
        assert_eq!(http.payload, http2.as_bytes());
        assert_eq!(ws.subject, "lark.im.message.receive_v1");
        assert_eq!(
            ws.header(&engine.ce("type")),
            Some("lark.im.message.receive_v1")
        );
        assert_eq!(ws.header("imbridge-tenant"), Some("736588c9260f175e"));
        assert_eq!(ws.header("content-type"), Some("application/json"));
        same_but_app(ws, http, &engine);

        let got = v1.next(&engine, 2).await;
        let ws = find(&got, &engine, &format!("uuid-ws-{name}"));
        let http = find(&got, &engine, &format!("uuid-http-{name}"));
        assert_eq!(ws.payload, ws1.as_bytes(), "{name}: byte for byte");
        assert_eq!(ws.header("imbridge-tenant"), Some("2ca1d211f64f6438"));
        same_but_app(ws, http, &engine);

        // A websocket-mode app has no HTTP route.
        let res = app
            .http
            .post(app.url("/callbacks/lark/ws"))
            .header("content-type", "application/json")
            .body(ws2.clone())
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{name}");

        assert_eq!(gw.calls(), 1, "{name}");
        assert_eq!(connected(&app), 1, "{name}");
        assert_eq!(frames(&app, "event"), 2, "{name}");
        let acks = series(&app, "imbridge_stream_acks_total", "status").await;
        assert_eq!(acks.get("success"), Some(&2), "{name}: {acks:?}");
        assert!(gw.violations().is_empty(), "{name}: {:?}", gw.violations());
        app.stop().await;
        // Shutdown closes the connection.
        gw.wait_closed(conn.index).await;
    }
}

#[tokio::test]
async fn a_redelivered_event_is_stored_once() {
    // Kafka: the engine remembers the ids this replica stored within its duplicate window.
    for engine in Engine::durable() {
        let name = engine.name();
        let gw = Gateway::start().await;
        let app = start(&gw, &engine.toml()).await;
        let conn = gw.next_conn().await;
        let event = event_v2("ev-same", "twice");
        // Lark pushes the same event again (whether it keeps message_id is undocumented:
        // here it does not); event_id is what makes it the same.
        conn.send(&conn.event("m-1", event.as_bytes()));
        assert_eq!(gw.answer("m-1").await.code(), 200, "{name}");
        conn.send(&conn.event("m-2", event.as_bytes()));
        assert_eq!(gw.answer("m-2").await.code(), 200, "{name}");
        let stored = engine.stored("lark.im.message.receive_v1").await;
        assert_eq!(stored, 1, "{name}");
        assert_eq!(
            app.platform_callbacks(PLATFORM, APP, "duplicate"),
            1,
            "{name}"
        );
        assert!(gw.violations().is_empty(), "{:?}", gw.violations());
        app.stop().await;
    }
}

#[tokio::test]
async fn a_stalled_bus_gets_no_200_until_it_is_back() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let app = start(&gw, &engine.toml()).await;
    let conn = gw.next_conn().await;
    let event = event_v2("ev-stall", "stalled");
    engine.pause();
    conn.send(&conn.event("m-stalled", event.as_bytes()));
    // The publish times out (2 s): Lark is told to push it again.
    let answer = gw.answer("m-stalled").await;
    engine.signal("-CONT");
    assert_eq!(answer.code(), 500, "{:?}", answer.json());
    assert!(gw.answers_of("m-stalled").iter().all(|a| a.code() != 200));
    // Lark pushes it again until it is answered 200.
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("m-again-{n}");
        conn.send(&conn.event(&id, event.as_bytes()));
        if gw.answer(&id).await.code() == 200 {
            break;
        }
        assert!(n < 100, "never stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The timed-out publish may have been stored when the broker woke up: the id dedupes it.
    assert_eq!(engine.stored("lark.im.message.receive_v1").await, 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_is_replaced_and_what_it_held_is_not_lost() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let app = start(&gw, &patient(&engine)).await;
    let first = gw.next_conn().await;
    // An event in hand when the TCP connection drops: it cannot be answered any more...
    engine.pause();
    let event = event_v2("ev-drop", "dropped");
    first.send(&first.event("m-1", event.as_bytes()));
    wait_for("the event read", || frames(&app, "event") == 1).await;
    drop(first);
    // ...the next connection comes at once (ReconnectNonce 0), with a fresh endpoint call...
    let second = gw.next_conn().await;
    assert_eq!(gw.calls(), 2);
    wait_for("the drop counted", || reconnects(&app, "dropped") == 1).await;
    wait_for("connected again", || connected(&app) == 1).await;
    engine.signal("-CONT");
    // ...and Lark's re-push on it is stored once and answered 200.
    second.send(&second.event("m-2", event.as_bytes()));
    let answer = gw.answer("m-2").await;
    assert_eq!((answer.conn, answer.code()), (second.index, 200));
    assert!(gw.answers_of("m-1").is_empty());
    assert_eq!(engine.stored("lark.im.message.receive_v1").await, 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_silent_gateway_is_declared_dead_and_replaced() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let first = gw.next_conn().await;
    // Pings every PingInterval (1 s), each answered: four of them outlast 3 × PingInterval
    // from the connection's start, and it is kept.
    let pings = gw.wait_pings(first.index, 4).await;
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(500) && gap <= Duration::from_millis(2000),
            "pings {gap:?} apart"
        );
    }
    assert_eq!(gw.calls(), 1, "a live connection is kept");
    // No frame at all from now on: dead after 3 × PingInterval, replaced.
    let frozen = Instant::now();
    first.stop_answering();
    let second = gw.next_conn().await;
    let after = gw.accepted_at(second.index) - frozen;
    assert!(
        after >= Duration::from_millis(1900) && after <= Duration::from_secs(6),
        "replaced {after:?} after the silence began"
    );
    assert_eq!(gw.calls(), 2);
    assert_eq!(reconnects(&app, "ping_timeout"), 1);
    second.send(&second.event("m1", event_v2("ev-s", "s").as_bytes()));
    assert_eq!(gw.answer("m1").await.code(), 200);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn failed_endpoint_calls_are_retried_each_with_a_fresh_call() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let first = gw.next_conn().await;
    first.send(&first.event("m0", event_v2("ev-0", "before").as_bytes()));
    assert_eq!(gw.answer("m0").await.code(), 200);
    // Lark's own failures, each retried: HTTP 500, system busy, internal error.
    gw.script_endpoint(&[
        EndpointReply::Status(500),
        EndpointReply::Code(1),
        EndpointReply::Code(1_000_040_343),
    ]);
    drop(first);
    let second = gw.next_conn().await;
    assert_eq!(gw.calls(), 5);
    // ReconnectInterval (1 s) apart, with jitter: not spinning.
    let times = gw.call_times();
    for pair in times[1..].windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(400),
            "calls {:?} apart",
            pair[1] - pair[0]
        );
    }
    let reasons = reconnect_reasons(&app).await;
    assert_eq!(reasons.get("dropped"), Some(&1), "{reasons:?}");
    assert_eq!(reasons.get("open_failed"), Some(&3), "{reasons:?}");
    // Server failures say nothing against the credentials.
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["streams"]["refused"], json!([]), "{body}");
    second.send(&second.event("m1", event_v2("ev-1", "after").as_bytes()));
    assert_eq!(gw.answer("m1").await.code(), 200);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn refused_credentials_turn_readyz_red_and_slow_the_retries() {
    let gw = Gateway::start().await;
    gw.script_endpoint(&[
        EndpointReply::Code(CODE_REFUSED),
        EndpointReply::Code(CODE_REFUSED),
    ]);
    let app = TestApp::start(&toml(&gw, FAST)).await;
    let (status, body) = wait_readyz(&app, "refused", json!(["lark/ws"])).await;
    assert_eq!(status, 503, "{body}");
    // Once per auth_retry (1 s), then the third call is accepted.
    let conn = gw.next_conn().await;
    let times = gw.call_times();
    assert_eq!(times.len(), 3);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(450),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    app.wait_ready().await;
    conn.send(&conn.event("m1", event_v2("ev-a", "a").as_bytes()));
    assert_eq!(gw.answer("m1").await.code(), 200);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

/// Waits for the next connection, polling `/readyz` meanwhile; whether it ever named the app
/// as refused.
async fn next_conn_watching_readyz(
    gw: &Gateway,
    app: &TestApp,
) -> (crate::common::lark_gateway::Conn, bool) {
    let mut refused = false;
    let next = gw.next_conn();
    tokio::pin!(next);
    loop {
        tokio::select! {
            conn = &mut next => return (conn, refused),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                let (_, body) = readyz(app).await;
                refused |= body["streams"]["refused"] != json!([]);
            }
        }
    }
}

#[tokio::test]
async fn refused_handshakes_are_told_apart_by_their_headers() {
    let gw = Gateway::start().await;
    // The client's fault: too many connections, the app banned. The HTTP status is not what
    // tells (Lark's is undocumented): the handshake-* headers are.
    gw.script_handshake(&[
        HandshakeRefusal {
            http_status: 400,
            status: 514,
            auth_code: Some(1_000_040_350),
        },
        HandshakeRefusal {
            http_status: 400,
            status: 403,
            auth_code: None,
        },
    ]);
    let app = TestApp::start(&toml(&gw, FAST)).await;
    let (status, body) = wait_readyz(&app, "refused", json!(["lark/ws"])).await;
    assert_eq!(status, 503, "{body}");
    let conn = gw.next_conn().await;
    // Every attempt a fresh endpoint call: a refused handshake used its ticket.
    assert_eq!(gw.calls(), 3);
    app.wait_ready().await;

    // Lark's fault: auth failed for another reason, or any other status. Retried, and the
    // credentials are not blamed.
    gw.script_handshake(&[
        HandshakeRefusal {
            http_status: 400,
            status: 514,
            auth_code: Some(1),
        },
        HandshakeRefusal {
            http_status: 502,
            status: 500,
            auth_code: None,
        },
    ]);
    drop(conn);
    let (conn, refused) = next_conn_watching_readyz(&gw, &app).await;
    assert!(!refused, "a server-side refusal blamed the credentials");
    assert_eq!(gw.calls(), 6);
    conn.send(&conn.event("m1", event_v2("ev-h", "h").as_bytes()));
    assert_eq!(gw.answer("m1").await.code(), 200);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_connection_down_past_its_grace_is_reported_by_readyz() {
    for fails in [true, false] {
        let gw = Gateway::start().await;
        // Nothing ever connects: every endpoint call fails.
        gw.script_endpoint(&[EndpointReply::Status(503); 1000]);
        let extra = format!("{FAST}\ndown_grace = \"200ms\"\ndown_fails_readiness = {fails}\n");
        let app = TestApp::start(&toml(&gw, &extra)).await;
        let (status, body) = wait_readyz(&app, "down", json!(["lark/ws"])).await;
        assert_eq!(status, if fails { 503 } else { 200 }, "{body}");
        assert_eq!(connected(&app), 0);
        app.stop().await;
    }
}

#[tokio::test]
async fn fragments_are_reassembled_in_any_order_and_dropped_after_their_deadline() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let mut sub = app.bus.memory().unwrap().subscribe("lark.>");
    let conn = gw.next_conn().await;

    // Three parts, split inside UTF-8 characters, sent last part first.
    let whole = event_v2("ev-frag", "分片 fragmented 事件");
    let w = whole.as_bytes();
    let at = whole.find('分').unwrap() + 1;
    let at2 = whole.find('事').unwrap() + 2;
    let parts = [&w[..at], &w[at..at2], &w[at2..]];
    let frames: Vec<Frame> = parts
        .iter()
        .enumerate()
        .map(|(seq, p)| conn.data("event", "m-frag", 3, seq, p))
        .collect();
    conn.send_all(&[frames[2].clone(), frames[0].clone(), frames[1].clone()]);
    let answer = gw.answer("m-frag").await;
    assert_eq!(answer.code(), 200);
    // Built from the fragment that completed the message (the gateway checks the rest).
    assert_eq!(answer.header("seq"), Some("1"));
    assert_eq!(answer.frame.seq_id, frames[1].seq_id);
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload.as_ref(), w, "byte for byte");
    assert_eq!(msg.header("ce-id"), Some("ev-frag"));
    assert_eq!(gw.answers_of("m-frag").len(), 1, "answered once");

    // The 5 s deadline counts from a set's latest part: B, fed every 3 s, completes; A, whose
    // second part comes 6 s after its first, is gone by then and never completes.
    let a = event_v2("ev-late", "A");
    let b = event_v2("ev-kept", "B");
    let fa = conn.fragments("m-a", a.as_bytes(), 3);
    let fb = conn.fragments("m-b", b.as_bytes(), 3);
    conn.send_all(&[fa[0].clone(), fb[0].clone()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    conn.send(&fb[1]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    conn.send_all(&[fb[2].clone(), fa[1].clone(), fa[2].clone()]);
    assert_eq!(gw.answer("m-b").await.code(), 200);
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload.as_ref(), b.as_bytes());
    // A frame sent after A's last parts, answered: they have been read.
    conn.send(&conn.event("m-after", event_v2("ev-after", "after").as_bytes()));
    assert_eq!(gw.answer("m-after").await.code(), 200);
    assert!(
        gw.answers_of("m-a").is_empty(),
        "an expired set never completes"
    );
    let reasons = invalid_reasons(&app).await;
    assert_eq!(reasons.get("fragments_expired"), Some(&1), "{reasons:?}");
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.header("ce-id"), Some("ev-after"), "A was not published");
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_incomplete_fragment_sets_is_dropped_and_costs_nothing_lasting() {
    const SETS: u64 = 1000;
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let conn = gw.next_conn().await;
    for i in 0..SETS {
        conn.send(&conn.data("event", &format!("junk-{i}"), 2, 0, br#"{"schema":"#));
    }
    // The daemon keeps working at once...
    conn.send(&conn.event("m-0", event_v2("ev-0", "still here").as_bytes()));
    assert_eq!(gw.answer("m-0").await.code(), 200);
    // ...and every incomplete set is dropped (past its deadline, or earlier to stay within a
    // bound) and counted. A daemon that expires sets only when frames arrive gets some.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    while fragment_drops(&app).await < SETS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            invalid_reasons(&app).await
        );
        n += 1;
        let id = format!("m-tick-{n}");
        conn.send(&conn.event(&id, event_v2(&format!("ev-tick-{n}"), "tick").as_bytes()));
        assert_eq!(gw.answer(&id).await.code(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(fragment_drops(&app).await, SETS);
    assert_eq!(gw.calls(), 1, "the connection stayed");
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_pong_carrying_a_client_config_is_applied_at_once() {
    let gw = Gateway::start().await;
    let mut config = fast_config();
    config["PingInterval"] = json!(3);
    gw.set_config(config);
    // Only the key that changes, as STREAMS.md §B.6 says imbridge must take it.
    gw.set_pong_config(Some(json!({"PingInterval": 1})));
    let app = start(&gw, "").await;
    let conn = gw.next_conn().await;
    let pings = gw.wait_pings(conn.index, 4).await;
    let first = pings[0] - gw.accepted_at(conn.index);
    assert!(
        first < Duration::from_millis(1500),
        "the first ping comes right after connecting, not after {first:?}"
    );
    // At once: the ping after the pong already comes at the new period. (Under the
    // endpoint's 3 s they would be 3 s apart; and a daemon that kept the ping scheduled at the
    // old period while judging silence by the new one would find its own quiet connection
    // dead.)
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(400) && gap < Duration::from_millis(2000),
            "pings {gap:?} apart after the pong said 1 s"
        );
    }
    assert!(frames(&app, "pong") >= 1);
    // Silence is judged by the new period too: 3 × 1 s, not 3 × 3 s.
    let frozen = Instant::now();
    conn.stop_answering();
    let next = gw.next_conn().await;
    let after = gw.accepted_at(next.index) - frozen;
    assert!(after < Duration::from_secs(6), "replaced after {after:?}");
    assert_eq!(reconnects(&app, "ping_timeout"), 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn bad_frames_are_counted_and_skipped_and_the_connection_stays() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let mut sub = app.bus.memory().unwrap().subscribe(">");
    let conn = gw.next_conn().await;
    let bad = 7;
    conn.send_binary(&[0xff, 0xff, 0xff]);
    conn.send_binary(b"");
    conn.send_text(r#"{"type":"event"}"#);
    conn.send(&conn.data("mystery", "m-type", 1, 0, b"{}"));
    conn.send(&conn.control("weird", None));
    conn.send(&Frame {
        method: 7,
        ..conn.event("m-method", event_v2("ev-method", "m").as_bytes())
    });
    let big = format!(r#"{{"x":"{}"}}"#, "x".repeat(9000));
    conn.send(&conn.event("m-big", big.as_bytes()));
    // Card actions are counted, neither published nor answered, as the SDKs do.
    conn.send(&conn.data("card", "m-card", 1, 0, br#"{"action":{"value":{}}}"#));
    // Still up: the next good frame is published and answered on the same connection.
    let ok = event_v2("ev-ok", "ok");
    conn.send(&conn.event("m-ok", ok.as_bytes()));
    let answer = gw.answer("m-ok").await;
    assert_eq!((answer.conn, answer.code()), (conn.index, 200));
    assert_eq!(gw.calls(), 1);
    let reasons = invalid_reasons(&app).await;
    assert_eq!(reasons.values().sum::<u64>(), bad, "{reasons:?}");
    assert_eq!(reasons.get("oversize"), Some(&1), "{reasons:?}");
    assert_eq!(frames(&app, "invalid"), bad);
    assert_eq!(frames(&app, "card"), 1);
    for id in ["m-type", "m-method", "m-big", "m-card"] {
        assert!(gw.answers_of(id).is_empty(), "{id} answered");
    }
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload.as_ref(), ok.as_bytes(), "only the good event");
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn shutdown_answers_what_is_in_hand_then_closes() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let app = TestApp::start(&toml(
        &gw,
        &format!("shutdown_grace = \"15s\"\n{}\n{FAST}", patient(&engine)),
    ))
    .await;
    app.wait_ready().await;
    let conn = gw.next_conn().await;
    engine.pause();
    conn.send(&conn.event("m-held", event_v2("ev-held", "held").as_bytes()));
    wait_for("the event read", || frames(&app, "event") == 1).await;
    app.shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent once the daemon is shutting down: not taken (Lark pushes it elsewhere again).
    conn.send(&conn.event("m-late", event_v2("ev-late", "late").as_bytes()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.signal("-CONT");
    tokio::time::timeout(WAIT, app.task)
        .await
        .expect("shutdown timed out")
        .unwrap()
        .unwrap();
    assert_eq!(gw.answer("m-held").await.code(), 200);
    assert!(gw.answers_of("m-late").is_empty());
    gw.wait_closed(conn.index).await;
    assert_eq!(engine.stored("lark.im.message.receive_v1").await, 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
}

/// `check-config`: each mode requires its own keys, problems name them, secrets stay out.
#[test]
fn websocket_mode_config_is_validated_by_key() {
    use figment::providers::{Format, Toml};
    let load =
        |toml: &str| imbridge::config::from_figment(figment::Figment::from(Toml::string(toml)));
    let err = load(
        r#"
        [apps.lark.empty]
        mode = "websocket"
        [apps.lark.plain]
        mode = "websocket"
        app_id = "cli_plain"
        app_secret = "very-secret-lark-value"
        domain = "http://gateway.local"
        [apps.lark.odd]
        mode = "stream"
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "apps.lark.empty.app_id",
        "apps.lark.empty.app_secret",
        // http:// only with allow_insecure_http.
        "apps.lark.plain.domain",
        "apps.lark.odd.mode",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
    // The http-mode keys are not required in websocket mode.
    assert!(
        !keys.iter().any(|k| (k.starts_with("apps.lark.empty.")
            || k.starts_with("apps.lark.plain."))
            && (k.ends_with(".verification_token") || k.ends_with(".encrypt_key"))),
        "{keys:?}"
    );
    assert!(!err.to_string().contains("very-secret-lark-value"));

    let s = load(&format!(
        r#"
        [apps.lark.s]
        mode = "websocket"
        app_id = "{APP_ID}"
        app_secret = "{APP_SECRET}"
        "#
    ))
    .expect("valid");
    assert!(s.lark_apps.is_empty(), "no HTTP route for it");
    assert!(!format!("{s:?}").contains(APP_SECRET));
}

/// The secret comes from `IMBRIDGE_APPS__LARK__<NAME>__APP_SECRET` alone, and is what the
/// endpoint call sends: the gateway accepts only the right one.
#[tokio::test]
async fn the_app_secret_comes_from_the_environment() {
    let gw = Gateway::start().await;
    let file = toml_with(&format!(
        r#"
        [apps.lark.ws]
        mode = "websocket"
        app_id = "{APP_ID}"
        domain = "{}"
        allow_insecure_http = true
        {FAST}
        "#,
        gw.domain()
    ));
    let mut settings = None;
    figment::Jail::expect_with(|jail| {
        jail.create_file("imbridge.toml", &file)?;
        jail.set_env("IMBRIDGE_APPS__LARK__WS__APP_SECRET", APP_SECRET);
        settings = Some(
            imbridge::config::load(Some(std::path::Path::new("imbridge.toml"))).expect("valid"),
        );
        Ok(())
    });
    let app = TestApp::start_settings(settings.unwrap()).await;
    let conn = gw.next_conn().await;
    conn.send(&conn.event("m1", event_v2("ev-env", "env").as_bytes()));
    assert_eq!(gw.answer("m1").await.code(), 200);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[test]
fn check_config_exits_64_naming_the_missing_websocket_keys() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[apps.lark.s]\nmode = \"websocket\"\napp_secret = \"hush-hush-lark-secret\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["check-config", "--config", bad.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("apps.lark.s.app_id"), "{all}");
    assert!(!all.contains("apps.lark.s.verification_token"), "{all}");
    assert!(!all.contains("hush-hush-lark-secret"), "{all}");
}

/// The fake gateway itself, played against by a client made of the daemon's pure protocol
/// module (`platform::lark::ws`): what the tests above rely on it to accept and to flag.
mod gateway_selftest {
    use std::time::{Duration, Instant};

    use futures::{SinkExt, StreamExt};
    use imbridge::platform::lark::ws::{self, Endpoint, Fragments, Frame, FrameKind};
    use tokio_tungstenite::tungstenite::{self, Message};

    use crate::common::lark_gateway::{
        event_v2, EndpointReply, Gateway, HandshakeRefusal, APP_ID, APP_SECRET, CODE_REFUSED,
    };
    use crate::common::WAIT;

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn endpoint(gw: &Gateway, secret: &str) -> Endpoint {
        let res = reqwest::Client::new()
            .post(format!("{}/callback/ws/endpoint", gw.domain()))
            .header("locale", "zh")
            .json(&ws::endpoint_request(APP_ID, secret))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        ws::endpoint(status, &res.bytes().await.unwrap())
    }

    async fn fresh_url(gw: &Gateway) -> String {
        match endpoint(gw, APP_SECRET).await {
            Endpoint::Connect { url, config } => {
                assert_eq!(config.ping_interval, 1);
                assert_eq!(config.reconnect_nonce, 0);
                url
            }
            other => panic!("{other:?}"),
        }
    }

    async fn next_frame(socket: &mut Socket) -> Frame {
        loop {
            let msg = tokio::time::timeout(WAIT, socket.next())
                .await
                .expect("a frame")
                .expect("open")
                .unwrap();
            if let Message::Binary(b) = msg {
                return Frame::decode_bytes(&b).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_well_behaved_client_leaves_no_violation() {
        let gw = Gateway::start().await;
        let url = fresh_url(&gw).await;
        let (service, device) = ws::connection_ids(&url);
        assert!(service > 0 && device.is_some(), "{url}");
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let conn = gw.next_conn().await;
        assert_eq!(conn.service_id, service);

        gw.set_pong_config(Some(serde_json::json!({"PingInterval": 5})));
        socket
            .send(Message::binary(Frame::ping(service).to_bytes()))
            .await
            .unwrap();
        let pong = next_frame(&mut socket).await;
        assert_eq!(pong.kind(), FrameKind::Pong);
        let mut config = ws::ClientConfig::default();
        assert!(config.apply(pong.payload.as_deref().unwrap()));
        assert_eq!(config.ping_interval, 5);
        assert_eq!(gw.pings(conn.index).len(), 1);

        // Out of order, answered from the part that completed the message.
        let event = event_v2("ev-self", "自检");
        let parts = conn.fragments("m-self", event.as_bytes(), 3);
        conn.send_all(&[parts[1].clone(), parts[2].clone(), parts[0].clone()]);
        let mut fragments = Fragments::new(Duration::from_secs(5), 8, 1 << 20);
        let whole = loop {
            let frame = next_frame(&mut socket).await;
            if let Some(whole) = fragments.add(&frame, Instant::now()).unwrap() {
                break (whole, frame);
            }
        };
        assert_eq!(whole.0, event.as_bytes());
        let answer = whole.1.answer(true, Duration::from_millis(3));
        socket
            .send(Message::binary(answer.to_bytes()))
            .await
            .unwrap();
        let got = gw.answer("m-self").await;
        assert_eq!((got.code(), got.header("seq")), (200, Some("0")));
        assert!(gw.violations().is_empty(), "{:?}", gw.violations());

        socket.close(None).await.unwrap();
        gw.wait_closed(conn.index).await;
    }

    #[tokio::test]
    async fn mistakes_are_flagged_and_refusals_scripted() {
        let gw = Gateway::start().await;
        let url = fresh_url(&gw).await;
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let conn = gw.next_conn().await;
        // A URL used twice.
        let reused = tokio_tungstenite::connect_async(&url).await;
        assert!(reused.is_err());
        // An answer that is not the frame it answers.
        let frame = conn.event("m-1", b"{}");
        conn.send(&frame);
        let got = next_frame(&mut socket).await;
        let mut answer = got.answer(true, Duration::ZERO);
        answer.seq_id += 1;
        socket
            .send(Message::binary(answer.to_bytes()))
            .await
            .unwrap();
        // A ping of the wrong service, and a text message.
        socket
            .send(Message::binary(Frame::ping(conn.service_id + 1).to_bytes()))
            .await
            .unwrap();
        socket.send(Message::text("hello")).await.unwrap();
        let deadline = Instant::now() + WAIT;
        while gw.violations().len() < 4 {
            assert!(Instant::now() < deadline, "{:?}", gw.violations());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Scripted endpoint answers, then wrong credentials.
        gw.script_endpoint(&[
            EndpointReply::Status(500),
            EndpointReply::Code(1),
            EndpointReply::Code(CODE_REFUSED),
        ]);
        assert!(matches!(
            endpoint(&gw, APP_SECRET).await,
            Endpoint::Retry(_)
        ));
        assert!(matches!(
            endpoint(&gw, APP_SECRET).await,
            Endpoint::Retry(_)
        ));
        assert!(matches!(
            endpoint(&gw, APP_SECRET).await,
            Endpoint::Refused(_)
        ));
        assert!(matches!(endpoint(&gw, "wrong").await, Endpoint::Refused(_)));

        // A scripted handshake refusal carries its headers.
        gw.script_handshake(&[HandshakeRefusal {
            http_status: 400,
            status: 514,
            auth_code: Some(1_000_040_350),
        }]);
        let url = fresh_url(&gw).await;
        let Err(tungstenite::Error::Http(res)) = tokio_tungstenite::connect_async(&url).await
        else {
            panic!("the handshake was not refused");
        };
        assert_eq!(res.status().as_u16(), 400);
        let header = |k| res.headers().get(k).and_then(|v| v.to_str().ok());
        assert!(ws::handshake_refused_by_client(
            header("handshake-status"),
            header("handshake-autherrcode")
        ));
        // Refusing it used its ticket: no new violation.
        assert_eq!(gw.violations().len(), 4, "{:?}", gw.violations());
    }
}
