//! The platform API gateway (`/api/<platform>/<app>/<path>` on the internal listener, NATS
//! `api.<platform>.<app>`), against fake DingTalk (oapi and api.dingtalk.com), WeCom and Lark
//! servers that count token fetches and calls, refuse a wrong or revoked token with the
//! platform's code, and check where each platform's token is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warp::Filter;

use crate::common::*;

/// Client "ops": DingTalk users and the three platforms' harmless paths.
const OPS_TOKEN: &str = "ops-client-token-abcdef0123";
/// Client "ci": the same paths, another token.
const CI_TOKEN: &str = "ci-client-token-abcdef012345";
/// Client "narrow": DingTalk user reads only.
const NARROW_TOKEN: &str = "narrow-client-token-abcdef0123";

/// One call the fake saw.
#[derive(Debug, Clone)]
struct Seen {
    /// `dingtalk-oapi`, `dingtalk-api`, `wecom`, `lark`.
    base: String,
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Bytes,
    at: Instant,
}

#[derive(Default)]
struct FakeState {
    /// The tokens a platform takes: every one issued (a new one does not end the old ones,
    /// PROTOCOLS.md §4), until revoked.
    tokens: HashMap<&'static str, Vec<String>>,
    fetches: HashMap<&'static str, usize>,
    calls: Vec<Seen>,
}

/// The three platforms on one server, each under its own base path.
#[derive(Clone)]
struct Fake {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    async fn start() -> Fake {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let s = state.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |method, full: warp::path::FullPath, query, headers, body| {
                    let state = s.clone();
                    async move { answer(&state, method, full.as_str(), query, headers, body).await }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Fake { addr, state }
    }

    fn base(&self, base: &str) -> String {
        format!("http://{}/{base}", self.addr)
    }

    fn fetches(&self, platform: &str) -> usize {
        *self
            .state
            .lock()
            .unwrap()
            .fetches
            .get(platform)
            .unwrap_or(&0)
    }

    fn calls(&self) -> Vec<Seen> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The platform stops taking the tokens it issued (the next fetch issues another).
    fn revoke(&self, platform: &'static str) {
        self.state.lock().unwrap().tokens.remove(platform);
    }

    /// The most calls under `base` within any window of `window`.
    fn max_in_window(&self, base: &str, window: Duration) -> usize {
        let times: Vec<Instant> = self
            .calls()
            .into_iter()
            .filter(|c| c.base == base)
            .map(|c| c.at)
            .collect();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|&&t| t < times[i] + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

type Answer = warp::http::Response<String>;

fn reply(status: u16, body: Value) -> Answer {
    warp::http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(body.to_string())
        .unwrap()
}

async fn answer(
    state: &Mutex<FakeState>,
    method: warp::http::Method,
    path: &str,
    query: String,
    headers: warp::http::HeaderMap,
    body: Bytes,
) -> Answer {
    let path = path.trim_start_matches('/');
    let (base, rest) = path.split_once('/').unwrap_or((path, ""));
    let platform: &'static str = match base {
        "dingtalk-oapi" | "dingtalk-api" => "dingtalk",
        "wecom" => "wecom",
        "lark" => "lark",
        _ => return reply(404, json!({})),
    };
    // Token endpoints: a short delay, so that concurrent callers would pile up on them.
    if matches!(
        rest,
        "gettoken" | "cgi-bin/gettoken" | "open-apis/auth/v3/tenant_access_token/internal"
    ) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = state.lock().unwrap();
        let n = {
            let n = s.fetches.entry(platform).or_default();
            *n += 1;
            *n
        };
        let token = format!("{platform}-token-{n}");
        s.tokens.entry(platform).or_default().push(token.clone());
        return match platform {
            "lark" => reply(
                200,
                json!({"code": 0, "tenant_access_token": token, "expire": 7200}),
            ),
            _ => reply(
                200,
                json!({"errcode": 0, "access_token": token, "expires_in": 7200}),
            ),
        };
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let query_token = url_param(&query, "access_token");
    let presented = match base {
        "dingtalk-oapi" | "wecom" => query_token
            .clone()
            .filter(|_| header("x-acs-dingtalk-access-token").is_none()),
        "dingtalk-api" => header("x-acs-dingtalk-access-token").filter(|_| query_token.is_none()),
        _ => header("authorization")
            .and_then(|h| h.strip_prefix("Bearer ").map(str::to_owned))
            .filter(|_| query_token.is_none()),
    };
    let mut s = state.lock().unwrap();
    s.calls.push(Seen {
        base: base.to_owned(),
        method: method.to_string(),
        path: rest.to_owned(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: body.clone(),
        at: Instant::now(),
    });
    let valid = s.tokens.get(platform).cloned().unwrap_or_default();
    if !presented.is_some_and(|t| valid.contains(&t)) {
        return match base {
            "dingtalk-oapi" => reply(
                200,
                json!({"errcode": 88, "sub_code": "40014", "errmsg": "不合法的access_token"}),
            ),
            "dingtalk-api" => reply(
                401,
                json!({"code": "InvalidAuthentication", "message": "token invalid"}),
            ),
            "wecom" => reply(
                200,
                json!({"errcode": 42001, "errmsg": "access_token expired"}),
            ),
            _ => reply(
                400,
                json!({"code": 99991663, "msg": "Invalid access token"}),
            ),
        };
    }
    // The raw query is echoed, token and all: the gateway must scrub it.
    let echo = json!({
        "method": method.to_string(),
        "path": rest,
        "query": query,
        "body": String::from_utf8_lossy(&body),
    });
    match platform {
        "lark" => reply(200, json!({"code": 0, "msg": "success", "data": echo})),
        _ => reply(200, json!({"errcode": 0, "errmsg": "ok", "result": echo})),
    }
}

fn url_param(query: &str, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The three apps with API credentials at the fake, the clients, and `extra`.
fn config(fake: &Fake, extra: &str) -> String {
    let (oapi, api, wecom, lark) = (
        fake.base("dingtalk-oapi"),
        fake.base("dingtalk-api"),
        fake.base("wecom"),
        fake.base("lark"),
    );
    let everything =
        r#"["dingtalk/main/*", "wecom/main/cgi-bin/user/*", "lark/main/open-apis/contact/*"]"#;
    toml_with(&format!(
        r#"
        [apps.dingtalk.main]
        token = "{TOKEN}"
        aes_key = "{AES_KEY}"
        receiver_id = "{CORP_ID}"
        app_key = "dingkey"
        app_secret = "dingsecret"
        oapi_base = "{oapi}"
        api_base = "{api}"
        allow_insecure_http = true
        api_rate_limit = "1000/s"

        [apps.wecom.main]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        app_secret = "wecomsecret"
        api_base = "{wecom}"
        allow_insecure_http = true
        api_rate_limit = "1000/s"

        [apps.wecom.nocreds]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"

        [apps.lark.main]
        verification_token = "{LARK_TOKEN}"
        encrypt_key = "{LARK_KEY}"
        app_id = "cli_test"
        app_secret = "larksecret"
        domain = "{lark}"
        allow_insecure_http = true
        api_rate_limit = "1000/s"

        [clients.ops]
        token = "{OPS_TOKEN}"
        api = {everything}

        [clients.ci]
        token = "{CI_TOKEN}"
        api = {everything}

        [clients.narrow]
        token = "{NARROW_TOKEN}"
        api = ["dingtalk/main/topapi/v2/user/*"]
        {extra}
        "#
    ))
}

fn api_url(app: &TestApp, path: &str) -> String {
    format!(
        "http://{}/api/{path}",
        app.internal.expect("internal listener")
    )
}

/// One call with a client token; the status and the JSON answer (null when none).
async fn call(
    token: &str,
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let client = client_with_token(token);
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, api_url(app, path)).timeout(WAIT);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let res = request.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_default(),
        text,
    )
}

/// A request written byte for byte, so the path reaches imbridge as given (an HTTP client
/// would resolve `..` and `%2e%2e` itself); the status.
async fn raw_get(addr: std::net::SocketAddr, path: &str, token: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Every platform's calls, at once, from two clients: each gets the platform's answer,
/// each app's token is fetched once, in its platform's place, and neither the client's
/// token nor the app's ever crosses to the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_calls_fetch_one_token_per_app_placed_the_platforms_way() {
    let fake = Fake::start().await;
    let app = TestApp::start(&config(&fake, "")).await;
    app.wait_ready().await;
    let paths = [
        ("POST", "dingtalk/main/topapi/v2/user/get?lang=zh_CN"),
        ("GET", "dingtalk/main/v1.0/contact/users/me"),
        ("GET", "wecom/main/cgi-bin/user/get?userid=u1"),
        (
            "GET",
            "lark/main/open-apis/contact/v3/users/ou_1?user_id_type=open_id",
        ),
    ];
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let (method, path) = paths[i % paths.len()];
            let token = if i % 2 == 0 { OPS_TOKEN } else { CI_TOKEN };
            let app = &app;
            async move {
                (
                    path,
                    call(token, app, method, path, Some(json!({"userid": "u1"}))).await,
                )
            }
        })
        .collect();
    for (path, (status, body, text)) in futures::future::join_all(calls).await {
        assert_eq!(status, 200, "{path}: {text}");
        let code = body
            .get("errcode")
            .or(body.get("code"))
            .and_then(Value::as_i64);
        assert_eq!(code, Some(0), "{path}: {text}");
        assert!(
            !text.contains("-token-"),
            "the platform token reached the client: {text}"
        );
    }
    for platform in ["dingtalk", "wecom", "lark"] {
        assert_eq!(fake.fetches(platform), 1, "{platform} token fetches");
    }
    let seen = fake.calls();
    assert_eq!(seen.len(), 50);
    for c in &seen {
        let auth = c.headers.get("authorization").cloned().unwrap_or_default();
        assert!(
            !auth.contains(OPS_TOKEN) && !auth.contains(CI_TOKEN),
            "a client token reached the platform: {c:?}"
        );
        match c.base.as_str() {
            "dingtalk-oapi" => {
                assert_eq!(c.method, "POST");
                assert!(
                    c.query
                        .starts_with("lang=zh_CN&access_token=dingtalk-token-1"),
                    "{c:?}"
                );
                assert!(auth.is_empty() && !c.headers.contains_key("x-acs-dingtalk-access-token"));
                assert_eq!(&c.body[..], br#"{"userid":"u1"}"#);
            }
            "dingtalk-api" => {
                assert_eq!(c.headers["x-acs-dingtalk-access-token"], "dingtalk-token-1");
                assert!(c.query.is_empty() && auth.is_empty(), "{c:?}");
            }
            "wecom" => assert_eq!(c.query, "userid=u1&access_token=wecom-token-1"),
            "lark" => {
                assert_eq!(auth, "Bearer lark-token-1");
                assert_eq!(c.query, "user_id_type=open_id");
            }
            other => panic!("unexpected base {other}"),
        }
    }
    let ok = app
        .metrics
        .api_requests_total
        .with_label_values(&["dingtalk", "main", "2xx"])
        .get();
    assert_eq!(ok, 26);
    assert_eq!(
        app.metrics
            .api_token_fetches_total
            .with_label_values(&["lark", "main", "ok"])
            .get(),
        1
    );
    app.stop().await;
}

/// A token the platform stops taking is fetched again once, and the call goes through.
#[tokio::test]
async fn a_revoked_token_is_refetched_once_and_the_call_succeeds() {
    let fake = Fake::start().await;
    let app = TestApp::start(&config(&fake, "")).await;
    app.wait_ready().await;
    let paths = [
        ("dingtalk", "dingtalk/main/topapi/v2/user/get"),
        ("dingtalk", "dingtalk/main/v1.0/contact/users/me"),
        ("wecom", "wecom/main/cgi-bin/user/get"),
        ("lark", "lark/main/open-apis/contact/v3/users/ou_1"),
    ];
    for (platform, path) in paths {
        let (status, _, text) = call(OPS_TOKEN, &app, "GET", path, None).await;
        assert_eq!(status, 200, "{text}");
        let (before, calls) = (fake.fetches(platform), fake.calls().len());
        fake.revoke(platform);
        let (status, body, text) = call(OPS_TOKEN, &app, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {text}");
        let code = body
            .get("errcode")
            .or(body.get("code"))
            .and_then(Value::as_i64);
        assert_eq!(code, Some(0), "{text}");
        assert_eq!(fake.fetches(platform), before + 1, "{path}: one refetch");
        assert_eq!(
            fake.calls().len(),
            calls + 2,
            "{path}: refused once, then once more"
        );
    }
    app.stop().await;
}

/// Outside a client's globs is 403 with nothing forwarded and no token fetched, however the
/// path climbs (`..`, `%2e%2e`, an encoded slash, `//`).
#[tokio::test]
async fn paths_outside_the_globs_are_forbidden_and_nothing_is_forwarded() {
    let fake = Fake::start().await;
    let app = TestApp::start(&config(&fake, "")).await;
    app.wait_ready().await;
    let internal = app.internal.unwrap();
    for path in [
        "/api/dingtalk/main/topapi/message/corpconversation/asyncsend_v2",
        "/api/dingtalk/main/topapi/v2/user/../../message/send",
        "/api/dingtalk/main/topapi/v2/user/%2e%2e/%2E%2E/message/send",
        "/api/dingtalk/main/topapi/v2/user/..%2f..%2fmessage%2fsend",
        "/api/dingtalk/main/topapi/v2/user/get/../../../../../gettoken",
        "/api/dingtalk/main//topapi/v2/role/list",
        "/api/wecom/main/cgi-bin/user/get",
    ] {
        assert_eq!(raw_get(internal, path, NARROW_TOKEN).await, 403, "{path}");
    }
    // The same tricks ending inside the globs are allowed: normalised, then matched.
    let allowed = "/api/dingtalk/main/topapi/v2/role/..//user/./get";
    assert_eq!(raw_get(internal, allowed, NARROW_TOKEN).await, 200);
    let seen = fake.calls();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "topapi/v2/user/get");
    // No token, a wrong one: 401.
    assert_eq!(
        raw_get(internal, allowed, "wrong-token-0123456789abc").await,
        401
    );
    assert_eq!(fake.calls().len(), 1);
    app.stop().await;
}

/// `/api` exists on the internal listener only; an app without API credentials, or none at
/// all, is 404.
#[tokio::test]
async fn no_api_on_the_public_listener_nor_for_apps_without_credentials() {
    let fake = Fake::start().await;
    let app = TestApp::start(&config(&fake, "")).await;
    app.wait_ready().await;
    let public = client_with_token(OPS_TOKEN)
        .get(app.public_url("/api/dingtalk/main/topapi/v2/user/get"))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let (status, body, _) = call(
        OPS_TOKEN,
        &app,
        "GET",
        "wecom/nocreds/cgi-bin/user/get",
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_app")));
    let (status, _, _) = call(OPS_TOKEN, &app, "GET", "wecom/other/cgi-bin/user/get", None).await;
    assert_eq!(status, 404);
    let (status, _, _) = call(OPS_TOKEN, &app, "GET", "slack/main/x", None).await;
    assert_eq!(status, 404);
    assert!(fake.calls().is_empty());
    assert_eq!(fake.fetches("wecom"), 0);
    app.stop().await;
}

/// Over the app's limit a caller waits up to `api.max_wait`, then gets 429 and Retry-After.
#[tokio::test]
async fn over_the_limit_past_the_wait_is_429_with_retry_after() {
    let fake = Fake::start().await;
    let toml = config(&fake, "[api]\nmax_wait = \"200ms\"\n").replace(
        "api_rate_limit = \"1000/s\"\n\n        [apps.wecom.main]",
        "api_rate_limit = \"2/s\"\n\n        [apps.wecom.main]",
    );
    let app = TestApp::start(&toml).await;
    app.wait_ready().await;
    let client = client_with_token(OPS_TOKEN);
    let mut limited = None;
    for _ in 0..5 {
        let res = client
            .get(api_url(&app, "dingtalk/main/topapi/v2/user/get"))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        if res.status() == 429 {
            limited = Some(res);
            break;
        }
        assert_eq!(res.status(), 200);
    }
    let res = limited.expect("the third call within a second is limited");
    assert_eq!(res.headers()["retry-after"], "1");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(fake.calls().len(), 2);
    app.stop().await;
}

/// Two replicas on one NATS keep one app to 5 calls a second between them (the nats_kv
/// limiter), as the fake counts; and request/reply on `api.dingtalk.main` answers as HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_keep_five_a_second_and_nats_answers_as_http() {
    let nats = NatsServer::start();
    let fake = Fake::start().await;
    let extra = format!(
        "{}\n[notify]\nlimiter = \"nats_kv\"\n[api]\nmax_wait = \"30s\"\nnats_client = \"narrow\"\n",
        nats_bus(&nats.url())
    );
    let toml = config(&fake, &extra).replace(
        "api_rate_limit = \"1000/s\"\n\n        [apps.wecom.main]",
        "api_rate_limit = \"5/s\"\n\n        [apps.wecom.main]",
    );
    // One after the other: two daemons creating the same streams at once were once both
    // answered "jetstream request timed out" and not ready within the harness's bound.
    let a = TestApp::start(&toml).await;
    a.wait_ready().await;
    let b = TestApp::start(&toml).await;
    b.wait_ready().await;
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let app = if i % 2 == 0 { &a } else { &b };
            call(
                OPS_TOKEN,
                app,
                "POST",
                "dingtalk/main/topapi/v2/user/get",
                Some(json!({"i": i})),
            )
        })
        .collect();
    for (status, _, text) in futures::future::join_all(calls).await {
        assert_eq!(status, 200, "{text}");
    }
    let most = fake.max_in_window("dingtalk-oapi", Duration::from_secs(1));
    assert!(most <= 5, "{most} calls within one second at the fake");
    assert_eq!(fake.calls().len(), 24);

    // Request/reply: the same call, the same answer as over HTTP.
    let nc = nats.client().await;
    let envelope = json!({"method": "POST", "path": "topapi/v2/user/get", "query": "lang=zh_CN", "body": {"userid": "u1"}});
    let msg = tokio::time::timeout(
        WAIT,
        nc.request(
            "api.dingtalk.main",
            serde_json::to_vec(&envelope).unwrap().into(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let over_nats: Value = serde_json::from_slice(&msg.payload).unwrap();
    let (status, over_http, _) = call(
        NARROW_TOKEN,
        &a,
        "POST",
        "dingtalk/main/topapi/v2/user/get?lang=zh_CN",
        Some(json!({"userid": "u1"})),
    )
    .await;
    assert_eq!(over_nats["status"], status);
    assert_eq!(over_nats["body"], over_http);
    assert!(!msg.payload.windows(7).any(|w| w == b"-token-"));
    // The client's globs apply on the bus too.
    let outside = json!({"method": "POST", "path": "topapi/message/send"});
    let msg = nc
        .request(
            "api.dingtalk.main",
            serde_json::to_vec(&outside).unwrap().into(),
        )
        .await
        .unwrap();
    let refused: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["body"]["code"], "path_forbidden");
    assert_eq!(fake.calls().len(), 26);
    a.stop().await;
    b.stop().await;
}

/// A work-notification target of the same app and the gateway share one token: one fetch for
/// both, whichever comes first.
#[tokio::test]
async fn a_notify_target_and_api_calls_of_one_app_share_its_token() {
    let fake = Fake::start().await;
    let extra = format!(
        "[targets.ding]\nkind = \"dingtalk_work\"\nbase_url = \"{}\"\n\
         app_key = \"dingkey\"\napp_secret = \"dingsecret\"\nagent_id = \"42\"\n\
         [users.zhangsan]\ndingtalk = \"ding-zs\"\n",
        fake.base("dingtalk-oapi")
    );
    let app = TestApp::start(&config(&fake, &extra)).await;
    app.wait_ready().await;
    let body = json!({"text": "hello", "to": {"users": ["zhangsan"]}});
    let (status, answer) = post_json(&app.http, app.url("/notify/ding?wait=true"), body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, _, text) = call(
        OPS_TOKEN,
        &app,
        "GET",
        "dingtalk/main/v1.0/contact/users/me",
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(fake.fetches("dingtalk"), 1);
    let paths: Vec<String> = fake.calls().into_iter().map(|c| c.path).collect();
    assert_eq!(
        paths,
        [
            "topapi/message/corpconversation/asyncsend_v2",
            "v1.0/contact/users/me"
        ]
    );
    app.stop().await;
}

/// The problems of a configuration, by key (check-config prints them and exits 64).
fn problems(toml: &str) -> Vec<String> {
    use figment::providers::{Format as _, Toml};
    let toml = allow_insecure_http(toml);
    match imbridge::config::from_figment(figment::Figment::from(Toml::string(&toml))) {
        Ok(settings) => settings
            .warnings
            .iter()
            .map(|w| format!("warning {}", w.key))
            .collect(),
        Err(e) => e.problems.iter().map(|p| p.key.clone()).collect(),
    }
}

#[test]
fn check_config_names_each_bad_gateway_key() {
    let base = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        internal_listen = "127.0.0.1:0"
        [apps.wecom.main]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        app_secret = "wecomsecret"
        [apps.lark.main]
        verification_token = "{LARK_TOKEN}"
        encrypt_key = "{LARK_KEY}"
        app_id = "cli_1"
        app_secret = "larksecret"
        [clients.reader]
        token = "{OPS_TOKEN}"
        api = ["wecom/main/cgi-bin/user/*", "lark/*/open-apis/contact/*"]
        "#
    );
    // A client of the gateway only, a Lark app in http mode with API keys: no complaint.
    assert_eq!(problems(&base), Vec::<String>::new());
    let bad = format!(
        r#"{base}
        [apps.dingtalk.nokey]
        token = "{TOKEN}"
        aes_key = "{AES_KEY}"
        receiver_id = "{CORP_ID}"
        api_rate_limit = "20/s"
        [apps.lark.half]
        verification_token = "{LARK_TOKEN}"
        encrypt_key = "{LARK_KEY}"
        app_id = "cli_2"
        [apps.wecom.fast]
        token = "{WECOM_TOKEN}"
        aes_key = "{WECOM_KEY}"
        corp_id = "{WECOM_CORP}"
        app_secret = "s"
        api_rate_limit = "fast"
        [clients.typo]
        token = "{CI_TOKEN}"
        api = ["dingtalk/ghost/topapi/*", "slack/main/x", "wecom"]
        [clients.idle]
        token = "{NARROW_TOKEN}"
        [api]
        max_wait = "0s"
        nats_client = "ghost"
        "#
    );
    let mut keys = problems(&bad);
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        [
            "api.max_wait",
            "api.nats_client",
            "apps.lark.half.app_secret",
            "apps.wecom.fast.api_rate_limit",
            "clients.idle.targets",
            "clients.typo.api",
        ]
    );
    let warned = problems(&format!(
        "{base}\n[apps.dingtalk.nokey]\ntoken = \"{TOKEN}\"\naes_key = \"{AES_KEY}\"\n\
         receiver_id = \"{CORP_ID}\"\napi_rate_limit = \"20/s\"\n"
    ));
    assert_eq!(warned, ["warning apps.dingtalk.nokey.api_rate_limit"]);
}

/// A request written byte for byte with `headers` and `body`; the status.
async fn raw_request(addr: std::net::SocketAddr, head: &str, body: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{head}\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Hop-by-hop headers (and those `Connection` names), cookies and a token header of the
/// client's own stay behind; bodies over either cap are refused, nothing forwarded for a
/// request over it.
#[tokio::test]
async fn hop_by_hop_headers_stay_behind_and_bodies_are_capped() {
    let fake = Fake::start().await;
    let toml = config(
        &fake,
        "[api]\nmax_request_bytes = 64\nmax_response_bytes = 400\n",
    );
    let app = TestApp::start(&toml).await;
    app.wait_ready().await;
    let internal = app.internal.unwrap();
    let head = format!(
        "POST /api/dingtalk/main/topapi/v2/user/get HTTP/1.1\r\nAuthorization: Bearer {OPS_TOKEN}\r\n\
         X-Custom: kept\r\nX-Hop: secret\r\nConnection: x-hop\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic eA==\r\nCookie: session=1\r\nTE: trailers\r\n\
         X-Acs-Dingtalk-Access-Token: mine\r\nX-Forwarded-For: 10.0.0.1\r\n\
         Content-Type: application/json"
    );
    assert_eq!(
        raw_request(internal, &head, r#"{"userid":"u1"}"#).await,
        200
    );
    let seen = fake.calls();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["content-type"], "application/json");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "cookie",
        "te",
        "x-acs-dingtalk-access-token",
        "x-forwarded-for",
        "authorization",
    ] {
        assert!(!headers.contains_key(gone), "{gone} forwarded: {headers:?}");
    }
    // A body over api.max_request_bytes: 413, not forwarded.
    let (status, body, _) = call(
        OPS_TOKEN,
        &app,
        "POST",
        "dingtalk/main/topapi/v2/user/get",
        Some(json!({"pad": "x".repeat(100)})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("body_too_large"))
    );
    assert_eq!(fake.calls().len(), 1);
    // An answer over api.max_response_bytes (the fake echoes the query): 502.
    let long = "q=".to_owned() + &"y".repeat(500);
    let (status, body, _) = call(
        OPS_TOKEN,
        &app,
        "GET",
        &format!("dingtalk/main/topapi/v2/user/get?{long}"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("response_too_large"))
    );
    app.stop().await;
}
