//! Checks the robot farm itself (tests/it/common/fakes.rs) with plain reqwest: signatures against
//! the shared vectors, the platforms' answers, the sliding-window limit and scripted answers.

use std::time::Duration;

use crate::common::fakes::{dingtalk_sign, lark_sign, Robot, RobotFarm, Scripted};
use crate::common::WAIT;
use serde_json::{json, Value};

fn vectors() -> Value {
    serde_json::from_str(include_str!("../data/platform-vectors.json")).unwrap()
}

async fn farm() -> RobotFarm {
    tokio::time::timeout(WAIT, RobotFarm::start())
        .await
        .expect("farm start timed out")
}

/// POSTs JSON and returns the status and the JSON answer.
async fn post(url: &str, query: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .query(query)
        .json(body)
        .timeout(WAIT)
        .send()
        .await
        .expect("request to the farm failed");
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.json::<Value>())
        .await
        .expect("body timed out")
        .expect("farm answers JSON");
    (status, body)
}

fn now_ms() -> u64 {
    imbridge::platform::now_ms()
}

fn text() -> Value {
    json!({ "msgtype": "text", "text": { "content": "hello" } })
}

#[test]
fn sign_helpers_match_the_vectors() {
    let v = vectors();
    let d = &v["dingtalk_robot_sign"];
    assert_eq!(
        dingtalk_sign(
            d["secret"].as_str().unwrap(),
            d["timestamp_ms"].as_u64().unwrap()
        ),
        d["expected_sign_base64"].as_str().unwrap()
    );
    let l = &v["lark"]["L5_custom_bot_sign"];
    let got = lark_sign(
        l["secret"].as_str().unwrap(),
        l["timestamp_s"].as_u64().unwrap(),
    );
    assert_eq!(got, l["expected_sign"].as_str().unwrap());
    assert_ne!(got, l["dingtalk_style_(WRONG_for_lark)"].as_str().unwrap());
}

#[tokio::test]
async fn dingtalk_signed_request_is_accepted() {
    let farm = farm().await;
    let secret = vectors()["dingtalk_robot_sign"]["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let url = farm.add(Robot::dingtalk("dt1").with_secret(&secret));
    assert!(url.ends_with("/robot/send?access_token=dt1"), "{url}");

    let ts = now_ms();
    let sign = dingtalk_sign(&secret, ts);
    let (status, answer) = post(
        &url,
        &[("timestamp", &ts.to_string()), ("sign", &sign)],
        &text(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({ "errcode": 0, "errmsg": "ok" }));
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());

    let got = farm.wait_accepted("dt1", 1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, text());
    assert!(got[0]
        .query
        .contains(&("sign".to_string(), sign.to_string())));
    assert_eq!(farm.requests("dt1"), 1);
}

#[tokio::test]
async fn dingtalk_bad_signatures_are_refused() {
    let farm = farm().await;
    let url = farm.add(Robot::dingtalk("dt2").with_secret("SECabc"));
    let ts = now_ms();

    // Signed with another secret.
    let wrong = dingtalk_sign("SECother", ts);
    let (_, answer) = post(
        &url,
        &[("timestamp", &ts.to_string()), ("sign", &wrong)],
        &text(),
    )
    .await;
    assert_eq!(answer["errcode"], 310000);
    assert_eq!(answer["errmsg"], "sign not match");

    // The vector's timestamp is years old: right sign, invalid timestamp.
    let old = 1_700_000_000_000;
    let (_, answer) = post(
        &url,
        &[
            ("timestamp", &old.to_string()),
            ("sign", &dingtalk_sign("SECabc", old)),
        ],
        &text(),
    )
    .await;
    assert_eq!(answer["errcode"], 310000);
    assert_eq!(answer["errmsg"], "invalid timestamp");

    // Seconds instead of milliseconds.
    let secs = ts / 1000;
    let (_, answer) = post(
        &url,
        &[
            ("timestamp", &secs.to_string()),
            ("sign", &dingtalk_sign("SECabc", secs)),
        ],
        &text(),
    )
    .await;
    assert_eq!(answer["errmsg"], "invalid timestamp");

    // A sign with a `+` pasted into the URL without encoding: the query parser reads a space.
    let (ts, sign) = (0..1000)
        .map(|k| (ts - k, dingtalk_sign("SECabc", ts - k)))
        .find(|(_, s)| s.contains('+'))
        .expect("some sign has a '+'");
    let raw = format!("{url}&timestamp={ts}&sign={sign}");
    let (_, answer) = post(&raw, &[], &text()).await;
    assert_eq!(answer["errmsg"], "sign not match");

    let v = farm.violations();
    assert_eq!(v.len(), 4, "{v:?}");
    assert!(v.iter().all(|v| v.starts_with("dingtalk sign")), "{v:?}");
    assert!(farm.accepted("dt2").is_empty());
    assert_eq!(farm.requests("dt2"), 4);
}

#[tokio::test]
async fn lark_signed_request_is_accepted_and_the_vector_is_too_old() {
    let farm = farm().await;
    let l5 = &vectors()["lark"]["L5_custom_bot_sign"];
    let secret = l5["secret"].as_str().unwrap();
    let url = farm.add(Robot::lark("lk1").with_secret(secret));
    assert!(url.ends_with("/open-apis/bot/v2/hook/lk1"), "{url}");

    let ts = now_ms() / 1000;
    let body = json!({
        "timestamp": ts.to_string(),
        "sign": lark_sign(secret, ts),
        "msg_type": "text",
        "content": { "text": "hello" },
    });
    let (status, answer) = post(&url, &[], &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({ "code": 0, "msg": "success", "data": {} }));
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    assert_eq!(farm.accepted("lk1")[0].body, body);

    // The vector's exact body: signed right, but more than an hour ago.
    let (_, answer) = post(&url, &[], &l5["expected_body"]).await;
    assert_eq!(answer["code"], 19021);
    let v = farm.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].starts_with("lark sign"), "{v:?}");
}

#[tokio::test]
async fn third_request_within_the_window_is_throttled() {
    let farm = farm().await;
    let url = farm.add(Robot::dingtalk("dt3").with_limits(vec![(2, Duration::from_secs(1))]));
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(post(&url, &[], &text()).await.1["errcode"].clone());
    }
    assert_eq!(answers, vec![json!(0), json!(0), json!(130101)]);
    let v = farm.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].starts_with("rate limit"), "{v:?}");
    assert_eq!(farm.requests("dt3"), 3);
    assert_eq!(farm.accepted("dt3").len(), 2);
    assert_eq!(farm.max_in_window("dt3", Duration::from_secs(1)), 3);
    assert_eq!(farm.max_in_window("dt3", Duration::ZERO), 0);

    // Once the window has passed, the robot takes messages again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&url, &[], &text()).await.1["errcode"], 0);
    assert_eq!(farm.violations().len(), 1);
}

#[tokio::test]
async fn scripted_answers_come_in_order_and_count_toward_the_limit() {
    let farm = farm().await;
    let url = farm.add(Robot::wecom("wc1").with_limits(vec![(5, Duration::from_secs(60))]));
    assert!(url.ends_with("/cgi-bin/webhook/send?key=wc1"), "{url}");
    farm.script(
        "wc1",
        vec![
            Scripted::Status(502),
            Scripted::ErrCode(-1),
            Scripted::Delay(Duration::from_millis(200)),
        ],
    );

    let (status, answer) = post(&url, &[], &text()).await;
    assert_eq!((status, answer), (502, json!({ "error": "scripted" })));
    let (status, answer) = post(&url, &[], &text()).await;
    assert_eq!(
        (status, answer),
        (200, json!({ "errcode": -1, "errmsg": "scripted" }))
    );
    let started = std::time::Instant::now();
    let (_, answer) = post(&url, &[], &text()).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(answer, json!({ "errcode": 0, "errmsg": "ok" }));
    assert_eq!(post(&url, &[], &text()).await.1["errcode"], 0);

    assert_eq!(farm.requests("wc1"), 4);
    assert_eq!(farm.accepted("wc1").len(), 2);
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());

    // Close: no answer before the client gives up.
    farm.script("wc1", vec![Scripted::Close]);
    let err = reqwest::Client::new()
        .post(&url)
        .json(&text())
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("a closed request gets no answer");
    assert!(err.is_timeout(), "{err}");

    // Six requests in the minute, the sixth breaks (5, 60s) although four were failures.
    assert_eq!(post(&url, &[], &text()).await.1["errcode"], 45009);
    assert_eq!(farm.violations().len(), 1);
}

#[tokio::test]
async fn bodies_are_checked() {
    let farm = farm().await;
    let wecom = farm.add(Robot::wecom("wc2"));
    let ding = farm.add(Robot::dingtalk("dt4"));
    let lark = farm.add(Robot::lark("lk2"));

    let long = "x".repeat(2049);
    let (_, a) = post(
        &wecom,
        &[],
        &json!({"msgtype":"text","text":{"content": long}}),
    )
    .await;
    assert_eq!(a["errcode"], 45002);
    let (_, a) = post(&wecom, &[], &json!({"msgtype":"sticker"})).await;
    assert_eq!(a["errcode"], 40008);
    let md = json!({"msgtype":"markdown","markdown":{"content":"**hi**"}});
    assert_eq!(post(&wecom, &[], &md).await.1["errcode"], 0);

    let (_, a) = post(
        &ding,
        &[],
        &json!({"msgtype":"markdown","markdown":{"text":"x"}}),
    )
    .await;
    assert_eq!(a["errcode"], 40035);
    let md = json!({"msgtype":"markdown","markdown":{"title":"t","text":"x"}});
    assert_eq!(post(&ding, &[], &md).await.1["errcode"], 0);

    // App-message style (content as a JSON string) is wrong for the webhook.
    let (_, a) = post(
        &lark,
        &[],
        &json!({"msg_type":"text","content":"{\"text\":\"hi\"}"}),
    )
    .await;
    assert_eq!(a["code"], 9499);
    let card = json!({"msg_type":"interactive","card":{"elements":[]}});
    assert_eq!(post(&lark, &[], &card).await.1["code"], 0);

    let v = farm.violations();
    assert_eq!(v.len(), 4, "{v:?}");
    assert!(v.iter().all(|v| v.starts_with("bad body")), "{v:?}");
}

#[tokio::test]
async fn unknown_tokens_get_the_platform_answer() {
    let farm = farm().await;
    let ding = farm.add(Robot::dingtalk("known"));
    let base = format!("http://{}", farm.addr());

    let (_, a) = post(&ding.replace("known", "nope"), &[], &text()).await;
    assert_eq!(a, json!({"errcode":300001,"errmsg":"token is not exist"}));
    // A DingTalk token on the WeCom path is not a WeCom robot.
    let (_, a) = post(
        &format!("{base}/cgi-bin/webhook/send?key=known"),
        &[],
        &text(),
    )
    .await;
    assert_eq!(a, json!({"errcode":93000,"errmsg":"invalid webhook url"}));
    let (_, a) = post(&format!("{base}/open-apis/bot/v2/hook/nope"), &[], &text()).await;
    assert_eq!(a["code"], 19001);

    assert_eq!(farm.requests("known"), 0);
    let v = farm.violations();
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v.iter().all(|v| v.starts_with("unknown token")), "{v:?}");
}
