//! DingTalk Stream mode (STREAMS.md §A): per app, register with `connections/open`, dial the
//! WebSocket it names, publish every event, robot message and card action it pushes, and ACK
//! each frame, events only once the bus has them. Forever: every loss (a `disconnect`, a
//! dropped socket, a connection gone quiet, a refused registration) ends in a fresh
//! registration, tickets being single-use.
//!
//! A connection runs in a task of its own so that a `disconnect` can be honoured as documented:
//! the next connection is opened at once while the old one finishes and ACKs what it holds,
//! then closes. The app's supervised task owns them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{DingTalkStreamApp, StreamSettings, Streams};
use crate::ingress::{self, State};
use crate::notify::http;
use crate::platform::dingtalk::stream::{self, Endpoint, Frame, OpenError, Push, PushKind};
use crate::platform::Platform;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

const PLATFORM: &str = Platform::DingTalk.as_str();

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Starts one supervised task per stream-mode app; each returns on `shutdown` once its
/// connections have ACKed what they held.
pub fn spawn(
    apps: &std::collections::BTreeMap<String, DingTalkStreamApp>,
    settings: &StreamSettings,
    state: Arc<State>,
    streams: &Streams,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(apps.len());
    for (name, app) in apps {
        streams.register(PLATFORM, name);
        state.metrics.stream_connected(PLATFORM, name, false);
        let client = Arc::new(Client {
            app: name.clone(),
            cfg: app.clone(),
            settings: settings.clone(),
            http: http::client(settings.connect_timeout)?,
            state: state.clone(),
            streams: streams.clone(),
        });
        let stop = shutdown.clone();
        tasks.push(supervisor.spawn(
            format!("dingtalk_stream:{name}"),
            shutdown.clone(),
            move || run(client.clone(), stop.clone()),
        ));
    }
    Ok(tasks)
}

/// One app's client: what its connections share.
struct Client {
    app: String,
    cfg: DingTalkStreamApp,
    settings: StreamSettings,
    http: reqwest::Client,
    state: Arc<State>,
    streams: Streams,
}

/// Why a connection attempt failed. Each is a reconnect reason.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("registration request failed: {0}")]
    Request(String),
    #[error("the gateway handed out a ws:// endpoint and allow_insecure_http is off")]
    Insecure,
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("timed out")]
    Timeout,
}

impl ConnectError {
    fn label(&self) -> &'static str {
        match self {
            ConnectError::Open(e) => e.label(),
            ConnectError::Request(_) => "open_failed",
            ConnectError::Insecure => "insecure_endpoint",
            ConnectError::Handshake(_) => "connect_failed",
            ConnectError::Timeout => "connect_timeout",
        }
    }
}

/// Why a connection ended (or is being replaced). Each is a reconnect reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The gateway announced it will close this connection: replace it now.
    Disconnect,
    /// The gateway closed it with a close frame.
    Closed,
    /// The socket went away without one (TCP dropped, reset).
    Dropped,
    /// Nothing heard (no frame, no pong) for two ping intervals.
    PingTimeout,
    /// Reading or writing failed otherwise.
    Error,
    Shutdown,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Disconnect => "disconnect",
            End::Closed => "closed",
            End::Dropped => "dropped",
            End::PingTimeout => "ping_timeout",
            End::Error => "error",
            End::Shutdown => "shutdown",
        }
    }
}

/// The app's task: connect, hand the connection to its own task, wait for it to end or ask to
/// be replaced, and again, until shutdown. Then waits for every connection to finish.
async fn run(client: Arc<Client>, shutdown: Shutdown) {
    let app = client.app.as_str();
    let metrics = &client.state.metrics;
    // Connections still finishing what they hold; the current one among them.
    let mut connections = JoinSet::new();
    let mut failures = 0u32;
    while !shutdown.is_triggered() {
        reap(&mut connections);
        let attempt = tokio::select! {
            r = client.connect() => r,
            _ = shutdown.cancelled() => break,
        };
        let socket = match attempt {
            Ok(socket) => socket,
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics.stream_reconnect(PLATFORM, app, e.label());
                let refused = matches!(e, ConnectError::Open(OpenError::Refused(_)));
                // Cleared only by a connection: a 5xx in between proves nothing of them.
                if refused {
                    client.streams.refused(PLATFORM, app, true);
                }
                let delay = if refused {
                    tracing::error!(platform = PLATFORM, app, error = %e, "DingTalk refuses the app's client_id/client_secret; retrying slowly");
                    // Refused credentials do not fix themselves: retry at the slow pace, plus
                    // up to a fifth of it so that replicas spread out.
                    let retry = client.settings.auth_retry;
                    retry + crate::backoff::delay(1, retry / 5, retry / 5)
                } else {
                    tracing::warn!(platform = PLATFORM, app, error = %e, failures, "cannot connect to DingTalk Stream; retrying");
                    client.backoff(failures)
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        client.streams.up(PLATFORM, app);
        metrics.stream_connected(PLATFORM, app, true);
        tracing::info!(platform = PLATFORM, app, "DingTalk Stream connected");
        let (replace_tx, replace_rx) = oneshot::channel();
        let connected_at = Instant::now();
        connections
            .spawn(Connection::new(client.clone(), replace_tx).run(socket, shutdown.clone()));

        let end = tokio::select! {
            end = replace_rx => end.unwrap_or(End::Error),
            _ = shutdown.cancelled() => break,
        };
        client.streams.down(PLATFORM, app);
        metrics.stream_connected(PLATFORM, app, false);
        metrics.stream_reconnect(PLATFORM, app, end.label());
        tracing::info!(
            platform = PLATFORM,
            app,
            reason = end.label(),
            "DingTalk Stream connection ended; reconnecting"
        );
        if end == End::Disconnect {
            // DingTalk is rotating connections: register anew at once (A.6).
            failures = 0;
            continue;
        }
        // A connection that lived a while was a success: start the backoff over.
        if connected_at.elapsed() > client.settings.ping_interval * 2 {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(client.backoff(failures)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Each connection stops taking frames on the shutdown signal and returns once it has ACKed
    // what it held; the daemon's grace period bounds the wait.
    while let Some(done) = connections.join_next().await {
        resume_panic(done);
    }
    client.streams.down(PLATFORM, app);
    metrics.stream_connected(PLATFORM, app, false);
}

/// Collects the connections that have finished, passing on a panic to the supervisor.
fn reap(connections: &mut JoinSet<()>) {
    while let Some(done) = connections.try_join_next() {
        resume_panic(done);
    }
}

fn resume_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

impl Client {
    fn backoff(&self, failures: u32) -> Duration {
        crate::backoff::delay(
            failures,
            self.settings.reconnect_initial,
            self.settings.reconnect_max,
        )
    }

    /// Registers (a fresh ticket every time: tickets are single-use, A.1) and dials.
    async fn connect(&self) -> Result<Socket, ConnectError> {
        let endpoint = self.open().await?;
        let url = endpoint.url();
        let insecure = url
            .get(..5)
            .is_some_and(|s| s.eq_ignore_ascii_case("ws://"));
        if insecure && !self.cfg.allow_insecure {
            return Err(ConnectError::Insecure);
        }
        // Frames over max_frame_bytes are read and skipped (the connection stays); only frames
        // far beyond it close the connection, so one flood cannot take unbounded memory.
        let cap = self
            .settings
            .max_frame_bytes
            .saturating_mul(4)
            .max(1024 * 1024);
        let config = WebSocketConfig::default()
            .max_message_size(Some(cap))
            .max_frame_size(Some(cap));
        let dial = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
        match tokio::time::timeout(self.settings.connect_timeout, dial).await {
            Err(_) => Err(ConnectError::Timeout),
            // The URL carries the ticket: the error is described without it.
            Ok(Err(e)) => Err(ConnectError::Handshake(handshake_error(&e))),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }

    /// `POST {api_base}/v1.0/gateway/connections/open`.
    async fn open(&self) -> Result<Endpoint, ConnectError> {
        let local_ip = local_ip(&self.cfg.api_base).await;
        let body = stream::OpenRequest {
            client_id: &self.cfg.client_id,
            client_secret: self.cfg.client_secret.expose(),
            subscriptions: &stream::SUBSCRIPTIONS,
            ua: stream::USER_AGENT,
            local_ip: &local_ip,
        };
        let url = format!("{}{}", self.cfg.api_base, stream::OPEN_PATH);
        let send = self
            .http
            .post(url)
            .header("content-type", "application/json")
            // Without it the gateway may answer XML (dt-node).
            .header("accept", "application/json")
            .json(&body)
            .send();
        let response = send
            .await
            .map_err(|e| ConnectError::Request(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let answer = http::read_capped(response)
            .await
            .map_err(|e| ConnectError::Request(e.to_string()))?;
        Ok(stream::open_answer(status, &answer)?)
    }
}

/// A handshake error without the URL it was for (its query holds the ticket).
fn handshake_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(response) => format!("HTTP {}", response.status().as_u16()),
        tungstenite::Error::Io(e) => e.kind().to_string(),
        tungstenite::Error::Url(_) => "invalid endpoint URL".to_owned(),
        other => crate::secret::redact(&other.to_string()).into_owned(),
    }
}

/// The address this host reaches `api_base` from, for the registration's `localIp` (the
/// vendor's diagnostics; optional, so "" when it cannot be told). A UDP "connect" sends nothing.
async fn local_ip(api_base: &str) -> String {
    let Ok(url) = reqwest::Url::parse(api_base) else {
        return String::new();
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return String::new();
    };
    let find = async {
        let socket = tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await.ok()?;
        socket.connect((host, port)).await.ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    };
    match tokio::time::timeout(Duration::from_secs(2), find).await {
        Ok(Some(ip)) if !ip.is_unspecified() => ip.to_string(),
        _ => String::new(),
    }
}

/// An ACK ready to send: its text, the status it is counted under, and when its frame came.
struct Answer {
    text: String,
    status: &'static str,
    received: Instant,
}

type Sink = futures::stream::SplitSink<Socket, Message>;

/// The pushes being published, each ending in its ACK.
type InHand = FuturesUnordered<BoxFuture<'static, Answer>>;

/// What a connection still does.
struct Live {
    /// Reading new frames (off after shutdown or once the socket is gone).
    taking: bool,
    /// The socket can still carry ACKs.
    writable: bool,
    /// After a `disconnect`: close once what is in hand is ACKed, or at this deadline.
    closing_by: Option<tokio::time::Instant>,
}

/// One connection: reads frames, publishes, ACKs, keeps alive.
struct Connection {
    client: Arc<Client>,
    /// Told once why this connection ends or must be replaced.
    replace: Option<oneshot::Sender<End>>,
}

impl Connection {
    fn new(client: Arc<Client>, replace: oneshot::Sender<End>) -> Self {
        Connection {
            client,
            replace: Some(replace),
        }
    }

    /// Tells the app's task (once) that this connection is done for, and why.
    fn end(&mut self, why: End) {
        if let Some(tx) = self.replace.take() {
            let _ = tx.send(why);
        }
    }

    /// Reads, publishes and ACKs until the connection ends (or, after a `disconnect` or on
    /// shutdown, until what it holds is ACKed), keeping it alive with pings meanwhile.
    async fn run(mut self, socket: Socket, shutdown: Shutdown) {
        let settings = self.client.settings.clone();
        let (mut sink, mut frames) = socket.split();
        let mut in_hand = InHand::new();
        let mut live = Live {
            taking: true,
            writable: true,
            closing_by: None,
        };
        let interval = settings.ping_interval;
        let mut heard = tokio::time::Instant::now();
        let mut ping_at = heard + interval;
        loop {
            if in_hand.is_empty() && (!live.taking || live.closing_by.is_some()) {
                break;
            }
            let may_read = live.taking && in_hand.len() < settings.max_in_flight;
            if !may_read {
                // Not reading (all slots busy publishing) is not the gateway's silence: its
                // frames and pongs wait in the socket meanwhile.
                heard = tokio::time::Instant::now();
            }
            let closing_by = live.closing_by;
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if live.taking => {
                    // Stop taking frames; what is in hand is finished and ACKed below.
                    live.taking = false;
                    self.end(End::Shutdown);
                }
                Some(answer) = in_hand.next(), if !in_hand.is_empty() => {
                    self.answer(&mut sink, answer, &mut live).await;
                }
                read = frames.next(), if may_read => {
                    heard = tokio::time::Instant::now();
                    self.read(read, &mut sink, &mut in_hand, &mut live).await;
                }
                _ = tokio::time::sleep_until(ping_at), if live.taking && live.writable => {
                    ping_at = tokio::time::Instant::now() + interval;
                    let ping = tokio::time::timeout(interval, sink.send(Message::Ping(Bytes::new())));
                    if !matches!(ping.await, Ok(Ok(()))) {
                        self.lose(&mut live, End::Error);
                    }
                }
                _ = tokio::time::sleep_until(heard + interval * 2), if live.taking => {
                    tracing::warn!(platform = PLATFORM, app = %self.client.app, "DingTalk Stream connection silent for two ping intervals; replacing it");
                    self.lose(&mut live, End::PingTimeout);
                }
                _ = tokio::time::sleep_until(closing_by.unwrap_or_else(tokio::time::Instant::now)), if closing_by.is_some() => {
                    // What is still in hand was never ACKed: DingTalk pushes it again.
                    break;
                }
            }
        }
        if live.writable {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
        }
        self.end(End::Closed);
    }

    /// What one message read from the socket calls for.
    async fn read(
        &mut self,
        read: Option<Result<Message, tungstenite::Error>>,
        sink: &mut Sink,
        in_hand: &mut InHand,
        live: &mut Live,
    ) {
        match read {
            Some(Ok(Message::Text(text))) => match self.frame(text.as_str(), Instant::now()) {
                Step::Publish(publish) => in_hand.push(publish),
                Step::Answer(answer) => self.answer(sink, answer, live).await,
                Step::Disconnect(answer) => {
                    self.answer(sink, answer, live).await;
                    // The gateway closes it about 10 s later (A.4): finish what is in hand
                    // before that, then close.
                    live.closing_by = Some(tokio::time::Instant::now() + Duration::from_secs(10));
                    self.end(End::Disconnect);
                }
                Step::Skip => {}
            },
            // dt-go ignores non-text messages; counted here so it shows.
            Some(Ok(Message::Binary(_))) => self.invalid(stream::FrameError::NotText),
            // Pings are answered by the library; any traffic counts as alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) => self.lose(live, End::Closed),
            Some(Err(e)) => {
                tracing::debug!(platform = PLATFORM, app = %self.client.app, error = %handshake_error(&e), "DingTalk Stream read failed");
                self.lose(
                    live,
                    if is_drop(&e) {
                        End::Dropped
                    } else {
                        End::Error
                    },
                );
            }
            None => self.lose(live, End::Dropped),
        }
    }

    /// The socket is gone (or given up): nothing more is read or written on it; what is in
    /// hand is still published, its ACKs dropped.
    fn lose(&mut self, live: &mut Live, why: End) {
        live.taking = false;
        live.writable = false;
        self.end(why);
    }

    /// Sends an ACK while the socket can take it.
    async fn answer(&mut self, sink: &mut Sink, answer: Answer, live: &mut Live) {
        if live.writable && !self.send(sink, answer).await {
            self.lose(live, End::Error);
        }
    }

    /// Sends an ACK; `false` when the socket cannot take it, or not within a ping interval (a
    /// gateway that stopped reading would otherwise hold the connection forever).
    async fn send(&self, sink: &mut Sink, answer: Answer) -> bool {
        let send = sink.send(Message::text(answer.text));
        let ok = matches!(
            tokio::time::timeout(self.client.settings.ping_interval, send).await,
            Ok(Ok(()))
        );
        if ok {
            self.client.state.metrics.stream_ack(
                PLATFORM,
                &self.client.app,
                answer.status,
                answer.received.elapsed(),
            );
        }
        ok
    }

    fn invalid(&self, e: stream::FrameError) {
        let app = &self.client.app;
        self.client
            .state
            .metrics
            .stream_invalid_frame(PLATFORM, app, e.label());
        tracing::warn!(platform = PLATFORM, app = %app, reason = e.label(), error = %e, "DingTalk Stream frame skipped");
    }

    /// What one text frame calls for.
    fn frame(&self, text: &str, received: Instant) -> Step {
        let answer = |text: String, status| {
            Step::Answer(Answer {
                text,
                status,
                received,
            })
        };
        let frame = match stream::parse(text, self.client.settings.max_frame_bytes) {
            Ok(frame) => frame,
            Err(e) => {
                self.invalid(e);
                // A frame of a type imbridge does not know is answered 404 (A.4); the others
                // are skipped, and an unanswered push is pushed again.
                if e == stream::FrameError::UnknownType {
                    if let Some(id) = stream::message_id_of(text) {
                        return answer(stream::ack_unknown(&id), "unknown");
                    }
                }
                return Step::Skip;
            }
        };
        let metrics = &self.client.state.metrics;
        metrics.stream_frame(PLATFORM, &self.client.app, frame.kind());
        match frame {
            Frame::Ping { message_id, data } => {
                answer(stream::ack_ping(&message_id, &data), "ping")
            }
            Frame::Disconnect { message_id, reason } => {
                tracing::info!(platform = PLATFORM, app = %self.client.app, reason = reason.as_deref().unwrap_or(""), "DingTalk announced a disconnect");
                Step::Disconnect(Answer {
                    text: stream::ack(&message_id, 200, "OK", "{}"),
                    status: "system",
                    received,
                })
            }
            Frame::OtherSystem { message_id, topic } => {
                tracing::debug!(platform = PLATFORM, app = %self.client.app, topic = %crate::bus::header_value(&topic), "system frame ignored");
                answer(stream::ack(&message_id, 200, "OK", "{}"), "system")
            }
            Frame::UnknownTopic { message_id, .. } => {
                answer(stream::ack_unknown(&message_id), "unknown")
            }
            Frame::Publish(push) => {
                // A panic here takes down the connection and, passed on, the app's task: the
                // supervisor restarts it, and the unACKed push is pushed again.
                crate::supervise::failpoint("dingtalk-stream-frame", &self.client.app);
                Step::Publish(publish(self.client.clone(), push, received).boxed())
            }
        }
    }
}

/// What the connection does with a frame.
enum Step {
    Publish(BoxFuture<'static, Answer>),
    Answer(Answer),
    Disconnect(Answer),
    Skip,
}

/// The socket went away without a close handshake.
fn is_drop(e: &tungstenite::Error) -> bool {
    use tungstenite::error::ProtocolError;
    matches!(
        e,
        tungstenite::Error::Io(_)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)
    )
}

/// Publishes one push and says how to ACK it: success only once the bus has it.
async fn publish(client: Arc<Client>, push: Push, received: Instant) -> Answer {
    let Push {
        kind,
        message_id,
        event_type,
        id,
        tenant,
        data,
    } = push;
    let app = client.app.as_str();
    // A push without an id of its own (card actions) is identified by its content, as HTTP
    // callbacks are: a redelivery of it is then dropped by the bus's duplicate window.
    let id = id.unwrap_or_else(|| ingress::dingtalk::event_id(app, data.as_bytes()));
    let event = ingress::dingtalk::event(app, event_type, id, tenant, Bytes::from(data));
    let state = &client.state;
    let result = ingress::publish(state, event).await;
    let (text, status) = match (&result, kind) {
        (Ok(outcome), _) => {
            state.metrics.callback(PLATFORM, app, outcome.label());
            match kind {
                PushKind::Event => (stream::ack_success(&message_id), "success"),
                PushKind::Robot | PushKind::Card => (stream::ack_callback(&message_id), "callback"),
            }
        }
        (Err(e), PushKind::Event) => {
            state.metrics.callback(PLATFORM, app, e.code);
            tracing::warn!(platform = PLATFORM, app, message = %e.message, "event not stored; DingTalk will push it again");
            (stream::ack_later(&message_id, &e.message), "later")
        }
        (Err(e), PushKind::Robot | PushKind::Card) => {
            state.metrics.callback(PLATFORM, app, e.code);
            tracing::warn!(platform = PLATFORM, app, message = %e.message, "callback not stored");
            (
                stream::ack_callback_failed(&message_id, &e.message),
                "callback_failed",
            )
        }
    };
    Answer {
        text,
        status,
        received,
    }
}
