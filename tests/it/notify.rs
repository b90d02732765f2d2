//! The notify pipeline end to end: messages published to `notify.<target>` (on the bus or
//! through `POST /notify/<target>`) reach a fake robot farm that checks every signature and
//! counts every rate-limit violation. Each scenario runs on every engine it applies to: the
//! in-process bus, a real nats-server and a real Kafka-protocol broker (tansu); those about
//! surviving the daemon (kill, handover between replicas) on the durable ones.

use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm, Scripted};
use crate::common::*;

const SECRET: &str = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const LARK_SECRET: &str = "demo-secret-abc";

/// Fast retry settings so failure scenarios finish in seconds.
const NOTIFY: &str = r#"
[notify]
retry_initial = "50ms"
retry_max = "200ms"
max_attempts = 4
request_timeout = "1s"
rate_limit_margin = "50ms"
requeue_delay = "200ms"
ack_wait = "2s"
"#;

fn target(name: &str, kind: &str, url: &str, extra: &str) -> String {
    format!("[targets.{name}]\nkind = \"{kind}\"\nurl = \"{url}\"\n{extra}\n")
}

async fn start(engine: &Engine, targets: &str) -> TestApp {
    start_with(engine, "", targets).await
}

/// `notify` is added to the `[notify]` section.
async fn start_with(engine: &Engine, notify: &str, targets: &str) -> TestApp {
    let app = TestApp::start(&toml_with(&format!(
        "{}\n{NOTIFY}\n{notify}\n{targets}",
        engine.toml()
    )))
    .await;
    app.wait_ready().await;
    app
}

async fn post(app: &TestApp, target: &str, body: serde_json::Value) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/notify/{target}")))
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
}

fn text_of(r: &crate::common::fakes::Received) -> String {
    let b = &r.body;
    b["text"]["content"]
        .as_str()
        .or(b["markdown"]["text"].as_str())
        .or(b["markdown"]["content"].as_str())
        .or(b["content"]["text"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn burst_of_100_arrives_once_each_within_the_window() {
    for engine in Engine::all() {
        let farm = RobotFarm::start().await;
        let url = farm.add(
            Robot::dingtalk("burst")
                .with_secret(SECRET)
                .with_limits(vec![(10, Duration::from_secs(1))]),
        );
        let app = start(
            &engine,
            &target(
                "ops",
                "dingtalk_robot",
                &url,
                &format!("secret = \"{SECRET}\"\nrate_limit = \"10/1s\""),
            ),
        )
        .await;
        for i in 0..100 {
            let res = post(
                &app,
                "ops",
                serde_json::json!({"text": format!("msg-{i}"), "format": "text"}),
            )
            .await;
            assert_eq!(res.status(), 202, "{}", engine.name());
        }
        let got = farm
            .wait_accepted("burst", 100, Duration::from_secs(60))
            .await;
        let mut texts: Vec<String> = got.iter().map(text_of).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 100, "{}: lost or duplicated", engine.name());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            farm.accepted("burst").len(),
            100,
            "{}: duplicates",
            engine.name()
        );
        assert!(
            farm.violations().is_empty(),
            "{}: {:?}",
            engine.name(),
            farm.violations()
        );
        assert!(farm.max_in_window("burst", Duration::from_secs(1)) <= 10);
        // It did have to wait for the limiter: 100 sends at 10/s take at least 9 s.
        let span = got.last().unwrap().at - got.first().unwrap().at;
        assert!(span >= Duration::from_secs(9), "{span:?}");
        app.stop().await;
    }
}

#[tokio::test]
async fn throttled_target_never_delays_another() {
    for engine in Engine::all() {
        let farm = RobotFarm::start().await;
        let slow = farm.add(Robot::wecom("slow").with_limits(vec![(2, Duration::from_secs(10))]));
        let fast = farm.add(Robot::lark("fast").with_secret(LARK_SECRET));
        // The flood is larger than a target's queue and than the catch-all's in-flight limit,
        // so a design where targets share in-flight slots would starve "fast".
        let app = start_with(
            &engine,
            "queue_capacity = 2\nmax_ack_pending = 4",
            &format!(
                "{}{}",
                target("slow", "wecom_robot", &slow, "rate_limit = \"2/10s\""),
                target(
                    "fast",
                    "lark_robot",
                    &fast,
                    &format!("secret = \"{LARK_SECRET}\"")
                ),
            ),
        )
        .await;
        for i in 0..10 {
            post(
                &app,
                "slow",
                serde_json::json!({"text": format!("slow-{i}")}),
            )
            .await;
        }
        farm.wait_accepted("slow", 2, WAIT).await;
        let sent = tokio::time::Instant::now();
        post(
            &app,
            "fast",
            serde_json::json!({"title": "T", "text": "fast one"}),
        )
        .await;
        farm.wait_accepted("fast", 1, Duration::from_secs(3)).await;
        assert!(sent.elapsed() < Duration::from_secs(3));
        // The slow target is still held back by its limit.
        assert_eq!(farm.accepted("slow").len(), 2, "{}", engine.name());
        assert!(farm.violations().is_empty(), "{:?}", farm.violations());
        let depth = app
            .metrics
            .notify_queue_depth
            .with_label_values(&["slow"])
            .get();
        assert!(depth > 0, "{}: queue depth {depth}", engine.name());
        app.stop().await;
    }
}

#[tokio::test]
async fn transient_failures_are_retried_until_delivered() {
    for engine in Engine::all() {
        let farm = RobotFarm::start().await;
        let url = farm.add(Robot::dingtalk("flaky").with_secret(SECRET));
        farm.script(
            "flaky",
            vec![
                Scripted::Status(500),
                Scripted::Close,           // no answer: the request times out
                Scripted::ErrCode(130101), // too fast: pause, keep the message
                Scripted::ErrCode(-1),     // system busy
            ],
        );
        let app = start(
            &engine,
            &target(
                "flaky",
                "dingtalk_robot",
                &url,
                &format!("secret = \"{SECRET}\"\npause_on_rate_limit = \"300ms\""),
            ),
        )
        .await;
        post(&app, "flaky", serde_json::json!({"text": "eventually"})).await;
        let got = farm.wait_accepted("flaky", 1, WAIT).await;
        assert_eq!(text_of(&got[0]), "eventually");
        let retries = app
            .metrics
            .notify_retries_total
            .with_label_values(&["flaky"])
            .get();
        assert_eq!(retries, 3, "{}", engine.name());
        let limited = app
            .metrics
            .notify_failed_total
            .with_label_values(&["flaky", "rate_limited"])
            .get();
        assert_eq!(limited, 1);
        // The farm records the request before the daemon has read the answer: wait for it.
        let sent = app.metrics.notify_sent_total.with_label_values(&["flaky"]);
        let deadline = tokio::time::Instant::now() + WAIT;
        while sent.get() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sent.get(), 1);
        // Exactly one delivery accepted: none of the failed attempts was.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(farm.accepted("flaky").len(), 1);
        app.stop().await;
    }
}

#[tokio::test]
async fn wait_true_answers_with_the_platform_result() {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::lark("sync").with_secret(LARK_SECRET));
    let app = start(
        &Engine::Memory,
        &target(
            "sync",
            "lark_robot",
            &url,
            &format!("secret = \"{LARK_SECRET}\""),
        ),
    )
    .await;
    let res = app
        .http
        .post(app.url("/notify/sync?wait=true"))
        .json(&serde_json::json!({"text": "now", "format": "text"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "delivered");
    assert_eq!(body["answer"]["code"], 0);
    assert_eq!(farm.accepted("sync").len(), 1);

    farm.script("sync", vec![Scripted::ErrCode(19021)]);
    let res = app
        .http
        .post(app.url("/notify/sync?wait=true"))
        .json(&serde_json::json!({"text": "refused"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "permanent");
    assert_eq!(body["answer"]["code"], 19021);
    // The outcome and code only: the platform's answer body is not passed on.
    assert!(body["answer"].get("body").is_none(), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn http_refusals() {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::wecom("w"));
    let app = start(&Engine::Memory, &target("w", "wecom_robot", &url, "")).await;
    let res = post(&app, "nosuch", serde_json::json!({"text": "x"})).await;
    assert_eq!(res.status(), 404);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["code"],
        "unknown_target"
    );
    for bad in [
        serde_json::json!({"text": "x", "colour": "red"}),
        serde_json::json!({"title": "no text"}),
        serde_json::json!([1, 2]),
    ] {
        let res = post(&app, "w", bad).await;
        assert_eq!(res.status(), 400);
        assert_eq!(
            res.json::<serde_json::Value>().await.unwrap()["code"],
            "invalid_message"
        );
    }
    let res = app
        .http
        .post(app.url("/notify/w"))
        .header("idempotency-key", "bad key with spaces")
        .json(&serde_json::json!({"text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        app.metrics
            .notify_requests_total
            .with_label_values(&["_unknown", "unknown_target"])
            .get(),
        1
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(farm.requests("w"), 0, "refused requests must not be sent");
    app.stop().await;

    // Nothing consumes notify.> in this process: the in-process bus would drop it.
    let app = start_with(
        &Engine::Memory,
        "enabled = false",
        &target("w", "wecom_robot", &url, ""),
    )
    .await;
    let res = post(&app, "w", serde_json::json!({"text": "x"})).await;
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["code"],
        "notify_disabled"
    );
    app.stop().await;
}

#[tokio::test]
async fn zentao_webhook_posted_as_form_and_json_arrives_rendered() {
    let farm = RobotFarm::start().await;
    let wecom = farm.add(Robot::wecom("zt-wecom"));
    let ding = farm.add(Robot::dingtalk("zt-ding").with_secret(SECRET));
    let app = start(
        &Engine::Memory,
        &format!(
            "{}{}",
            target("zentao-wecom", "wecom_robot", &wecom, ""),
            target(
                "zentao-ding",
                "dingtalk_robot",
                &ding,
                &format!("secret = \"{SECRET}\"")
            ),
        ),
    )
    .await;
    let form = "objectType=bug&objectID=12&product=%2C1%2C&execution=3&action=opened&actor=zhangsan&date=2024-01-01+10%3A00%3A00&comment=&text=%E5%BC%A0%E4%B8%89%E5%88%9B%E5%BB%BA%E4%BA%86Bug+%5B%2312%3A%3ALogin+fails%5D%28https%3A%2F%2Fzentao.example.com%2Fbug-view-12.html%29";
    let res = app
        .http
        .post(app.url("/notify/zentao-wecom"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded;charset=utf-8",
        )
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let got = farm.wait_accepted("zt-wecom", 1, WAIT).await;
    assert_eq!(got[0].body["msgtype"], "markdown");
    let content = got[0].body["markdown"]["content"].as_str().unwrap();
    assert!(
        content.contains("张三创建了Bug #12::Login fails"),
        "{content}"
    );
    assert!(content.contains("[#12::Login fails](https://zentao.example.com/bug-view-12.html)"));
    assert!(content.contains("2024-01-01 10:00:00"));

    // JSON labelled as a form (curl's default) is still JSON.
    let res = app
        .http
        .post(app.url("/notify/zentao-wecom"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"text":"curl default","format":"text"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let got = farm.wait_accepted("zt-wecom", 2, WAIT).await;
    assert_eq!(got[1].body["text"]["content"], "curl default");

    let json = serde_json::json!({"objectType":"task","objectID":"7","product":",2,","project":"4","action":"finished","actor":"lisi","date":"2024-02-02 09:00:00","comment":"","text":"李四完成了任务 [#7::Deploy](https://zentao.example.com/task-view-7.html)"});
    assert_eq!(post(&app, "zentao-ding", json).await.status(), 202);
    let got = farm.wait_accepted("zt-ding", 1, WAIT).await;
    assert_eq!(got[0].body["msgtype"], "markdown");
    assert_eq!(
        got[0].body["markdown"]["title"],
        "李四完成了任务 #7::Deploy"
    );
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

#[tokio::test]
async fn mentions_and_long_messages_reach_each_platform_as_expected() {
    let farm = RobotFarm::start().await;
    let d = farm.add(Robot::dingtalk("m-ding").with_secret(SECRET));
    let w = farm.add(Robot::wecom("m-wecom"));
    let l = farm.add(Robot::lark("m-lark").with_secret(LARK_SECRET));
    let app = start(
        &Engine::Memory,
        &format!(
            "{}{}{}",
            target("d", "dingtalk_robot", &d, &format!("secret = \"{SECRET}\"")),
            target("w", "wecom_robot", &w, "max_bytes = 200"),
            target(
                "l",
                "lark_robot",
                &l,
                // Mentioning everyone is a broadcast.
                &format!("secret = \"{LARK_SECRET}\"\nallow_broadcast = true")
            ),
        ),
    )
    .await;
    let mention = serde_json::json!({
        "text": "deploy done", "format": "text",
        "mentions": {"mobiles": ["13800000000"], "user_ids": ["u1"], "all": false}
    });
    post(&app, "d", mention.clone()).await;
    let got = farm.wait_accepted("m-ding", 1, WAIT).await;
    assert_eq!(
        got[0].body,
        serde_json::json!({
            "msgtype": "text",
            "text": {"content": "deploy done\n\n@13800000000 @u1"},
            "at": {"atMobiles": ["13800000000"], "atUserIds": ["u1"], "isAtAll": false}
        })
    );
    post(&app, "w", mention.clone()).await;
    let got = farm.wait_accepted("m-wecom", 1, WAIT).await;
    assert_eq!(
        got[0].body,
        serde_json::json!({
            "msgtype": "text",
            "text": {"content": "deploy done", "mentioned_list": ["u1"], "mentioned_mobile_list": ["13800000000"]}
        })
    );
    post(&app, "l", serde_json::json!({"text": "hi", "format": "text", "mentions": {"user_ids": ["ou_x"], "all": true}})).await;
    let got = farm.wait_accepted("m-lark", 1, WAIT).await;
    assert_eq!(got[0].body["msg_type"], "text");
    let text = got[0].body["content"]["text"].as_str().unwrap();
    assert!(text.starts_with("hi"), "{text}");
    assert!(text.contains(r#"<at user_id="ou_x"></at>"#) && text.contains(r#"<at user_id="all">"#));

    // 1000 bytes of Chinese text to a WeCom target limited to 200 bytes: several parts, each
    // within the limit, that rejoin to the original.
    let long: String = "进度更新。".repeat(67);
    post(
        &app,
        "w",
        serde_json::json!({"text": long, "format": "text"}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let parts = loop {
        // Complete once the last part arrived: it is marked (k/k).
        let parts: Vec<_> = farm.accepted("m-wecom")[1..].to_vec();
        let k = parts.len();
        let last = parts
            .last()
            .map(|p| p.body["text"]["content"].as_str().unwrap().to_owned());
        if k > 1 && last.is_some_and(|c| c.starts_with(&format!("({k}/{k}) "))) {
            break parts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} parts",
            parts.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut rejoined = String::new();
    for (i, p) in parts.iter().enumerate() {
        let content = p.body["text"]["content"].as_str().unwrap();
        assert!(content.len() <= 200, "part {i} has {} bytes", content.len());
        let prefix = format!("({}/{}) ", i + 1, parts.len());
        rejoined.push_str(
            content
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{content}")),
        );
    }
    assert_eq!(rejoined, long);
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

#[tokio::test]
async fn permanent_failures_and_bad_messages_are_dead_lettered() {
    for engine in Engine::all() {
        let name = engine.name();
        let farm = RobotFarm::start().await;
        let url = farm.add(Robot::dingtalk("perm").with_secret(SECRET));
        farm.script("perm", vec![Scripted::ErrCode(310000)]);
        let busy = farm.add(Robot::wecom("busy"));
        farm.script("busy", vec![Scripted::Status(502); 4]);
        let slow = farm.add(Robot::wecom("slowpoke"));
        let app = start_with(
            &engine,
            "max_wait = \"2s\"",
            &format!(
                "{}{}{}",
                target(
                    "perm",
                    "dingtalk_robot",
                    &url,
                    &format!("secret = \"{SECRET}\"")
                ),
                target("busy", "wecom_robot", &busy, ""),
                target("slowpoke", "wecom_robot", &slow, "rate_limit = \"1/1m\""),
            ),
        )
        .await;
        let mut perm = engine.watch(&app, "dlq.notify.perm");
        let mut busy = engine.watch(&app, "dlq.notify.busy");
        let mut slowpoke = engine.watch(&app, "dlq.notify.slowpoke");
        let mut nobody = engine.watch(&app, "dlq.notify.nobody");
        post(&app, "perm", serde_json::json!({"text": "will fail"})).await;
        // Four 502s with max_attempts = 4: attempts exhausted.
        post(&app, "busy", serde_json::json!({"text": "never accepted"})).await;
        // The second message cannot get a slot within max_wait: expired.
        post(&app, "slowpoke", serde_json::json!({"text": "first"})).await;
        post(&app, "slowpoke", serde_json::json!({"text": "second"})).await;
        // Published straight on the bus: to a target nobody configured, and a body that is no
        // notification.
        engine
            .publish(Some(&app), "notify.nobody", br#"{"text":"lost?"}"#)
            .await;
        engine.publish(Some(&app), "notify.perm", b"not json").await;

        let mut letters = perm.next(&engine, 2).await;
        letters.sort_by_key(|l| l.header("imbridge-dlq-reason").map(str::to_owned));
        let (bad, failed) = (&letters[0], &letters[1]);
        assert_eq!(
            bad.header("imbridge-dlq-reason"),
            Some("invalid_message"),
            "{name}"
        );
        assert_eq!(bad.payload, b"not json", "{name}");
        assert_eq!(
            failed.header("imbridge-dlq-reason"),
            Some("permanent"),
            "{name}"
        );
        assert_eq!(failed.subject, "dlq.notify.perm");
        assert_eq!(failed.payload, br#"{"text":"will fail"}"#, "{name}");
        assert_eq!(failed.header("imbridge-dlq-attempts"), Some("1"), "{name}");
        assert_eq!(failed.header("imbridge-dlq-target"), Some("perm"), "{name}");
        assert!(failed
            .header("imbridge-dlq-answer")
            .unwrap()
            .contains("310000"));
        assert!(
            failed.header(&engine.ce("id")).is_some(),
            "{name}: original headers are kept: {:?}",
            failed.headers
        );
        if let Engine::Kafka(_) = engine {
            assert_eq!(failed.key.as_deref(), Some("perm"), "keyed by target");
        }

        let letter = &busy.next(&engine, 1).await[0];
        assert_eq!(
            letter.header("imbridge-dlq-reason"),
            Some("attempts_exhausted")
        );
        assert_eq!(letter.header("imbridge-dlq-attempts"), Some("4"), "{name}");
        assert!(letter
            .header("imbridge-dlq-answer")
            .unwrap()
            .contains("scripted"));

        let letter = &slowpoke.next(&engine, 1).await[0];
        assert_eq!(
            letter.header("imbridge-dlq-reason"),
            Some("expired"),
            "{name}"
        );
        assert_eq!(letter.payload, br#"{"text":"second"}"#, "{name}");
        assert_eq!(farm.accepted("slowpoke").len(), 1, "{name}");

        let letter = &nobody.next(&engine, 1).await[0];
        assert_eq!(
            letter.header("imbridge-dlq-reason"),
            Some("unknown_target"),
            "{name}"
        );
        assert_eq!(letter.payload, br#"{"text":"lost?"}"#, "{name}");
        assert_eq!(
            app.metrics
                .notify_dead_letters_total
                .with_label_values(&["_unknown", "unknown_target"])
                .get(),
            1,
            "{name}"
        );
        if let Engine::Nats(server) = &engine {
            // Everything was acknowledged: the work queue is empty.
            let js = async_nats::jetstream::new(server.client().await);
            let mut stream = js.get_stream("IMBRIDGE_NOTIFY").await.unwrap();
            let deadline = tokio::time::Instant::now() + WAIT;
            while stream.info().await.unwrap().state.messages != 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "messages left unacknowledged"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(farm.violations().is_empty(), "{:?}", farm.violations());
        app.stop().await;
    }
}

/// The sends each replica has finished (the farm records a request before its daemon has read
/// the answer, so wait until they add up to `total`).
async fn sent_by(a: &TestApp, b: &TestApp, target: &str, total: u64) -> (u64, u64) {
    let sent_a = a.metrics.notify_sent_total.with_label_values(&[target]);
    let sent_b = b.metrics.notify_sent_total.with_label_values(&[target]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while sent_a.get() + sent_b.get() < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (sent_a.get(), sent_b.get())
}

#[tokio::test]
async fn two_replicas_together_respect_the_limit() {
    for engine in Engine::durable() {
        let name = engine.name();
        let farm = RobotFarm::start().await;
        let url =
            farm.add(Robot::dingtalk("shared").with_limits(vec![(4, Duration::from_secs(1))]));
        let targets = target("shared", "dingtalk_robot", &url, "rate_limit = \"4/1s\"");
        // Small queues, so neither replica can hold every message.
        let small = || {
            toml_with(&format!(
                "{}\n{NOTIFY}\nqueue_capacity = 3\n{targets}",
                engine.toml()
            ))
        };
        let a = TestApp::start(&small()).await;
        let b = TestApp::start(&small()).await;
        a.wait_ready().await;
        b.wait_ready().await;
        for i in 0..32 {
            let app = if i % 2 == 0 { &a } else { &b };
            let res = post(app, "shared", serde_json::json!({"text": format!("r-{i}")})).await;
            assert_eq!(res.status(), 202, "{name}");
        }
        let got = farm
            .wait_accepted("shared", 32, Duration::from_secs(60))
            .await;
        let mut texts: Vec<String> = got.iter().map(text_of).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 32, "{name}");
        assert!(
            farm.violations().is_empty(),
            "{name}: {:?}",
            farm.violations()
        );
        assert!(farm.max_in_window("shared", Duration::from_secs(1)) <= 4);
        let (sent_a, sent_b) = sent_by(&a, &b, "shared", 32).await;
        assert_eq!(sent_a + sent_b, 32, "{name}");
        // On NATS both replicas pull from the target's consumer; on Kafka the target's one
        // partition belongs to one replica of the group.
        if let Engine::Nats(_) = engine {
            assert!(
                sent_a > 0 && sent_b > 0,
                "both deliver: {sent_a} + {sent_b}"
            );
        }
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test]
async fn a_target_moving_to_another_replica_keeps_its_limit() {
    for engine in Engine::durable() {
        let name = engine.name();
        let farm = RobotFarm::start().await;
        // A window longer than a rebalance takes, so the new owner must know the old one's
        // sends to stay within it.
        let window = Duration::from_secs(4);
        let url = farm.add(Robot::wecom("moving").with_limits(vec![(3, window)]));
        let config = toml_with(&format!(
            "{}\n{NOTIFY}\nqueue_capacity = 3\n{}",
            engine.toml(),
            target("moving", "wecom_robot", &url, "rate_limit = \"3/4s\"")
        ));
        let a = TestApp::start(&config).await;
        let b = TestApp::start(&config).await;
        a.wait_ready().await;
        b.wait_ready().await;
        for i in 0..9 {
            let res = post(&a, "moving", serde_json::json!({"text": format!("m-{i}")})).await;
            assert_eq!(res.status(), 202, "{name}");
        }
        // The first window's sends are made; stop whichever replica made them, so the rest is
        // delivered by the other (on Kafka, after the target's partition moved to it).
        farm.wait_accepted("moving", 3, WAIT).await;
        let (sent_a, _) = sent_by(&a, &b, "moving", 3).await;
        let (stopping, staying) = if sent_a > 0 { (a, b) } else { (b, a) };
        stopping.stop().await;
        let got = farm
            .wait_accepted("moving", 9, Duration::from_secs(60))
            .await;
        let mut texts: Vec<String> = got.iter().map(text_of).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 9, "{name}: lost or duplicated");
        assert!(
            farm.violations().is_empty(),
            "{name}: {:?}",
            farm.violations()
        );
        assert!(farm.max_in_window("moving", window) <= 3, "{name}");
        let sent = staying
            .metrics
            .notify_sent_total
            .with_label_values(&["moving"]);
        let deadline = tokio::time::Instant::now() + WAIT;
        while sent.get() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sent.get() > 0, "{name}: the other replica took over");
        staying.stop().await;
    }
}

#[tokio::test]
async fn killed_mid_delivery_loses_nothing() {
    for engine in Engine::durable() {
        let name = engine.name();
        let farm = RobotFarm::start().await;
        let url = farm.add(Robot::wecom("kill"));
        // The first request hangs (the daemon is mid-delivery when it is killed).
        farm.script("kill", vec![Scripted::Delay(Duration::from_secs(30))]);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("imbridge.toml");
        std::fs::write(
            &config,
            toml_with(&format!(
                "{}\n{NOTIFY}\n{}",
                engine.toml(),
                target("kill", "wecom_robot", &url, "")
            ))
            .replace("request_timeout = \"1s\"", "request_timeout = \"60s\""),
        )
        .unwrap();
        let spawn = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
                .args(["serve", "--config", config.to_str().unwrap()])
                .env_clear()
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut first = spawn();
        // Published straight on the bus, once it keeps notify.kill for the daemon.
        engine.wait_notify_kept("kill").await;
        engine
            .publish(None, "notify.kill", br#"{"text":"survives"}"#)
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while farm.requests("kill") == 0 {
            assert!(tokio::time::Instant::now() < deadline, "{name}: never sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.kill().unwrap();
        first.wait().unwrap();
        assert!(farm.accepted("kill").is_empty());
        let mut second = spawn();
        let got = farm.wait_accepted("kill", 1, WAIT).await;
        assert_eq!(got[0].body["markdown"]["content"], "survives", "{name}");
        second.kill().unwrap();
        second.wait().unwrap();
    }
}

#[tokio::test]
async fn wait_true_delivers_through_the_shared_limiter_on_a_replica_that_does_not_consume() {
    // On Kafka the limiter follows its log topic before any send; the topic must exist even
    // where this replica runs no notify consumer.
    let engine = Engine::kafka();
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::wecom("direct"));
    let app = start_with(
        &engine,
        "enabled = false",
        &target("direct", "wecom_robot", &url, ""),
    )
    .await;
    let res = app
        .http
        .post(app.url("/notify/direct?wait=true"))
        .json(&serde_json::json!({"text": "now"}))
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["status"],
        "delivered"
    );
    assert_eq!(farm.accepted("direct").len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_bad_request_answer_fails_its_message_without_pausing_the_bot() {
    // Lark's 9499 is "bad request": were it taken as "too fast", one crafted message would
    // pause the bot for everyone (the default pause is a minute).
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::lark("lk").with_secret(LARK_SECRET));
    let app = start(
        &Engine::Memory,
        &target(
            "lk",
            "lark_robot",
            &url,
            &format!("secret = \"{LARK_SECRET}\""),
        ),
    )
    .await;
    farm.script("lk", vec![Scripted::ErrCode(9499)]);
    let res = post(
        &app,
        "lk",
        serde_json::json!({"text": "crafted", "format": "text"}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let res = post(
        &app,
        "lk",
        serde_json::json!({"text": "next", "format": "text"}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let got = farm.wait_accepted("lk", 1, Duration::from_secs(5)).await;
    assert_eq!(text_of(&got[0]), "next");
    let dead = app
        .metrics
        .notify_dead_letters_total
        .with_label_values(&["lk", "permanent"])
        .get();
    assert_eq!(dead, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_a_conflict() {
    let farm = RobotFarm::start().await;
    let url = farm.add(Robot::wecom("idem"));
    let app = start(&Engine::Memory, &target("idem", "wecom_robot", &url, "")).await;
    let send = |text: &'static str| {
        app.http
            .post(app.url("/notify/idem"))
            .header("idempotency-key", "order-42")
            .json(&serde_json::json!({ "text": text, "format": "text" }))
            .timeout(WAIT)
            .send()
    };
    let first = send("shipped").await.unwrap();
    assert_eq!(first.status(), 202);
    let id = first.json::<serde_json::Value>().await.unwrap()["id"].clone();
    let again = send("shipped").await.unwrap();
    assert_eq!(again.status(), 202, "a retry of the same message");
    assert_eq!(again.json::<serde_json::Value>().await.unwrap()["id"], id);
    let other = send("cancelled").await.unwrap();
    assert_eq!(other.status(), 409);
    assert_eq!(
        other.json::<serde_json::Value>().await.unwrap()["code"],
        "idempotency_conflict"
    );
    let got = farm.wait_accepted("idem", 1, WAIT).await;
    assert_eq!(text_of(&got[0]), "shipped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(farm.accepted("idem").len(), 1);
    app.stop().await;
}
