//! Recovering what DingTalk failed to push (`recover_failed`), against a fake of DingTalk's
//! classic API that hands each failed push out once, a page at a time, as DingTalk does: two
//! replicas on one real nats-server (and on tansu) take turns through a lease, and every entry
//! reaches the bus exactly once; the poller survives a 500 and an expired token; an entry it cannot read
//! is counted, not published, and does not stop the others.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use warp::Filter;

use crate::common::engine::Engine;
use crate::common::*;

const APP_KEY: &str = "dingrecoverkey";
const APP_SECRET: &str = "recover-app-secret-0123456789";
const PAGE: usize = 150;

/// A fake `oapi.dingtalk.com`: `gettoken` and `call_back/get_call_back_failed_result`.
#[derive(Clone, Default)]
struct Oapi {
    state: Arc<Mutex<OapiState>>,
}

#[derive(Default)]
struct OapiState {
    /// What is still to hand out, in order.
    failed: VecDeque<Value>,
    tokens_issued: u64,
    /// Tokens DingTalk no longer accepts.
    expired: HashSet<String>,
    /// Answers to give the next page requests before the real ones (HTTP statuses).
    script: VecDeque<u16>,
    /// The token of each page request that handed out entries, in order.
    pages: Vec<String>,
    violations: Vec<String>,
}

impl Oapi {
    async fn start(self) -> String {
        let gettoken = {
            let state = self.state.clone();
            warp::path!("gettoken")
                .and(warp::query::<BTreeMap<String, String>>())
                .map(move |q: BTreeMap<String, String>| {
                    let mut st = state.lock().unwrap();
                    if q.get("appkey").map(String::as_str) != Some(APP_KEY)
                        || q.get("appsecret").map(String::as_str) != Some(APP_SECRET)
                    {
                        return warp::reply::json(&json!({"errcode": 40089, "errmsg": "invalid appkey or appsecret"}));
                    }
                    st.tokens_issued += 1;
                    let token = format!("tok-{}", st.tokens_issued);
                    warp::reply::json(&json!({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200}))
                })
        };
        let failed = {
            let state = self.state.clone();
            warp::path!("call_back" / "get_call_back_failed_result")
                .and(warp::query::<BTreeMap<String, String>>())
                .map(move |q: BTreeMap<String, String>| {
                    let mut st = state.lock().unwrap();
                    if let Some(status) = st.script.pop_front() {
                        return warp::reply::with_status(
                            warp::reply::json(&json!({"message": "busy"})),
                            warp::http::StatusCode::from_u16(status).unwrap(),
                        );
                    }
                    let token = q.get("access_token").cloned().unwrap_or_default();
                    if !token.starts_with("tok-") {
                        st.violations
                            .push(format!("a page asked with token {token:?}"));
                    }
                    if st.expired.contains(&token) {
                        let answer = json!({"errcode": 42001, "errmsg": "access_token expired"});
                        return warp::reply::with_status(
                            warp::reply::json(&answer),
                            warp::http::StatusCode::OK,
                        );
                    }
                    let n = st.failed.len().min(PAGE);
                    let list: Vec<Value> = st.failed.drain(..n).collect();
                    if n > 0 {
                        st.pages.push(token);
                    }
                    let answer = json!({
                        "errcode": 0, "errmsg": "ok",
                        "has_more": !st.failed.is_empty(),
                        "failed_list": list,
                    });
                    warp::reply::with_status(warp::reply::json(&answer), warp::http::StatusCode::OK)
                })
        };
        let routes = warp::get().and(gettoken.or(failed));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(warp::serve(routes).incoming(listener).run());
        url
    }

    fn add(&self, entries: impl IntoIterator<Item = Value>) {
        self.state.lock().unwrap().failed.extend(entries);
    }

    fn left(&self) -> usize {
        self.state.lock().unwrap().failed.len()
    }
}

/// A `user_add_org` push that failed, as DingTalk lists it: documented (`call_back_data`, a
/// JSON string) or as seen in the wild (a field named after the tag).
fn entry(i: usize) -> Value {
    let data = json!({"EventType": "user_add_org", "UserId": [format!("user-{i}")], "CorpId": "dingcorp", "TimeStamp": format!("{}", 1_700_000_000_000u64 + i as u64)});
    if i % 3 == 0 {
        json!({"event_time": 1_700_000_000_000u64 + i as u64, "call_back_tag": "user_add_org", "user_add_org": data})
    } else {
        json!({"event_time": 1_700_000_000_000u64 + i as u64, "call_back_tag": "user_add_org", "corpid": "dingcorp", "id": i.to_string(), "call_back_data": data.to_string()})
    }
}

fn config(engine: &Engine, oapi: &str) -> String {
    toml_with(&format!(
        "{}\n{MAIN_APP}\napp_key = \"{APP_KEY}\"\napp_secret = \"{APP_SECRET}\"\n\
         oapi_base = \"{oapi}\"\nallow_insecure_http = true\nrecover_failed = \"300ms\"\n",
        engine.toml()
    ))
}

fn recovered(app: &TestApp) -> u64 {
    app.metrics
        .recovered_events_total
        .with_label_values(&["dingtalk", "main"])
        .get()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_replicas_recover_450_failed_pushes_exactly_once() {
    for engine in Engine::durable() {
        let name = engine.name();
        let oapi = Oapi::default();
        let url = oapi.clone().start().await;
        // One after the other: two daemons starting at once on a loaded machine (the whole
        // suite runs beside this test) were once not ready within the harness's bound.
        let a = TestApp::start(&config(&engine, &url)).await;
        a.wait_ready().await;
        let b = TestApp::start(&config(&engine, &url)).await;
        b.wait_ready().await;
        oapi.add((0..450).map(entry));
        let total = || recovered(&a) + recovered(&b);
        wait_for("every entry recovered", || total() >= 450).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(oapi.left(), 0, "{name}");
        assert_eq!(total(), 450, "{name}");
        assert_eq!(engine.stored("dingtalk.user_add_org").await, 450, "{name}");
        // One replica at a time: the three pages went to one pass (a pass asks with one
        // token; each replica fetches its own).
        let (pages, violations) = {
            let st = oapi.state.lock().unwrap();
            (st.pages.clone(), st.violations.clone())
        };
        assert_eq!(pages.len(), 3, "{name}: {pages:?}");
        assert!(pages.iter().all(|t| *t == pages[0]), "{name}: {pages:?}");
        assert!(violations.is_empty(), "{name}: {violations:?}");
        let polls = |app: &TestApp| {
            app.metrics
                .recover_polls_total
                .with_label_values(&["dingtalk", "main", "ok"])
                .get()
        };
        // On NATS the first holder keeps the lease while it renews it; on Kafka the group
        // may hand it to the second member when it joins, before any entry came.
        let holders = [&a, &b].iter().filter(|app| polls(app) > 0).count();
        if name == "nats" {
            assert_eq!(holders, 1, "{name}: both replicas polled");
        }
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test]
async fn recovered_events_look_like_pushes_and_say_so() {
    let engine = Engine::Memory;
    let oapi = Oapi::default();
    let url = oapi.clone().start().await;
    let app = TestApp::start(&config(&engine, &url)).await;
    app.wait_ready().await;
    let mut watch = engine.watch(&app, "dingtalk.user_add_org");
    oapi.add([entry(1), entry(3)]);
    let got = watch.next(&engine, 2).await;
    for (stored, i) in got.iter().zip([1, 3]) {
        let data = json!({"EventType": "user_add_org", "UserId": [format!("user-{i}")], "CorpId": "dingcorp", "TimeStamp": format!("{}", 1_700_000_000_000u64 + i as u64)});
        assert_eq!(stored.payload, data.to_string().as_bytes());
        assert_eq!(stored.header("imbridge-recovered"), Some("true"));
        assert_eq!(stored.header("ce-type"), Some("dingtalk.user_add_org"));
        assert_eq!(stored.header("ce-source"), Some("dingtalk/main"));
    }
    // The documented shape names the tenant.
    assert_eq!(got[0].header("imbridge-tenant"), Some("dingcorp"));
    // The id is derived as for a pushed callback of the same bytes: a push of the same
    // change is the same event, which the bus stores once.
    let pushed = DingTalk::main().callback(&String::from_utf8(got[0].payload.clone()).unwrap());
    assert_eq!(pushed.post(&app, "main").await.status(), 200);
    assert_eq!(app.platform_callbacks("dingtalk", "main", "duplicate"), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_poller_survives_a_500_an_expired_token_and_an_unreadable_entry() {
    let engine = Engine::Memory;
    let oapi = Oapi::default();
    let url = oapi.clone().start().await;
    {
        let mut st = oapi.state.lock().unwrap();
        st.script.extend([500, 503]);
        // The first token will have expired by its first page.
        st.expired.insert("tok-1".to_owned());
    }
    let app = TestApp::start(&config(&engine, &url)).await;
    app.wait_ready().await;
    let unreadable =
        json!({"event_time": 1, "call_back_tag": "user_add_org", "call_back_data": "{not json"});
    oapi.add([entry(1), unreadable, entry(2)]);
    wait_for("the readable entries recovered", || recovered(&app) >= 2).await;
    let errors = |reason: &str| {
        app.metrics
            .recover_errors_total
            .with_label_values(&["dingtalk", "main", reason])
            .get()
    };
    assert_eq!(errors("unreadable_entry"), 1);
    assert!(errors("status") >= 1, "the 500 was counted");
    assert_eq!(oapi.left(), 0);
    assert!(
        oapi.state.lock().unwrap().tokens_issued >= 2,
        "the expired token was replaced"
    );
    app.stop().await;
}

#[test]
fn recover_failed_needs_credentials_and_a_duration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recover.toml");
    std::fs::write(
        &path,
        format!("{MAIN_APP}\nrecover_failed = \"0s\"\ncallback_tags = [\"user add\"]\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for key in [
        "apps.dingtalk.main.recover_failed",
        "apps.dingtalk.main.callback_tags[0]",
        "apps.dingtalk.main.app_key",
    ] {
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}

/// `imbridge dingtalk callback failed` does one pass by hand, without a daemon: every entry
/// reaches the bus and is printed; without credentials it exits 64 naming the key.
#[tokio::test]
async fn the_failed_command_publishes_one_pass_and_prints_it() {
    let engine = Engine::nats();
    let oapi = Oapi::default();
    let url = oapi.clone().start().await;
    oapi.add((0..5).map(entry));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    let without_poller = config(&engine, &url).replace("recover_failed = \"300ms\"\n", "");
    std::fs::write(&path, without_poller).unwrap();
    let run = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
                .args([
                    "dingtalk", "callback", "failed", "--app", "main", "--config",
                ])
                .arg(path)
                .env_clear()
                .output()
                .unwrap()
        })
    };
    let out = run(path.clone()).await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert!(
        stdout
            .lines()
            .all(|l| l.starts_with("dingtalk.user_add_org\t")),
        "{stdout}"
    );
    assert!(
        stderr.contains("5 published from 1 page(s); 0 unreadable"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(APP_SECRET) && !stdout.contains("tok-"),
        "{stderr}"
    );
    assert_eq!(engine.stored("dingtalk.user_add_org").await, 5);
    assert_eq!(oapi.left(), 0);

    let no_credentials = dir.path().join("bare.toml");
    std::fs::write(
        &no_credentials,
        toml_with(&format!("{}\n{MAIN_APP}", engine.toml())),
    )
    .unwrap();
    let out = run(no_credentials).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("apps.dingtalk.main.app_key"), "{stderr}");
}
