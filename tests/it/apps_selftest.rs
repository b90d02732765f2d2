//! Checks the app farm itself (tests/it/common/apps.rs) with plain reqwest: tokens and their
//! expiry, credentials, every body check both ways, recipients, limits, Lark's uuid
//! deduplication and scripted answers.

use std::time::Duration;

use crate::common::apps::{AppFarm, DingTalkApp, LarkApp, Scripted, WeComApp};
use crate::common::WAIT;
use serde_json::{json, Value};

const DT: &str = "dingkey";
const DT_SECRET: &str = "dt+secret/=";
const DT_AGENT: u64 = 123456;
const WC: &str = "ww0123456789";
const WC_SECRET: &str = "wc-secret";
const WC_AGENT: u64 = 1000002;
const LK: &str = "cli_a1b2";
const LK_SECRET: &str = "lk-secret";

/// Lark allows 5 sends a second per tenant: tests that are not about the limit keep under it.
const LARK_PACE: Duration = Duration::from_millis(250);

async fn farm() -> AppFarm {
    let farm = tokio::time::timeout(WAIT, AppFarm::start())
        .await
        .expect("farm start timed out");
    farm.add_dingtalk(DingTalkApp {
        app_key: DT.into(),
        app_secret: DT_SECRET.into(),
        agent_id: DT_AGENT,
        users: vec!["alice".into(), "bob".into()],
    });
    farm.add_wecom(WeComApp {
        corp_id: WC.into(),
        secret: WC_SECRET.into(),
        agent_id: WC_AGENT,
        users: vec!["alice".into(), "bob".into()],
    });
    farm.add_lark(LarkApp {
        app_id: LK.into(),
        app_secret: LK_SECRET.into(),
        users: vec!["ou_alice".into(), "bob@example.com".into()],
    });
    farm
}

/// Status and JSON answer of a response.
async fn answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.json::<Value>())
        .await
        .expect("body timed out")
        .expect("farm answers JSON");
    (status, body)
}

async fn get(url: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(url)
        .query(query)
        .timeout(WAIT)
        .send()
        .await
        .expect("request to the farm failed");
    answer(resp).await
}

async fn post(
    url: &str,
    query: &[(&str, &str)],
    bearer: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .query(query)
        .json(body)
        .timeout(WAIT);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    answer(req.send().await.expect("request to the farm failed")).await
}

async fn dingtalk_token(farm: &AppFarm, key: &str, secret: &str) -> Value {
    let url = format!("{}/gettoken", farm.base_url());
    get(&url, &[("appkey", key), ("appsecret", secret)]).await.1
}

async fn wecom_token(farm: &AppFarm, corp: &str, secret: &str) -> Value {
    let url = format!("{}/cgi-bin/gettoken", farm.base_url());
    get(&url, &[("corpid", corp), ("corpsecret", secret)])
        .await
        .1
}

async fn lark_token(farm: &AppFarm, id: &str, secret: &str) -> Value {
    let url = format!(
        "{}/open-apis/auth/v3/tenant_access_token/internal",
        farm.base_url()
    );
    let body = json!({ "app_id": id, "app_secret": secret });
    post(&url, &[], None, &body).await.1
}

/// A fresh token for each app, by their right secrets.
async fn tokens(farm: &AppFarm) -> (String, String, String) {
    let d = dingtalk_token(farm, DT, DT_SECRET).await;
    let w = wecom_token(farm, WC, WC_SECRET).await;
    let l = lark_token(farm, LK, LK_SECRET).await;
    let s = |v: &Value, k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .to_string()
    };
    (
        s(&d, "access_token"),
        s(&w, "access_token"),
        s(&l, "tenant_access_token"),
    )
}

async fn dingtalk_send(farm: &AppFarm, token: &str, body: &Value) -> Value {
    let url = format!(
        "{}/topapi/message/corpconversation/asyncsend_v2",
        farm.base_url()
    );
    let (status, a) = post(&url, &[("access_token", token)], None, body).await;
    assert_eq!(status, 200, "{a}");
    a
}

async fn wecom_send(farm: &AppFarm, token: &str, body: &Value) -> Value {
    let url = format!("{}/cgi-bin/message/send", farm.base_url());
    let (status, a) = post(&url, &[("access_token", token)], None, body).await;
    assert_eq!(status, 200, "{a}");
    a
}

/// Sends unpaced: only for the tenant-limit test.
async fn lark_send_now(farm: &AppFarm, token: &str, id_type: &str, body: &Value) -> (u16, Value) {
    let url = format!("{}/open-apis/im/v1/messages", farm.base_url());
    post(&url, &[("receive_id_type", id_type)], Some(token), body).await
}

async fn lark_send(farm: &AppFarm, token: &str, id_type: &str, body: &Value) -> (u16, Value) {
    tokio::time::sleep(LARK_PACE).await;
    lark_send_now(farm, token, id_type, body).await
}

fn dingtalk_text(users: &str) -> Value {
    json!({
        "agent_id": DT_AGENT,
        "userid_list": users,
        "msg": { "msgtype": "text", "text": { "content": "hello" } },
    })
}

fn wecom_text(users: &str) -> Value {
    json!({
        "touser": users,
        "agentid": WC_AGENT,
        "msgtype": "text",
        "text": { "content": "hello" },
    })
}

fn lark_text(receive_id: &str) -> Value {
    json!({
        "receive_id": receive_id,
        "msg_type": "text",
        "content": json!({ "text": "hello" }).to_string(),
    })
}

fn assert_violations(farm: &AppFarm, n: usize, prefix: &str) {
    let v = farm.violations();
    assert_eq!(v.len(), n, "{v:#?}");
    assert!(v.iter().all(|v| v.starts_with(prefix)), "{v:#?}");
}

#[tokio::test]
async fn tokens_are_issued_counted_and_stay_valid_until_their_expiry() {
    let farm = farm().await;
    let first = tokens(&farm).await;
    let second = tokens(&farm).await;
    assert_ne!(first.0, second.0);
    assert_ne!(first.1, second.1);
    assert_ne!(first.2, second.2);
    assert!(first.2.starts_with("t-"), "{}", first.2);

    let d = dingtalk_token(&farm, DT, DT_SECRET).await;
    assert_eq!(
        (d["errcode"].clone(), d["expires_in"].clone()),
        (json!(0), json!(7200))
    );
    let w = wecom_token(&farm, WC, WC_SECRET).await;
    assert_eq!(
        (w["errcode"].clone(), w["expires_in"].clone()),
        (json!(0), json!(7200))
    );
    let l = lark_token(&farm, LK, LK_SECRET).await;
    assert_eq!(
        (l["code"].clone(), l["expire"].clone()),
        (json!(0), json!(7200))
    );
    for app in [DT, WC, LK] {
        assert_eq!(farm.token_fetches(app), 3, "{app}");
    }

    // Fetching again leaves the older tokens working.
    for t in [&first.0, &second.0] {
        assert_eq!(
            dingtalk_send(&farm, t, &dingtalk_text("alice")).await["errcode"],
            0
        );
    }
    for t in [&first.1, &second.1] {
        assert_eq!(
            wecom_send(&farm, t, &wecom_text("alice")).await["errcode"],
            0
        );
    }
    for t in [&first.2, &second.2] {
        let (status, a) = lark_send(&farm, t, "open_id", &lark_text("ou_alice")).await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["code"], 0);
        assert!(a["data"]["message_id"].as_str().unwrap().starts_with("om_"));
    }
    let sent = farm.wait_sent(DT, 2, WAIT).await;
    assert_eq!(sent[0].token, first.0);
    assert_eq!(sent[1].token, second.0);
    assert_eq!(sent[0].recipients, ["alice"]);
    assert!(sent[0]
        .query
        .contains(&("access_token".to_string(), first.0.clone())));
    assert_eq!(farm.wait_sent(WC, 2, WAIT).await.len(), 2);
    let lark = farm.wait_sent(LK, 2, WAIT).await;
    assert_eq!(lark[1].lark_content(), json!({ "text": "hello" }));
    assert_eq!(lark[1].recipients, ["ou_alice"]);
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());
}

#[tokio::test]
async fn a_short_ttl_really_expires() {
    let farm = farm().await;
    for app in [DT, WC, LK] {
        farm.set_token_ttl(app, Duration::from_secs(1));
    }
    assert_eq!(dingtalk_token(&farm, DT, DT_SECRET).await["expires_in"], 1);
    assert_eq!(lark_token(&farm, LK, LK_SECRET).await["expire"], 1);
    let (d, w, l) = tokens(&farm).await;
    assert_eq!(
        dingtalk_send(&farm, &d, &dingtalk_text("alice")).await["errcode"],
        0
    );
    assert_eq!(
        wecom_send(&farm, &w, &wecom_text("alice")).await["errcode"],
        0
    );
    assert_eq!(
        lark_send_now(&farm, &l, "open_id", &lark_text("ou_alice"))
            .await
            .0,
        200
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = dingtalk_send(&farm, &d, &dingtalk_text("alice")).await;
    assert_eq!(a["errcode"], 42001, "{a}");
    let a = wecom_send(&farm, &w, &wecom_text("alice")).await;
    assert_eq!(a["errcode"], 42001, "{a}");
    let (status, a) = lark_send_now(&farm, &l, "open_id", &lark_text("ou_alice")).await;
    assert_eq!((status, a["code"].clone()), (400, json!(99991663)), "{a}");
    for app in [DT, WC, LK] {
        assert_eq!(farm.expired_sends(app), 1, "{app}");
        assert_eq!(farm.requests(app), 2, "{app}");
        assert_eq!(farm.sent(app).len(), 1, "{app}");
    }
    // Expiry is the daemon's cue to refresh, not a violation.
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());

    let (d, _, _) = tokens(&farm).await;
    assert_eq!(
        dingtalk_send(&farm, &d, &dingtalk_text("alice")).await["errcode"],
        0
    );
}

#[tokio::test]
async fn expire_tokens_ends_every_token_issued_so_far() {
    let farm = farm().await;
    let (d1, w1, l1) = tokens(&farm).await;
    let (d2, _, l2) = tokens(&farm).await;
    farm.expire_tokens(DT);
    farm.expire_tokens(WC);
    farm.expire_tokens(LK);
    for d in [&d1, &d2] {
        assert_eq!(
            dingtalk_send(&farm, d, &dingtalk_text("alice")).await["errcode"],
            42001
        );
    }
    assert_eq!(
        wecom_send(&farm, &w1, &wecom_text("alice")).await["errcode"],
        42001
    );
    for l in [&l1, &l2] {
        let (status, a) = lark_send(&farm, l, "open_id", &lark_text("ou_alice")).await;
        assert_eq!((status, a["code"].clone()), (400, json!(99991663)));
    }
    assert_eq!(farm.expired_sends(DT), 2);

    // Tokens issued afterwards work for their full ttl.
    let (d3, w3, l3) = tokens(&farm).await;
    assert_eq!(
        dingtalk_send(&farm, &d3, &dingtalk_text("alice")).await["errcode"],
        0
    );
    assert_eq!(
        wecom_send(&farm, &w3, &wecom_text("alice")).await["errcode"],
        0
    );
    assert_eq!(
        lark_send(&farm, &l3, "open_id", &lark_text("ou_alice"))
            .await
            .0,
        200
    );
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());
}

#[tokio::test]
async fn wrong_secrets_and_unknown_apps_get_the_platform_codes() {
    let farm = farm().await;
    assert_eq!(dingtalk_token(&farm, DT, "nope").await["errcode"], 40089);
    assert_eq!(wecom_token(&farm, WC, "nope").await["errcode"], 40001);
    let l = lark_token(&farm, LK, "nope").await;
    assert_eq!(l["code"], 10014, "{l}");
    assert_eq!(farm.token_fetches(DT), 1);
    assert_eq!(farm.token_fetches(LK), 1);
    assert_violations(&farm, 3, "wrong secret");

    // Unknown apps; a DingTalk key is not a WeCom corp.
    assert_eq!(
        dingtalk_token(&farm, "other", DT_SECRET).await["errcode"],
        40089
    );
    assert_eq!(wecom_token(&farm, DT, DT_SECRET).await["errcode"], 40013);
    assert_eq!(
        lark_token(&farm, "cli_other", LK_SECRET).await["code"],
        10014
    );
    assert_eq!(farm.violations().len(), 6);
    assert!(farm.violations()[3..]
        .iter()
        .all(|v| v.starts_with("unknown app")));

    // The secret is compared URL-decoded: one pasted into the URL unencoded has its `+`
    // turned into a space.
    let raw = format!(
        "{}/gettoken?appkey={DT}&appsecret={DT_SECRET}",
        farm.base_url()
    );
    assert_eq!(get(&raw, &[]).await.1["errcode"], 40089);
    assert_eq!(dingtalk_token(&farm, DT, DT_SECRET).await["errcode"], 0);

    // A rotated secret makes the configured one wrong.
    farm.set_secret(WC, "rotated");
    assert_eq!(wecom_token(&farm, WC, WC_SECRET).await["errcode"], 40001);
    assert_eq!(wecom_token(&farm, WC, "rotated").await["errcode"], 0);

    // Lark wants JSON.
    let url = format!(
        "{}/open-apis/auth/v3/tenant_access_token/internal",
        farm.base_url()
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .form(&[("app_id", LK), ("app_secret", LK_SECRET)])
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(resp).await.1["code"], 10003);

    let v = farm.violations();
    assert_eq!(v.len(), 9, "{v:#?}");
    assert!(
        v[6].starts_with("wrong secret") && v[6].contains("dt secret/="),
        "{v:#?}"
    );
    assert!(v[7].starts_with("wrong secret"), "{v:#?}");
    assert!(v[8].starts_with("bad token request"), "{v:#?}");
}

#[tokio::test]
async fn dingtalk_bodies_are_checked() {
    let farm = farm().await;
    let (t, _, _) = tokens(&farm).await;

    let a = dingtalk_send(&farm, &t, &dingtalk_text("alice,bob,ghost")).await;
    assert_eq!(a["errcode"], 0, "{a}");
    assert!(a["task_id"].is_u64(), "{a}");
    let md = json!({
        "agent_id": DT_AGENT,
        "userid_list": "bob",
        "msg": { "msgtype": "markdown", "markdown": { "title": "t", "text": "**x**" } },
    });
    assert_eq!(dingtalk_send(&farm, &t, &md).await["errcode"], 0);
    // The msg limit is on its serialised JSON: exactly 2048 bytes pass.
    let empty = json!({ "msgtype": "text", "text": { "content": "" } });
    let fill = "x".repeat(2048 - empty.to_string().len());
    let mut full = dingtalk_text("alice");
    full["msg"]["text"]["content"] = json!(fill);
    assert_eq!(dingtalk_send(&farm, &t, &full).await["errcode"], 0);

    let sent = farm.sent(DT);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].recipients, ["alice", "bob", "ghost"]);
    assert_eq!(farm.unknown_recipients(DT), ["ghost"]);
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());

    let mut bad = Vec::new();
    let mut b = dingtalk_text("alice");
    b["agent_id"] = json!(DT_AGENT.to_string());
    bad.push((b, 40035));
    let mut b = dingtalk_text("alice");
    b["agent_id"] = json!(1);
    bad.push((b, 40056));
    let mut b = dingtalk_text("alice");
    b["userid_list"] = json!(["alice"]);
    bad.push((b, 40035));
    bad.push((dingtalk_text("alice|bob"), 40035));
    bad.push((dingtalk_text("alice,,bob"), 40035));
    bad.push((dingtalk_text("alice, bob"), 40035));
    let mut b = dingtalk_text("alice");
    b["msg"] = json!({ "msgtype": "actionCard", "actionCard": { "title": "t", "text": "x" } });
    bad.push((b, 40035));
    let mut b = dingtalk_text("alice");
    b["msg"]["at"] = json!({ "atUserIds": ["alice"] });
    bad.push((b, 40035));
    let mut b = full.clone();
    b["msg"]["text"]["content"] = json!(format!("{fill}x"));
    bad.push((b, 40035));
    let mut b = dingtalk_text("alice");
    b.as_object_mut().unwrap().remove("msg");
    bad.push((b, 40035));
    let n = bad.len();
    for (body, code) in bad {
        let a = dingtalk_send(&farm, &t, &body).await;
        assert_eq!(a["errcode"], code, "{body} → {a}");
    }

    let url = format!(
        "{}/topapi/message/corpconversation/asyncsend_v2",
        farm.base_url()
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .query(&[("access_token", &t)])
        .header("content-type", "text/plain")
        .body(dingtalk_text("alice").to_string())
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(resp).await.1["errcode"], 40035);

    assert_violations(&farm, n + 1, "bad body: dingtalk");
    assert_eq!(farm.sent(DT).len(), 3);
    assert_eq!(farm.requests(DT), 3 + n + 1);
}

#[tokio::test]
async fn wecom_bodies_and_recipients_are_checked() {
    let farm = farm().await;
    let (_, t, _) = tokens(&farm).await;

    let a = wecom_send(&farm, &t, &wecom_text("alice|ghost")).await;
    assert_eq!(
        (a["errcode"].clone(), a["invaliduser"].clone()),
        (json!(0), json!("ghost"))
    );
    let a = wecom_send(&farm, &t, &wecom_text("alice|bob")).await;
    assert_eq!(a["errcode"], 0);
    assert!(a.get("invaliduser").is_none(), "{a}");
    // Nobody valid: 81013, nothing sent, and no violation (reachability is the platform's
    // data).
    let a = wecom_send(&farm, &t, &wecom_text("ghost|nobody")).await;
    assert_eq!(a["errcode"], 81013, "{a}");
    assert_eq!(a["invaliduser"], "ghost|nobody");
    let md = json!({
        "touser": "bob",
        "agentid": WC_AGENT,
        "msgtype": "markdown",
        "markdown": { "content": "x".repeat(2048) },
    });
    assert_eq!(wecom_send(&farm, &t, &md).await["errcode"], 0);

    let sent = farm.sent(WC);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].recipients, ["alice", "ghost"]);
    assert_eq!(farm.unknown_recipients(WC), ["ghost", "nobody"]);
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());

    let mut bad = Vec::new();
    let mut b = wecom_text("alice");
    b["agentid"] = json!(WC_AGENT.to_string());
    bad.push((b, 40056));
    let mut b = wecom_text("alice");
    b["agentid"] = json!(7);
    bad.push((b, 40056));
    bad.push((wecom_text("alice,bob"), 40031));
    bad.push((wecom_text(""), 40031));
    let mut b = wecom_text("alice");
    b["touser"] = json!(["alice"]);
    bad.push((b, 40031));
    let mut b = md.clone();
    b["markdown"]["content"] = json!("x".repeat(2049));
    bad.push((b, 45002));
    let mut b = wecom_text("alice");
    b["text"]["content"] = json!(" ");
    bad.push((b, 44004));
    let b = json!({
        "touser": "alice",
        "agentid": WC_AGENT,
        "msgtype": "textcard",
        "textcard": { "title": "t", "description": "d", "url": "u" },
    });
    bad.push((b, 40008));
    let n = bad.len();
    for (body, code) in bad {
        let a = wecom_send(&farm, &t, &body).await;
        assert_eq!(a["errcode"], code, "{body} → {a}");
    }
    assert_violations(&farm, n, "bad body: wecom");
    assert_eq!(farm.sent(WC).len(), 3);
}

#[tokio::test]
async fn wecom_member_limit_breach_is_recorded() {
    let farm = farm().await;
    let (_, t, _) = tokens(&farm).await;
    for _ in 0..30 {
        assert_eq!(
            wecom_send(&farm, &t, &wecom_text("alice|bob")).await["errcode"],
            0
        );
    }
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());

    // The 31st within the minute for alice: WeCom drops it silently and says ok.
    assert_eq!(
        wecom_send(&farm, &t, &wecom_text("alice")).await["errcode"],
        0
    );
    let v = farm.violations();
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(
        v[0].starts_with("rate limit: wecom") && v[0].contains("\"alice\""),
        "{v:#?}"
    );
    let minute = Duration::from_secs(60);
    assert_eq!(farm.max_member_in_window(WC, "alice", minute), 31);
    assert_eq!(farm.max_member_in_window(WC, "bob", minute), 30);
    assert_eq!(farm.max_member_in_window(WC, "ghost", minute), 0);
    assert_eq!(farm.sent(WC).len(), 31);
}

#[tokio::test]
async fn lark_bodies_are_checked() {
    let farm = farm().await;
    let (_, _, t) = tokens(&farm).await;

    let post_content = json!({ "zh_cn": {
        "title": "t",
        "content": [[{ "tag": "text", "text": "hello" }]],
    }});
    let good = [
        ("open_id", lark_text("ou_alice")),
        (
            "email",
            json!({
                "receive_id": "bob@example.com",
                "msg_type": "post",
                "content": post_content.to_string(),
                "uuid": "x".repeat(50),
            }),
        ),
        (
            "open_id",
            json!({
                "receive_id": "ou_alice",
                "msg_type": "interactive",
                "content": json!({
                    "header": { "title": { "tag": "plain_text", "content": "t" } },
                    "elements": [{ "tag": "markdown", "content": "**x**" }],
                }).to_string(),
            }),
        ),
    ];
    for (ty, body) in &good {
        let (status, a) = lark_send(&farm, &t, ty, body).await;
        assert_eq!((status, a["code"].clone()), (200, json!(0)), "{body} → {a}");
    }
    let sent = farm.sent(LK);
    assert_eq!(sent[1].lark_content(), post_content);
    assert_eq!(sent[1].recipients, ["bob@example.com"]);
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());

    let mut bad: Vec<(&str, Value, i64)> = Vec::new();
    // The custom bot's shapes are wrong here.
    let mut b = lark_text("ou_alice");
    b["content"] = json!({ "text": "hello" });
    bad.push(("open_id", b, 99992402));
    let mut b = good[1].1.clone();
    b["content"] = json!(json!({ "post": post_content }).to_string());
    bad.push(("email", b, 230001));
    let mut b = good[2].1.clone();
    b["content"] = json!(json!({ "card": { "elements": [] } }).to_string());
    bad.push(("open_id", b, 230001));
    let mut b = lark_text("ou_alice");
    b["content"] = json!(json!({ "content": "hello" }).to_string());
    bad.push(("open_id", b, 230001));
    let mut b = lark_text("ou_alice");
    b["content"] = json!("hello");
    bad.push(("open_id", b, 230001));
    bad.push(("user_id", lark_text("ou_alice"), 230001));
    bad.push(("open_id", lark_text("bob@example.com"), 230001));
    bad.push(("", lark_text("ou_alice"), 99992402));
    let mut b = lark_text("ou_alice");
    b["uuid"] = json!("x".repeat(51));
    bad.push(("open_id", b, 99992402));
    let mut b = lark_text("ou_alice");
    b["msg_type"] = json!("sticker");
    bad.push(("open_id", b, 230001));
    let n = bad.len();
    for (ty, body, code) in bad {
        let (status, a) = lark_send(&farm, &t, ty, &body).await;
        assert_eq!(
            (status, a["code"].clone()),
            (400, json!(code)),
            "{ty} {body} → {a}"
        );
    }

    tokio::time::sleep(LARK_PACE).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/open-apis/im/v1/messages", farm.base_url()))
        .query(&[("receive_id_type", "open_id")])
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body(lark_text("ou_alice").to_string())
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer(resp).await,
        (
            400,
            json!({ "code": 99992402, "msg": "content-type must be application/json, got Some(\"text/plain\")" })
        )
    );

    assert_violations(&farm, n + 1, "bad body: lark");
    assert_eq!(farm.sent(LK).len(), 3);
}

#[tokio::test]
async fn lark_unknown_users_and_repeated_uuids() {
    let farm = farm().await;
    let (_, _, t) = tokens(&farm).await;

    let (status, a) = lark_send(&farm, &t, "open_id", &lark_text("ou_ghost")).await;
    assert_eq!((status, a["code"].clone()), (400, json!(230013)), "{a}");
    assert_eq!(farm.unknown_recipients(LK), ["ou_ghost"]);

    let mut b = lark_text("ou_alice");
    b["uuid"] = json!("u-1");
    let (_, first) = lark_send(&farm, &t, "open_id", &b).await;
    let (status, again) = lark_send(&farm, &t, "open_id", &b).await;
    assert_eq!(status, 200);
    assert_eq!(again, first);
    assert_eq!(farm.duplicates(LK), ["u-1"]);
    assert_eq!(farm.sent(LK).len(), 1);
    assert_eq!(farm.requests(LK), 3);
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());
}

#[tokio::test]
async fn lark_tenant_limit_is_five_a_second() {
    let farm = farm().await;
    let (_, _, t) = tokens(&farm).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let (status, a) = lark_send_now(&farm, &t, "open_id", &lark_text("ou_alice")).await;
        codes.push((status, a["code"].clone()));
    }
    let mut want = vec![(200, json!(0)); 5];
    want.push((400, json!(11232)));
    assert_eq!(codes, want);
    assert_violations(&farm, 1, "rate limit: lark");
    assert_eq!(farm.max_in_window(LK, Duration::from_secs(1)), 6);
    assert_eq!(farm.sent(LK).len(), 5);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        lark_send_now(&farm, &t, "open_id", &lark_text("ou_alice"))
            .await
            .0,
        200
    );
    assert_eq!(farm.violations().len(), 1);
}

#[tokio::test]
async fn scripted_answers_come_in_order() {
    let farm = farm().await;
    farm.script_token(
        DT,
        vec![
            Scripted::Status(500),
            Scripted::ErrCode(-1),
            Scripted::Delay(Duration::from_millis(200)),
        ],
    );
    let url = format!("{}/gettoken", farm.base_url());
    let q = [("appkey", DT), ("appsecret", DT_SECRET)];
    assert_eq!(get(&url, &q).await, (500, json!({ "error": "scripted" })));
    assert_eq!(
        get(&url, &q).await,
        (200, json!({ "errcode": -1, "errmsg": "scripted" }))
    );
    let started = std::time::Instant::now();
    let (_, a) = get(&url, &q).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(a["errcode"], 0);
    assert_eq!(farm.token_fetches(DT), 3);

    let (_, w, l) = tokens(&farm).await;
    farm.script_send(LK, vec![Scripted::ErrCode(11232), Scripted::Status(502)]);
    let (status, a) = lark_send(&farm, &l, "open_id", &lark_text("ou_alice")).await;
    assert_eq!(
        (status, a),
        (400, json!({ "code": 11232, "msg": "scripted" }))
    );
    let (status, _) = lark_send(&farm, &l, "open_id", &lark_text("ou_alice")).await;
    assert_eq!(status, 502);
    assert_eq!(
        lark_send(&farm, &l, "open_id", &lark_text("ou_alice"))
            .await
            .0,
        200
    );
    assert_eq!(farm.requests(LK), 3);
    assert_eq!(farm.sent(LK).len(), 1);

    farm.script_send(WC, vec![Scripted::ErrCode(45009), Scripted::Close]);
    assert_eq!(
        wecom_send(&farm, &w, &wecom_text("alice")).await["errcode"],
        45009
    );
    let err = reqwest::Client::new()
        .post(format!("{}/cgi-bin/message/send", farm.base_url()))
        .query(&[("access_token", &w)])
        .json(&wecom_text("alice"))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("a closed request gets no answer");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(
        wecom_send(&farm, &w, &wecom_text("alice")).await["errcode"],
        0
    );
    assert!(farm.violations().is_empty(), "{:#?}", farm.violations());
}

#[tokio::test]
async fn unknown_tokens_and_endpoints_are_violations() {
    let farm = farm().await;
    let (d, _, _) = tokens(&farm).await;
    let base = farm.base_url();

    assert_eq!(
        dingtalk_send(&farm, "nope", &dingtalk_text("alice")).await["errcode"],
        40014
    );
    assert_eq!(
        dingtalk_send(&farm, "", &dingtalk_text("alice")).await["errcode"],
        40014
    );
    assert_eq!(
        wecom_send(&farm, "nope", &wecom_text("alice")).await["errcode"],
        40014
    );
    // A DingTalk token is no WeCom token.
    assert_eq!(
        wecom_send(&farm, &d, &wecom_text("alice")).await["errcode"],
        40014
    );
    let (status, a) = post(
        &format!("{base}/cgi-bin/message/send"),
        &[],
        None,
        &wecom_text("alice"),
    )
    .await;
    assert_eq!((status, a["errcode"].clone()), (200, json!(41001)));
    let url = format!("{base}/open-apis/im/v1/messages");
    let q = [("receive_id_type", "open_id")];
    let (status, a) = post(&url, &q, None, &lark_text("ou_alice")).await;
    assert_eq!((status, a["code"].clone()), (400, json!(99991661)));
    let (status, a) = post(&url, &q, Some("t-nope"), &lark_text("ou_alice")).await;
    assert_eq!((status, a["code"].clone()), (400, json!(99991663)));
    assert_violations(&farm, 7, "unknown token");
    for app in [DT, WC, LK] {
        assert_eq!(farm.requests(app), 0, "{app}");
    }

    assert_eq!(get(&url, &q).await.0, 405);
    assert_eq!(get(&format!("{base}/robot/send"), &[]).await.0, 404);
    let v = farm.violations();
    assert_eq!(v.len(), 9, "{v:#?}");
    assert!(
        v[7..].iter().all(|v| v.starts_with("unexpected request")),
        "{v:#?}"
    );
}
