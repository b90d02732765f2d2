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

/// Business subjects: `[apps.dingtalk.main.subjects]` appends the process code and the
/// instance's change type, so a subscriber picks one process with a plain wildcard; a value
/// that tries to add levels or wildcards stays one token, an absent one is `_`, `ce-type`
/// stays the event type, and an app without `subjects` publishes exactly today's subjects.
#[tokio::test]
async fn subscribers_pick_one_process_by_business_subject() {
    let server = NatsServer::start();
    let config = toml_with(&format!(
        r#"{bus}
        {MAIN_APP}
        [apps.dingtalk.main.subjects]
        bpms_instance_change = ["/processCode", "/type"]
        [apps.dingtalk.plain]
        token = "mryue"
        aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
        receiver_id = "ding6ccabc44d2c8d38b"
        "#,
        bus = nats_bus(&server.url())
    ));
    let app = TestApp::start(&config).await;
    app.wait_ready().await;
    let client = server.client().await;
    let mut proc1 = client
        .subscribe("dingtalk.bpms_instance_change.PROC-1.>")
        .await
        .unwrap();
    let mut all = client.subscribe("dingtalk.>").await.unwrap();
    client
        .publish("dingtalk.bpms_instance_change.PROC-1.probe", "probe".into())
        .await
        .unwrap();
    for sub in [&mut proc1, &mut all] {
        let probe = tokio::time::timeout(WAIT, futures::StreamExt::next(sub))
            .await
            .expect("probe not received")
            .unwrap();
        assert_eq!(probe.payload.as_ref(), b"probe");
    }

    let approval = |instance: &str, code: &str, ty: &str| {
        approval_event(instance)
            .replace("\"PROC-EXAMPLE\"", code)
            .replace("\"type\":\"finish\"", &format!("\"type\":\"{ty}\""))
    };
    let user = r#"{"EventType":"user_add_org","UserId":["u1"],"CorpId":"ding6ccabc44d2c8d38b","TimeStamp":"1608001896814"}"#;
    let sent = [
        ("main", approval("i1", "\"PROC-1\"", "start")),
        ("main", approval("i2", "\"PROC-2\"", "finish")),
        ("main", approval("i3", "\"PROC-1.>\"", "finish")),
        ("main", approval("i4", "null", "finish")),
        ("main", approval("i5", "\"PROC-1\"", "finish")),
        ("main", user.to_owned()),
        ("plain", approval("i6", "\"PROC-1\"", "finish")),
    ];
    let dt = DingTalk::main();
    for (name, event) in &sent {
        assert_eq!(dt.callback(event).post(&app, name).await.status(), 200);
    }
    let mut subjects = Vec::new();
    for _ in &sent {
        let msg = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut all))
            .await
            .expect("event not received")
            .unwrap();
        let headers = imbridge::bus::nats::header_pairs(msg.headers.as_ref());
        let ce_type = headers.iter().find(|(k, _)| k == "ce-type").unwrap();
        let want_type = msg.subject.split('.').take(2).collect::<Vec<_>>().join(".");
        assert_eq!(ce_type.1, want_type, "ce-type of {}", msg.subject);
        subjects.push(msg.subject.to_string());
    }
    assert_eq!(
        subjects,
        [
            "dingtalk.bpms_instance_change.PROC-1.start",
            "dingtalk.bpms_instance_change.PROC-2.finish",
            "dingtalk.bpms_instance_change.PROC-1__.finish",
            "dingtalk.bpms_instance_change._.finish",
            "dingtalk.bpms_instance_change.PROC-1.finish",
            "dingtalk.user_add_org",
            "dingtalk.bpms_instance_change",
        ]
    );
    let mut seen = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut proc1),
    )
    .await
    {
        seen.push(msg.subject.to_string());
    }
    assert_eq!(
        seen,
        [
            "dingtalk.bpms_instance_change.PROC-1.start",
            "dingtalk.bpms_instance_change.PROC-1.finish",
        ]
    );
    app.stop().await;
}
