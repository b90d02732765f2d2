//! `imbridge dingtalk callback register|update|get|delete` as a process, against a fake
//! DingTalk classic API and a running daemon. The fake does what DingTalk does on
//! `register_call_back` and `update_call_back`: it sends the URL a `check_url` callback
//! encrypted for its corp id and refuses the registration (errcode 71006 here) unless the
//! answer is signed with the registration's token and decrypts to `success`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use warp::Filter;

use crate::common::{toml_with, TestApp, AES_KEY, CORP_ID, MAIN_APP, TOKEN, WAIT};
use imbridge::platform::msgcrypt::MsgCrypt;

const APP_KEY: &str = "dingappkey0123";
const APP_SECRET: &str = "app-secret-do-not-print-0123456789";
const ACCESS_TOKEN: &str = "fake-access-token-do-not-print";

/// Another http-mode app of the daemon, with its own keys.
const OTHER_APP: &str = r#"
[apps.dingtalk.other]
token = "other-token-xyz"
aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
receiver_id = "ding6ccabc44d2c8d38b"
"#;

/// What the fake holds and saw.
#[derive(Default)]
struct State {
    /// The corp id DingTalk encrypts its `check_url` for.
    corp_id: String,
    registration: Option<Value>,
    /// `<path>` of every request, in order.
    calls: Vec<String>,
    /// `check_url` callbacks sent, and how many were answered correctly.
    checks: (usize, usize),
}

struct FakeOapi {
    base: String,
    state: Arc<Mutex<State>>,
}

impl FakeOapi {
    async fn start() -> FakeOapi {
        let state = Arc::new(Mutex::new(State {
            corp_id: CORP_ID.into(),
            ..State::default()
        }));
        let shared = state.clone();
        let routes = warp::method()
            .and(warp::path::full())
            .and(warp::query::<std::collections::HashMap<String, String>>())
            .and(warp::body::bytes())
            .and_then(move |m, p: warp::path::FullPath, q, b: bytes::Bytes| {
                let state = shared.clone();
                async move {
                    let answer = handle(&state, m, p.as_str(), q, &b).await;
                    Ok::<_, std::convert::Infallible>(warp::reply::json(&answer))
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(warp::serve(routes).incoming(listener).run());
        FakeOapi { base, state }
    }

    fn registration(&self) -> Option<Value> {
        self.state.lock().unwrap().registration.clone()
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

fn refuse(errcode: i64, errmsg: &str) -> Value {
    json!({ "errcode": errcode, "errmsg": errmsg })
}

async fn handle(
    state: &Mutex<State>,
    method: warp::http::Method,
    path: &str,
    query: std::collections::HashMap<String, String>,
    body: &[u8],
) -> Value {
    state.lock().unwrap().calls.push(path.to_owned());
    if path == "/gettoken" {
        assert_eq!(method, "GET");
        let ok = query.get("appkey").map(String::as_str) == Some(APP_KEY)
            && query.get("appsecret").map(String::as_str) == Some(APP_SECRET);
        return match ok {
            true => {
                json!({"errcode": 0, "errmsg": "ok", "access_token": ACCESS_TOKEN, "expires_in": 7200})
            }
            false => refuse(40089, "不合法的corpid或corpsecret"),
        };
    }
    if query.get("access_token").map(String::as_str) != Some(ACCESS_TOKEN) {
        return refuse(40014, "不合法的access_token");
    }
    match (method.as_str(), path) {
        ("POST", "/call_back/register_call_back" | "/call_back/update_call_back") => {
            let body: Value = serde_json::from_slice(body).expect("a JSON body");
            let exists = state.lock().unwrap().registration.is_some();
            if path.ends_with("register_call_back") && exists {
                return refuse(71007, "回调地址已存在 (fake)");
            }
            let corp_id = state.lock().unwrap().corp_id.clone();
            let passed = check_url(&body, &corp_id).await;
            let mut s = state.lock().unwrap();
            s.checks.0 += 1;
            if !passed {
                return refuse(71006, "回调地址无效 (fake: check_url failed)");
            }
            s.checks.1 += 1;
            s.registration = Some(body);
            json!({"errcode": 0, "errmsg": "ok"})
        }
        ("GET", "/call_back/get_call_back") => match state.lock().unwrap().registration.clone() {
            Some(mut r) => {
                r["errcode"] = 0.into();
                r["errmsg"] = "ok".into();
                r
            }
            None => refuse(71004, "回调不存在 (fake)"),
        },
        ("GET", "/call_back/delete_call_back") => {
            state.lock().unwrap().registration = None;
            json!({"errcode": 0, "errmsg": "ok"})
        }
        _ => refuse(404, "请求的URI地址不存在"),
    }
}

/// DingTalk's check: a `check_url` push to the URL, encrypted for the corp id with the
/// registration's keys; the answer must be signed with its token and decrypt to `success`.
async fn check_url(body: &Value, corp_id: &str) -> bool {
    let (Some(token), Some(aes_key), Some(url)) = (
        body["token"].as_str(),
        body["aes_key"].as_str(),
        body["url"].as_str(),
    ) else {
        return false;
    };
    let Ok(crypt) = MsgCrypt::new(token, aes_key, corp_id) else {
        return false;
    };
    let encrypt = crypt.encrypt_fresh(br#"{"EventType":"check_url"}"#);
    let ts = imbridge::platform::now_ms().to_string();
    let nonce = "WL4PK6yA";
    let sent = reqwest::Client::new()
        .post(url)
        .query(&[
            ("signature", crypt.signature(&ts, nonce, &encrypt)),
            ("timestamp", ts),
            ("nonce", nonce.to_owned()),
        ])
        .json(&json!({ "encrypt": encrypt }))
        .timeout(Duration::from_millis(1500))
        .send()
        .await;
    let Ok(answer) = sent else { return false };
    if answer.status() != 200 {
        return false;
    }
    let Ok(reply) = answer.json::<Value>().await else {
        return false;
    };
    let field = |n: &str| reply[n].as_str().unwrap_or_default().to_owned();
    let (sig, ts, nonce, encrypt) = (
        field("msg_signature"),
        field("timeStamp"),
        field("nonce"),
        field("encrypt"),
    );
    crypt.verify(&sig, &ts, &nonce, &encrypt)
        && crypt
            .decrypt(&encrypt)
            .is_ok_and(|d| d.message == b"success")
}

/// The CLI's configuration: `main` (the D1 keys, as the daemon has them) with server-API
/// credentials pointing at the fake, `other` without.
fn cli_config(dir: &tempfile::TempDir, oapi: &str, secret: &str) -> std::path::PathBuf {
    let path = dir.path().join("imbridge.toml");
    let toml = format!(
        r#"{MAIN_APP}
app_key = "{APP_KEY}"
app_secret = "{secret}"
oapi_base = "{oapi}"
allow_insecure_http = true
callback_tags = ["user_add_org", "bpms_instance_change"]
{OTHER_APP}"#
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// What a run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Neither output holds a secret: the app's token and key, the AppSecret, the access
    /// token.
    fn assert_no_secrets(&self) {
        for secret in [TOKEN, AES_KEY, APP_SECRET, ACCESS_TOKEN, "other-token-xyz"] {
            for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
                assert!(!text.contains(secret), "{name} shows {secret:?}:\n{text}");
            }
        }
    }
}

async fn imbridge(config: &std::path::Path, args: &[&str]) -> Run {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
            .args(["dingtalk", "callback"])
            .args(args)
            .arg("--config")
            .arg(config)
            .env_clear()
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command hung")
    .unwrap();
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    run.assert_no_secrets();
    run
}

async fn daemon() -> TestApp {
    TestApp::start(&toml_with(&format!("{MAIN_APP}{OTHER_APP}"))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_get_update_delete_round_trip_against_a_running_daemon() {
    let app = daemon().await;
    let fake = FakeOapi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&dir, &fake.base, APP_SECRET);
    let url = app.public_url("/callbacks/dingtalk/main");

    let run = imbridge(&config, &["register", "--app", "main", "--url", &url]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("registered"), "{}", run.stdout);
    assert!(run.stdout.contains(&url), "{}", run.stdout);
    let r = fake.registration().expect("registered at the fake");
    assert_eq!(r["url"], url.as_str());
    assert_eq!(
        r["call_back_tag"],
        json!(["user_add_org", "bpms_instance_change"])
    );
    assert_eq!(
        (r["token"].as_str(), r["aes_key"].as_str()),
        (Some(TOKEN), Some(AES_KEY))
    );
    // The URL was checked before DingTalk was called, and DingTalk's own check passed too.
    assert_eq!(fake.state.lock().unwrap().checks, (1, 1));

    // Registering again: DingTalk's errcode and errmsg, exit 69.
    let run = imbridge(&config, &["register", "--app", "main", "--url", &url]).await;
    assert_eq!(run.code, Some(69), "{}", run.stderr);
    assert!(run.stderr.contains("errcode 71007"), "{}", run.stderr);
    assert!(run.stderr.contains("回调地址已存在"), "{}", run.stderr);

    let run = imbridge(&config, &["get", "--app", "main"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!("url: {url}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("tags: user_add_org, bpms_instance_change"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("token: *** (the same as apps.dingtalk.main.token)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("aes_key: *** (the same as apps.dingtalk.main.aes_key)"),
        "{}",
        run.stdout
    );

    let run = imbridge(
        &config,
        &[
            "update",
            "--app",
            "main",
            "--url",
            &url,
            "--tags",
            "user_leave_org,chat_quit",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("updated"), "{}", run.stdout);
    let r = fake.registration().unwrap();
    assert_eq!(r["call_back_tag"], json!(["user_leave_org", "chat_quit"]));
    let run = imbridge(&config, &["get", "--app", "main"]).await;
    assert!(
        run.stdout.contains("tags: user_leave_org, chat_quit"),
        "{}",
        run.stdout
    );

    let run = imbridge(&config, &["delete", "--app", "main"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("deleted"), "{}", run.stdout);
    assert!(fake.registration().is_none());
    let run = imbridge(&config, &["get", "--app", "main"]).await;
    assert_eq!(run.code, Some(69), "{}", run.stdout);
    assert!(run.stderr.contains("errcode 71004"), "{}", run.stderr);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_url_fails_with_a_clear_message_and_nothing_is_registered() {
    let app = daemon().await;
    let fake = FakeOapi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(&dir, &fake.base, APP_SECRET);
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/callbacks/dingtalk/main", l.local_addr().unwrap())
    };
    let cases = [
        (nobody, "cannot be reached"),
        // Another app's URL: the daemon there checks the signature with another token.
        (
            app.public_url("/callbacks/dingtalk/other"),
            "HTTP 401: the signature was refused",
        ),
        (app.public_url("/callbacks/dingtalk/nosuch"), "HTTP 404"),
        // Not imbridge at all: the fake oapi answers JSON that is not a reply.
        (
            format!("{}/elsewhere", fake.base),
            "not DingTalk's reply JSON",
        ),
    ];
    for (url, why) in &cases {
        for action in ["register", "update"] {
            let run = imbridge(&config, &[action, "--app", "main", "--url", url]).await;
            assert_eq!(run.code, Some(69), "{url}: {}", run.stderr);
            assert!(
                run.stderr.contains("failed the check_url check"),
                "{}",
                run.stderr
            );
            assert!(run.stderr.contains(why), "{url}: {}", run.stderr);
            assert!(
                run.stderr.contains("nothing was registered"),
                "{}",
                run.stderr
            );
        }
    }
    // DingTalk was not even asked for a token.
    assert!(
        fake.calls().iter().all(|c| c == "/elsewhere"),
        "{:?}",
        fake.calls()
    );
    assert!(fake.registration().is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalk_refusals_print_errcode_and_errmsg_and_exit_69() {
    let app = daemon().await;
    let fake = FakeOapi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = app.public_url("/callbacks/dingtalk/main");

    // Wrong AppSecret: gettoken's errcode.
    let config = cli_config(&dir, &fake.base, "not-the-app-secret-0123456789");
    for args in [
        vec!["register", "--app", "main", "--url", &url],
        vec!["get", "--app", "main"],
        vec!["delete", "--app", "main"],
    ] {
        let run = imbridge(&config, &args).await;
        assert_eq!(run.code, Some(69), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr
                .contains("DingTalk refused gettoken: errcode 40089"),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("不合法的corpid或corpsecret"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("not-the-app-secret"), "{}", run.stderr);
    }

    // The URL answers imbridge's check (same receiver id as configured), but DingTalk
    // encrypts for its corp id, which is not the app's receiver_id: DingTalk refuses.
    fake.state.lock().unwrap().corp_id = "dingsomeothercorp".into();
    let config = cli_config(&dir, &fake.base, APP_SECRET);
    let run = imbridge(&config, &["register", "--app", "main", "--url", &url]).await;
    assert_eq!(run.code, Some(69), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("DingTalk refused call_back/register_call_back: errcode 71006"),
        "{}",
        run.stderr
    );
    assert!(fake.registration().is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_and_usage_problems_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // No app_key: no server API.
    let config = dir.path().join("imbridge.toml");
    std::fs::write(&config, format!("{MAIN_APP}{OTHER_APP}")).unwrap();
    let url = "https://imbridge.example.com/callbacks/dingtalk/main";
    for args in [
        vec!["register", "--app", "main", "--url", url],
        vec!["get", "--app", "other"],
    ] {
        let run = imbridge(&config, &args).await;
        assert_eq!(run.code, Some(64), "{}", run.stderr);
        assert!(
            run.stderr.contains(".app_key: must be set"),
            "{}",
            run.stderr
        );
    }
    let run = imbridge(&config, &["get", "--app", "nosuch"]).await;
    assert_eq!(run.code, Some(64), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("apps.dingtalk.nosuch: no such app (configured: main, other)"),
        "{}",
        run.stderr
    );

    // With credentials: no --url, no tags anywhere, a config that does not load.
    let fake_base = "http://127.0.0.1:9";
    let config = cli_config(&dir, fake_base, APP_SECRET);
    let run = imbridge(&config, &["register", "--app", "main"]).await;
    assert_eq!(run.code, Some(64), "{}", run.stderr);
    assert!(run.stderr.contains("--url is required"), "{}", run.stderr);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "callback_tags = [\"user_add_org\", \"bpms_instance_change\"]",
        "",
    );
    std::fs::write(&config, text).unwrap();
    let run = imbridge(&config, &["update", "--app", "main", "--url", url]).await;
    assert_eq!(run.code, Some(64), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("apps.dingtalk.main.callback_tags: is empty"),
        "{}",
        run.stderr
    );
    std::fs::write(&config, "[apps.dingtalk.main]\nmode = \"carrier-pigeon\"\n").unwrap();
    let run = imbridge(&config, &["get", "--app", "main"]).await;
    assert_eq!(run.code, Some(64), "{}", run.stderr);
    assert!(
        run.stderr.contains("apps.dingtalk.main.mode"),
        "{}",
        run.stderr
    );
}
