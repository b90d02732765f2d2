//! A fake Lark / Feishu long-connection gateway (STREAMS.md §B): `POST /callback/ws/endpoint`
//! checked as Lark would (headers, the exact `{"AppID","AppSecret"}` body), single-use tickets
//! in the WebSocket URLs it hands out, scripted refusals of the endpoint call and of the
//! handshake, and a WebSocket server speaking binary `pbbp2.Frame`s that the test drives frame
//! by frame. It answers every ping with a pong (optionally carrying a `ClientConfig`), records
//! pings and answers with the connection they came on, and checks their shape: everything the
//! daemon gets wrong is a violation, so a test ends with
//! `assert!(gateway.violations().is_empty())`.

// The handshake callback's error is the library's own response type, large by design.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use imbridge::platform::lark::ws::{Frame, Header, METHOD_CONTROL, METHOD_DATA};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use warp::http::{HeaderValue, StatusCode};
use warp::Filter;

use super::WAIT;

/// The credentials the gateway accepts.
pub const APP_ID: &str = "cli_larkstreamtest01";
pub const APP_SECRET: &str = "lark-stream-app-secret-0123456789";

/// What Lark answers a client error with (here: credentials it does not know).
pub const CODE_REFUSED: i64 = 1_000_040_344;

/// A scripted answer to one endpoint call, given instead of the normal one.
#[derive(Debug, Clone, Copy)]
pub enum EndpointReply {
    /// This HTTP status, with a JSON body (Lark's own failures: retried).
    Status(u16),
    /// HTTP 200 with this `code` and no URL (`1`, `1000040343`: retried; others: refused).
    Code(i64),
}

/// A scripted refusal of one WebSocket handshake: the non-101 answer and its `handshake-*`
/// headers (STREAMS.md §B.2).
#[derive(Debug, Clone, Copy)]
pub struct HandshakeRefusal {
    /// The answer's HTTP status. Lark's is undocumented; the daemon must decide by the headers.
    pub http_status: u16,
    pub status: u16,
    pub auth_code: Option<u64>,
}

/// One answer to a data frame, as the gateway received it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Which connection (0 for the first the daemon opened).
    pub conn: usize,
    pub frame: Frame,
}

impl Answer {
    /// The payload's `code` (200 stored, 500 not); 0 when there is none.
    pub fn code(&self) -> i64 {
        self.json()["code"].as_i64().unwrap_or_default()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(self.frame.payload.as_deref().unwrap_or_default())
            .unwrap_or(Value::Null)
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.frame.header(key)
    }
}

#[derive(Default)]
struct State {
    /// What the endpoint hands out as `ClientConfig`.
    config: Value,
    /// What every pong carries (`None`: an empty pong).
    pong_config: Option<Value>,
    /// Answers to give the next endpoint calls, before answering normally.
    endpoint_script: VecDeque<EndpointReply>,
    /// Refusals to give the next handshakes, before accepting normally.
    handshake_script: VecDeque<HandshakeRefusal>,
    /// When each endpoint call arrived.
    calls: Vec<Instant>,
    /// Tickets handed out and not used yet, each with the query it was handed out in.
    tickets: HashMap<String, String>,
    /// Handed out so far (tickets, device and service ids derive from it).
    handed_out: u64,
    /// Connections accepted: when, and with which service id.
    accepted: Vec<(Instant, i32)>,
    closed: Vec<usize>,
    /// The data frames sent on each connection, by message_id, latest last.
    sent: HashMap<(usize, String), Vec<Frame>>,
    answers: Vec<Answer>,
    /// When each ping arrived, by connection.
    pings: HashMap<usize, Vec<Instant>>,
    violations: Vec<String>,
}

impl State {
    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }
}

/// What a connection task is told to do.
enum Cmd {
    Frame(Frame),
    Binary(Vec<u8>),
    Text(String),
    /// Stop reading and writing (so no pong either), keeping TCP open.
    Freeze,
    /// A close handshake from the gateway's side.
    Close,
}

/// One WebSocket connection from the daemon, driven by the test. Dropping it drops the TCP
/// connection without a close handshake.
pub struct Conn {
    pub index: usize,
    /// The `service_id` of the URL this connection was opened with: every ping carries it.
    pub service_id: i32,
    tx: mpsc::UnboundedSender<Cmd>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Conn {
    /// Sends a frame (recorded when it is a data frame, to check its answer against).
    pub fn send(&self, frame: &Frame) {
        let _ = self.tx.send(Cmd::Frame(frame.clone()));
    }

    pub fn send_all(&self, frames: &[Frame]) {
        for f in frames {
            self.send(f);
        }
    }

    /// Sends raw bytes as a binary message (garbage, for the tests of bad frames).
    pub fn send_binary(&self, bytes: &[u8]) {
        let _ = self.tx.send(Cmd::Binary(bytes.to_vec()));
    }

    /// Sends a text message, which Lark never does.
    pub fn send_text(&self, text: &str) {
        let _ = self.tx.send(Cmd::Text(text.to_owned()));
    }

    /// Stops answering anything, pings included, without closing.
    pub fn stop_answering(&self) {
        let _ = self.tx.send(Cmd::Freeze);
    }

    /// Closes the connection with a close handshake.
    pub fn close(&self) {
        let _ = self.tx.send(Cmd::Close);
    }

    /// A whole event as one data frame on this connection: `sum` 1, `seq` 0.
    pub fn event(&self, message_id: &str, payload: &[u8]) -> Frame {
        self.data("event", message_id, 1, 0, payload)
    }

    /// `payload` split into `parts` data frames (in `seq` order; the test picks the sending
    /// order), at byte offsets that need not fall between UTF-8 characters. Each fragment has
    /// its own SeqID, so that an answer tells which one it was built from.
    pub fn fragments(&self, message_id: &str, payload: &[u8], parts: usize) -> Vec<Frame> {
        let size = payload.len().div_ceil(parts);
        (0..parts)
            .map(|seq| {
                let start = (seq * size).min(payload.len());
                let end = ((seq + 1) * size).min(payload.len());
                self.data("event", message_id, parts, seq, &payload[start..end])
            })
            .collect()
    }

    /// A data frame of any `type` (`event`, `card`, …).
    pub fn data(
        &self,
        kind: &str,
        message_id: &str,
        sum: usize,
        seq: usize,
        payload: &[u8],
    ) -> Frame {
        let seq_id = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Frame {
            seq_id,
            log_id: 9_000_000 + seq_id,
            service: self.service_id,
            method: METHOD_DATA,
            headers: vec![
                header("type", kind),
                header("message_id", message_id),
                header("sum", &sum.to_string()),
                header("seq", &seq.to_string()),
                header("trace_id", &format!("trace-{message_id}-{seq}")),
            ],
            payload: Some(payload.to_vec()),
            ..Frame::default()
        }
    }

    /// A control frame of `type` `kind`, as the gateway would send it.
    pub fn control(&self, kind: &str, payload: Option<&[u8]>) -> Frame {
        Frame {
            service: self.service_id,
            method: METHOD_CONTROL,
            headers: vec![header("type", kind)],
            payload: payload.map(<[u8]>::to_vec),
            ..Frame::default()
        }
    }
}

pub fn header(key: &str, value: &str) -> Header {
    Header {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

/// The `ClientConfig` tests hand out: reconnect at once after a loss (nonce 0), then once a
/// second, and ping every second (so silence is noticed after 3 s).
pub fn fast_config() -> Value {
    json!({"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0, "PingInterval": 1})
}

pub struct Gateway {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    conns: tokio::sync::Mutex<mpsc::UnboundedReceiver<Conn>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// Starts with [`fast_config`].
    pub async fn start() -> Gateway {
        let state = Arc::new(Mutex::new(State {
            config: fast_config(),
            ..State::default()
        }));
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = ws.local_addr().unwrap();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();

        let s = state.clone();
        let endpoint = warp::path!("callback" / "ws" / "endpoint")
            .and(warp::post())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(move |headers: warp::http::HeaderMap, body: bytes::Bytes| {
                let (status, answer) = endpoint(&s, ws_addr, &headers, &body);
                warp::reply::with_status(
                    warp::reply::json(&answer),
                    StatusCode::from_u16(status).unwrap(),
                )
            });
        let s = state.clone();
        let routes = endpoint.recover(move |rejection: warp::Rejection| {
            s.lock()
                .unwrap()
                .violation(format!("unexpected request: {rejection:?}"));
            async move {
                Ok::<_, Infallible>(warp::reply::with_status(
                    warp::reply::json(&json!({"code": 404, "msg": "not found"})),
                    StatusCode::NOT_FOUND,
                ))
            }
        });
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = http.local_addr().unwrap();
        let http_task = tokio::spawn(warp::serve(routes).incoming(http).run());
        let ws_task = tokio::spawn(accept(ws, state.clone(), conn_tx));
        Gateway {
            addr,
            state,
            conns: tokio::sync::Mutex::new(conn_rx),
            tasks: vec![http_task, ws_task],
        }
    }

    /// The daemon's `domain`.
    pub fn domain(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `ClientConfig` the next endpoint answers hand out.
    pub fn set_config(&self, config: Value) {
        self.state.lock().unwrap().config = config;
    }

    /// What every pong carries from now on (`None`: nothing).
    pub fn set_pong_config(&self, config: Option<Value>) {
        self.state.lock().unwrap().pong_config = config;
    }

    /// The next endpoint calls are answered so, one each.
    pub fn script_endpoint(&self, replies: &[EndpointReply]) {
        self.state.lock().unwrap().endpoint_script.extend(replies);
    }

    /// The next handshakes are refused so, one each.
    pub fn script_handshake(&self, refusals: &[HandshakeRefusal]) {
        self.state.lock().unwrap().handshake_script.extend(refusals);
    }

    /// Endpoint calls so far.
    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }

    pub fn call_times(&self) -> Vec<Instant> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The next connection the daemon opens.
    pub async fn next_conn(&self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.lock().await.recv())
            .await
            .expect("the daemon never connected")
            .expect("gateway running")
    }

    /// When connection `index` was accepted.
    pub fn accepted_at(&self, index: usize) -> Instant {
        self.state.lock().unwrap().accepted[index].0
    }

    /// Whether the daemon has closed connection `index` (or it is gone).
    pub fn closed(&self, index: usize) -> bool {
        self.state.lock().unwrap().closed.contains(&index)
    }

    pub async fn wait_closed(&self, index: usize) {
        let deadline = Instant::now() + WAIT;
        while !self.closed(index) {
            assert!(Instant::now() < deadline, "connection {index} never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// When each ping arrived on connection `index`.
    pub fn pings(&self, index: usize) -> Vec<Instant> {
        self.state
            .lock()
            .unwrap()
            .pings
            .get(&index)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until connection `index` has sent `n` pings; their times.
    pub async fn wait_pings(&self, index: usize, n: usize) -> Vec<Instant> {
        let deadline = Instant::now() + WAIT;
        loop {
            let pings = self.pings(index);
            if pings.len() >= n {
                return pings;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} pings on connection {index}",
                pings.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every answer to `message_id` so far.
    pub fn answers_of(&self, message_id: &str) -> Vec<Answer> {
        self.state
            .lock()
            .unwrap()
            .answers
            .iter()
            .filter(|a| a.header("message_id") == Some(message_id))
            .cloned()
            .collect()
    }

    /// Waits for the (first) answer to `message_id`.
    pub async fn answer(&self, message_id: &str) -> Answer {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(a) = self.answers_of(message_id).into_iter().next() {
                return a;
            }
            assert!(Instant::now() < deadline, "no answer to {message_id}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

/// Answers one endpoint call, checking it as Lark would.
fn endpoint(
    state: &Mutex<State>,
    ws: SocketAddr,
    headers: &warp::http::HeaderMap,
    body: &[u8],
) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.calls.push(Instant::now());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = header("content-type").map(str::to_owned);
    if !content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"))
    {
        s.violation(format!("endpoint: Content-Type {content_type:?}"));
    }
    let locale = header("locale").map(str::to_owned);
    if locale.as_deref() != Some("zh") {
        s.violation(format!("endpoint: locale {locale:?}"));
    }
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let keys: Vec<&String> = body
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    if keys.len() != 2 || !body["AppID"].is_string() || !body["AppSecret"].is_string() {
        s.violation(format!(
            "endpoint: the body is not {{AppID, AppSecret}}: {body}"
        ));
    }
    if let Some(reply) = s.endpoint_script.pop_front() {
        return match reply {
            EndpointReply::Status(status) => {
                (status, json!({"code": 1, "msg": "scripted failure"}))
            }
            EndpointReply::Code(code) => (200, json!({"code": code, "msg": "scripted"})),
        };
    }
    if body["AppID"] != APP_ID || body["AppSecret"] != APP_SECRET {
        return (
            200,
            json!({"code": CODE_REFUSED, "msg": "app_id or app_secret is invalid"}),
        );
    }
    s.handed_out += 1;
    let n = s.handed_out;
    // The other parameters are opaque credentials to the client: it must use the URL as given.
    let query = format!(
        "device_id=dev-{n}&service_id={}&ticket=tk{n}x&aid=552564&fpid=493",
        7000 + n
    );
    s.tickets.insert(format!("tk{n}x"), query.clone());
    let answer = json!({
        "code": 0,
        "msg": "ok",
        "data": {"URL": format!("ws://{ws}/ws?{query}"), "ClientConfig": s.config},
    });
    (200, answer)
}

/// Accepts WebSocket connections, each only with a ticket handed out and not used before, and
/// only on the URL exactly as handed out.
async fn accept(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    conns: mpsc::UnboundedSender<Conn>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let s = state.clone();
        let service = Arc::new(Mutex::new(0));
        let service_seen = service.clone();
        let check = move |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
            let query = req.uri().query().unwrap_or("").to_owned();
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(&query).unwrap_or_default();
            let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            let mut st = s.lock().unwrap();
            let handed = get("ticket").and_then(|t| st.tickets.remove(&t));
            if req.uri().path() != "/ws" || handed.as_deref() != Some(query.as_str()) {
                st.violation(format!(
                    "connect with an unknown, used or altered URL: {}",
                    req.uri()
                ));
                let mut refused = ErrorResponse::new(Some("bad ticket".into()));
                *refused.status_mut() = StatusCode::FORBIDDEN;
                return Err(refused);
            }
            if let Some(r) = st.handshake_script.pop_front() {
                let mut refused = ErrorResponse::new(Some("refused".into()));
                *refused.status_mut() = StatusCode::from_u16(r.http_status).unwrap();
                let h = refused.headers_mut();
                h.insert("handshake-status", HeaderValue::from(r.status));
                h.insert(
                    "handshake-msg",
                    HeaderValue::from_static("scripted refusal"),
                );
                if let Some(code) = r.auth_code {
                    h.insert("handshake-autherrcode", HeaderValue::from(code));
                }
                return Err(refused);
            }
            *service_seen.lock().unwrap() = get("service_id")
                .and_then(|s| s.parse().ok())
                .unwrap_or_default();
            Ok(res)
        };
        let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
            continue;
        };
        let service_id = *service.lock().unwrap();
        let index = {
            let mut st = state.lock().unwrap();
            st.accepted.push((Instant::now(), service_id));
            st.accepted.len() - 1
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(socket, index, service_id, state.clone(), rx));
        let _ = conns.send(Conn {
            index,
            service_id,
            tx,
            next_seq: std::sync::atomic::AtomicU64::new(1),
        });
    }
}

/// Plays one connection: sends what the test says, answers pings, records answers.
async fn serve(
    mut socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    index: usize,
    service_id: i32,
    state: Arc<Mutex<State>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut frozen = false;
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Frame(f)) => {
                    if f.method == METHOD_DATA {
                        if let Some(id) = f.header("message_id") {
                            let mut st = state.lock().unwrap();
                            st.sent.entry((index, id.to_owned())).or_default().push(f.clone());
                        }
                    }
                    let _ = socket.send(Message::binary(f.to_bytes())).await;
                }
                Some(Cmd::Binary(b)) => { let _ = socket.send(Message::binary(b)).await; }
                Some(Cmd::Text(t)) => { let _ = socket.send(Message::text(t)).await; }
                Some(Cmd::Freeze) => frozen = true,
                Some(Cmd::Close) => { let _ = socket.close(None).await; }
                // The test dropped its handle: drop TCP, no close handshake.
                None => return,
            },
            msg = socket.next(), if !frozen => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if let Some(pong) = received(&state, index, service_id, &b) {
                        let _ = socket.send(Message::binary(pong.to_bytes())).await;
                    }
                }
                Some(Ok(Message::Text(t))) => state
                    .lock()
                    .unwrap()
                    .violation(format!("text message from the daemon: {}", t.as_str())),
                // The library answers WebSocket pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    state.lock().unwrap().closed.push(index);
                    // Keep the handle's channel alive until the test drops it.
                    while cmds.recv().await.is_some() {}
                    return;
                }
            },
        }
    }
}

/// Checks one binary message from the daemon (a ping or an answer, STREAMS.md §B.5, §B.6) and
/// records it; the pong to send back, for a ping.
fn received(state: &Mutex<State>, conn: usize, service_id: i32, bytes: &[u8]) -> Option<Frame> {
    let mut s = state.lock().unwrap();
    let Ok(frame) = Frame::decode_bytes(bytes) else {
        s.violation(format!("not a pbbp2 frame from the daemon: {bytes:02x?}"));
        return None;
    };
    match (frame.method, frame.header("type")) {
        (METHOD_CONTROL, Some("ping")) => {
            let well_formed = frame.seq_id == 0
                && frame.log_id == 0
                && frame.service == service_id
                && frame.headers == [header("type", "ping")]
                && frame.payload.as_deref().unwrap_or_default().is_empty();
            if !well_formed {
                s.violation(format!("ping of the wrong shape: {frame:?}"));
            }
            s.pings.entry(conn).or_default().push(Instant::now());
            let payload = s.pong_config.as_ref().map(|c| c.to_string().into_bytes());
            Some(Frame {
                service: service_id,
                method: METHOD_CONTROL,
                headers: vec![header("type", "pong")],
                payload,
                ..Frame::default()
            })
        }
        (METHOD_DATA, Some(_)) => {
            check_answer(&mut s, conn, &frame);
            s.answers.push(Answer { conn, frame });
            None
        }
        _ => {
            s.violation(format!("unexpected frame from the daemon: {frame:?}"));
            None
        }
    }
}

/// An answer is the frame it answers (for a fragmented message, the fragment sent last, which
/// completed it) with `biz_rt` added and a JSON `{"code": 200 | 500}` payload.
fn check_answer(s: &mut State, conn: usize, answer: &Frame) {
    let id = answer.header("message_id").unwrap_or_default().to_owned();
    let Some(sent) = s
        .sent
        .get(&(conn, id.clone()))
        .and_then(|f| f.last())
        .cloned()
    else {
        s.violation(format!(
            "answer to a message not sent on connection {conn}: {answer:?}"
        ));
        return;
    };
    let biz_rt: Vec<&Header> = answer
        .headers
        .iter()
        .filter(|h| h.key == "biz_rt")
        .collect();
    if biz_rt.len() != 1 || biz_rt[0].value.parse::<u64>().is_err() {
        s.violation(format!("answer to {id}: biz_rt {biz_rt:?}"));
    }
    let headers: Vec<Header> = answer
        .headers
        .iter()
        .filter(|h| h.key != "biz_rt")
        .cloned()
        .collect();
    let same = Frame {
        headers,
        payload: sent.payload.clone(),
        ..answer.clone()
    } == sent;
    if !same {
        s.violation(format!(
            "answer to {id} is not the frame that completed it: {answer:?} for {sent:?}"
        ));
    }
    let json: Value =
        serde_json::from_slice(answer.payload.as_deref().unwrap_or_default()).unwrap_or_default();
    if !matches!(json["code"].as_i64(), Some(200 | 500)) {
        s.violation(format!("answer to {id}: payload {json}"));
    }
}

/// A schema 2.0 event, as Lark pushes it (and posts it to an HTTP callback, decrypted).
pub fn event_v2(event_id: &str, text: &str) -> String {
    format!(
        r#"{{"schema":"2.0","header":{{"event_id":"{event_id}","event_type":"im.message.receive_v1","create_time":"1608725989000","token":"{}","app_id":"{APP_ID}","tenant_key":"736588c9260f175e"}},"event":{{"sender":{{"sender_id":{{"open_id":"ou_84aad35d084aa403a838cf73ee18467"}}}},"message":{{"message_id":"om_5ce6d572455d361153b7cb51da133945","chat_id":"oc_5ce6d572455d361153b7cb5xxfsdfsdfdsf","message_type":"text","content":"{{\"text\":\"{text}\"}}"}}}}}}"#,
        super::LARK_TOKEN
    )
}

/// A schema 1.0 event (`uuid`, `event.type`), as older subscriptions receive them.
pub fn event_v1(uuid: &str) -> String {
    format!(
        r#"{{"uuid":"{uuid}","token":"{}","ts":"1608725989.000000","type":"event_callback","event":{{"type":"p2p_chat_create","app_id":"{APP_ID}","tenant_key":"2ca1d211f64f6438","chat_id":"oc_9e9619b938c9571c1c3165681cdaead5","operator":{{"open_id":"ou_2d2c0399b53d06fd195bb393cd1e38f2"}}}}}}"#,
        super::LARK_TOKEN
    )
}
