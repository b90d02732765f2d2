//! A fake "robot farm": one local HTTP server playing the three group-bot webhooks of
//! `PROTOCOLS.md`: the DingTalk custom robot (§3), the WeCom group robot (§6.1) and the Lark
//! custom bot (§8.1). It checks every request the way the platform does (token, signature,
//! body, rate limit), answers as the platform would, and records everything the daemon got
//! wrong as a violation, so a test can end with `assert!(farm.violations().is_empty())`.
//!
//! Per request, in this order:
//! 1. the arrival instant is logged for the robot (every request counts toward the limits:
//!    throttled, failed and scripted ones too, as on the platforms);
//! 2. rate limits, as a strict sliding window: a request breaks `(n, w)` when, counting
//!    itself, more than `n` requests arrived within the last `w` (`at > now - w`);
//! 3. a scripted answer, if one is queued;
//! 4. the signature (DingTalk and Lark robots that have a secret);
//! 5. the body;
//! 6. success, recorded in [`RobotFarm::accepted`].
//!
//! Tokens are unique across the farm; a robot is only found on its own platform's path.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use warp::http::{Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Reply};

/// How long [`Scripted::Close`] holds a request before answering 504: longer than any client
/// timeout a test configures, so for the daemon it looks like a connection that never answers.
pub const CLOSE_HOLD: Duration = Duration::from_secs(60);

/// Signed timestamps must be within this distance of the farm's clock (both platforms: 1 h).
const SIGN_WINDOW: Duration = Duration::from_secs(3600);

/// Largest body the Lark custom bot takes (§8.1).
const LARK_MAX_BODY: usize = 20 * 1024;

/// Largest `text.content` / `markdown.content` of a WeCom group robot (§6.1), in bytes.
const WECOM_MAX_TEXT: usize = 2048;
const WECOM_MAX_MARKDOWN: usize = 4096;

/// Which webhook a robot impersonates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    DingTalk,
    WeCom,
    Lark,
}

impl Platform {
    fn name(self) -> &'static str {
        match self {
            Platform::DingTalk => "dingtalk",
            Platform::WeCom => "wecom",
            Platform::Lark => "lark",
        }
    }

    /// The platform's error JSON shape.
    fn error(self, code: i64, msg: &str) -> Value {
        match self {
            Platform::Lark => json!({ "code": code, "msg": msg }),
            _ => json!({ "errcode": code, "errmsg": msg }),
        }
    }

    fn success(self) -> Value {
        match self {
            Platform::Lark => json!({ "code": 0, "msg": "success", "data": {} }),
            _ => json!({ "errcode": 0, "errmsg": "ok" }),
        }
    }

    fn invalid_token(self) -> Value {
        match self {
            Platform::DingTalk => self.error(300001, "token is not exist"),
            Platform::WeCom => self.error(93000, "invalid webhook url"),
            Platform::Lark => self.error(
                19001,
                "param invalid: incoming webhook access token invalid",
            ),
        }
    }

    fn throttled(self) -> Value {
        match self {
            Platform::DingTalk => self.error(130101, "send too fast, exceed 20 times per minute"),
            Platform::WeCom => self.error(45009, "api freq out of limit"),
            Platform::Lark => self.error(11232, "frequency limited"),
        }
    }

    fn bad_request_code(self) -> i64 {
        match self {
            Platform::DingTalk => 40035,
            Platform::WeCom => 40008,
            Platform::Lark => 9499,
        }
    }
}

/// One fake robot.
#[derive(Debug, Clone)]
pub struct Robot {
    pub platform: Platform,
    pub token: String,
    /// DingTalk `SEC…` or Lark signing secret; `None` disables the signature check.
    pub secret: Option<String>,
    /// `(n, w)`: at most `n` requests within any `w`.
    pub limits: Vec<(u32, Duration)>,
}

impl Robot {
    /// A DingTalk robot with the documented limit, 20 per minute, and no secret.
    pub fn dingtalk(token: &str) -> Robot {
        Robot {
            platform: Platform::DingTalk,
            token: token.into(),
            secret: None,
            limits: vec![(20, Duration::from_secs(60))],
        }
    }

    /// A WeCom group robot with the documented limit, 20 per minute.
    pub fn wecom(token: &str) -> Robot {
        Robot {
            platform: Platform::WeCom,
            token: token.into(),
            secret: None,
            limits: vec![(20, Duration::from_secs(60))],
        }
    }

    /// A Lark custom bot with the documented limits, 5 per second and 100 per minute, and no
    /// secret.
    pub fn lark(token: &str) -> Robot {
        Robot {
            platform: Platform::Lark,
            token: token.into(),
            secret: None,
            limits: vec![(5, Duration::from_secs(1)), (100, Duration::from_secs(60))],
        }
    }

    pub fn with_secret(mut self, secret: &str) -> Robot {
        self.secret = Some(secret.into());
        self
    }

    pub fn with_limits(mut self, limits: Vec<(u32, Duration)>) -> Robot {
        self.limits = limits;
        self
    }
}

/// A request the farm answered with success.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub body: Value,
    /// The URL-decoded query string (DingTalk: `access_token`, `timestamp`, `sign`).
    pub query: Vec<(String, String)>,
}

/// A forced answer for the next request to a robot (see [`RobotFarm::script`]).
#[derive(Debug, Clone)]
pub enum Scripted {
    /// That HTTP status with body `{"error":"scripted"}`.
    Status(u16),
    /// HTTP 200 with the platform's error shape and this code.
    ErrCode(i64),
    /// Sleep, then handle the request normally (signature, body, success).
    Delay(Duration),
    /// Never answer in time: the request is held for [`CLOSE_HOLD`], then gets a 504. (warp
    /// cannot drop a connection from a handler; for a client with a timeout the effect is the
    /// same transport failure.)
    Close,
}

/// Handle to a running farm. Clones share the state; the server stops when the last clone is
/// dropped (or with the test's runtime).
#[derive(Clone)]
pub struct RobotFarm {
    state: Arc<State>,
    addr: SocketAddr,
    _server: Arc<ServerGuard>,
}

struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct State {
    robots: Mutex<HashMap<String, RobotState>>,
    violations: Mutex<Vec<String>>,
}

struct RobotState {
    robot: Robot,
    /// Arrival instants of every request, in order (taken under the lock, so sorted).
    arrivals: Vec<Instant>,
    accepted: Vec<Received>,
    script: VecDeque<Scripted>,
}

impl State {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

impl RobotFarm {
    /// Binds 127.0.0.1:0 and serves in a tokio task.
    pub async fn start() -> RobotFarm {
        let state = Arc::new(State::default());
        let s = state.clone();
        let routes = warp::method()
            .and(warp::path::full())
            .and(warp::query::<Vec<(String, String)>>())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::body::bytes())
            .and_then(move |method, path, query, content_type, body| {
                handle(s.clone(), method, path, query, content_type, body)
            });
        let s = state.clone();
        let routes = routes.recover(move |rejection: warp::Rejection| {
            s.violation(format!("unexpected request: rejected with {rejection:?}"));
            async move {
                Ok::<_, Infallible>(warp::reply::with_status(
                    warp::reply::json(&json!({ "error": "unexpected request" })),
                    StatusCode::BAD_REQUEST,
                ))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(warp::serve(routes).incoming(listener).run());
        RobotFarm {
            state,
            addr,
            _server: Arc::new(ServerGuard(task)),
        }
    }

    /// The farm's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers a robot and returns the webhook URL the daemon should be configured with.
    /// Panics if the token is already taken.
    pub fn add(&self, robot: Robot) -> String {
        let port = self.addr.port();
        let url = match robot.platform {
            Platform::DingTalk => format!(
                "http://127.0.0.1:{port}/robot/send?access_token={}",
                robot.token
            ),
            Platform::WeCom => format!(
                "http://127.0.0.1:{port}/cgi-bin/webhook/send?key={}",
                robot.token
            ),
            Platform::Lark => format!(
                "http://127.0.0.1:{port}/open-apis/bot/v2/hook/{}",
                robot.token
            ),
        };
        let mut robots = self.state.robots.lock().unwrap();
        assert!(
            !robots.contains_key(&robot.token),
            "robot token {:?} added twice",
            robot.token
        );
        robots.insert(
            robot.token.clone(),
            RobotState {
                robot,
                arrivals: Vec::new(),
                accepted: Vec::new(),
                script: VecDeque::new(),
            },
        );
        url
    }

    /// Queues forced answers: the next requests to that robot get them, one each, in order
    /// (after the rate-limit check, before the signature and body checks).
    pub fn script(&self, token: &str, answers: Vec<Scripted>) {
        self.with_robot(token, |r| r.script.extend(answers));
    }

    /// Requests answered with success, in arrival order.
    pub fn accepted(&self, token: &str) -> Vec<Received> {
        self.with_robot(token, |r| r.accepted.clone())
    }

    /// All requests that reached this robot (throttled, scripted and rejected ones too).
    pub fn requests(&self, token: &str) -> usize {
        self.with_robot(token, |r| r.arrivals.len())
    }

    /// Every rate-limit breach, signature failure, bad body, unknown token and unexpected
    /// request, as `"<kind>: <details>"`.
    pub fn violations(&self) -> Vec<String> {
        self.state.violations.lock().unwrap().clone()
    }

    /// The largest number of requests (all, not only accepted) within any sliding window of
    /// that length (arrivals `a <= b` are in one window when `b - a < window`).
    pub fn max_in_window(&self, token: &str, window: Duration) -> usize {
        self.with_robot(token, |r| max_in_window(&r.arrivals, window))
    }

    /// Polls until at least `n` requests were accepted and returns all accepted ones; panics
    /// after `timeout`.
    pub async fn wait_accepted(&self, token: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.accepted(token);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "robot {token:?}: {} of {n} requests accepted after {timeout:?} ({} arrived); \
                 violations: {:#?}",
                got.len(),
                self.requests(token),
                self.violations()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn with_robot<T>(&self, token: &str, f: impl FnOnce(&mut RobotState) -> T) -> T {
        let mut robots = self.state.robots.lock().unwrap();
        let r = robots
            .get_mut(token)
            .unwrap_or_else(|| panic!("no robot {token:?} in the farm"));
        f(r)
    }
}

fn max_in_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (i, &at) in arrivals.iter().enumerate() {
        while start <= i && at.duration_since(arrivals[start]) >= window {
            start += 1;
        }
        best = best.max(i + 1 - start);
    }
    best
}

/// base64(HMAC-SHA256(key = secret, message = "{ts_ms}\n{secret}")), before URL-encoding
/// (§3.1).
pub fn dingtalk_sign(secret: &str, ts_ms: u64) -> String {
    dingtalk_sign_str(secret, &ts_ms.to_string())
}

/// base64(HMAC-SHA256(key = "{ts_s}\n{secret}", message = empty)) (§8.1).
pub fn lark_sign(secret: &str, ts_s: u64) -> String {
    lark_sign_str(secret, &ts_s.to_string())
}

fn dingtalk_sign_str(secret: &str, ts: &str) -> String {
    hmac_b64(secret.as_bytes(), format!("{ts}\n{secret}").as_bytes())
}

fn lark_sign_str(secret: &str, ts: &str) -> String {
    hmac_b64(format!("{ts}\n{secret}").as_bytes(), b"")
}

fn hmac_b64(key: &[u8], msg: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn now_since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
}

fn reply(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn ok(body: &Value) -> Response {
    reply(StatusCode::OK, body)
}

/// Which robot a path and query address, if any.
fn route(path: &str, query: &[(String, String)]) -> Option<(Platform, String)> {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    match path {
        "/robot/send" => Some((Platform::DingTalk, param("access_token"))),
        "/cgi-bin/webhook/send" => Some((Platform::WeCom, param("key"))),
        _ => path
            .strip_prefix("/open-apis/bot/v2/hook/")
            .filter(|t| !t.contains('/'))
            .map(|t| (Platform::Lark, t.to_string())),
    }
}

/// What the locked part of the handling decided.
enum Step {
    Unknown,
    Throttled(String),
    Go {
        scripted: Option<Scripted>,
        secret: Option<String>,
        at: Instant,
    },
}

async fn handle(
    state: Arc<State>,
    method: Method,
    path: FullPath,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: bytes::Bytes,
) -> Result<Response, warp::Rejection> {
    Ok(handle_inner(state, method, path, query, content_type, body).await)
}

async fn handle_inner(
    state: Arc<State>,
    method: Method,
    path: FullPath,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    body: bytes::Bytes,
) -> Response {
    let Some((platform, token)) = route(path.as_str(), &query) else {
        state.violation(format!(
            "unexpected request: {method} {} (no such webhook)",
            path.as_str()
        ));
        return reply(StatusCode::NOT_FOUND, &json!({ "error": "not found" }));
    };
    if method != Method::POST {
        state.violation(format!(
            "unexpected request: {method} {} (webhooks take POST)",
            path.as_str()
        ));
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method not allowed" }),
        );
    }
    let p = platform.name();

    // 1-3: log the arrival, check the limits, pop a scripted answer, all under one lock so the
    // arrival log stays sorted.
    let step = {
        let mut robots = state.robots.lock().unwrap();
        match robots.get_mut(&token) {
            Some(r) if r.robot.platform == platform => {
                let now = Instant::now();
                r.arrivals.push(now);
                let broken = r.robot.limits.iter().find_map(|&(n, w)| {
                    let count = r
                        .arrivals
                        .iter()
                        .rev()
                        .take_while(|&&at| now.duration_since(at) < w)
                        .count();
                    (count > n as usize).then_some((n, w, count))
                });
                match broken {
                    Some((n, w, count)) => Step::Throttled(format!(
                        "rate limit: {p} robot {token:?}: request #{} is the {count}th within \
                         {w:?} (limit {n})",
                        r.arrivals.len()
                    )),
                    None => Step::Go {
                        scripted: r.script.pop_front(),
                        secret: r.robot.secret.clone(),
                        at: now,
                    },
                }
            }
            _ => Step::Unknown,
        }
    };
    let (scripted, secret, at) = match step {
        Step::Unknown => {
            state.violation(format!(
                "unknown token: {p} robot {token:?} is not registered"
            ));
            return ok(&platform.invalid_token());
        }
        Step::Throttled(v) => {
            state.violation(v);
            return ok(&platform.throttled());
        }
        Step::Go {
            scripted,
            secret,
            at,
        } => (scripted, secret, at),
    };

    match scripted {
        Some(Scripted::Status(s)) => {
            let status = StatusCode::from_u16(s).expect("scripted status is a valid HTTP status");
            return reply(status, &json!({ "error": "scripted" }));
        }
        Some(Scripted::ErrCode(c)) => return ok(&platform.error(c, "scripted")),
        Some(Scripted::Delay(d)) => tokio::time::sleep(d).await,
        Some(Scripted::Close) => {
            tokio::time::sleep(CLOSE_HOLD).await;
            return reply(
                StatusCode::GATEWAY_TIMEOUT,
                &json!({ "error": "scripted close" }),
            );
        }
        None => {}
    }

    let bad_body = |reason: String| {
        state.violation(format!("bad body: {p} robot {token:?}: {reason}"));
        ok(&platform.error(platform.bad_request_code(), &reason))
    };
    let json_type = content_type
        .as_deref()
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    if !json_type {
        return bad_body(format!(
            "content-type must be application/json, got {content_type:?}"
        ));
    }
    if platform == Platform::Lark && body.len() > LARK_MAX_BODY {
        return bad_body(format!(
            "body has {} bytes, more than {LARK_MAX_BODY}",
            body.len()
        ));
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => return bad_body(format!("body is not a JSON object: {other}")),
        Err(e) => return bad_body(format!("body is not UTF-8 JSON: {e}")),
    };

    // 4: signature.
    if let Some(secret) = secret {
        match platform {
            Platform::DingTalk => {
                if let Err((errmsg, why)) = check_dingtalk_sign(&secret, &query) {
                    state.violation(format!("dingtalk sign: robot {token:?}: {why}"));
                    return ok(&platform.error(310000, errmsg));
                }
            }
            Platform::Lark => {
                if let Err(why) = check_lark_sign(&secret, &value) {
                    state.violation(format!("lark sign: robot {token:?}: {why}"));
                    return ok(&platform.error(
                        19021,
                        "sign match fail or timestamp is not within one hour from current time",
                    ));
                }
            }
            Platform::WeCom => {}
        }
    }

    // 5: body.
    let checked = match platform {
        Platform::DingTalk => check_dingtalk_body(&value),
        Platform::WeCom => check_wecom_body(&value),
        Platform::Lark => check_lark_body(&value),
    };
    if let Err(e) = checked {
        return match e {
            BodyError::Bad(reason) => bad_body(reason),
            BodyError::TooLong(reason) => {
                state.violation(format!("bad body: {p} robot {token:?}: {reason}"));
                ok(&platform.error(45002, &reason))
            }
        };
    }

    // 6: success.
    let accepted = Received {
        at,
        body: value,
        query,
    };
    state
        .robots
        .lock()
        .unwrap()
        .get_mut(&token)
        .expect("robots are never removed")
        .accepted
        .push(accepted);
    ok(&platform.success())
}

/// Ok, or (errmsg, violation detail).
fn check_dingtalk_sign(
    secret: &str,
    query: &[(String, String)],
) -> Result<(), (&'static str, String)> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let ts = get("timestamp").ok_or(("invalid timestamp", "no timestamp in the query".into()))?;
    let ts_ms: u64 = ts.parse().map_err(|_| {
        (
            "invalid timestamp",
            format!("timestamp {ts:?} is not milliseconds"),
        )
    })?;
    let skew = Duration::from_millis(ts_ms).abs_diff(now_since_epoch());
    if skew > SIGN_WINDOW {
        return Err((
            "invalid timestamp",
            format!("timestamp {ts} is {skew:?} away from now (is it in milliseconds?)"),
        ));
    }
    let sign = get("sign").ok_or(("sign not match", "no sign in the query".into()))?;
    let want = dingtalk_sign_str(secret, ts);
    if sign != want {
        return Err((
            "sign not match",
            format!(
                "sign not match: got {sign:?} (after URL-decoding), want {want:?} for timestamp {ts}"
            ),
        ));
    }
    Ok(())
}

fn check_lark_sign(secret: &str, body: &Value) -> Result<(), String> {
    let ts = match body.get("timestamp") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(format!("body timestamp must be a string, got {other}")),
        None => return Err("no timestamp in the body".into()),
    };
    let ts_s: u64 = ts
        .parse()
        .map_err(|_| format!("timestamp {ts:?} is not seconds"))?;
    let skew = Duration::from_secs(ts_s).abs_diff(now_since_epoch());
    if skew > SIGN_WINDOW {
        return Err(format!(
            "timestamp {ts} is {skew:?} away from now (is it in seconds?)"
        ));
    }
    let sign = match body.get("sign") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(format!("body sign must be a string, got {other}")),
        None => return Err("no sign in the body".into()),
    };
    let want = lark_sign_str(secret, ts);
    if sign != want {
        return Err(format!(
            "sign not match: got {sign:?}, want {want:?} for timestamp {ts}"
        ));
    }
    Ok(())
}

enum BodyError {
    /// The platform's bad-request code.
    Bad(String),
    /// WeCom 45002.
    TooLong(String),
}

fn bad<T>(reason: impl Into<String>) -> Result<T, BodyError> {
    Err(BodyError::Bad(reason.into()))
}

/// The value at `path`, which must exist.
fn at<'a>(body: &'a Value, path: &[&str]) -> Result<&'a Value, BodyError> {
    let mut v = body;
    for key in path {
        v = match v.get(key) {
            Some(x) => x,
            None => return bad(format!("missing {}", path.join("."))),
        };
    }
    Ok(v)
}

fn string<'a>(body: &'a Value, path: &[&str]) -> Result<&'a str, BodyError> {
    match at(body, path)? {
        Value::String(s) => Ok(s),
        other => bad(format!("{} must be a string, got {other}", path.join("."))),
    }
}

fn object<'a>(body: &'a Value, path: &[&str]) -> Result<&'a Value, BodyError> {
    match at(body, path)? {
        v @ Value::Object(_) => Ok(v),
        other => bad(format!("{} must be an object, got {other}", path.join("."))),
    }
}

fn array<'a>(body: &'a Value, path: &[&str]) -> Result<&'a Vec<Value>, BodyError> {
    match at(body, path)? {
        Value::Array(a) => Ok(a),
        other => bad(format!("{} must be an array, got {other}", path.join("."))),
    }
}

/// §3.2.
fn check_dingtalk_body(b: &Value) -> Result<(), BodyError> {
    match string(b, &["msgtype"])? {
        "text" => {
            string(b, &["text", "content"])?;
        }
        "markdown" => {
            string(b, &["markdown", "title"])?;
            string(b, &["markdown", "text"])?;
        }
        "link" => {
            string(b, &["link", "title"])?;
            string(b, &["link", "text"])?;
            string(b, &["link", "messageUrl"])?;
        }
        "actionCard" => {
            string(b, &["actionCard", "title"])?;
            string(b, &["actionCard", "text"])?;
            if b["actionCard"].get("btns").is_some() {
                for btn in array(b, &["actionCard", "btns"])? {
                    string(btn, &["title"])?;
                    string(btn, &["actionURL"])?;
                }
            } else {
                string(b, &["actionCard", "singleTitle"])?;
                string(b, &["actionCard", "singleURL"])?;
            }
        }
        "feedCard" => {
            let links = array(b, &["feedCard", "links"])?;
            if links.is_empty() {
                return bad("feedCard.links is empty");
            }
            for link in links {
                string(link, &["title"])?;
                string(link, &["messageURL"])?;
            }
        }
        other => return bad(format!("unknown msgtype {other:?}")),
    }
    if b.get("at").is_some() {
        object(b, &["at"])?;
    }
    Ok(())
}

/// §6.1.
fn check_wecom_body(b: &Value) -> Result<(), BodyError> {
    let too_long = |path: &[&str], max: usize| -> Result<(), BodyError> {
        let s = string(b, path)?;
        if s.len() > max {
            return Err(BodyError::TooLong(format!(
                "{} has {} bytes, more than {max}",
                path.join("."),
                s.len()
            )));
        }
        Ok(())
    };
    match string(b, &["msgtype"])? {
        "text" => too_long(&["text", "content"], WECOM_MAX_TEXT)?,
        "markdown" => too_long(&["markdown", "content"], WECOM_MAX_MARKDOWN)?,
        "markdown_v2" => too_long(&["markdown_v2", "content"], WECOM_MAX_MARKDOWN)?,
        "image" => {
            string(b, &["image", "base64"])?;
            string(b, &["image", "md5"])?;
        }
        "news" => {
            let articles = array(b, &["news", "articles"])?;
            if !(1..=8).contains(&articles.len()) {
                return bad(format!(
                    "news.articles has {} items, not 1 to 8",
                    articles.len()
                ));
            }
            for a in articles {
                string(a, &["title"])?;
                string(a, &["url"])?;
            }
        }
        kind @ ("file" | "voice") => {
            string(b, &[kind, "media_id"])?;
        }
        "template_card" => {
            match string(b, &["template_card", "card_type"])? {
                "text_notice" => {}
                "news_notice" => {
                    string(b, &["template_card", "card_image", "url"])?;
                }
                other => return bad(format!("unknown template_card.card_type {other:?}")),
            }
            object(b, &["template_card", "card_action"])?;
            at(b, &["template_card", "card_action", "type"])?;
        }
        other => return bad(format!("unknown msgtype {other:?}")),
    }
    Ok(())
}

/// §8.1.
fn check_lark_body(b: &Value) -> Result<(), BodyError> {
    match string(b, &["msg_type"])? {
        "text" => {
            string(b, &["content", "text"])?;
        }
        "post" => {
            object(b, &["content", "post"])?;
        }
        "image" => {
            string(b, &["content", "image_key"])?;
        }
        "share_chat" => {
            string(b, &["content", "share_chat_id"])?;
        }
        "interactive" => {
            object(b, &["card"])?;
        }
        other => return bad(format!("unknown msg_type {other:?}")),
    }
    Ok(())
}
