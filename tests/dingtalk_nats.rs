//! DingTalk callbacks to a real `nats-server -js` started by each test: the stream is created,
//! events are stored byte for byte with their headers, retries are deduplicated, a stopped
//! server means 503 and not-ready, a restarted one means publishing again, and a shutdown
//! lets an in-flight publish finish.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use imbridge::platform::dingtalk::callback::Reply;

async fn nats_app(server: &NatsServer, extra: &str) -> TestApp {
    let app = TestApp::start(&toml_with(&format!(
        "{extra}\n{}\n{MAIN_APP}",
        nats_bus(&server.url())
    )))
    .await;
    app.wait_ready().await;
    app
}

async fn stream(server: &NatsServer) -> jetstream::stream::Stream {
    let js = jetstream::new(server.client().await);
    js.get_stream("TEST_EVENTS").await.expect("stream exists")
}

async fn stored(server: &NatsServer) -> u64 {
    stream(server).await.info().await.unwrap().state.messages
}

#[tokio::test]
async fn event_stored_byte_for_byte_with_headers_and_deduplicated() {
    let server = NatsServer::start();
    let app = nats_app(&server, "").await;
    let info = stream(&server).await.info().await.unwrap().config.clone();
    assert_eq!(
        info.subjects,
        ["dingtalk.>", "wecom.>", "lark.>"]
            .map(String::from)
            .to_vec()
    );
    assert_eq!(info.duplicate_window, Duration::from_secs(120));

    let dt = DingTalk::main();
    let event = approval_event("nats-1");
    let res = dt.callback(&event).post(&app, "main").await;
    assert_eq!(res.status(), 200);
    dt.check_reply(&res.json::<Reply>().await.unwrap());

    let msg = stream(&server).await.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "dingtalk.bpms_instance_change");
    assert_eq!(&msg.payload[..], event.as_bytes());
    let h = msg.headers;
    let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
    assert_eq!(get("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(
        get("ce-type").as_deref(),
        Some("dingtalk.bpms_instance_change")
    );
    assert_eq!(get("ce-source").as_deref(), Some("dingtalk/main"));
    assert_eq!(get("content-type").as_deref(), Some("application/json"));
    assert_eq!(get("imbridge-app").as_deref(), Some("main"));
    assert_eq!(get("imbridge-tenant").as_deref(), Some(CORP_ID));
    assert!(get("ce-time").is_some());
    let id = get("ce-id").unwrap();
    assert_eq!(get("Nats-Msg-Id"), Some(id));

    // The same event sent again (fresh random prefix and signature, as a platform retry) is
    // answered success but stored once.
    let res = dt.callback(&event).post(&app, "main").await;
    assert_eq!(res.status(), 200);
    dt.check_reply(&res.json::<Reply>().await.unwrap());
    assert_eq!(stored(&server).await, 1);
    assert_eq!(app.callbacks("main", "duplicate"), 1);

    // A different event is stored.
    let res = dt
        .callback(&approval_event("nats-2"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(stored(&server).await, 2);

    // check_url is not stored.
    let res = dt
        .callback(r#"{"EventType":"check_url"}"#)
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(stored(&server).await, 2);
    app.stop().await;
}

#[tokio::test]
async fn subscribers_receive_events_live() {
    let server = NatsServer::start();
    let app = nats_app(&server, "").await;
    let client = server.client().await;
    let mut sub = client.subscribe("dingtalk.>").await.unwrap();
    client.flush().await.unwrap();
    let dt = DingTalk::main();
    let event = r#"{"EventType":"user_add_org","UserId":["u1"],"CorpId":"ding6ccabc44d2c8d38b","TimeStamp":"1608001896814"}"#;
    assert_eq!(dt.callback(event).post(&app, "main").await.status(), 200);
    let msg = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject.as_str(), "dingtalk.user_add_org");
    assert_eq!(&msg.payload[..], event.as_bytes());
    app.stop().await;
}

#[tokio::test]
async fn existing_stream_is_updated_not_duplicated() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "TEST_EVENTS".into(),
        subjects: vec!["dingtalk.>".into()],
        duplicate_window: Duration::from_secs(10),
        ..Default::default()
    })
    .await
    .unwrap();
    let app = nats_app(&server, "").await;
    let config = stream(&server).await.info().await.unwrap().config.clone();
    assert_eq!(config.subjects.len(), 3);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    app.stop().await;
}

#[tokio::test]
async fn bus_down_gives_503_and_not_ready_then_recovers() {
    let mut server = NatsServer::start();
    let app = nats_app(&server, "").await;
    let dt = DingTalk::main();
    let event = approval_event("outage-1");
    let callback = dt.callback(&event);

    server.stop();
    // The client notices the closed connection; from then on, fail fast.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.get_admin("/readyz").await.status() != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = callback.post(&app, "main").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "bus_unavailable");
    assert_eq!(app.callbacks("main", "bus_unavailable"), 1);
    let metrics = app.get_admin("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("imbridge_bus_connected{engine=\"nats\"} 0"),
        "{metrics}"
    );
    // check_url needs no bus and is still answered.
    let res = dt
        .callback(r#"{"EventType":"check_url"}"#)
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);

    server.restart();
    app.wait_ready().await;
    // DingTalk retries the refused callback; now it is stored.
    let res = callback.post(&app, "main").await;
    assert_eq!(res.status(), 200);
    dt.check_reply(&res.json().await.unwrap());
    let msg = stream(&server)
        .await
        .get_last_raw_message_by_subject("dingtalk.bpms_instance_change")
        .await
        .unwrap();
    assert_eq!(&msg.payload[..], event.as_bytes());
    let metrics = app.get_admin("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("imbridge_bus_connected{engine=\"nats\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn daemon_starts_before_the_bus_and_waits_for_it() {
    // A server started and stopped only to reserve a port nobody listens on yet.
    let mut server = NatsServer::start();
    server.stop();
    let app = TestApp::start(&toml_with(&format!(
        "{}\n{MAIN_APP}",
        nats_bus(&server.url())
    )))
    .await;
    assert_eq!(app.get_admin("/readyz").await.status(), 503);
    let res = DingTalk::main()
        .callback(&approval_event("early"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 503);
    server.restart();
    app.wait_ready().await;
    let res = DingTalk::main()
        .callback(&approval_event("early"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(stored(&server).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn stalled_bus_times_out_with_503_and_retry_is_deduplicated() {
    let server = NatsServer::start();
    let app = nats_app(&server, "").await;
    let dt = DingTalk::main();
    let callback = dt.callback(&approval_event("stall"));
    server.signal("-STOP");
    let res = callback.post(&app, "main").await;
    server.signal("-CONT");
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["code"],
        "bus_unavailable"
    );
    // The timed-out publish may still have been stored once the server woke up; the retry
    // carries the same Nats-Msg-Id, so either way exactly one copy exists.
    app.wait_ready().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = callback.post(&app, "main").await;
        if res.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored(&server).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_publishes() {
    let server = NatsServer::start();
    // A publish timeout long enough to span the pause below.
    let app = TestApp::start(&toml_with(&format!(
        "shutdown_grace = \"15s\"\n{}\npublish_timeout = \"10s\"\n{MAIN_APP}",
        nats_bus(&server.url()).replace("publish_timeout = \"2s\"", "")
    )))
    .await;
    app.wait_ready().await;
    let dt = DingTalk::main();
    let event = approval_event("in-flight");
    let callback = dt.callback(&event);

    server.signal("-STOP");
    let http = app.http.clone();
    let url = app.url("/callbacks/dingtalk/main");
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .query(&callback.query)
            .body(callback.body)
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    });
    // Wait until the request is inside the handler, then start the shutdown.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.metrics.requests_in_flight.get() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !app.task.is_finished(),
        "shutdown must wait for the in-flight publish"
    );
    // New connections are no longer accepted.
    let refused = reqwest::Client::new()
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "listener still accepting during shutdown");
    server.signal("-CONT");

    let res = in_flight.await.unwrap();
    assert_eq!(res.status(), 200);
    dt.check_reply(&res.json().await.unwrap());
    tokio::time::timeout(WAIT, app.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stored(&server).await, 1);
}
