//! The API gateway's overhead: the same call to a fake DingTalk server API, made directly
//! (baseline) and through the daemon's `/api/dingtalk/<app>/…` (which adds the managed access
//! token, the per-app rate limit and the client checks), each from the closed-loop generator
//! at the same concurrency. Writes `results/api.json`.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::callbacks;
use crate::load::{self, Stats};
use crate::procs::Daemon;

const CONCURRENCY: [usize; 2] = [16, 64];
const CLIENT_TOKEN: &str = "bench-api-client-token-0123456789";
/// The token the fake issues; a call without it is refused, as DingTalk would.
const ACCESS_TOKEN: &str = "bench-access-token";
/// The call: a small JSON body and a small JSON answer, as `topapi/v2/user/get` has.
const PATH: &str = "topapi/v2/user/get";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiPoint {
    pub concurrency: usize,
    pub direct: Stats,
    pub gateway: Stats,
    /// The daemon's CPU per call through the gateway, in microseconds.
    pub daemon_cpu_us: f64,
}

/// A fake DingTalk classic API: `gettoken`, and any other path answered `errcode` 0 when it
/// carries the token (40014 otherwise).
async fn fake_oapi(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let path = req.uri().path().to_owned();
                let query = req.uri().query().unwrap_or_default().to_owned();
                let _ = req.into_body().collect().await;
                let body = if path == "/gettoken" {
                    format!(
                        r#"{{"errcode":0,"errmsg":"ok","access_token":"{ACCESS_TOKEN}","expires_in":7200}}"#
                    )
                } else if query.contains(&format!("access_token={ACCESS_TOKEN}")) {
                    r#"{"errcode":0,"errmsg":"ok","result":{"userid":"u1","name":"张三"}}"#.into()
                } else {
                    r#"{"errcode":40014,"errmsg":"invalid access_token"}"#.into()
                };
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One call; `true` when it answered 200 with errcode 0.
async fn call(http: &reqwest::Client, url: &str, token: Option<&str>) -> bool {
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"userid":"u1","language":"zh_CN"}"#);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(res) if res.status() == 200 => res
            .bytes()
            .await
            .is_ok_and(|b| b.starts_with(b"{\"errcode\":0,")),
        _ => false,
    }
}

async fn load(url: String, token: Option<&'static str>, c: usize, d: Duration) -> Stats {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()
        .expect("client");
    let url = Arc::new(url);
    load::closed_loop(c, Duration::from_secs(1), d, move |_| {
        let (http, url) = (http.clone(), url.clone());
        async move { call(&http, &url, token).await }
    })
    .await
}

pub async fn run(out: &Path, d: Duration) -> anyhow::Result<()> {
    eprintln!("api: the gateway against calling the fake platform directly");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let fake = listener.local_addr()?;
    let fake_task = tokio::spawn(fake_oapi(listener));
    // A limit that does not bind (100,000 calls/s, no margin): what is measured is the
    // gateway's own cost, not a wait for the limiter.
    let toml = format!(
        "{}app_key = \"bench-key\"\napp_secret = \"bench-secret\"\n\
         oapi_base = \"http://{fake}\"\nallow_insecure_http = true\n\
         api_rate_limit = \"1000/10ms\"\n\
         [clients.bench]\ntoken = \"{CLIENT_TOKEN}\"\napi = [\"dingtalk/bench/*\"]\n\
         [notify]\nenabled = false\nrate_limit_margin = \"0s\"\n",
        callbacks::app_toml()
    );
    let daemon = Daemon::start_internal(&toml).await?;
    let internal = daemon.internal.expect("an internal listener");
    let mut points = Vec::new();
    for c in CONCURRENCY {
        let direct_url = format!("http://{fake}/{PATH}?access_token={ACCESS_TOKEN}");
        let direct = load(direct_url, None, c, d).await;
        let gateway_url = format!("http://127.0.0.1:{internal}/api/dingtalk/bench/{PATH}");
        let before = daemon.proc.cpu_time();
        let gateway = load(gateway_url, Some(CLIENT_TOKEN), c, d).await;
        let cpu = daemon.proc.cpu_time().saturating_sub(before);
        let calls = (gateway.ok + gateway.errors).max(1) as f64;
        points.push(ApiPoint {
            concurrency: c,
            daemon_cpu_us: cpu.as_secs_f64() * 1e6 / calls,
            direct,
            gateway,
        });
    }
    fake_task.abort();
    crate::save(out, "api", &points)
}
