//! What only the NATS engine does, against a real `nats-server -js` started by each test: the
//! stream is created or updated, and plain subscribers see events live. The contract every
//! engine shares is in `bus_engines.rs`.

use std::time::Duration;

use crate::common::*;
use async_nats::jetstream;

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
    // Only once its own probe comes back is the subscription known to be in place on the
    // server (a flush alone left the event unseen now and then).
    client
        .publish("dingtalk.probe", "probe".into())
        .await
        .unwrap();
    let probe = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut sub))
        .await
        .expect("probe not received")
        .unwrap();
    assert_eq!(probe.subject.as_str(), "dingtalk.probe");
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
async fn a_tenant_id_with_line_breaks_is_carried_as_one_header_line() {
    // Signed by the platform, but still outside bytes: a CR/LF in a value that becomes a
    // header would split it (and the NATS client panics on it).
    let server = NatsServer::start();
    let app = nats_app(&server, "").await;
    let dt = DingTalk::main();
    let event = r#"{"EventType":"user_add_org","CorpId":"ding1\r\nX-Evil: 1","UserId":["u1"]}"#;
    assert_eq!(dt.callback(event).post(&app, "main").await.status(), 200);
    let msg = stream(&server)
        .await
        .get_last_raw_message_by_subject("dingtalk.user_add_org")
        .await
        .expect("stored");
    let headers = imbridge::bus::nats::header_pairs(Some(&msg.headers));
    let tenant = headers
        .iter()
        .find(|(k, _)| k == "imbridge-tenant")
        .unwrap();
    assert_eq!(tenant.1, "ding1  X-Evil: 1");
    assert!(!headers.iter().any(|(k, _)| k == "X-Evil"));
    app.stop().await;
}
