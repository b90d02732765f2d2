//! Test harness: a real `nats-server -js` per test on a random port, the daemon built from a
//! TOML string on port 0, and a DingTalk client that encrypts and signs like the platform.
//! Every wait is bounded.

#![allow(dead_code)]

pub mod apps;
pub mod daemon;
pub mod engine;
pub mod fakes;
pub mod kafka;
pub mod lark_gateway;
pub mod receiver;
pub mod stream_gateway;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Format, Toml};
use imbridge::app::App;
use imbridge::bus::Bus;
use imbridge::config;
use imbridge::metrics::Metrics;
use imbridge::platform::dingtalk::callback::Reply;
use imbridge::platform::msgcrypt::MsgCrypt;
use imbridge::shutdown::Shutdown;
use tempfile::TempDir;

/// Bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// The D1 credentials of the shared vectors.
pub const TOKEN: &str = "mryue";
pub const AES_KEY: &str = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7";
pub const CORP_ID: &str = "ding6ccabc44d2c8d38b";

/// The W1 credentials of the shared vectors.
pub const WECOM_TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
pub const WECOM_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
pub const WECOM_CORP: &str = "ww1436e0e65a779aee";
/// The Lark apps' verification token and Encrypt Key in the tests.
pub const LARK_TOKEN: &str = "lark-verification-token";
pub const LARK_KEY: &str = "lark-encrypt-key";

/// A `nats-server -js` owned by the test, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: TempDir,
}

impl NatsServer {
    /// Starts on a random port.
    pub fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let (child, port) = spawn_nats(None, store.path());
        NatsServer {
            child: Some(child),
            port,
            store,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (the store directory is kept).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        let (child, port) = spawn_nats(Some(self.port), self.store.path());
        assert_eq!(port, self.port);
        self.child = Some(child);
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the server process: connections stay open but
    /// nothing is answered, like a stalled broker.
    pub fn signal(&self, sig: &str) {
        signal(self.child.as_ref().expect("running"), sig);
    }

    /// Pauses the server and waits until every one of its threads is stopped: after SIGSTOP
    /// nats-server can keep answering for a few milliseconds (STREAMS.md §C), which would let a
    /// publish through that the test means to stall.
    pub fn pause(&self) {
        self.signal("-STOP");
        wait_all_threads_stopped(self.child.as_ref().expect("running").id());
    }

    pub async fn client(&self) -> async_nats::Client {
        tokio::time::timeout(WAIT, async_nats::connect(self.url()))
            .await
            .expect("connect timed out")
            .expect("connect")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `command` (a `nats-server`) and waits until it says it is ready: the process, and
/// the client port it listens on (`None` when it was not ready within [`WAIT`]).
pub fn start_nats(command: Command) -> (Child, Option<u16>) {
    let mut child = dies_with_test(command)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server must be installed (see ./test)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                port = rest
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim().parse::<u16>().ok());
            }
            if line.contains("Server is ready") {
                let _ = tx.send(port);
            }
        }
        // The pipe is drained until the server exits so it never blocks on logging.
    });
    (child, rx.recv_timeout(WAIT).ok().flatten())
}

fn spawn_nats(port: Option<u16>, store: &std::path::Path) -> (Child, u16) {
    let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(store);
        let (mut child, port) = start_nats(command);
        match port {
            Some(p) => return (child, p),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                // The old process may still hold the port for a moment after a restart.
                assert!(
                    std::time::Instant::now() < deadline,
                    "nats-server did not start"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Waits until every thread of process `pid` is in the stopped state (`T` in
/// `/proc/<pid>/task/*/stat`).
pub fn wait_all_threads_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process runs");
        let all_stopped = tasks.filter_map(Result::ok).all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses and may hold spaces.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            state.is_some_and(|s| s.starts_with('T') || s.starts_with('t'))
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `sig` (e.g. `-STOP`) to a server the test started.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Makes a server the test starts die with the test process, even when the process is killed
/// (a timeout, Ctrl-C) and its Drop guards never run: no broker outlives its test run.
pub fn dies_with_test(mut command: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A running daemon and the handles a test needs.
pub struct TestApp {
    pub ingress: SocketAddr,
    /// The internal listener (`POST /notify`), when configured.
    pub internal: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub bus: Arc<Bus>,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: reqwest::Client,
}

/// The token of the client every test configuration has ([`toml_with`]); [`TestApp`]'s
/// HTTP client sends it with every request.
pub const CLIENT_TOKEN: &str = "test-client-token-0123456789";

/// The configuration tests start from: the three listeners on port 0, a client allowed
/// everything (token [`CLIENT_TOKEN`]), plus `extra` TOML, its targets allowed the fakes'
/// `http://` ([`allow_insecure_http`]).
pub fn toml_with(extra: &str) -> String {
    allow_insecure_http(&format!(
        r#"
        [clients.test]
        token = "{CLIENT_TOKEN}"
        targets = ["*"]
        allow_recipients = true
        allow_raw = true

        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        internal_listen = "127.0.0.1:0"
        {extra}
        "#
    ))
}

/// The fake platforms are local `http://` servers, which a target may reach only with
/// `allow_insecure_http = true`: set on every `[targets.<name>]` table of `toml` that does not
/// say it already.
pub fn allow_insecure_http(toml: &str) -> String {
    let mut out = String::with_capacity(toml.len());
    let mut lines = toml.lines().peekable();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let header = line.trim();
        if header.starts_with("[targets.") && header.ends_with(']') {
            let said = lines
                .peek()
                .is_some_and(|next| next.trim().starts_with("allow_insecure_http"));
            if !said {
                out.push_str("allow_insecure_http = true\n");
            }
        }
    }
    out
}

pub const MAIN_APP: &str = r#"
[apps.dingtalk.main]
token = "mryue"
aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
receiver_id = "ding6ccabc44d2c8d38b"
"#;

/// The `[bus]` section for a test NATS server (its own stream, fast timeouts).
pub fn nats_bus(url: &str) -> String {
    format!(
        r#"
        [bus]
        kind = "nats"
        [bus.nats]
        url = "{url}"
        stream = "TEST_EVENTS"
        duplicate_window = "2m"
        publish_timeout = "2s"
        reconnect_max_delay = "250ms"
        "#
    )
}

impl TestApp {
    /// Builds and starts the daemon from TOML (which must set the `[server]` listeners).
    pub async fn start(toml: &str) -> TestApp {
        let toml = allow_insecure_http(toml);
        let settings = config::from_figment(figment::Figment::from(Toml::string(&toml)))
            .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        TestApp::start_settings(settings).await
    }

    /// Builds and starts the daemon from settings already loaded (e.g. from a file and the
    /// environment, with `config::load`).
    pub async fn start_settings(settings: config::Settings) -> TestApp {
        // Logs show with `--nocapture`; RUST_LOG selects them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let shutdown = Shutdown::new();
        let app = App::build(settings, shutdown.clone()).await.expect("build");
        let (ingress, internal, admin) = (app.ingress_addr, app.internal_addr, app.admin_addr);
        let bus = app.bus().clone();
        let metrics = app.metrics().clone();
        let task = tokio::spawn(app.run());
        TestApp {
            ingress,
            admin,
            bus,
            metrics,
            shutdown,
            task,
            http: client_with_token(CLIENT_TOKEN),
            internal,
        }
    }

    /// The URL of `path`: `/notify/…` on the internal listener, the rest on the public one.
    pub fn url(&self, path: &str) -> String {
        match (path.starts_with("/notify"), self.internal) {
            (true, Some(internal)) => format!("http://{internal}{path}"),
            _ => self.public_url(path),
        }
    }

    /// The URL of `path` on the public (callback) listener.
    pub fn public_url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingress, path)
    }

    pub async fn get_admin(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{}", self.admin, path))
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let res = self.get_admin("/readyz").await;
            if res.status() == 200 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                // What /readyz said last: which part was not ready.
                let body = res.text().await.unwrap_or_default();
                panic!("never became ready: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Value of `imbridge_callbacks_total` for a DingTalk app.
    pub fn callbacks(&self, app: &str, outcome: &str) -> u64 {
        self.platform_callbacks("dingtalk", app, outcome)
    }

    /// Value of `imbridge_callbacks_total` for these labels.
    pub fn platform_callbacks(&self, platform: &str, app: &str, outcome: &str) -> u64 {
        self.metrics
            .callbacks_total
            .with_label_values(&[platform, app, outcome])
            .get()
    }

    /// Stops the daemon and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("shutdown timed out")
            .unwrap()
            .unwrap();
    }
}

/// POSTs `body` as JSON; the status and the JSON answer (null when it is none).
pub async fn post_json(
    client: &reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let res = client
        .post(url)
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or_default())
}

/// An HTTP client sending `Authorization: Bearer <token>` with every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {token}")
        .parse()
        .expect("a valid header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("an HTTP client")
}

/// Plays DingTalk: encrypts with a fresh random prefix, signs, posts, and checks replies.
#[derive(Clone)]
pub struct DingTalk {
    pub crypt: MsgCrypt,
}

/// A signed callback, before sending (so tests can tamper with it).
#[derive(Clone, Debug)]
pub struct Callback {
    pub query: Vec<(String, String)>,
    pub body: String,
}

impl DingTalk {
    pub fn new(token: &str, aes_key: &str, receiver: &str) -> Self {
        DingTalk {
            crypt: MsgCrypt::new(token, aes_key, receiver).unwrap(),
        }
    }

    pub fn main() -> Self {
        Self::new(TOKEN, AES_KEY, CORP_ID)
    }

    /// Signs an already encrypted payload with the current time.
    pub fn sign(&self, encrypt: &str) -> Callback {
        let ts = imbridge::platform::now_ms().to_string();
        let nonce = "nonce123";
        let sig = self.crypt.signature(&ts, nonce, encrypt);
        Callback {
            query: vec![
                ("msg_signature".into(), sig),
                ("timestamp".into(), ts),
                ("nonce".into(), nonce.into()),
            ],
            body: serde_json::json!({ "encrypt": encrypt }).to_string(),
        }
    }

    pub fn callback(&self, plaintext: &str) -> Callback {
        self.sign(&self.crypt.encrypt_fresh(plaintext.as_bytes()))
    }

    /// Checks a reply the way DingTalk does: signature over the reply's fields, `success`.
    pub fn check_reply(&self, reply: &Reply) {
        assert_eq!(reply.nonce.len(), 16, "reply nonce must have 16 characters");
        assert!(reply.nonce.bytes().all(|b| b.is_ascii_alphanumeric()));
        let ts: u64 = reply.time_stamp.parse().expect("timeStamp is ms");
        assert!(imbridge::platform::now_ms().abs_diff(ts) < 60_000);
        assert!(self.crypt.verify(
            &reply.msg_signature,
            &reply.time_stamp,
            &reply.nonce,
            &reply.encrypt
        ));
        let d = self.crypt.decrypt(&reply.encrypt).expect("reply decrypts");
        assert_eq!(d.message, b"success");
    }
}

impl Callback {
    pub fn set(&mut self, key: &str, value: &str) {
        self.query.retain(|(k, _)| k != key);
        self.query.push((key.into(), value.into()));
    }

    pub fn remove(&mut self, key: &str) {
        self.query.retain(|(k, _)| k != key);
    }

    pub async fn post(&self, app: &TestApp, name: &str) -> reqwest::Response {
        self.post_to(&app.http, &app.url(""), name).await
    }

    /// Posts to the public listener at `base` (`http://host:port`) of a daemon of any kind.
    pub async fn post_to(
        &self,
        http: &reqwest::Client,
        base: &str,
        name: &str,
    ) -> reqwest::Response {
        http.post(format!("{base}/callbacks/dingtalk/{name}"))
            .query(&self.query)
            .header("content-type", "application/json")
            .body(self.body.clone())
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    }
}

/// A bpms_instance_change event with a unique instance id (so tests don't dedupe each other).
pub fn approval_event(instance: &str) -> String {
    format!(
        r#"{{"EventType":"bpms_instance_change","processInstanceId":"{instance}","corpId":"ding6ccabc44d2c8d38b","createTime":1608001800000,"title":"张三提交的请假","type":"finish","staffId":"manager75","result":"agree","processCode":"PROC-EXAMPLE"}}"#
    )
}
