//! A fake DingTalk Stream gateway (STREAMS.md §A): `POST /v1.0/gateway/connections/open`
//! checked field by field, single-use tickets, and a WebSocket server the test drives frame by
//! frame. Every ACK the daemon sends is checked for the documented shape and recorded with the
//! connection it came on; everything the daemon gets wrong is a violation, so a test ends with
//! `assert!(gateway.violations().is_empty())`.

// The handshake callback's error is the library's own response type, large by design.
#![allow(clippy::result_large_err)]

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use warp::http::StatusCode;
use warp::Filter;

use super::WAIT;

/// The credentials the gateway accepts.
pub const CLIENT_ID: &str = "dingstreamclientid";
pub const CLIENT_SECRET: &str = "stream-client-secret-0123456789";

/// One ACK as the gateway received it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Which connection (0 for the first the daemon opened).
    pub conn: usize,
    pub frame: Value,
}

impl Ack {
    pub fn code(&self) -> i64 {
        self.frame["code"].as_i64().unwrap_or_default()
    }

    /// `data`, parsed (it is a JSON string holding JSON).
    pub fn data(&self) -> Value {
        serde_json::from_str(self.frame["data"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    /// Answers to give the next registrations (status codes), before answering normally.
    script: VecDeque<u16>,
    /// When each registration arrived.
    opens: Vec<Instant>,
    /// Tickets handed out and not used yet.
    tickets: HashSet<String>,
    next_ticket: u64,
    acks: Vec<Ack>,
    violations: Vec<String>,
    /// Connections accepted, and which of them the daemon has closed.
    accepted: usize,
    closed: Vec<usize>,
}

/// What a connection task is told to do.
enum Cmd {
    Text(String),
    Binary(Vec<u8>),
    /// Stop reading and writing (so no pong either), keeping TCP open.
    Freeze,
}

/// One WebSocket connection from the daemon, driven by the test. Dropping it drops the TCP
/// connection without a close handshake.
pub struct Conn {
    pub index: usize,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Conn {
    pub fn send(&self, frame: impl Into<String>) {
        let _ = self.tx.send(Cmd::Text(frame.into()));
    }

    pub fn send_binary(&self, bytes: &[u8]) {
        let _ = self.tx.send(Cmd::Binary(bytes.to_vec()));
    }

    /// Stops answering anything, pings included, without closing.
    pub fn stop_answering(&self) {
        let _ = self.tx.send(Cmd::Freeze);
    }
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
    pub async fn start() -> Gateway {
        let state = Arc::new(Mutex::new(State::default()));
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = ws.local_addr().unwrap();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();

        let s = state.clone();
        let open = warp::path!("v1.0" / "gateway" / "connections" / "open")
            .and(warp::post())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::header::optional::<String>("accept"))
            .and(warp::body::bytes())
            .map(
                move |ct: Option<String>, accept: Option<String>, body: bytes::Bytes| {
                    let (status, answer) = register(&s, ws_addr, ct, accept, &body);
                    warp::reply::with_status(
                        warp::reply::json(&answer),
                        StatusCode::from_u16(status).unwrap(),
                    )
                },
            );
        let s = state.clone();
        let routes = open.recover(move |rejection: warp::Rejection| {
            s.lock()
                .unwrap()
                .violations
                .push(format!("unexpected request: {rejection:?}"));
            async move {
                Ok::<_, Infallible>(warp::reply::with_status(
                    warp::reply::json(&json!({"code": "NotFound"})),
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

    /// The daemon's `api_base`.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next registrations are answered with these statuses, one each.
    pub fn script(&self, statuses: &[u16]) {
        self.state.lock().unwrap().script.extend(statuses);
    }

    /// Registrations so far.
    pub fn opens(&self) -> usize {
        self.state.lock().unwrap().opens.len()
    }

    pub fn open_times(&self) -> Vec<Instant> {
        self.state.lock().unwrap().opens.clone()
    }

    /// The next connection the daemon opens.
    pub async fn next_conn(&self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.lock().await.recv())
            .await
            .expect("the daemon never connected")
            .expect("gateway running")
    }

    /// Whether the daemon has closed connection `index`.
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

    /// How many ACKs came so far.
    pub fn ack_count(&self) -> usize {
        self.state.lock().unwrap().acks.len()
    }

    /// Every ACK so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.state.lock().unwrap().acks.clone()
    }

    /// Every ACK of `message_id` so far.
    pub fn acks_of(&self, message_id: &str) -> Vec<Ack> {
        self.state
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|a| a.frame["headers"]["messageId"] == message_id)
            .cloned()
            .collect()
    }

    /// Waits for the (first) ACK of `message_id`.
    pub async fn ack(&self, message_id: &str) -> Ack {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(a) = self.acks_of(message_id).into_iter().next() {
                return a;
            }
            assert!(Instant::now() < deadline, "no ACK of {message_id}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

/// Answers one `connections/open`, checking it as the gateway would.
fn register(
    state: &Mutex<State>,
    ws: SocketAddr,
    content_type: Option<String>,
    accept: Option<String>,
    body: &[u8],
) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.opens.push(Instant::now());
    if content_type.as_deref() != Some("application/json") {
        s.violations
            .push(format!("open: Content-Type {content_type:?}"));
    }
    if accept.as_deref() != Some("application/json") {
        s.violations.push(format!("open: Accept {accept:?}"));
    }
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let want_subs = json!([
        {"type": "EVENT", "topic": "*"},
        {"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"},
        {"type": "CALLBACK", "topic": "/v1.0/card/instances/callback"},
    ]);
    if body["subscriptions"] != want_subs {
        s.violations
            .push(format!("open: subscriptions {}", body["subscriptions"]));
    }
    if body["ua"].as_str().is_none_or(str::is_empty) || !body["localIp"].is_string() {
        s.violations.push(format!("open: ua/localIp in {body}"));
    }
    if let Some(status) = s.script.pop_front() {
        let error =
            json!({"code": "Forbidden.AccessDenied", "message": "scripted", "requestid": "r"});
        return (status, error);
    }
    if body["clientId"] != CLIENT_ID || body["clientSecret"] != CLIENT_SECRET {
        return (
            401,
            json!({"code": "InvalidAuthentication", "message": "bad credentials"}),
        );
    }
    // Characters that must be URL-encoded, to check the daemon does.
    s.next_ticket += 1;
    let ticket = format!("t+{}/x=y&z", s.next_ticket);
    s.tickets.insert(ticket.clone());
    (
        200,
        json!({"endpoint": format!("ws://{ws}/connect"), "ticket": ticket}),
    )
}

/// Accepts WebSocket connections, each only with a ticket handed out and not used before.
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
        let check = move |req: &Request, res: Response| -> Result<Response, ErrorResponse> {
            let query = req.uri().query().unwrap_or("");
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(query).unwrap_or_default();
            let ticket = pairs
                .iter()
                .find(|(k, _)| k == "ticket")
                .map(|(_, v)| v.clone());
            let mut st = s.lock().unwrap();
            let valid = req.uri().path() == "/connect"
                && ticket.as_ref().is_some_and(|t| st.tickets.remove(t));
            if valid {
                return Ok(res);
            }
            st.violations
                .push(format!("connect with an unknown or used ticket: {query}"));
            let mut refused = ErrorResponse::new(Some("bad ticket".into()));
            *refused.status_mut() = StatusCode::FORBIDDEN;
            Err(refused)
        };
        let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
            continue;
        };
        let index = {
            let mut st = state.lock().unwrap();
            st.accepted += 1;
            st.accepted - 1
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(socket, index, state.clone(), rx));
        let _ = conns.send(Conn { index, tx });
    }
}

/// Plays one connection: sends what the test says, records every ACK.
async fn serve(
    mut socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    index: usize,
    state: Arc<Mutex<State>>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut frozen = false;
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Text(t)) => { let _ = socket.send(Message::text(t)).await; }
                Some(Cmd::Binary(b)) => { let _ = socket.send(Message::binary(b)).await; }
                Some(Cmd::Freeze) => frozen = true,
                // The test dropped its handle: drop TCP, no close handshake.
                None => return,
            },
            msg = socket.next(), if !frozen => match msg {
                Some(Ok(Message::Text(t))) => record(&state, index, t.as_str()),
                Some(Ok(Message::Binary(_))) => state.lock().unwrap().violations.push("binary frame from the daemon".into()),
                // The library answers pings itself.
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

/// Checks an ACK's shape (STREAMS.md A.4) and records it.
fn record(state: &Mutex<State>, conn: usize, text: &str) {
    let mut s = state.lock().unwrap();
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        s.violations.push(format!("ACK is not JSON: {text}"));
        return;
    };
    let ok = frame["code"].is_i64()
        && frame["headers"]["messageId"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
        && frame["headers"]["contentType"] == "application/json"
        && frame["message"].is_string()
        && frame["data"].is_string();
    if !ok {
        s.violations.push(format!("ACK of the wrong shape: {text}"));
    }
    s.acks.push(Ack { conn, frame });
}

/// An EVENT frame as the gateway pushes it.
pub fn event_frame(message_id: &str, event_id: &str, event_type: &str, data: &str) -> String {
    json!({
        "specVersion": "1.0",
        "type": "EVENT",
        "headers": {
            "topic": "*", "messageId": message_id, "contentType": "application/json",
            "time": "1693221579964", "eventType": event_type, "eventId": event_id,
            "eventCorpId": "dingstreamcorp", "eventBornTime": "1683533823336",
            "eventUnifiedAppId": "bbb381b6-0000", "appId": "a1", "connectionId": "c1",
        },
        "data": data,
    })
    .to_string()
}

/// A CALLBACK frame on `topic`.
pub fn callback_frame(message_id: &str, topic: &str, data: &str) -> String {
    json!({
        "specVersion": "1.0",
        "type": "CALLBACK",
        "headers": {"topic": topic, "messageId": message_id, "contentType": "application/json",
                    "time": "1693221579964"},
        "data": data,
    })
    .to_string()
}

/// A SYSTEM frame (`ping`, `disconnect`, …).
pub fn system_frame(message_id: &str, topic: &str, data: &str) -> String {
    json!({
        "specVersion": "1.0",
        "type": "SYSTEM",
        "headers": {"topic": topic, "messageId": message_id, "contentType": "application/json",
                    "time": "1693221579964"},
        "data": data,
    })
    .to_string()
}
