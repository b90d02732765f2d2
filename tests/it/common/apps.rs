//! A fake "app farm": one local HTTP server playing the three app-message platforms of
//! `PROTOCOLS.md` under one base URL: DingTalk work notifications (§4, old-style API), WeCom app
//! messages (§6.2) and Lark app messages (§8.2), each with its token endpoint. It issues
//! tokens, checks every request the way the platform does (credentials, token, body,
//! recipients, limits), answers as the platform would, and records everything the daemon got
//! wrong as a violation, so a test can end with `assert!(farm.violations().is_empty())`.
//!
//! Apps are named by one string: the DingTalk `app_key`, the WeCom `corp_id` (one app per
//! corp) and the Lark `app_id`.
//!
//! Token endpoints, per request:
//! 1. the app is found by its id (unknown: a violation and the platform's answer) and the
//!    fetch is counted, whatever comes next;
//! 2. a scripted answer, if one is queued;
//! 3. the secret (wrong: a violation and the platform's answer);
//! 4. a new random token, valid for the app's ttl; earlier tokens stay valid until their own
//!    expiry.
//!
//! Send endpoints, per request:
//! 1. the token is looked up (missing, never issued or issued for another platform: a
//!    violation) and the request is counted for its app (every request counts toward the
//!    limits: throttled, failed and scripted ones too, as on the platforms);
//! 2. Lark's tenant limits, as a strict sliding window: a request breaks `(n, w)` when,
//!    counting itself, more than `n` requests arrived within the last `w` (`at > now - w`);
//! 3. a scripted answer, if one is queued;
//! 4. token expiry: answered as the platform does, but not a violation, since a token can
//!    expire between the daemon's check and the platform's;
//! 5. content type and body;
//! 6. recipients: unknown ones are remembered in [`AppFarm::unknown_recipients`] and are not
//!    violations (who may be reached is the platform's data, not the daemon's mistake);
//!    DingTalk accepts them silently, WeCom lists them in `invaliduser` (81013 when nobody is
//!    left), Lark refuses with 230013. Then WeCom's per-member limits, whose breach is a
//!    violation although the send succeeds, and Lark's uuid deduplication (a repeat is
//!    answered like the first and not delivered again);
//! 7. success, recorded in [`AppFarm::sent`].
//!
//! Answers: DingTalk and WeCom always answer HTTP 200 with `errcode`; the Lark token endpoint
//! answers HTTP 200 with `code`, and the Lark send endpoint HTTP 400 with `code` for every
//! error (as the platform's error tables say), HTTP 200 for success.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::http::{Method, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Reply};

/// How long [`Scripted::Close`] holds a request before answering 504: longer than any client
/// timeout a test configures, so for the daemon it looks like a connection that never answers.
pub const CLOSE_HOLD: Duration = Duration::from_secs(60);

/// The token lifetime every platform issues unless [`AppFarm::set_token_ttl`] says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(7200);

/// DingTalk: the serialised `msg` of a work notification (§4).
const DINGTALK_MAX_MSG: usize = 2048;
/// DingTalk: recipients per call for internal apps (§4).
const DINGTALK_MAX_USERS: usize = 5000;
/// WeCom: `text.content` / `markdown.content` of an app message, in bytes.
const WECOM_MAX_CONTENT: usize = 2048;
/// WeCom: users in one `touser`.
const WECOM_MAX_USERS: usize = 1000;
/// WeCom: what one member may receive from one app (§6.2); the excess is dropped silently.
const WECOM_MEMBER_LIMITS: [(usize, Duration); 2] = [
    (30, Duration::from_secs(60)),
    (1000, Duration::from_secs(3600)),
];
/// Lark: send requests per tenant (one app here), code 11232 beyond (§8.2).
const LARK_TENANT_LIMITS: [(usize, Duration); 2] =
    [(5, Duration::from_secs(1)), (100, Duration::from_secs(60))];
/// Lark: longest `uuid`.
const LARK_MAX_UUID: usize = 50;
/// Lark: `content` of a text message, and of a post or card (the platform's documented
/// request limits, 150 KB and 30 KB).
const LARK_MAX_TEXT: usize = 150 * 1024;
const LARK_MAX_RICH: usize = 30 * 1024;

/// Which platform an app or a request belongs to.
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

    /// The platform's error shape.
    fn error(self, code: i64, msg: &str) -> Value {
        match self {
            Platform::Lark => json!({ "code": code, "msg": msg }),
            _ => json!({ "errcode": code, "errmsg": msg }),
        }
    }

    /// An error from a token endpoint: always HTTP 200.
    fn token_error(self, code: i64, msg: &str) -> Response {
        ok(&self.error(code, msg))
    }

    /// An error from a send endpoint: Lark says it with HTTP 400 too.
    fn send_error(self, code: i64, msg: &str) -> Response {
        let status = match self {
            Platform::Lark if code != 0 => StatusCode::BAD_REQUEST,
            _ => StatusCode::OK,
        };
        reply(status, &self.error(code, msg))
    }

    /// Unknown app on the token endpoint.
    fn unknown_app(self) -> Response {
        match self {
            Platform::DingTalk => self.token_error(40089, "invalid appkey or appsecret"),
            Platform::WeCom => self.token_error(40013, "invalid corpid"),
            Platform::Lark => self.token_error(10014, "app id not exists"),
        }
    }

    fn wrong_secret(self) -> Response {
        match self {
            Platform::DingTalk => self.token_error(40089, "invalid appkey or appsecret"),
            Platform::WeCom => self.token_error(40001, "invalid credential"),
            Platform::Lark => self.token_error(10014, "app secret invalid"),
        }
    }

    fn missing_token(self) -> Response {
        match self {
            Platform::DingTalk => self.send_error(40014, "invalid access_token"),
            Platform::WeCom => self.send_error(41001, "access_token missing"),
            Platform::Lark => self.send_error(
                99991661,
                "Missing access token for authorization. Please make a request with token attached.",
            ),
        }
    }

    fn invalid_token(self) -> Response {
        match self {
            Platform::DingTalk | Platform::WeCom => self.send_error(40014, "invalid access_token"),
            Platform::Lark => self.send_error(
                99991663,
                "Invalid access token for authorization. Please make a request with token attached.",
            ),
        }
    }

    fn expired_token(self) -> Response {
        match self {
            Platform::DingTalk | Platform::WeCom => self.send_error(42001, "access_token expired"),
            // Lark does not tell an expired tenant token from an invalid one.
            Platform::Lark => self.invalid_token(),
        }
    }
}

/// A DingTalk internal app sending work notifications.
#[derive(Debug, Clone)]
pub struct DingTalkApp {
    pub app_key: String,
    pub app_secret: String,
    pub agent_id: u64,
    /// The user ids the app can reach.
    pub users: Vec<String>,
}

/// A WeCom self-built app.
#[derive(Debug, Clone)]
pub struct WeComApp {
    pub corp_id: String,
    pub secret: String,
    pub agent_id: u64,
    /// The user ids in the app's visible scope.
    pub users: Vec<String>,
}

/// A Lark app with the bot ability.
#[derive(Debug, Clone)]
pub struct LarkApp {
    pub app_id: String,
    pub app_secret: String,
    /// The receive ids the bot can reach, of any type (`ou_…` open_ids, emails, user ids,
    /// `oc_…` chats).
    pub users: Vec<String>,
}

/// A send the farm answered with success.
#[derive(Debug, Clone)]
pub struct AppSend {
    pub at: Instant,
    /// Everyone the request addressed, in its order, reachable or not (see
    /// [`AppFarm::unknown_recipients`]).
    pub recipients: Vec<String>,
    /// The request body as sent (for Lark, `content` is still a JSON string; see
    /// [`AppSend::lark_content`]).
    pub body: Value,
    /// The URL-decoded query string (`access_token`, `receive_id_type`).
    pub query: Vec<(String, String)>,
    /// The token the request carried.
    pub token: String,
}

impl AppSend {
    /// A Lark body's `content`, parsed (the farm accepted it, so it is JSON).
    pub fn lark_content(&self) -> Value {
        let s = self.body["content"]
            .as_str()
            .expect("a Lark send has a string content");
        serde_json::from_str(s).expect("an accepted content is JSON")
    }
}

/// A forced answer for the next request to an app's token or send endpoint (see
/// [`AppFarm::script_token`], [`AppFarm::script_send`]).
#[derive(Debug, Clone)]
pub enum Scripted {
    /// That HTTP status with body `{"error":"scripted"}`.
    Status(u16),
    /// The platform's error shape with this code: HTTP 200, except on the Lark send endpoint,
    /// where a code other than 0 comes with HTTP 400 as the platform's own errors do.
    ErrCode(i64),
    /// Sleep, then handle the request normally.
    Delay(Duration),
    /// Never answer in time: the request is held for [`CLOSE_HOLD`], then gets a 504. (warp
    /// cannot drop a connection from a handler; for a client with a timeout the effect is the
    /// same transport failure.)
    Close,
}

/// Handle to a running farm. Clones share the state; the server stops when the last clone is
/// dropped (or with the test's runtime).
#[derive(Clone)]
pub struct AppFarm {
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
    farm: Mutex<Farm>,
    violations: Mutex<Vec<String>>,
}

impl State {
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
}

#[derive(Default)]
struct Farm {
    apps: HashMap<String, AppState>,
    /// Every token ever issued, by its value.
    tokens: HashMap<String, Issued>,
    /// Source of DingTalk task ids and WeCom msgids.
    next_id: u64,
}

struct Issued {
    app: String,
    expires_at: Instant,
}

/// The platform-specific part of an app.
#[derive(Debug, Clone)]
enum Kind {
    DingTalk { agent_id: u64 },
    WeCom { agent_id: u64 },
    Lark,
}

impl Kind {
    fn platform(&self) -> Platform {
        match self {
            Kind::DingTalk { .. } => Platform::DingTalk,
            Kind::WeCom { .. } => Platform::WeCom,
            Kind::Lark => Platform::Lark,
        }
    }
}

struct AppState {
    kind: Kind,
    secret: String,
    /// A set: a test may reach a hundred thousand members.
    users: HashSet<String>,
    ttl: Duration,
    token_fetches: usize,
    token_script: VecDeque<Scripted>,
    send_script: VecDeque<Scripted>,
    /// Arrival instants of every send request, in order (taken under the lock, so sorted).
    arrivals: Vec<Instant>,
    sent: Vec<AppSend>,
    /// Sends refused because their token had expired.
    expired_sends: usize,
    /// Deliveries per reachable member, in order.
    deliveries: HashMap<String, Vec<Instant>>,
    unknown_recipients: Vec<String>,
    /// Lark: uuid of each accepted send → the message id it got.
    uuids: HashMap<String, String>,
    duplicates: Vec<String>,
}

impl AppState {
    fn new(kind: Kind, secret: String, users: Vec<String>) -> AppState {
        AppState {
            kind,
            secret,
            users: users.into_iter().collect(),
            ttl: DEFAULT_TTL,
            token_fetches: 0,
            token_script: VecDeque::new(),
            send_script: VecDeque::new(),
            arrivals: Vec::new(),
            sent: Vec::new(),
            expired_sends: 0,
            deliveries: HashMap::new(),
            unknown_recipients: Vec::new(),
            uuids: HashMap::new(),
            duplicates: Vec::new(),
        }
    }

    fn note_unknown(&mut self, ids: &[String]) {
        for id in ids {
            if !self.unknown_recipients.contains(id) {
                self.unknown_recipients.push(id.clone());
            }
        }
    }
}

impl AppFarm {
    /// Binds 127.0.0.1:0 and serves in a tokio task.
    pub async fn start() -> AppFarm {
        let state = Arc::new(State::default());
        let s = state.clone();
        let routes = warp::method()
            .and(warp::path::full())
            .and(warp::query::<Vec<(String, String)>>())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::bytes())
            .and_then(
                move |method, path: FullPath, query, content_type, authorization, body| {
                    let req = Request {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        content_type,
                        authorization,
                        body,
                    };
                    handle(s.clone(), req)
                },
            );
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
        AppFarm {
            state,
            addr,
            _server: Arc::new(ServerGuard(task)),
        }
    }

    /// The farm's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of all three platforms, `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a DingTalk app under its `app_key`. Panics if the id is taken.
    pub fn add_dingtalk(&self, app: DingTalkApp) {
        let kind = Kind::DingTalk {
            agent_id: app.agent_id,
        };
        self.add(app.app_key, AppState::new(kind, app.app_secret, app.users));
    }

    /// Registers a WeCom app under its `corp_id`. Panics if the id is taken.
    pub fn add_wecom(&self, app: WeComApp) {
        let kind = Kind::WeCom {
            agent_id: app.agent_id,
        };
        self.add(app.corp_id, AppState::new(kind, app.secret, app.users));
    }

    /// Registers a Lark app under its `app_id`. Panics if the id is taken.
    pub fn add_lark(&self, app: LarkApp) {
        self.add(
            app.app_id,
            AppState::new(Kind::Lark, app.app_secret, app.users),
        );
    }

    fn add(&self, id: String, app: AppState) {
        let mut farm = self.state.farm.lock().unwrap();
        assert!(!farm.apps.contains_key(&id), "app {id:?} added twice");
        farm.apps.insert(id, app);
    }

    /// Lifetime of the tokens issued from now on (default [`DEFAULT_TTL`]). The answer says it
    /// in whole seconds, rounded down, and the token stops working after exactly `ttl`.
    pub fn set_token_ttl(&self, app: &str, ttl: Duration) {
        self.with_app(app, |a| a.ttl = ttl);
    }

    /// Every token issued to the app so far stops working now.
    pub fn expire_tokens(&self, app: &str) {
        let now = Instant::now();
        let mut farm = self.state.farm.lock().unwrap();
        assert!(farm.apps.contains_key(app), "no app {app:?} in the farm");
        for t in farm.tokens.values_mut().filter(|t| t.app == app) {
            t.expires_at = t.expires_at.min(now);
        }
    }

    /// Changes the secret the platform expects, as when it is rotated in the console: the
    /// daemon's configured one is wrong from now on (tokens already issued keep working).
    pub fn set_secret(&self, app: &str, secret: &str) {
        self.with_app(app, |a| a.secret = secret.into());
    }

    /// Requests to the app's token endpoint, whatever the answer (scripted and wrong-secret
    /// ones too).
    pub fn token_fetches(&self, app: &str) -> usize {
        self.with_app(app, |a| a.token_fetches)
    }

    /// Queues forced answers for the next token requests of the app, one each, in order
    /// (before the secret check).
    pub fn script_token(&self, app: &str, answers: Vec<Scripted>) {
        self.with_app(app, |a| a.token_script.extend(answers));
    }

    /// Queues forced answers for the next send requests of the app, one each, in order (after
    /// the rate-limit check, before the token expiry and body checks).
    pub fn script_send(&self, app: &str, answers: Vec<Scripted>) {
        self.with_app(app, |a| a.send_script.extend(answers));
    }

    /// Sends answered with success, in arrival order (Lark duplicates are not among them).
    pub fn sent(&self, app: &str) -> Vec<AppSend> {
        self.with_app(app, |a| a.sent.clone())
    }

    /// Send requests that carried one of the app's tokens, whatever the answer.
    pub fn requests(&self, app: &str) -> usize {
        self.with_app(app, |a| a.arrivals.len())
    }

    /// Send requests refused because their token had expired (not violations).
    pub fn expired_sends(&self, app: &str) -> usize {
        self.with_app(app, |a| a.expired_sends)
    }

    /// Lark: the uuids of sends answered as duplicates of an accepted one, one entry per
    /// repeat.
    pub fn duplicates(&self, app: &str) -> Vec<String> {
        self.with_app(app, |a| a.duplicates.clone())
    }

    /// Recipients the app cannot reach that some send addressed (accepted or refused), each
    /// once, in the order first seen.
    pub fn unknown_recipients(&self, app: &str) -> Vec<String> {
        self.with_app(app, |a| a.unknown_recipients.clone())
    }

    /// The largest number of send requests (all, not only accepted) within any sliding window
    /// of that length (arrivals `a <= b` are in one window when `b - a < window`).
    pub fn max_in_window(&self, app: &str, window: Duration) -> usize {
        self.with_app(app, |a| max_in_window(&a.arrivals, window))
    }

    /// The same for the accepted sends that reached one member.
    pub fn max_member_in_window(&self, app: &str, member: &str, window: Duration) -> usize {
        self.with_app(app, |a| {
            a.deliveries
                .get(member)
                .map_or(0, |d| max_in_window(d, window))
        })
    }

    /// Every unknown app or token, wrong secret, bad body, limit breach and unexpected
    /// request, as `"<kind>: <details>"`.
    pub fn violations(&self) -> Vec<String> {
        self.state.violations.lock().unwrap().clone()
    }

    /// Polls until at least `n` sends were accepted and returns all accepted ones; panics
    /// after `timeout`.
    pub async fn wait_sent(&self, app: &str, n: usize, timeout: Duration) -> Vec<AppSend> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.sent(app);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "app {app:?}: {} of {n} sends accepted after {timeout:?} ({} requests, {} token \
                 fetches, {} refused for expiry, unknown recipients {:?}); violations: {:#?}",
                got.len(),
                self.requests(app),
                self.token_fetches(app),
                self.expired_sends(app),
                self.unknown_recipients(app),
                self.violations()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn with_app<T>(&self, app: &str, f: impl FnOnce(&mut AppState) -> T) -> T {
        let mut farm = self.state.farm.lock().unwrap();
        let a = farm
            .apps
            .get_mut(app)
            .unwrap_or_else(|| panic!("no app {app:?} in the farm"));
        f(a)
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

/// Requests within the last `w` (counting the one at `now`, which is the last arrival).
fn in_window(arrivals: &[Instant], now: Instant, w: Duration) -> usize {
    arrivals
        .iter()
        .rev()
        .take_while(|&&at| now.duration_since(at) < w)
        .count()
}

/// The first of `limits` the arrivals break at `now`, as `(n, w, count)`.
fn broken_limit(
    arrivals: &[Instant],
    now: Instant,
    limits: &[(usize, Duration)],
) -> Option<(usize, Duration, usize)> {
    limits.iter().find_map(|&(n, w)| {
        let count = in_window(arrivals, now, w);
        (count > n).then_some((n, w, count))
    })
}

fn reply(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn ok(body: &Value) -> Response {
    reply(StatusCode::OK, body)
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

struct Request {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    authorization: Option<String>,
    body: bytes::Bytes,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json_type(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"))
    }
}

#[derive(Clone, Copy)]
enum Endpoint {
    Token,
    Send,
}

/// Which endpoint a path is, and the method it takes.
fn route(path: &str) -> Option<(Platform, Endpoint, Method)> {
    Some(match path {
        "/gettoken" => (Platform::DingTalk, Endpoint::Token, Method::GET),
        "/topapi/message/corpconversation/asyncsend_v2" => {
            (Platform::DingTalk, Endpoint::Send, Method::POST)
        }
        "/cgi-bin/gettoken" => (Platform::WeCom, Endpoint::Token, Method::GET),
        "/cgi-bin/message/send" => (Platform::WeCom, Endpoint::Send, Method::POST),
        "/open-apis/auth/v3/tenant_access_token/internal" => {
            (Platform::Lark, Endpoint::Token, Method::POST)
        }
        "/open-apis/im/v1/messages" => (Platform::Lark, Endpoint::Send, Method::POST),
        _ => return None,
    })
}

async fn handle(state: Arc<State>, req: Request) -> Result<Response, warp::Rejection> {
    Ok(handle_inner(state, req).await)
}

async fn handle_inner(state: Arc<State>, req: Request) -> Response {
    let Some((platform, endpoint, method)) = route(&req.path) else {
        state.violation(format!(
            "unexpected request: {} {} (no such endpoint)",
            req.method, req.path
        ));
        return reply(StatusCode::NOT_FOUND, &json!({ "error": "not found" }));
    };
    if req.method != method {
        state.violation(format!(
            "unexpected request: {} {} (takes {method})",
            req.method, req.path
        ));
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({ "error": "method not allowed" }),
        );
    }
    match endpoint {
        Endpoint::Token => token(&state, platform, req).await,
        Endpoint::Send => send(&state, platform, req).await,
    }
}

/// Plays a scripted answer; `None` means carry on with the request. `send` picks the send
/// endpoint's error answer (HTTP 400 on Lark) over the token endpoint's.
async fn play(scripted: Option<Scripted>, platform: Platform, send: bool) -> Option<Response> {
    match scripted? {
        Scripted::Status(s) => {
            let status = StatusCode::from_u16(s).expect("scripted status is a valid HTTP status");
            Some(reply(status, &json!({ "error": "scripted" })))
        }
        Scripted::ErrCode(c) if send => Some(platform.send_error(c, "scripted")),
        Scripted::ErrCode(c) => Some(platform.token_error(c, "scripted")),
        Scripted::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Scripted::Close => {
            tokio::time::sleep(CLOSE_HOLD).await;
            Some(reply(
                StatusCode::GATEWAY_TIMEOUT,
                &json!({ "error": "scripted close" }),
            ))
        }
    }
}

async fn token(state: &State, platform: Platform, req: Request) -> Response {
    let p = platform.name();
    let param = |name: &str| req.param(name).unwrap_or_default().to_string();
    let (id, secret) = match platform {
        Platform::DingTalk => (param("appkey"), param("appsecret")),
        Platform::WeCom => (param("corpid"), param("corpsecret")),
        Platform::Lark => match lark_credentials(&req) {
            Ok(credentials) => credentials,
            Err(why) => {
                state.violation(format!("bad token request: lark: {why}"));
                return platform.token_error(10003, "invalid param");
            }
        },
    };

    // 1-2, under one lock: find the app, count the fetch, pop a scripted answer.
    let found = {
        let mut farm = state.farm.lock().unwrap();
        match farm.apps.get_mut(&id) {
            Some(a) if a.kind.platform() == platform => {
                a.token_fetches += 1;
                Some((a.token_script.pop_front(), a.secret.clone()))
            }
            _ => None,
        }
    };
    let Some((scripted, want)) = found else {
        state.violation(format!("unknown app: {p} token request for {id:?}"));
        return platform.unknown_app();
    };
    if let Some(answer) = play(scripted, platform, false).await {
        return answer;
    }

    // 3: the secret, as the platform sees it: URL-decoded (so one sent unencoded with a `+`
    // or `&` in it comes out wrong, as it would there).
    if secret != want {
        state.violation(format!(
            "wrong secret: {p} app {id:?}: got {secret:?}, want {want:?}"
        ));
        return platform.wrong_secret();
    }

    // 4: a new token.
    let token = match platform {
        Platform::Lark => format!("t-{}", random_hex()),
        _ => random_hex(),
    };
    let ttl = {
        let mut farm = state.farm.lock().unwrap();
        let ttl = farm.apps[&id].ttl;
        farm.tokens.insert(
            token.clone(),
            Issued {
                app: id,
                expires_at: Instant::now() + ttl,
            },
        );
        ttl
    };
    let secs = ttl.as_secs();
    match platform {
        Platform::Lark => ok(&json!({
            "code": 0, "msg": "ok", "tenant_access_token": token, "expire": secs,
        })),
        _ => ok(&json!({
            "errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": secs,
        })),
    }
}

/// The Lark token request's `app_id` and `app_secret`, from its JSON body.
fn lark_credentials(req: &Request) -> Result<(String, String), String> {
    if !req.json_type() {
        return Err(format!(
            "content-type must be application/json, got {:?}",
            req.content_type
        ));
    }
    let body: Value =
        serde_json::from_slice(&req.body).map_err(|e| format!("body is not JSON: {e}"))?;
    let field = |name: &str| match body.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        other => Err(format!("{name} must be a string, got {other:?}")),
    };
    Ok((field("app_id")?, field("app_secret")?))
}

/// What the locked part of a send decided.
enum Step {
    UnknownToken(String),
    Throttled(String),
    Go {
        app: String,
        kind: Kind,
        scripted: Option<Scripted>,
        expired: bool,
        at: Instant,
    },
}

async fn send(state: &State, platform: Platform, req: Request) -> Response {
    let p = platform.name();
    let token = match platform {
        Platform::Lark => req
            .authorization
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer ")),
        _ => req.param("access_token"),
    }
    .map(str::trim)
    .filter(|t| !t.is_empty())
    .map(str::to_string);
    let Some(token) = token else {
        let place = match platform {
            Platform::Lark => "no `Authorization: Bearer <token>` header",
            _ => "no access_token in the query",
        };
        state.violation(format!("unknown token: {p} send with {place}"));
        return platform.missing_token();
    };

    // 1-3, under one lock so the arrival log stays sorted: find the app by its token, log the
    // arrival, check the limits, pop a scripted answer.
    let step = {
        let mut guard = state.farm.lock().unwrap();
        let farm = &mut *guard;
        match farm.tokens.get(&token) {
            Some(issued) if farm.apps[&issued.app].kind.platform() == platform => {
                let id = issued.app.clone();
                let expires_at = issued.expires_at;
                let a = farm.apps.get_mut(&id).expect("apps are never removed");
                let now = Instant::now();
                a.arrivals.push(now);
                let limits: &[(usize, Duration)] = match platform {
                    Platform::Lark => &LARK_TENANT_LIMITS,
                    _ => &[],
                };
                match broken_limit(&a.arrivals, now, limits) {
                    Some((n, w, count)) => Step::Throttled(format!(
                        "rate limit: {p} app {id:?}: request #{} is the {count}th within {w:?} \
                         (limit {n})",
                        a.arrivals.len()
                    )),
                    None => Step::Go {
                        scripted: a.send_script.pop_front(),
                        expired: now >= expires_at,
                        kind: a.kind.clone(),
                        app: id,
                        at: now,
                    },
                }
            }
            Some(issued) => Step::UnknownToken(format!(
                "a token of {} app {:?}",
                farm.apps[&issued.app].kind.platform().name(),
                issued.app
            )),
            None => Step::UnknownToken("never issued".into()),
        }
    };
    let (id, kind, scripted, expired, at) = match step {
        Step::UnknownToken(what) => {
            state.violation(format!("unknown token: {p} send with {token:?} ({what})"));
            return platform.invalid_token();
        }
        Step::Throttled(v) => {
            state.violation(v);
            return platform.send_error(11232, "frequency limited");
        }
        Step::Go {
            app,
            kind,
            scripted,
            expired,
            at,
        } => (app, kind, scripted, expired, at),
    };
    if let Some(answer) = play(scripted, platform, true).await {
        return answer;
    }

    // 4: expiry is the daemon's cue to fetch a new token and retry, not a mistake.
    if expired {
        state
            .farm
            .lock()
            .unwrap()
            .apps
            .get_mut(&id)
            .expect("apps are never removed")
            .expired_sends += 1;
        return platform.expired_token();
    }

    // 5: content type and body.
    let refuse = |r: Refusal| {
        state.violation(format!("bad body: {p} app {id:?}: {}", r.reason));
        platform.send_error(r.code, &r.reason)
    };
    let bad_request = match platform {
        Platform::DingTalk => DINGTALK_BAD,
        Platform::WeCom => WECOM_BAD_FORMAT,
        Platform::Lark => LARK_BAD_FIELD,
    };
    if !req.json_type() {
        return refuse(Refusal::new(
            bad_request,
            format!(
                "content-type must be application/json, got {:?}",
                req.content_type
            ),
        ));
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(other) => {
            return refuse(Refusal::new(
                bad_request,
                format!("body is not a JSON object: {other}"),
            ))
        }
        Err(e) => {
            return refuse(Refusal::new(
                bad_request,
                format!("body is not UTF-8 JSON: {e}"),
            ))
        }
    };
    let checked = match kind {
        Kind::DingTalk { agent_id } => check_dingtalk(&body, agent_id).map(|r| (r, None)),
        Kind::WeCom { agent_id } => check_wecom(&body, agent_id).map(|r| (r, None)),
        Kind::Lark => check_lark(req.param("receive_id_type"), &body)
            .map(|(receive_id, uuid)| (vec![receive_id], uuid)),
    };
    let (recipients, uuid) = match checked {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };

    // 6-7: recipients, limits, deduplication, success.
    let record = AppSend {
        at,
        recipients: recipients.clone(),
        body,
        query: req.query,
        token,
    };
    let mut breaches = Vec::new();
    let answer = {
        let mut guard = state.farm.lock().unwrap();
        let farm = &mut *guard;
        farm.next_id += 1;
        let serial = farm.next_id;
        let a = farm.apps.get_mut(&id).expect("apps are never removed");
        let (known, unknown): (Vec<String>, Vec<String>) =
            recipients.into_iter().partition(|r| a.users.contains(r));
        a.note_unknown(&unknown);
        match platform {
            Platform::DingTalk => {
                // Asynchronous delivery: unreachable users only show in getsendresult.
                deliver(a, &known, at, record, &[], &id, &mut breaches);
                ok(&json!({
                    "errcode": 0, "errmsg": "ok", "task_id": serial, "request_id": random_hex(),
                }))
            }
            Platform::WeCom => {
                let invalid = unknown.join("|");
                if known.is_empty() {
                    ok(&json!({
                        "errcode": 81013,
                        "errmsg": "user & party & tag all invalid",
                        "invaliduser": invalid,
                    }))
                } else {
                    deliver(
                        a,
                        &known,
                        at,
                        record,
                        &WECOM_MEMBER_LIMITS,
                        &id,
                        &mut breaches,
                    );
                    let mut answer = json!({
                        "errcode": 0, "errmsg": "ok", "msgid": format!("msg{serial}"),
                    });
                    if !invalid.is_empty() {
                        answer["invaliduser"] = json!(invalid);
                    }
                    ok(&answer)
                }
            }
            Platform::Lark => {
                let message_id = uuid.as_ref().and_then(|u| a.uuids.get(u)).cloned();
                if !unknown.is_empty() {
                    platform.send_error(230013, "Bot has NO availability to this user.")
                } else if let Some(message_id) = message_id {
                    // The platform's idempotency: the first message stands, nothing is sent.
                    a.duplicates.push(uuid.unwrap_or_default());
                    lark_success(&message_id)
                } else {
                    let message_id = format!("om_{}", random_hex());
                    if let Some(u) = uuid {
                        a.uuids.insert(u, message_id.clone());
                    }
                    deliver(a, &known, at, record, &[], &id, &mut breaches);
                    lark_success(&message_id)
                }
            }
        }
    };
    for b in breaches {
        state.violation(b);
    }
    answer
}

/// Records an accepted send and its deliveries to `members`, noting into `breaches` every
/// member whose deliveries now break one of `limits`.
fn deliver(
    a: &mut AppState,
    members: &[String],
    at: Instant,
    record: AppSend,
    limits: &[(usize, Duration)],
    id: &str,
    breaches: &mut Vec<String>,
) {
    let p = a.kind.platform().name();
    for m in members {
        let log = a.deliveries.entry(m.clone()).or_default();
        log.push(at);
        if let Some((n, w, count)) = broken_limit(log, at, limits) {
            breaches.push(format!(
                "rate limit: {p} app {id:?} member {m:?}: message #{} is the {count}th within \
                 {w:?} (limit {n}; the platform drops it silently)",
                log.len()
            ));
        }
    }
    a.sent.push(record);
}

fn lark_success(message_id: &str) -> Response {
    ok(&json!({ "code": 0, "msg": "success", "data": { "message_id": message_id } }))
}

// The codes a refused body gets. DingTalk: "invalid parameter"; DingTalk and WeCom: "invalid
// agentid"; WeCom: "data format error", "invalid message type", "invalid user list", "empty
// content", "content size out of limit"; Lark: "field validation failed", "invalid request
// parameter", "message too long".
const DINGTALK_BAD: i64 = 40035;
const BAD_AGENT: i64 = 40056;
const WECOM_BAD_FORMAT: i64 = 47001;
const WECOM_BAD_TYPE: i64 = 40008;
const WECOM_BAD_USERS: i64 = 40031;
const WECOM_EMPTY: i64 = 44004;
const WECOM_TOO_LONG: i64 = 45002;
const LARK_BAD_FIELD: i64 = 99992402;
const LARK_BAD_PARAM: i64 = 230001;
const LARK_TOO_LONG: i64 = 230025;

/// Why a body is refused: the code the platform answers and the detail for the violation.
struct Refusal {
    code: i64,
    reason: String,
}

impl Refusal {
    fn new(code: i64, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

fn refuse<T>(code: i64, reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(code, reason))
}

/// The value at `path`, which must exist.
fn at<'a>(body: &'a Value, path: &[&str], code: i64) -> Result<&'a Value, Refusal> {
    let mut v = body;
    for key in path {
        v = match v.get(key) {
            Some(x) => x,
            None => return refuse(code, format!("missing {}", path.join("."))),
        };
    }
    Ok(v)
}

fn string<'a>(body: &'a Value, path: &[&str], code: i64) -> Result<&'a str, Refusal> {
    match at(body, path, code)? {
        Value::String(s) => Ok(s),
        other => refuse(
            code,
            format!("{} must be a string, got {other}", path.join(".")),
        ),
    }
}

fn object<'a>(body: &'a Value, path: &[&str], code: i64) -> Result<&'a Value, Refusal> {
    match at(body, path, code)? {
        v @ Value::Object(_) => Ok(v),
        other => refuse(
            code,
            format!("{} must be an object, got {other}", path.join(".")),
        ),
    }
}

fn array<'a>(body: &'a Value, path: &[&str], code: i64) -> Result<&'a Vec<Value>, Refusal> {
    match at(body, path, code)? {
        Value::Array(a) => Ok(a),
        other => refuse(
            code,
            format!("{} must be an array, got {other}", path.join(".")),
        ),
    }
}

/// `agent_id` / `agentid`: a JSON number equal to the app's (a string of digits is the
/// classic mistake).
fn check_agent(body: &Value, name: &str, agent_id: u64, code: i64) -> Result<(), Refusal> {
    match at(body, &[name], code)? {
        Value::Number(n) if n.as_u64() == Some(agent_id) => Ok(()),
        Value::Number(n) => refuse(BAD_AGENT, format!("{name} {n} is not the app's {agent_id}")),
        other => refuse(code, format!("{name} must be a number, got {other}")),
    }
}

/// A `sep`-separated id list: no empty ids (doubled or trailing separators), no padding, and
/// not the other platform's separator.
fn split_ids(
    name: &str,
    list: &str,
    sep: char,
    max: usize,
    code: i64,
) -> Result<Vec<String>, Refusal> {
    let other = if sep == ',' { '|' } else { ',' };
    let ids: Vec<&str> = list.split(sep).collect();
    for id in &ids {
        let why = if id.is_empty() {
            "an empty id (a doubled, leading or trailing separator?)".to_string()
        } else if id.trim() != *id {
            format!("id {id:?} has surrounding whitespace")
        } else if id.contains(other) {
            format!("id {id:?} contains {other:?}: the list is separated by {sep:?}")
        } else {
            continue;
        };
        return refuse(code, format!("{name} {list:?} has {why}"));
    }
    if ids.len() > max {
        return refuse(
            code,
            format!("{name} has {} ids, more than {max}", ids.len()),
        );
    }
    Ok(ids.into_iter().map(str::to_string).collect())
}

/// §4: `{"agent_id": <number>, "userid_list": "a,b", "msg": {...}}`.
fn check_dingtalk(b: &Value, agent_id: u64) -> Result<Vec<String>, Refusal> {
    let bad = DINGTALK_BAD;
    check_agent(b, "agent_id", agent_id, bad)?;
    let list = string(b, &["userid_list"], bad)?;
    let users = split_ids("userid_list", list, ',', DINGTALK_MAX_USERS, bad)?;
    let msg = object(b, &["msg"], bad)?;
    match string(msg, &["msgtype"], bad)? {
        "text" => {
            string(msg, &["text", "content"], bad)?;
        }
        "markdown" => {
            string(msg, &["markdown", "title"], bad)?;
            string(msg, &["markdown", "text"], bad)?;
        }
        "link" => {
            string(msg, &["link", "messageUrl"], bad)?;
            string(msg, &["link", "title"], bad)?;
            string(msg, &["link", "text"], bad)?;
        }
        "oa" => {
            string(msg, &["oa", "message_url"], bad)?;
            object(msg, &["oa", "head"], bad)?;
            object(msg, &["oa", "body"], bad)?;
        }
        "action_card" => {
            string(msg, &["action_card", "title"], bad)?;
            string(msg, &["action_card", "markdown"], bad)?;
            if msg["action_card"].get("single_title").is_some() {
                string(msg, &["action_card", "single_url"], bad)?;
            } else {
                for btn in array(msg, &["action_card", "btn_json_list"], bad)? {
                    string(btn, &["title"], bad)?;
                    string(btn, &["action_url"], bad)?;
                }
            }
        }
        other => return refuse(bad, format!("unknown msg.msgtype {other:?}")),
    }
    if msg.get("at").is_some() {
        return refuse(bad, "msg has `at`: work notifications cannot @");
    }
    // Measured on serde_json's compact form, which is what a serde_json client sends.
    let size = msg.to_string().len();
    if size > DINGTALK_MAX_MSG {
        return refuse(
            bad,
            format!("msg has {size} bytes serialised, more than {DINGTALK_MAX_MSG}"),
        );
    }
    Ok(users)
}

/// §6.2: `{"touser": "a|b", "agentid": <number>, "msgtype": "text"|"markdown", ...}`.
fn check_wecom(b: &Value, agent_id: u64) -> Result<Vec<String>, Refusal> {
    check_agent(b, "agentid", agent_id, BAD_AGENT)?;
    let list = string(b, &["touser"], WECOM_BAD_USERS)?;
    let users = split_ids("touser", list, '|', WECOM_MAX_USERS, WECOM_BAD_USERS)?;
    let kind = match string(b, &["msgtype"], WECOM_BAD_TYPE)? {
        kind @ ("text" | "markdown") => kind,
        other => {
            return refuse(
                WECOM_BAD_TYPE,
                format!("msgtype {other:?} is not text or markdown"),
            )
        }
    };
    let content = string(b, &[kind, "content"], WECOM_EMPTY)?;
    if content.trim().is_empty() {
        return refuse(WECOM_EMPTY, format!("{kind}.content is empty"));
    }
    if content.len() > WECOM_MAX_CONTENT {
        return refuse(
            WECOM_TOO_LONG,
            format!(
                "{kind}.content has {} bytes, more than {WECOM_MAX_CONTENT}",
                content.len()
            ),
        );
    }
    Ok(users)
}

/// The `receive_id_type` an id calls for.
fn lark_id_type(id: &str) -> &'static str {
    if id.starts_with("ou_") {
        "open_id"
    } else if id.starts_with("on_") {
        "union_id"
    } else if id.starts_with("oc_") {
        "chat_id"
    } else if id.contains('@') {
        "email"
    } else {
        "user_id"
    }
}

/// §8.2: query `receive_id_type`, body `{"receive_id", "msg_type", "content": "<JSON>",
/// "uuid"}`. Returns the receive id and the uuid.
fn check_lark(
    receive_id_type: Option<&str>,
    b: &Value,
) -> Result<(String, Option<String>), Refusal> {
    let ty = match receive_id_type {
        Some(t @ ("open_id" | "user_id" | "union_id" | "email" | "chat_id")) => t,
        Some(other) => {
            return refuse(
                LARK_BAD_FIELD,
                format!("receive_id_type {other:?} is not valid"),
            )
        }
        None => return refuse(LARK_BAD_FIELD, "no receive_id_type in the query"),
    };
    let id = string(b, &["receive_id"], LARK_BAD_FIELD)?;
    if lark_id_type(id) != ty {
        return refuse(
            LARK_BAD_PARAM,
            format!(
                "receive_id {id:?} is a {}, but receive_id_type is {ty}",
                lark_id_type(id)
            ),
        );
    }
    let msg_type = string(b, &["msg_type"], LARK_BAD_FIELD)?;
    let raw = match at(b, &["content"], LARK_BAD_FIELD)? {
        Value::String(s) => s,
        other => {
            return refuse(
                LARK_BAD_FIELD,
                format!("content must be a JSON string, got {other} (the custom bot's shape?)"),
            )
        }
    };
    let content: Value = serde_json::from_str(raw)
        .map_err(|e| Refusal::new(LARK_BAD_PARAM, format!("content is not JSON: {e}")))?;
    if !content.is_object() {
        return refuse(
            LARK_BAD_PARAM,
            format!("content is not a JSON object: {raw}"),
        );
    }
    let bad = LARK_BAD_PARAM;
    let max = match msg_type {
        "text" => {
            string(&content, &["text"], bad)?;
            LARK_MAX_TEXT
        }
        "post" => {
            check_lark_post(&content)?;
            LARK_MAX_RICH
        }
        "interactive" => {
            if content.get("elements").is_none() && content.get("header").is_none() {
                return refuse(
                    bad,
                    format!("an interactive content is a card with elements or header, got {raw}"),
                );
            }
            LARK_MAX_RICH
        }
        "image" => {
            string(&content, &["image_key"], bad)?;
            LARK_MAX_TEXT
        }
        "share_chat" => {
            string(&content, &["share_chat_id"], bad)?;
            LARK_MAX_TEXT
        }
        other => return refuse(bad, format!("unknown msg_type {other:?}")),
    };
    if raw.len() > max {
        return refuse(
            LARK_TOO_LONG,
            format!(
                "{msg_type} content has {} bytes, more than {max}",
                raw.len()
            ),
        );
    }
    let uuid = match b.get("uuid") {
        None => None,
        Some(Value::String(u)) if u.chars().count() <= LARK_MAX_UUID => Some(u.clone()),
        Some(Value::String(u)) => {
            return refuse(
                LARK_BAD_FIELD,
                format!("uuid {u:?} is longer than {LARK_MAX_UUID} characters"),
            )
        }
        Some(other) => {
            return refuse(
                LARK_BAD_FIELD,
                format!("uuid must be a string, got {other}"),
            )
        }
    };
    Ok((id.to_string(), uuid))
}

/// A post's content is an object of languages (`{"zh_cn": {"title", "content": [[...]]}}`),
/// without the custom bot's `{"post": ...}` wrapper.
fn check_lark_post(content: &Value) -> Result<(), Refusal> {
    let bad = LARK_BAD_PARAM;
    let langs = content.as_object().expect("checked to be an object");
    if langs.is_empty() {
        return refuse(bad, "post content has no language");
    }
    for (lang, post) in langs {
        let b = lang.as_bytes();
        let language_like = b.len() == 5
            && b[2] == b'_'
            && b.iter()
                .enumerate()
                .all(|(i, c)| i == 2 || c.is_ascii_lowercase());
        if !language_like {
            return refuse(
                bad,
                format!("post content key {lang:?} is not a language like zh_cn (a wrapper?)"),
            );
        }
        for row in array(post, &["content"], bad)? {
            if !row.is_array() {
                return refuse(
                    bad,
                    format!("post {lang}.content row is not an array: {row}"),
                );
            }
        }
    }
    Ok(())
}
