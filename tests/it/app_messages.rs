//! App messages (DingTalk work notifications, WeCom and Lark app messages), user bindings,
//! routes and templates, end to end: the daemon against fake app platforms that check tokens,
//! parameters and per-member limits, and the fake robot farm for group bots.

use std::io::Write;
use std::time::Duration;

use crate::common::apps::{AppFarm, DingTalkApp, LarkApp, Scripted, WeComApp};
use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;
use serde_json::{json, Value};

const NOTIFY: &str = r#"
[notify]
retry_initial = "50ms"
retry_max = "200ms"
max_attempts = 4
request_timeout = "2s"
rate_limit_margin = "50ms"
requeue_delay = "200ms"
ack_wait = "2s"
"#;

const USERS: &str = r#"
[users.zhangsan]
name = "张三"
dingtalk = "ding-zs"
wecom = "ZhangSan"
lark = "ou_zs"
mobile = "13800000001"

[users.lisi]
dingtalk = "ding-ls"
wecom = "LiSi"
mobile = "13800000002"
email = "lisi@example.com"

[users.wangwu]
wecom = "WangWu"
"#;

fn wecom_target(name: &str, farm: &AppFarm, corp: &str, extra: &str) -> String {
    format!(
        "[targets.{name}]\nkind = \"wecom_app\"\nbase_url = \"{}\"\ncorp_id = \"{corp}\"\n\
         app_secret = \"wecom-secret\"\nagent_id = 1000002\n{extra}\n",
        farm.base_url()
    )
}

fn wecom_app(corp: &str, users: &[&str]) -> WeComApp {
    WeComApp {
        corp_id: corp.into(),
        secret: "wecom-secret".into(),
        agent_id: 1000002,
        users: users.iter().map(|u| u.to_string()).collect(),
    }
}

async fn start(engine: &Engine, rest: &str) -> TestApp {
    let app = TestApp::start(&toml_with(&format!(
        "{}\n{NOTIFY}\n{USERS}\n{rest}",
        engine.toml()
    )))
    .await;
    app.wait_ready().await;
    app
}

async fn post(app: &TestApp, name: &str, query: &str, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/notify/{name}{query}")))
        .json(body)
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
}

fn metric(app: &TestApp, family: &str, labels: &[&str]) -> u64 {
    let m = &app.metrics;
    let vec = match family {
        "unbound" => &m.notify_unbound_users_total,
        "invalid" => &m.notify_invalid_recipients_total,
        "tokens" => &m.notify_token_fetches_total,
        "routed" => &m.notify_routed_total,
        other => panic!("no metric {other}"),
    };
    vec.with_label_values(labels).get()
}

#[tokio::test]
async fn tokens_are_fetched_once_for_50_concurrent_sends_and_refreshed() {
    let farm = AppFarm::start().await;
    let accounts: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
    let ids: Vec<String> = (0..50).map(|i| format!("U{i}")).collect();
    let ids_ref: Vec<&str> = ids.iter().map(String::as_str).collect();
    farm.add_wecom(wecom_app("corp-50", &ids_ref));
    farm.set_token_ttl("corp-50", Duration::from_secs(4));
    // 50 targets of one app: 50 workers that all need the app's token at the same moment.
    let mut config = String::new();
    for (i, account) in accounts.iter().enumerate() {
        config += &format!("[users.{account}]\nwecom = \"U{i}\"\n");
        config += &wecom_target(&format!("w{i}"), &farm, "corp-50", "");
    }
    let app = start(&Engine::Memory, &config).await;

    let sends = (0..50).map(|i| {
        let app = &app;
        let account = accounts[i].clone();
        async move {
            let body = json!({"text": format!("hello {i}"), "to": {"users": [account]}});
            let res = post(app, &format!("w{i}"), "?wait=true", &body).await;
            let status = res.status();
            (status, res.text().await.unwrap())
        }
    });
    for (status, body) in futures::future::join_all(sends).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(farm.sent("corp-50").len(), 50);
    assert_eq!(farm.token_fetches("corp-50"), 1, "one token for 50 sends");

    // Past its lifetime the token is fetched again before use.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let body = json!({"text": "after expiry", "to": {"users": ["u1"]}});
    assert_eq!(post(&app, "w1", "?wait=true", &body).await.status(), 200);
    assert_eq!(farm.token_fetches("corp-50"), 2);
    assert_eq!(farm.expired_sends("corp-50"), 0, "refreshed before expiry");

    // Revoked early on the platform's side: the send is refused with 42001, the daemon fetches
    // a new token and sends again, once.
    farm.set_token_ttl("corp-50", Duration::from_secs(7200));
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let body = json!({"text": "warm", "to": {"users": ["u2"]}});
    assert_eq!(post(&app, "w2", "?wait=true", &body).await.status(), 200);
    let fetched = farm.token_fetches("corp-50");
    farm.expire_tokens("corp-50");
    let body = json!({"text": "after revocation", "to": {"users": ["u3"]}});
    let res = post(&app, "w3", "?wait=true", &body).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(farm.token_fetches("corp-50"), fetched + 1);
    assert_eq!(farm.expired_sends("corp-50"), 1);
    assert_eq!(farm.sent("corp-50").len(), 53);
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

#[tokio::test]
async fn the_three_app_kinds_deliver_to_bound_users() {
    for engine in Engine::all() {
        let farm = AppFarm::start().await;
        farm.add_dingtalk(DingTalkApp {
            app_key: "ding-key".into(),
            app_secret: "ding-secret".into(),
            agent_id: 42,
            users: vec!["ding-zs".into(), "ding-ls".into()],
        });
        farm.add_wecom(wecom_app("corp-3", &["ZhangSan", "LiSi"]));
        farm.add_lark(LarkApp {
            app_id: "cli_3".into(),
            app_secret: "lark-secret".into(),
            users: vec!["ou_zs".into(), "lisi@example.com".into()],
        });
        let base = farm.base_url();
        let app = start(
            &engine,
            &format!(
                "[targets.ding]\nkind = \"dingtalk_work\"\nbase_url = \"{base}\"\n\
                 app_key = \"ding-key\"\napp_secret = \"ding-secret\"\nagent_id = \"42\"\n\
                 [targets.lark]\nkind = \"lark_app\"\nbase_url = \"{base}\"\napp_id = \"cli_3\"\n\
                 app_secret = \"lark-secret\"\n{}",
                wecom_target("wecom", &farm, "corp-3", "")
            ),
        )
        .await;
        let body = json!({
            "title": "Release",
            "text": "v1.2 is out",
            "to": {"users": ["zhangsan", "lisi"]},
        });
        for target in ["ding", "wecom", "lark"] {
            let res = post(&app, target, "", &body).await;
            assert_eq!(res.status(), 202, "{}: {target}", engine.name());
        }
        let timeout = Duration::from_secs(20);
        let ding = farm.wait_sent("ding-key", 1, timeout).await;
        assert_eq!(ding[0].body["agent_id"], 42);
        assert_eq!(ding[0].body["userid_list"], "ding-zs,ding-ls");
        assert!(ding[0].body["msg"].to_string().contains("v1.2 is out"));
        let wecom = farm.wait_sent("corp-3", 1, timeout).await;
        assert_eq!(wecom[0].body["touser"], "ZhangSan|LiSi");
        assert_eq!(wecom[0].body["agentid"], 1000002);
        let lark = farm.wait_sent("cli_3", 2, timeout).await;
        let mut to: Vec<(String, String)> = lark
            .iter()
            .map(|s| {
                let ty = s
                    .query
                    .iter()
                    .find(|(k, _)| k == "receive_id_type")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (s.body["receive_id"].as_str().unwrap().to_owned(), ty)
            })
            .collect();
        to.sort();
        assert_eq!(
            to,
            [
                ("lisi@example.com".to_owned(), "email".to_owned()),
                ("ou_zs".to_owned(), "open_id".to_owned())
            ],
            "{}",
            engine.name()
        );
        assert!(lark[0].lark_content().to_string().contains("v1.2 is out"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(farm.sent("ding-key").len(), 1, "{}", engine.name());
        assert_eq!(farm.sent("cli_3").len(), 2, "{}", engine.name());
        assert!(farm.violations().is_empty(), "{:?}", farm.violations());
        app.stop().await;
    }
}

#[tokio::test]
async fn unbound_users_invalid_users_and_token_failures_are_classified() {
    let engine = Engine::Memory;
    let farm = AppFarm::start().await;
    // wangwu is bound but outside the app's visible scope.
    farm.add_wecom(wecom_app("corp-c", &["ZhangSan", "LiSi"]));
    farm.add_lark(LarkApp {
        app_id: "cli_c".into(),
        app_secret: "right".into(),
        users: vec!["ou_zs".into()],
    });
    let base = farm.base_url();
    let app = start(
        &engine,
        &format!(
            "{}[targets.badcreds]\nkind = \"lark_app\"\nbase_url = \"{base}\"\n\
             app_id = \"cli_c\"\napp_secret = \"wrong\"\n\
             [targets.lark]\nkind = \"lark_app\"\nbase_url = \"{base}\"\napp_id = \"cli_c\"\n\
             app_secret = \"right\"\n",
            wecom_target("wecom", &farm, "corp-c", "")
        ),
    )
    .await;

    // Unbound accounts are skipped and counted; the others get the message.
    let body = json!({"text": "t1", "to": {"users": ["zhangsan", "ghost", "phantom"]}});
    assert_eq!(post(&app, "wecom", "?wait=true", &body).await.status(), 200);
    let sent = farm.sent("corp-c");
    assert_eq!(sent[0].body["touser"], "ZhangSan");
    assert_eq!(metric(&app, "unbound", &["wecom"]), 2);

    // Nobody reachable: refused at the door, and dead-lettered when it comes from the bus.
    let body = json!({"text": "t2", "to": {"users": ["ghost"]}});
    let res = post(&app, "wecom", "", &body).await;
    assert_eq!(res.status(), 422);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["code"], "no_recipients");
    let mut dlq = engine.watch(&app, "dlq.notify.wecom");
    engine
        .publish(Some(&app), "notify.wecom", body.to_string().as_bytes())
        .await;
    let dead = dlq.next(&engine, 1).await;
    assert_eq!(dead[0].header("imbridge-dlq-reason"), Some("no_recipients"));

    // Bound and named, but outside the app's scope: WeCom names it in `invaliduser`.
    let body = json!({"text": "t3", "to": {"users": ["lisi", "wangwu"]}});
    assert_eq!(post(&app, "wecom", "?wait=true", &body).await.status(), 200);
    assert_eq!(metric(&app, "invalid", &["wecom"]), 1);

    // Credentials refused by the token endpoint: dead-lettered at once as token_refused.
    let body = json!({"text": "t4", "to": {"user_ids": ["ou_zs"]}});
    let res = post(&app, "badcreds", "?wait=true", &body).await;
    assert_eq!(res.status(), 502);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["code"], "token_refused", "{err}");
    assert_eq!(err["attempts"], 1, "{err}");
    assert_eq!(metric(&app, "tokens", &["badcreds", "permanent"]), 1);
    let mut dlq = engine.watch(&app, "dlq.notify.badcreds");
    assert_eq!(post(&app, "badcreds", "", &body).await.status(), 202);
    let dead = dlq.next(&engine, 1).await;
    assert_eq!(dead[0].header("imbridge-dlq-reason"), Some("token_refused"));

    // A token endpoint failing for a moment is retried.
    farm.script_token("cli_c", vec![Scripted::Status(503)]);
    let res = post(&app, "lark", "?wait=true", &body).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(metric(&app, "tokens", &["lark", "transient"]), 1);
    assert_eq!(farm.sent("cli_c").len(), 1);
    // The wrong secret was the daemon's configuration, not a fake-platform surprise.
    let violations = farm.violations();
    assert!(
        violations.iter().all(|v| v.contains("secret")),
        "{violations:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn wecom_member_limits_hold() {
    let farm = AppFarm::start().await;
    farm.add_wecom(wecom_app("corp-m", &["ZhangSan", "LiSi"]));
    let app = start(
        &Engine::Memory,
        &wecom_target(
            "wecom",
            &farm,
            "corp-m",
            "member_rate_limit = \"3/2s\"\nusers = [\"zhangsan\"]",
        ),
    )
    .await;
    for i in 0..8 {
        let res = post(&app, "wecom", "", &json!({"text": format!("m{i}")})).await;
        assert_eq!(res.status(), 202);
    }
    let res = post(
        &app,
        "wecom",
        "",
        &json!({"text": "for lisi", "to": {"users": ["lisi"]}}),
    )
    .await;
    assert_eq!(res.status(), 202);
    let sent = farm.wait_sent("corp-m", 9, Duration::from_secs(30)).await;
    let window = Duration::from_secs(2);
    assert!(farm.max_member_in_window("corp-m", "ZhangSan", window) <= 3);
    let zs: Vec<_> = sent
        .iter()
        .filter(|s| s.body["touser"] == "ZhangSan")
        .collect();
    assert_eq!(zs.len(), 8);
    // 8 at 3 per 2 s take at least 4 s.
    assert!(zs[7].at - zs[0].at >= Duration::from_secs(4));
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

/// The ZenTao payload as ZenTao posts it: a form.
fn zentao_form(product: &str, object_type: &str) -> String {
    serde_urlencoded::to_string([
        ("objectType", object_type),
        ("objectID", "12"),
        ("product", product),
        ("execution", "3"),
        ("action", "assigned"),
        ("actor", "zhangsan"),
        ("assignedTo", "lisi"),
        ("mailto", ",wangwu,zhangsan,"),
        ("date", "2024-01-01 10:00:00"),
        (
            "text",
            "张三指派了Bug [#12::Login fails](https://zentao.example.com/bug-view-12.html)",
        ),
    ])
    .unwrap()
}

fn route_config(robot_url: &str, farm: &AppFarm, shaping: &str) -> String {
    format!(
        r#"
[targets.ops]
kind = "dingtalk_robot"
url = "{robot_url}"

{}

[routes.zentao]
targets = ["ops", "dev"]
match = {{ product = ["1", "2"], objectType = ["bug", "task"] }}
recipients = ["assignedTo", "mailto"]
mention = ["assignedTo"]
{shaping}
"#,
        wecom_target("dev", farm, "corp-r", "")
    )
}

async fn post_form(app: &TestApp, form: String, key: Option<&str>) -> reqwest::Response {
    let mut req = app
        .http
        .post(app.url("/notify/zentao"))
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req.body(form).timeout(WAIT).send().await.unwrap()
}

#[tokio::test]
async fn a_zentao_payload_is_routed_with_recipients_and_mentions() {
    for engine in Engine::all() {
        let robots = RobotFarm::start().await;
        let robot_url = robots.add(Robot::dingtalk("zentao-ops"));
        let farm = AppFarm::start().await;
        farm.add_wecom(wecom_app("corp-r", &["LiSi", "WangWu", "ZhangSan"]));
        let app = start(&engine, &route_config(&robot_url, &farm, "")).await;

        // Out of scope: another product, an object type not listed.
        for form in [zentao_form(",7,", "bug"), zentao_form(",1,", "story")] {
            assert_eq!(post_form(&app, form, None).await.status(), 202);
        }
        let form = zentao_form(",2,5,", "bug");
        assert_eq!(post_form(&app, form, None).await.status(), 202);

        let timeout = Duration::from_secs(30);
        let robot = robots.wait_accepted("zentao-ops", 1, timeout).await;
        let body = &robot[0].body;
        assert_eq!(body["msgtype"], "markdown");
        // The assignee is mentioned by mobile, which DingTalk wants in the text too.
        assert_eq!(body["at"]["atMobiles"], json!(["13800000002"]));
        assert!(body["markdown"]["text"]
            .as_str()
            .unwrap()
            .contains("@13800000002"));
        let sent = farm.wait_sent("corp-r", 1, timeout).await;
        // Assignee and mailto, the actor (zhangsan) left out.
        assert_eq!(sent[0].body["touser"], "LiSi|WangWu", "{}", engine.name());
        // The two out-of-scope payloads went nowhere.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(&app, "routed", &["zentao", ""]) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "{}", engine.name());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(robots.accepted("zentao-ops").len(), 1, "{}", engine.name());
        assert_eq!(farm.sent("corp-r").len(), 1, "{}", engine.name());
        assert_eq!(metric(&app, "routed", &["zentao", "ops"]), 1);
        assert!(robots.violations().is_empty(), "{:?}", robots.violations());
        assert!(farm.violations().is_empty(), "{:?}", farm.violations());
        app.stop().await;
    }
}

const TEMPLATE: &str = r#"
[templates.zentao]
title = "[{{ objectType }} #{{ objectID }}] {{ action }}"
text = """
{{ mention(actor) }} {{ action }} {{ objectType }} {{ link('#' ~ objectID, 'https://zentao.example.com/' ~ objectType ~ '-view-' ~ objectID ~ '.html') }}
{{ date | date('%m-%d %H:%M') }}"""
"#;

#[tokio::test]
async fn render_prints_exactly_what_the_platforms_receive() {
    let robots = RobotFarm::start().await;
    let robot_url = robots.add(Robot::dingtalk("render-ops"));
    let farm = AppFarm::start().await;
    farm.add_wecom(wecom_app("corp-r", &["LiSi", "WangWu"]));
    farm.add_lark(LarkApp {
        app_id: "cli_r".into(),
        app_secret: "lark-secret".into(),
        users: vec!["ou_zs".into(), "lisi@example.com".into()],
    });
    let config = toml_with(&format!(
        "{NOTIFY}\n{USERS}\n{TEMPLATE}\n{}\n\
         [targets.lark]\nkind = \"lark_app\"\nbase_url = \"{}\"\napp_id = \"cli_r\"\n\
         app_secret = \"lark-secret\"\nusers = [\"zhangsan\", \"lisi\"]\n\
         [[routes.zentao.rules]]\ntargets = [\"lark\"]\ntemplate = \"zentao\"\n",
        route_config(&robot_url, &farm, "template = \"zentao\""),
        farm.base_url()
    ));
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(config.as_bytes()).unwrap();
    let form = zentao_form(",1,", "bug");

    let out = render_cli(file.path(), "zentao", "K-1", &form);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    // Each request: a "# <target>: <where>" line, then pretty JSON (whose lines never start
    // with '#').
    let mut rendered: Vec<(String, Value)> = Vec::new();
    let mut json = String::new();
    for line in printed.lines().chain(["# end"]) {
        if let Some(head) = line.strip_prefix("# ") {
            if let Some(last) = rendered.last_mut() {
                last.1 = serde_json::from_str(&json).unwrap();
            }
            json.clear();
            let target = head.split(':').next().unwrap().to_owned();
            rendered.push((target, Value::Null));
        } else {
            json.push_str(line);
            json.push('\n');
        }
    }
    rendered.pop();
    let targets: Vec<&str> = rendered.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(targets, ["ops", "dev", "lark", "lark"], "{printed}");
    assert!(printed.contains("@张三"), "{printed}");

    let app = TestApp::start(&config).await;
    app.wait_ready().await;
    assert_eq!(post_form(&app, form, Some("K-1")).await.status(), 202);
    let timeout = Duration::from_secs(20);
    let robot = robots.wait_accepted("render-ops", 1, timeout).await;
    let wecom = farm.wait_sent("corp-r", 1, timeout).await;
    let mut lark = farm.wait_sent("cli_r", 2, timeout).await;
    assert_eq!(robot[0].body, rendered[0].1);
    assert_eq!(wecom[0].body, rendered[1].1);
    lark.sort_by_key(|s| s.body["receive_id"].as_str().unwrap_or_default().to_owned());
    let mut expected = [rendered[2].1.clone(), rendered[3].1.clone()];
    expected.sort_by_key(|b| b["receive_id"].as_str().unwrap_or_default().to_owned());
    assert_eq!(lark[0].body, expected[0]);
    assert_eq!(lark[1].body, expected[1]);
    assert!(robots.violations().is_empty(), "{:?}", robots.violations());
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

/// `imbridge render --target <name> --id <id> --config <config> < payload`.
fn render_cli(
    config: &std::path::Path,
    name: &str,
    id: &str,
    payload: &str,
) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["render", "--target", name, "--id", id, "--config"])
        .arg(config)
        // The config tests in this process set IMBRIDGE_ variables inside their jails.
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(payload.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn render_shows_a_routes_other_targets_when_one_cannot_send() {
    let farm = AppFarm::start().await;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let config = toml_with(&format!(
        "{USERS}
{}",
        route_config("https://x.invalid/robot/send?access_token=t", &farm, "")
    ));
    file.write_all(config.as_bytes()).unwrap();
    // Assigned to someone bound nowhere, mailto only the actor: the WeCom app has nobody.
    let form = zentao_form(",1,", "bug")
        .replace("assignedTo=lisi", "assignedTo=ghost")
        .replace("mailto=%2Cwangwu%2Czhangsan%2C", "mailto=zhangsan");
    let out = render_cli(file.path(), "zentao", "K-2", &form);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stdout.starts_with("# ops: "), "{stdout}");
    assert!(!stdout.contains("# dev"), "{stdout}");
    assert!(
        stderr.contains("dev: would be dead-lettered as no_recipients"),
        "{stderr}"
    );
}

#[test]
fn template_errors_stop_the_daemon_naming_template_and_line() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let config = toml_with(
        "[templates.broken]\ntext = \"\"\"\nfirst line\n{% if objectType %}unclosed\n\"\"\"\n\
         [targets.ops]\nkind = \"dingtalk_robot\"\nurl = \"https://x.invalid/robot\"\n\
         template = \"broken\"\n\
         [targets.other]\nkind = \"dingtalk_robot\"\nurl = \"https://x.invalid/robot\"\n\
         template = \"missing\"\n",
    );
    file.write_all(config.as_bytes()).unwrap();
    for command in ["check-config", "serve"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
            .args([command, "--config"])
            .arg(file.path())
            // The config tests in this process set IMBRIDGE_ variables inside their jails.
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("templates.broken.text"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("targets.other.template"), "{err}");
    }
}
