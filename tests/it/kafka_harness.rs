//! Self-test of the Kafka harness against a real tansu broker: records go in and come back byte
//! for byte; a consumer group subscribed by regex picks up new topics, commits, and a new
//! member resumes after the committed offsets; a restarted broker answers again (empty).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::kafka::{self, Record, Tansu};
use crate::common::WAIT;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;

#[tokio::test]
async fn records_come_back_byte_for_byte() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    let payloads: [&[u8]; 3] = [
        b"{\"n\":0}",
        b"\x00\xff binary \xfe",
        "张三 提交".as_bytes(),
    ];
    for (i, payload) in payloads.iter().enumerate() {
        let id = format!("id-{i}");
        let headers = [("ce-id", id.as_str()), ("content-type", "application/json")];
        kafka::produce(
            &brokers,
            "dingtalk.x",
            Some(&format!("k{i}")),
            &headers,
            payload,
        )
        .await;
    }

    let got = kafka::records(&brokers, "dingtalk.x", 3).await;
    let want: Vec<Record> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| Record {
            topic: "dingtalk.x".into(),
            partition: 0,
            offset: i as i64,
            key: Some(format!("k{i}").into_bytes()),
            headers: vec![
                ("ce-id".into(), format!("id-{i}")),
                ("content-type".into(), "application/json".into()),
            ],
            payload: payload.to_vec(),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(kafka::count(&brokers, "dingtalk.x").await, 3);
    assert_eq!(kafka::count(&brokers, "no.such.topic").await, 0);
}

/// A consumer of `group` with the settings the daemon's engine uses.
fn group_consumer(brokers: &str, group: &str) -> StreamConsumer {
    let consumer: StreamConsumer = kafka::config(brokers)
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Regex subscriptions are matched by the client against its metadata: this bounds how
        // soon a topic created later is picked up.
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .unwrap();
    // librdkafka treats a topic starting with `^` as a regex.
    consumer.subscribe(&["^notify\\..+"]).unwrap();
    consumer
}

/// The next message as (topic, offset, payload).
async fn next(consumer: &StreamConsumer) -> (String, i64, Vec<u8>) {
    let msg = tokio::time::timeout(WAIT, consumer.recv())
        .await
        .expect("no message within WAIT")
        .expect("consume");
    let payload = msg.payload().unwrap_or_default().to_vec();
    (msg.topic().to_owned(), msg.offset(), payload)
}

#[tokio::test]
async fn group_regex_subscription_commits_and_resumes() {
    let tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka::produce(&brokers, "notify.a", None, &[], b"a0").await;
    kafka::produce(&brokers, "notify.a", None, &[], b"a1").await;
    kafka::produce(&brokers, "notify.b", None, &[], b"b0").await;
    kafka::produce(&brokers, "other", None, &[], b"not matched").await;

    let first = group_consumer(&brokers, "workers");
    let mut got = BTreeSet::new();
    for _ in 0..3 {
        got.insert(next(&first).await);
    }
    let want = BTreeSet::from([
        ("notify.a".to_owned(), 0, b"a0".to_vec()),
        ("notify.a".to_owned(), 1, b"a1".to_vec()),
        ("notify.b".to_owned(), 0, b"b0".to_vec()),
    ]);
    assert_eq!(got, want);

    // A topic created after subscribing is picked up at the next metadata refresh, through a
    // rebalance that restarts every partition from its committed offset: commit first, or
    // what was consumed is delivered again.
    first.commit_consumer_state(CommitMode::Sync).unwrap();
    let created = Instant::now();
    kafka::produce(&brokers, "notify.c", None, &[], b"c0").await;
    assert_eq!(
        next(&first).await,
        ("notify.c".to_owned(), 0, b"c0".to_vec())
    );
    println!("notify.c picked up after {:?}", created.elapsed());

    first.commit_consumer_state(CommitMode::Sync).unwrap();
    // The list must not outlive the consumer: its elements hold librdkafka partition handles,
    // and destroying the consumer waits for them forever.
    let offsets: BTreeSet<_> = first
        .committed(WAIT)
        .unwrap()
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition(), e.offset().to_raw()))
        .collect();
    let want = BTreeSet::from([
        ("notify.a".to_owned(), 0, Some(2)),
        ("notify.b".to_owned(), 0, Some(1)),
        ("notify.c".to_owned(), 0, Some(1)),
    ]);
    assert_eq!(offsets, want);
    // Dropping closes the consumer: it leaves the group.
    drop(first);

    kafka::produce(&brokers, "notify.a", None, &[], b"a2").await;
    let second = group_consumer(&brokers, "workers");
    assert_eq!(
        next(&second).await,
        ("notify.a".to_owned(), 2, b"a2".to_vec())
    );
    // Nothing before the committed offsets is delivered again.
    let again = tokio::time::timeout(Duration::from_secs(2), second.recv()).await;
    assert!(
        again.is_err(),
        "unexpected redelivery: {:?}",
        again.map(|m| m.map(|m| m.detach()))
    );
}

#[tokio::test]
async fn restarted_broker_answers_again_empty() {
    let mut tansu = Tansu::start();
    let brokers = tansu.brokers();
    kafka::produce(&brokers, "dingtalk.y", None, &[], b"before").await;
    assert_eq!(kafka::count(&brokers, "dingtalk.y").await, 1);

    tansu.stop();
    tansu.restart();
    assert_eq!(tansu.brokers(), brokers);
    // Memory storage: the topic and its record are gone.
    assert!(kafka::partitions(&brokers, "dingtalk.y").await.is_empty());
    kafka::produce(&brokers, "dingtalk.y", None, &[], b"after").await;
    let got = kafka::records(&brokers, "dingtalk.y", 1).await;
    assert_eq!(
        (got[0].offset, got[0].payload.as_slice()),
        (0, &b"after"[..])
    );
}
