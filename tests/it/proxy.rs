//! `[http] proxy` and the per-target override, end to end: a fake forward proxy (it answers
//! every request itself, as the platform would) records what reaches it. The webhook URLs name
//! a host that does not resolve, so a delivery can only have gone through the proxy.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::receiver::Receiver;
use crate::common::*;

/// What reached the proxy: a request line and its `Proxy-Authorization`.
type Seen = (String, Option<String>);

/// A forward proxy that answers every request 200 itself, recording its request line and
/// `Proxy-Authorization`.
struct FakeProxy {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeProxy {
    async fn start() -> FakeProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    if let Some(head) = read_request(&mut conn).await {
                        log.lock().unwrap().push(head);
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        FakeProxy { port, seen }
    }

    fn url(&self, userinfo: &str) -> String {
        format!("http://{userinfo}127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The request line and `Proxy-Authorization` of one request, its body read and dropped.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            })
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < end + length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = head.lines().next().unwrap_or_default().to_owned();
    Some((line, header("proxy-authorization")))
}

async fn notify(app: &TestApp, target: &str) {
    let url = app.url(&format!("/notify/{target}"));
    notify_at(&app.http, url).await;
}

/// POSTs a small notification to `url`, which must accept it.
async fn notify_at(client: &reqwest::Client, url: String) {
    let body = serde_json::json!({"title": "t", "text": "x"});
    let (status, answer) = post_json(client, url, body).await;
    assert!((200..300).contains(&status), "{status} {answer}");
}

async fn wait_sent(app: &TestApp, target: &str) {
    let counter = app.metrics.notify_sent_total.with_label_values(&[target]);
    tokio::time::timeout(WAIT, async {
        while counter.get() < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{target} was not delivered"));
}

#[tokio::test]
async fn targets_send_through_the_configured_proxy_with_its_credentials() {
    let proxy = FakeProxy::start().await;
    let receiver = Receiver::start(vec![]).await;
    let other = FakeProxy::start().await;
    let app = TestApp::start(&toml_with(&format!(
        r#"
[http]
proxy = "{global}"
no_proxy = ["internal.example.com", "10.0.0.0/8"]

[targets.viaproxy]
kind = "webhook"
url = "http://hooks.example.invalid/in"

[targets.direct]
kind = "webhook"
url = "{direct}"
proxy = "none"

[targets.own]
kind = "webhook"
url = "http://own.example.invalid/in"
proxy = "{own}"
"#,
        global = proxy.url("user:pa55@"),
        direct = receiver.url,
        own = other.url(""),
    )))
    .await;
    app.wait_ready().await;

    notify(&app, "viaproxy").await;
    wait_sent(&app, "viaproxy").await;
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "POST http://hooks.example.invalid/in HTTP/1.1");
    let basic = base64::engine::general_purpose::STANDARD.encode("user:pa55");
    assert_eq!(
        seen[0].1.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );

    // "none": straight to the receiver, the proxy never asked.
    notify(&app, "direct").await;
    receiver.wait_for(1).await;
    wait_sent(&app, "direct").await;
    // Its own proxy, not the global one.
    notify(&app, "own").await;
    wait_sent(&app, "own").await;
    assert_eq!(other.seen().len(), 1);
    assert_eq!(other.seen()[0].1, None);
    assert_eq!(proxy.seen().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn no_proxy_hosts_are_reached_directly() {
    let proxy = FakeProxy::start().await;
    let receiver = Receiver::start(vec![]).await;
    let app = TestApp::start(&toml_with(&format!(
        r#"
[http]
proxy = "{}"
no_proxy = ["127.0.0.0/8"]

[targets.hook]
kind = "webhook"
url = "{}"
"#,
        proxy.url(""),
        receiver.url,
    )))
    .await;
    app.wait_ready().await;
    notify(&app, "hook").await;
    receiver.wait_for(1).await;
    assert!(proxy.seen().is_empty(), "{:?}", proxy.seen());
    app.stop().await;
}

#[test]
fn check_config_names_a_bad_proxy_by_key_and_never_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    std::fs::write(
        &path,
        r#"
[http]
proxy = "socks5://admin:hunter2@proxy:1080"
no_proxy = ["*.corp"]

[targets.hook]
kind = "webhook"
url = "https://example.com/hook"
proxy = ""
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("http.proxy"), "{text}");
    assert!(text.contains("http.no_proxy"), "{text}");
    assert!(text.contains("targets.hook.proxy"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn the_proxy_environment_variables_are_not_read() {
    let proxy = FakeProxy::start().await;
    let receiver = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    let toml = toml_with(&format!(
        r#"
[log]
format = "json"

[targets.unresolvable]
kind = "webhook"
url = "http://hooks.example.invalid/in"

[targets.local]
kind = "webhook"
url = "{}"
"#,
        receiver.url
    ));
    std::fs::write(&path, toml).unwrap();
    let url = proxy.url("");
    let env = [
        ("HTTP_PROXY", url.as_str()),
        ("http_proxy", url.as_str()),
        ("HTTPS_PROXY", url.as_str()),
        ("ALL_PROXY", url.as_str()),
    ];
    let daemon = crate::common::daemon::Daemon::start(&path, &env);
    daemon.wait_ready().await;
    let internal = daemon.internal.clone().expect("an internal listener");
    let client = client_with_token(CLIENT_TOKEN);
    for target in ["unresolvable", "local"] {
        notify_at(&client, format!("http://{internal}/notify/{target}")).await;
    }
    // The local one arrives directly; by then the other has been tried (and failed to resolve)
    // at least once. Had the variables been read, the proxy would have answered both.
    receiver.wait_for(1).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(proxy.seen().is_empty(), "{:?}", proxy.seen());
}
