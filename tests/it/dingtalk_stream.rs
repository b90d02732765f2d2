//! DingTalk Stream mode against a fake gateway ([`stream_gateway`]) that speaks the protocol of
//! STREAMS.md §A and records every ACK: pushes reach the same subjects, bodies and headers as
//! HTTP callbacks on every engine, events are ACKed SUCCESS only once the bus has them, and the
//! connection survives everything a gateway or a network does to it.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::engine::Engine;
use crate::common::stream_gateway::{
    callback_frame, event_frame, system_frame, Gateway, CLIENT_ID, CLIENT_SECRET,
};
use crate::common::*;

const ROBOT: &str = "/v1.0/im/bot/messages/get";
const CARD: &str = "/v1.0/card/instances/callback";

/// The stream-mode app `stream` on `gw`, fast keepalive and backoff, plus `extra`.
fn stream_toml(gw: &Gateway, extra: &str) -> String {
    toml_with(&format!(
        r#"
        {extra}
        [apps.dingtalk.stream]
        mode = "stream"
        client_id = "{CLIENT_ID}"
        client_secret = "{CLIENT_SECRET}"
        api_base = "{}"
        allow_insecure_http = true
        "#,
        gw.api_base()
    ))
}

/// `[streams]` for tests: a 400 ms ping, quick reconnects, a small frame cap.
const FAST: &str = r#"
[streams]
ping_interval = "400ms"
reconnect_initial = "20ms"
reconnect_max = "200ms"
auth_retry = "1s"
max_frame_bytes = 8192
"#;

async fn start(gw: &Gateway, bus: &str) -> TestApp {
    let app = TestApp::start(&stream_toml(gw, &format!("{bus}\n{FAST}"))).await;
    app.wait_ready().await;
    app
}

fn reconnects(app: &TestApp, reason: &str) -> u64 {
    app.metrics
        .stream_reconnects_total
        .with_label_values(&["dingtalk", "stream", reason])
        .get()
}

fn invalid(app: &TestApp, reason: &str) -> u64 {
    app.metrics
        .stream_invalid_frames_total
        .with_label_values(&["dingtalk", "stream", reason])
        .get()
}

fn connected(app: &TestApp) -> i64 {
    app.metrics
        .stream_connected
        .with_label_values(&["dingtalk", "stream"])
        .get()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn success() -> Value {
    json!({"status": "SUCCESS", "message": "success"})
}

fn user_event(id: &str) -> String {
    format!(r#"{{"timeStamp":"1685501863357","userId":["{id}"],"x":"审批 \"quoted\""}}"#)
}

const ROBOT_MSG: &str = r#"{"conversationId":"cid1","atUsers":[],"chatbotCorpId":"dingbotcorp","chatbotUserId":"$:LWCP","msgId":"msgABC123","senderNick":"张三","isAdmin":false,"senderStaffId":"s1","sessionWebhookExpiredTime":1693222000000,"createAt":1693221579000,"senderCorpId":"dingbotcorp","conversationType":"1","senderId":"$:sender","sessionWebhook":"https://oapi.dingtalk.com/robot/sendBySession?session=x","robotCode":"dingrobot","msgtype":"text","text":{"content":"hello"}}"#;

const CARD_ACTION: &str = r#"{"extension":"{}","corpId":"dingcardcorp","type":"actionCallback","userId":"u1","content":"{\"cardPrivateData\":{\"actionIds\":[\"ok\"],\"params\":{}}}","outTrackId":"track-1"}"#;

#[tokio::test]
async fn pushes_reach_the_bus_byte_for_byte_on_every_engine_and_are_acked() {
    for engine in Engine::all() {
        let name = engine.name();
        let gw = Gateway::start().await;
        let app = start(&gw, &engine.toml()).await;
        let conn = gw.next_conn().await;
        let mut events = engine.watch(&app, "dingtalk.user_add_org");
        let mut robots = engine.watch(&app, "dingtalk.bot.message");
        let mut cards = engine.watch(&app, "dingtalk.card.callback");

        let data = user_event(name);
        conn.send(event_frame(
            "m-ev",
            &format!("ev-{name}"),
            "user_add_org",
            &data,
        ));
        conn.send(callback_frame("m-bot", ROBOT, ROBOT_MSG));
        conn.send(callback_frame("m-card", CARD, CARD_ACTION));
        conn.send(system_frame("m-ping", "ping", r#"{"opaque":"op-1"}"#));

        let ack = gw.ack("m-ev").await;
        assert_eq!((ack.code(), ack.data()), (200, success()), "{name}");
        assert_eq!(ack.frame["message"], "OK");
        for id in ["m-bot", "m-card"] {
            let ack = gw.ack(id).await;
            assert_eq!(ack.code(), 200, "{name}");
            assert_eq!(ack.data(), json!({"response": null}), "{name}");
        }
        let ping = gw.ack("m-ping").await;
        assert_eq!(ping.frame["data"], r#"{"opaque":"op-1"}"#, "{name}");

        let ev = &events.next(&engine, 1).await[0];
        assert_eq!(ev.payload, data.as_bytes(), "{name}");
        assert_eq!(
            ev.header(&engine.ce("id")),
            Some(format!("ev-{name}").as_str())
        );
        assert_eq!(ev.header(&engine.ce("source")), Some("dingtalk/stream"));
        assert_eq!(ev.header(&engine.ce("type")), Some("dingtalk.user_add_org"));
        assert_eq!(ev.header(&engine.ce("specversion")), Some("1.0"));
        assert_eq!(ev.header("content-type"), Some("application/json"));
        assert_eq!(ev.header("imbridge-app"), Some("stream"));
        assert_eq!(ev.header("imbridge-tenant"), Some("dingstreamcorp"));

        let bot = &robots.next(&engine, 1).await[0];
        assert_eq!(bot.payload, ROBOT_MSG.as_bytes(), "{name}");
        assert_eq!(bot.header(&engine.ce("id")), Some("msgABC123"));
        assert_eq!(bot.header(&engine.ce("type")), Some("dingtalk.bot.message"));
        assert_eq!(bot.header("imbridge-tenant"), Some("dingbotcorp"));

        let card = &cards.next(&engine, 1).await[0];
        assert_eq!(card.payload, CARD_ACTION.as_bytes(), "{name}");
        assert_eq!(card.header(&engine.ce("id")).map(str::len), Some(32));
        assert_eq!(card.header("imbridge-tenant"), Some("dingcardcorp"));

        // A stream-mode app has no HTTP route.
        let res = DingTalk::main()
            .callback(&approval_event("x"))
            .post(&app, "stream")
            .await;
        assert_eq!(res.status(), 404, "{name}");

        assert_eq!(gw.opens(), 1, "{name}");
        assert_eq!(connected(&app), 1);
        assert!(gw.violations().is_empty(), "{name}: {:?}", gw.violations());
        app.stop().await;
        // Shutdown closes the connection cleanly.
        gw.wait_closed(conn.index).await;
    }
}

#[tokio::test]
async fn business_subjects_apply_to_stream_events_as_to_callbacks() {
    let gw = Gateway::start().await;
    let toml = stream_toml(&gw, FAST)
        + "\n[apps.dingtalk.stream.subjects]\nbpms_instance_change = [\"/processCode\"]\n";
    let app = TestApp::start(&toml).await;
    let mut sub = app.bus.memory().unwrap().subscribe("dingtalk.>");
    let conn = gw.next_conn().await;
    let data = r#"{"processCode":"PROC-9","type":"finish"}"#;
    conn.send(event_frame("m1", "e1", "bpms_instance_change", data));
    assert_eq!(gw.ack("m1").await.data(), success());
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject, "dingtalk.bpms_instance_change.PROC-9");
    assert_eq!(msg.header("ce-type"), Some("dingtalk.bpms_instance_change"));
    app.stop().await;
}

#[tokio::test]
async fn a_redelivered_event_is_stored_once() {
    // Kafka: the engine remembers the ids this replica stored within its duplicate window.
    for engine in Engine::durable() {
        let name = engine.name();
        let gw = Gateway::start().await;
        let app = start(&gw, &engine.toml()).await;
        let conn = gw.next_conn().await;
        let data = user_event("redeliver");
        // The same event pushed twice: a new messageId each time, the same eventId.
        conn.send(event_frame("m-1", "ev-same", "user_add_org", &data));
        assert_eq!(gw.ack("m-1").await.data(), success(), "{name}");
        conn.send(event_frame("m-2", "ev-same", "user_add_org", &data));
        assert_eq!(gw.ack("m-2").await.data(), success(), "{name}");
        assert_eq!(engine.stored("dingtalk.user_add_org").await, 1, "{name}");
        let duplicates = app.platform_callbacks("dingtalk", "stream", "duplicate");
        assert_eq!(duplicates, 1, "{name}");
        app.stop().await;
    }
}

#[tokio::test]
async fn a_stalled_bus_gets_no_success_until_it_is_back() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let app = start(&gw, &engine.toml()).await;
    let conn = gw.next_conn().await;
    let data = user_event("stall");
    engine.signal("-STOP");
    conn.send(event_frame("m-stalled", "ev-stall", "user_add_org", &data));
    let ack = gw.ack("m-stalled").await;
    engine.signal("-CONT");
    assert_eq!(ack.code(), 200);
    assert_eq!(ack.data()["status"], "LATER", "{:?}", ack.frame);
    assert!(gw
        .acks_of("m-stalled")
        .iter()
        .all(|a| a.data()["status"] != "SUCCESS"));
    // DingTalk pushes it again (a new messageId) until it is ACKed SUCCESS.
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("m-again-{n}");
        conn.send(event_frame(&id, "ev-stall", "user_add_org", &data));
        if gw.ack(&id).await.data() == success() {
            break;
        }
        assert!(n < 100, "never stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The timed-out publish may have been stored when the broker woke up: the id dedupes it.
    assert_eq!(engine.stored("dingtalk.user_add_org").await, 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn disconnect_opens_a_new_connection_and_finishes_the_old_one() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    // A publish that waits out the pause below rather than timing out.
    let bus = engine
        .toml()
        .replace("publish_timeout = \"2s\"", "publish_timeout = \"10s\"");
    let app = start(&gw, &bus).await;
    let old = gw.next_conn().await;
    // An event in hand (the bus is paused) when DingTalk announces the disconnect.
    engine.signal("-STOP");
    old.send(event_frame(
        "m-old",
        "ev-old",
        "user_add_org",
        &user_event("old"),
    ));
    old.send(system_frame(
        "m-bye",
        "disconnect",
        r#"{"reason":"connection is expired"}"#,
    ));
    // The next connection is opened at once, with a fresh registration, the event still held.
    let new = gw.next_conn().await;
    assert_eq!(gw.opens(), 2);
    assert_eq!(reconnects(&app, "disconnect"), 1);
    assert!(gw.acks_of("m-old").is_empty());
    assert!(
        !gw.closed(old.index),
        "the old connection is kept while it holds an event"
    );
    engine.signal("-CONT");
    // What the old connection held is ACKed on it; then the daemon closes it.
    let ack = gw.ack("m-old").await;
    assert_eq!((ack.conn, ack.data()), (old.index, success()));
    gw.wait_closed(old.index).await;
    // The new one works.
    new.send(event_frame(
        "m-new",
        "ev-new",
        "user_add_org",
        &user_event("new"),
    ));
    let ack = gw.ack("m-new").await;
    assert_eq!((ack.conn, ack.data()), (new.index, success()));
    assert_eq!(engine.stored("dingtalk.user_add_org").await, 2);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_is_replaced_and_what_it_held_is_not_lost() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let bus = engine
        .toml()
        .replace("publish_timeout = \"2s\"", "publish_timeout = \"10s\"");
    let app = start(&gw, &bus).await;
    let first = gw.next_conn().await;
    // An event in hand when the TCP connection drops: it cannot be ACKed any more...
    engine.signal("-STOP");
    let data = user_event("dropped");
    first.send(event_frame("m-1", "e-drop", "user_add_org", &data));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(first);
    let second = gw.next_conn().await;
    assert_eq!(gw.opens(), 2);
    wait_for("the drop counted", || reconnects(&app, "dropped") == 1).await;
    wait_for("connected again", || connected(&app) == 1).await;
    engine.signal("-CONT");
    // ...but it is still stored, and DingTalk's redelivery on the new connection is ACKed
    // SUCCESS and not stored twice.
    second.send(event_frame("m-2", "e-drop", "user_add_org", &data));
    assert_eq!(gw.ack("m-2").await.data(), success());
    assert!(gw.acks_of("m-1").is_empty());
    assert_eq!(engine.stored("dingtalk.user_add_org").await, 1);
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn a_silent_gateway_is_declared_dead_and_replaced() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let first = gw.next_conn().await;
    // Pings are answered while the gateway reads: the connection outlives several intervals.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.opens(), 1, "a live connection is kept");
    first.stop_answering();
    let second = gw.next_conn().await;
    assert_eq!(gw.opens(), 2);
    assert_eq!(reconnects(&app, "ping_timeout"), 1);
    second.send(event_frame("m1", "e1", "user_add_org", &user_event("s")));
    assert_eq!(gw.ack("m1").await.data(), success());
    app.stop().await;
}

#[tokio::test]
async fn refused_registrations_are_retried_each_with_a_fresh_call() {
    let gw = Gateway::start().await;
    gw.script(&[503, 500, 502]);
    let app = TestApp::start(&stream_toml(&gw, FAST)).await;
    let conn = gw.next_conn().await;
    assert_eq!(gw.opens(), 4);
    assert_eq!(reconnects(&app, "open_failed"), 3);
    conn.send(event_frame("m1", "e1", "user_add_org", &user_event("r")));
    assert_eq!(gw.ack("m1").await.data(), success());
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn refused_credentials_turn_readyz_red_and_slow_the_retries() {
    let gw = Gateway::start().await;
    gw.script(&[401, 403, 401]);
    let app = TestApp::start(&stream_toml(&gw, FAST)).await;
    wait_for("a refusal", || reconnects(&app, "auth_refused") >= 1).await;
    let res = app.get_admin("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["streams"]["refused"],
        json!(["dingtalk/stream"]),
        "{body}"
    );
    // Once a second (auth_retry), not at the 20 ms reconnect pace.
    let conn = gw.next_conn().await;
    let times = gw.open_times();
    assert_eq!(times.len(), 4);
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(450),
            "{:?}",
            pair[1] - pair[0]
        );
    }
    app.wait_ready().await;
    conn.send(event_frame("m1", "e1", "user_add_org", &user_event("a")));
    assert_eq!(gw.ack("m1").await.data(), success());
    app.stop().await;
}

#[tokio::test]
async fn a_connection_down_past_its_grace_is_reported_by_readyz() {
    let gw = Gateway::start().await;
    // Nothing ever connects: every registration fails.
    gw.script(&[503; 1000]);
    let extra = format!("{FAST}\ndown_grace = \"200ms\"\n");
    let app = TestApp::start(&stream_toml(&gw, &extra)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let res = app.get_admin("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["streams"]["down"],
        json!(["dingtalk/stream"]),
        "{body}"
    );
    app.stop().await;

    // Reported, but not failing readiness, when so configured.
    let gw = Gateway::start().await;
    gw.script(&[503; 1000]);
    let extra = format!("{FAST}\ndown_grace = \"200ms\"\ndown_fails_readiness = false\n");
    let app = TestApp::start(&stream_toml(&gw, &extra)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let res = app.get_admin("/readyz").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["streams"]["down"],
        json!(["dingtalk/stream"]),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_frames_are_counted_and_skipped_and_the_connection_stays() {
    let gw = Gateway::start().await;
    let app = start(&gw, "").await;
    let conn = gw.next_conn().await;
    conn.send("not json at all");
    conn.send(r#"{"type":"EVENT","headers":{"messageId":"m-obj"},"data":{"a":1}}"#);
    conn.send(r#"{"type":"MYSTERY","headers":{"messageId":"m-type"},"data":"{}"}"#);
    conn.send(event_frame(
        "m-big",
        "e-big",
        "user_add_org",
        &format!(r#"{{"x":"{}"}}"#, "x".repeat(9000)),
    ));
    conn.send(event_frame(
        "m-text",
        "e-text",
        "user_add_org",
        "not json data",
    ));
    conn.send_binary(&[0xff, 0x00, 0x01]);
    conn.send(callback_frame("m-topic", "/v1.0/graph/api/invoke", "{}"));
    conn.send(system_frame("m-keep", "KEEPALIVE", ""));
    // Still up: the next good frame is published and ACKed on the same connection.
    conn.send(event_frame(
        "m-ok",
        "e-ok",
        "user_add_org",
        &user_event("ok"),
    ));
    let ack = gw.ack("m-ok").await;
    assert_eq!((ack.conn, ack.data()), (conn.index, success()));
    assert_eq!(gw.opens(), 1);
    for reason in [
        "not_json",
        "data_not_string",
        "unknown_type",
        "oversize",
        "data_not_json",
        "not_text",
    ] {
        assert_eq!(invalid(&app, reason), 1, "{reason}");
    }
    // An unknown type or topic is answered 404 (A.4); an unknown system topic, 200.
    assert_eq!(gw.ack("m-type").await.code(), 404);
    assert_eq!(gw.ack("m-topic").await.code(), 404);
    assert_eq!(gw.ack("m-keep").await.code(), 200);
    assert!(gw.acks_of("m-obj").is_empty() && gw.acks_of("m-big").is_empty());
    assert!(gw.violations().is_empty(), "{:?}", gw.violations());
    app.stop().await;
}

#[tokio::test]
async fn shutdown_acks_what_is_in_hand_then_closes() {
    let engine = Engine::nats();
    let gw = Gateway::start().await;
    let bus = engine
        .toml()
        .replace("publish_timeout = \"2s\"", "publish_timeout = \"10s\"");
    let app = TestApp::start(&stream_toml(
        &gw,
        &format!("shutdown_grace = \"15s\"\n{bus}\n{FAST}"),
    ))
    .await;
    app.wait_ready().await;
    let conn = gw.next_conn().await;
    engine.signal("-STOP");
    conn.send(event_frame(
        "m-held",
        "e-held",
        "user_add_org",
        &user_event("held"),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.signal("-CONT");
    tokio::time::timeout(WAIT, app.task)
        .await
        .expect("shutdown timed out")
        .unwrap()
        .unwrap();
    assert_eq!(gw.ack("m-held").await.data(), success());
    gw.wait_closed(conn.index).await;
    assert_eq!(engine.stored("dingtalk.user_add_org").await, 1);
}

/// A panic while handling a frame restarts the app's supervised task, which reconnects; the
/// push it held was never ACKed, so the gateway's redelivery is stored and ACKed.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_panicking_connection_is_restarted_by_its_supervisor() {
    const VICTIM: &str = "stream-failpoint-victim";
    let gw = Gateway::start().await;
    let toml = stream_toml(&gw, FAST).replace(
        "[apps.dingtalk.stream]",
        &format!("[apps.dingtalk.{VICTIM}]"),
    );
    let app = TestApp::start(&toml).await;
    let first = gw.next_conn().await;
    fail::cfg("dingtalk-stream-frame", &format!("return({VICTIM})")).unwrap();
    first.send(event_frame(
        "m-1",
        "e-fp",
        "user_add_org",
        &user_event("fp"),
    ));
    let second = gw.next_conn().await;
    fail::remove("dingtalk-stream-frame");
    assert!(
        gw.acks_of("m-1").is_empty(),
        "nothing ACKed before it was stored"
    );
    let task = format!("dingtalk_stream:{VICTIM}");
    assert_eq!(
        app.metrics
            .task_restarts_total
            .with_label_values(&[task.as_str()])
            .get(),
        1
    );
    second.send(event_frame(
        "m-2",
        "e-fp",
        "user_add_org",
        &user_event("fp"),
    ));
    assert_eq!(gw.ack("m-2").await.data(), success());
    app.stop().await;
}

/// `check-config`: each mode requires its own keys, problems name them, secrets stay out.
#[test]
fn stream_mode_config_is_validated_by_key() {
    use figment::providers::{Format, Toml};
    let load =
        |toml: &str| imbridge::config::from_figment(figment::Figment::from(Toml::string(toml)));
    let err = load(
        r#"
        [apps.dingtalk.empty]
        mode = "stream"
        [apps.dingtalk.plain]
        mode = "stream"
        client_id = "id"
        client_secret = "very-secret-value"
        api_base = "http://gateway.local"
        [apps.dingtalk.odd]
        mode = "websocket"
        "#,
    )
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "apps.dingtalk.empty.client_id",
        "apps.dingtalk.empty.client_secret",
        "apps.dingtalk.plain.api_base",
        "apps.dingtalk.odd.mode",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
    // The http-mode keys are not required in stream mode.
    assert!(
        !keys.iter().any(|k| k.ends_with(".token")
            || k.ends_with(".aes_key")
            || k.ends_with(".receiver_id")),
        "{keys:?}"
    );
    assert!(!err.to_string().contains("very-secret-value"));

    let s = load(&format!(
        r#"
        [apps.dingtalk.s]
        mode = "stream"
        client_id = "{CLIENT_ID}"
        client_secret = "{CLIENT_SECRET}"
        [streams]
        ping_interval = "30s"
        "#
    ))
    .expect("valid");
    let app = &s.dingtalk_streams["s"];
    assert_eq!(app.api_base, "https://api.dingtalk.com");
    assert!(s.dingtalk_apps.is_empty(), "no HTTP route for it");
    assert_eq!(s.streams.ping_interval, Duration::from_secs(30));
    assert!(!format!("{s:?}").contains(CLIENT_SECRET));

    // Stream keys are not needed (nor wanted) in http mode.
    let s = load(MAIN_APP).expect("valid");
    assert!(s.dingtalk_streams.is_empty());
    assert!(s.warnings.is_empty());
}

#[test]
fn the_client_secret_comes_from_the_environment() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "imbridge.toml",
            "[apps.dingtalk.main]\nmode = \"stream\"\nclient_id = \"ding1\"\n",
        )?;
        jail.set_env("IMBRIDGE_APPS__DINGTALK__MAIN__CLIENT_SECRET", "from-env");
        let s = imbridge::config::load(Some(std::path::Path::new("imbridge.toml"))).expect("valid");
        assert_eq!(
            s.dingtalk_streams["main"].client_secret.expose(),
            "from-env"
        );
        Ok(())
    });
}

#[test]
fn check_config_exits_64_naming_the_missing_stream_keys() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[apps.dingtalk.s]\nmode = \"stream\"\nclient_secret = \"hush-hush-secret\"\n",
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
    assert!(all.contains("apps.dingtalk.s.client_id"), "{all}");
    assert!(!all.contains("apps.dingtalk.s.token"), "{all}");
    assert!(!all.contains("hush-hush-secret"), "{all}");
}
