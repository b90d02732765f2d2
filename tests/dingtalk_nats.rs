//! What only the NATS engine does, against a real `nats-server -js` started by each test: the
//! stream is created or updated, plain subscribers see events live, a stalled server times out
//! with 503 and the retry is deduplicated by `Nats-Msg-Id`, and a shutdown lets an in-flight
//! publish finish. The contract every engine shares is in `bus_engines.rs`.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;

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
async fn stream_holds_every_platform_with_the_duplicate_window() {
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
