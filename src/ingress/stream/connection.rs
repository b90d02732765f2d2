//! What every long connection does, whatever the platform: per app, connect (a fresh
//! registration each time), read and publish what is pushed, answer each push only once the
//! bus has it, keep the connection alive, and on any loss connect again with capped backoff
//! and jitter, forever. A [`Protocol`] says what differs: how to register and dial, what a
//! ping is, and what a message read calls for.
//!
//! A connection runs in a task of its own so that a platform rotating connections (DingTalk's
//! `disconnect`) can be honoured as documented: the next connection is opened at once while
//! the old one finishes and answers what it holds, then closes. The app's supervised task
//! owns them all.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Shared, StreamSettings, Streams};
use crate::ingress::State;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

type Sink = futures::stream::SplitSink<Socket, Message>;

/// One app's client: what its connections share.
pub(super) struct Client<P> {
    pub(super) app: String,
    pub(super) protocol: P,
    pub(super) settings: StreamSettings,
    pub(super) http: reqwest::Client,
    pub(super) state: Arc<State>,
    pub(super) streams: Streams,
}

/// What differs between the platforms' long connections.
pub(super) trait Protocol: Sized + Send + Sync + 'static {
    /// What one connection keeps (its keepalive period, partial messages).
    type Conn: Send + Sync + 'static;
    /// For metrics and logs.
    const PLATFORM: &'static str;
    /// The mode's name in logs.
    const NAME: &'static str;

    /// How the registration call leaves (the app's proxy, or none).
    fn egress(&self) -> &crate::egress::Egress;

    /// Registers (a fresh registration every time) and dials.
    fn connect(
        client: &Client<Self>,
    ) -> impl Future<Output = Result<(Socket, Self::Conn), ConnectError>> + Send;

    /// The keepalive message.
    fn ping(client: &Client<Self>, conn: &Self::Conn) -> Message;

    /// How often it goes, now (a platform may change it on a live connection).
    fn ping_every(client: &Client<Self>, conn: &Self::Conn) -> Duration;

    /// How long without any traffic means the connection is dead.
    fn silence(client: &Client<Self>, conn: &Self::Conn) -> Duration;

    /// What one message read from the socket calls for.
    fn read(
        client: &Arc<Client<Self>>,
        conn: &mut Self::Conn,
        msg: Message,
        received: Instant,
    ) -> Step;

    /// How long to wait before the next attempt after `failures` failed ones in a row.
    fn retry_delay(client: &Client<Self>, failures: u32) -> Duration {
        crate::backoff::delay(
            failures,
            client.settings.reconnect_initial,
            client.settings.reconnect_max,
        )
    }
}

/// Why a connection attempt failed. Each is a reconnect reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// The platform refuses the app's credentials: retried slowly, and `/readyz` says so.
    #[error("credentials refused: {0}")]
    Refused(String),
    /// The registration failed otherwise; `label` is the reconnect reason.
    #[error("{message}")]
    Register {
        label: &'static str,
        message: String,
    },
    #[error("the platform handed out a ws:// URL and allow_insecure_http is off")]
    Insecure,
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("timed out")]
    Timeout,
}

impl ConnectError {
    fn label(&self) -> &'static str {
        match self {
            ConnectError::Refused(_) => "auth_refused",
            ConnectError::Register { label, .. } => label,
            ConnectError::Insecure => "insecure_endpoint",
            ConnectError::Handshake(_) => "connect_failed",
            ConnectError::Timeout => "connect_timeout",
        }
    }
}

/// Why a connection ended (or is being replaced). Each is a reconnect reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The platform announced it will close this connection: replace it now.
    Disconnect,
    /// The platform closed it with a close frame.
    Closed,
    /// The socket went away without one (TCP dropped, reset).
    Dropped,
    /// Nothing heard (no frame, no pong) for too long.
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

/// An answer ready to send: the message, the status it is counted under, and when the push
/// it answers came.
pub(super) struct Answer {
    pub(super) message: Message,
    pub(super) status: &'static str,
    pub(super) received: Instant,
}

/// What the connection does with a message read.
pub(super) enum Step {
    /// Publish, then answer.
    Publish(BoxFuture<'static, Answer>),
    /// Answer at once.
    Answer(Answer),
    /// Answer, then open the next connection and close this one once what it holds is
    /// answered.
    Disconnect(Answer),
    /// Nothing to answer.
    Skip,
}

/// Starts one supervised task per app; each returns on `shutdown` once its connections have
/// answered what they held.
pub(super) fn spawn_all<P: Protocol>(
    apps: impl IntoIterator<Item = (String, P)>,
    shared: Shared<'_>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for (app, protocol) in apps {
        let http = crate::notify::http::client(shared.settings.connect_timeout, protocol.egress())?;
        let client = Client {
            app,
            protocol,
            settings: shared.settings.clone(),
            http,
            state: shared.state.clone(),
            streams: shared.streams.clone(),
        };
        tasks.push(spawn(client, shared.supervisor, shared.shutdown));
    }
    Ok(tasks)
}

/// Starts the app's supervised task.
fn spawn<P: Protocol>(
    client: Client<P>,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    client.streams.register(P::PLATFORM, &client.app);
    let metrics = &client.state.metrics;
    metrics.stream_connected(P::PLATFORM, &client.app, false);
    let name = format!("{}_stream:{}", P::PLATFORM, client.app);
    let client = Arc::new(client);
    let stop = shutdown.clone();
    supervisor.spawn(name, shutdown.clone(), move || {
        run(client.clone(), stop.clone())
    })
}

/// The app's task: connect, hand the connection to its own task, wait for it to end or ask to
/// be replaced, and again, until shutdown. Then waits for every connection to finish.
async fn run<P: Protocol>(client: Arc<Client<P>>, shutdown: Shutdown) {
    let (platform, app) = (P::PLATFORM, client.app.as_str());
    let metrics = &client.state.metrics;
    // Connections still finishing what they hold; the current one among them.
    let mut connections = JoinSet::new();
    let mut failures = 0u32;
    while !shutdown.is_triggered() {
        reap(&mut connections);
        let attempt = tokio::select! {
            r = P::connect(&client) => r,
            _ = shutdown.cancelled() => break,
        };
        let (socket, conn) = match attempt {
            Ok(connected) => connected,
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics.stream_reconnect(platform, app, e.label());
                let delay = client.failed(&e, failures);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        client.streams.up(platform, app);
        metrics.stream_connected(platform, app, true);
        tracing::info!(platform, app, "{} connected", P::NAME);
        let (replace_tx, replace_rx) = oneshot::channel();
        let connected_at = Instant::now();
        let connection = Connection {
            client: client.clone(),
            conn,
            replace: Some(replace_tx),
        };
        connections.spawn(connection.run(socket, shutdown.clone()));

        // Biased: a connection ending because of the stop is no reconnect to report.
        let end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            end = replace_rx => end.unwrap_or(End::Error),
        };
        client.streams.down(platform, app);
        metrics.stream_connected(platform, app, false);
        metrics.stream_reconnect(platform, app, end.label());
        tracing::info!(
            platform,
            app,
            reason = end.label(),
            "{} ended; reconnecting",
            P::NAME
        );
        if end == End::Disconnect {
            // The platform is rotating connections: register anew at once.
            failures = 0;
            continue;
        }
        // A connection that lived a while was a success: start the backoff over.
        if connected_at.elapsed() > client.settings.ping_interval * 2 {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(P::retry_delay(&client, failures)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // Each connection stops taking pushes on the shutdown signal and returns once it has
    // answered what it held; the daemon's grace period bounds the wait.
    while let Some(done) = connections.join_next().await {
        resume_panic(done);
    }
    // Stopped by a reload rather than the shutdown: the app's health is its successor's
    // (already connecting under the same name), or forgotten with the app.
    if client.state.shutdown.is_triggered() {
        client.streams.down(platform, app);
        metrics.stream_connected(platform, app, false);
    }
}

impl<P: Protocol> Client<P> {
    /// Logs a failed attempt and says how long to wait before the next.
    fn failed(&self, e: &ConnectError, failures: u32) -> Duration {
        let (platform, app) = (P::PLATFORM, self.app.as_str());
        if let ConnectError::Refused(_) = e {
            // Cleared only by a connection: a 5xx in between proves nothing of them.
            self.streams.refused(platform, app, true);
            tracing::error!(platform, app, error = %e, "{} refuses the app's credentials; retrying slowly", P::NAME);
            // Refused credentials do not fix themselves: retry at the slow pace, plus up to a
            // fifth of it so that replicas spread out.
            let retry = self.settings.auth_retry;
            return retry + crate::backoff::delay(1, retry / 5, retry / 5);
        }
        tracing::warn!(platform, app, error = %e, failures, "cannot connect ({}); retrying", P::NAME);
        P::retry_delay(self, failures)
    }
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

/// Sends a registration request (its JSON body, with `content-type: application/json`) and
/// reads the answer, capped: the status and the body. Failing to, a `Register` error counted
/// as `open_failed`, described without the URL (it may hold credentials).
pub(super) async fn register(
    request: reqwest::RequestBuilder,
    body: &impl serde::Serialize,
) -> Result<(u16, Vec<u8>), ConnectError> {
    let failed = |message: String| ConnectError::Register {
        label: "open_failed",
        message: format!("registration request failed: {message}"),
    };
    let response = request
        .header("content-type", "application/json")
        .json(body)
        .send()
        .await
        .map_err(|e| failed(e.without_url().to_string()))?;
    let status = response.status().as_u16();
    let answer = crate::notify::http::read_capped(response)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok((status, answer))
}

/// Dials `url` within the connect timeout, refusing `ws://` unless allowed. Always directly:
/// tokio-tungstenite's `connect_async` opens its own TCP connection and takes no proxy (a
/// CONNECT tunnel would have to be written here, TLS to an `https://` proxy included), so a
/// proxied app's registration goes through its proxy and its WebSocket does not;
/// check-config warns about it. Frames over
/// `max_frame_bytes` are read and skipped by the protocol (the connection stays); only
/// messages far beyond it close the connection, so one flood cannot take unbounded memory.
pub(super) async fn dial(
    url: &str,
    allow_insecure: bool,
    settings: &StreamSettings,
) -> Result<Socket, DialError> {
    let insecure = url
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("ws://"));
    if insecure && !allow_insecure {
        return Err(DialError::Insecure);
    }
    let cap = settings.max_frame_bytes.saturating_mul(4).max(1024 * 1024);
    let config = WebSocketConfig::default()
        .max_message_size(Some(cap))
        .max_frame_size(Some(cap));
    let dial = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    match tokio::time::timeout(settings.connect_timeout, dial).await {
        Err(_) => Err(DialError::Timeout),
        Ok(Err(e)) => Err(DialError::Ws(Box::new(e))),
        Ok(Ok((socket, _))) => Ok(socket),
    }
}

/// Why dialing failed: the protocol tells a refusal from the rest.
pub(super) enum DialError {
    Insecure,
    Timeout,
    Ws(Box<tungstenite::Error>),
}

impl DialError {
    /// The generic reading of a failed dial.
    pub(super) fn into_connect_error(self) -> ConnectError {
        match self {
            DialError::Insecure => ConnectError::Insecure,
            DialError::Timeout => ConnectError::Timeout,
            DialError::Ws(e) => ConnectError::Handshake(describe(&e)),
        }
    }
}

/// A WebSocket error without the URL it was for (its query holds a ticket or credentials).
pub(super) fn describe(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(response) => format!("HTTP {}", response.status().as_u16()),
        tungstenite::Error::Io(e) => e.kind().to_string(),
        tungstenite::Error::Url(_) => "invalid endpoint URL".to_owned(),
        other => crate::secret::redact(&other.to_string()).into_owned(),
    }
}

/// The pushes being published, each ending in its answer.
type InHand = FuturesUnordered<BoxFuture<'static, Answer>>;

/// What a connection still does.
struct Live {
    /// Reading new messages (off after shutdown or once the socket is gone).
    taking: bool,
    /// The socket can still carry answers.
    writable: bool,
    /// After a `disconnect`: close once what is in hand is answered, or at this deadline.
    closing_by: Option<tokio::time::Instant>,
}

/// One connection: reads, publishes, answers, keeps alive.
struct Connection<P: Protocol> {
    client: Arc<Client<P>>,
    conn: P::Conn,
    /// Told once why this connection ends or must be replaced.
    replace: Option<oneshot::Sender<End>>,
}

/// How long a connection announced as closing may take to answer what it holds: DingTalk
/// closes it about 10 s after its `disconnect` (STREAMS.md §A.4).
const CLOSING_GRACE: Duration = Duration::from_secs(10);

impl<P: Protocol> Connection<P> {
    /// Tells the app's task (once) that this connection is done for, and why.
    fn end(&mut self, why: End) {
        if let Some(tx) = self.replace.take() {
            let _ = tx.send(why);
        }
    }

    /// Reads, publishes and answers until the connection ends (or, after a `disconnect` or on
    /// shutdown, until what it holds is answered), keeping it alive meanwhile.
    async fn run(mut self, socket: Socket, shutdown: Shutdown) {
        let max_in_flight = self.client.settings.max_in_flight;
        let (mut sink, mut messages) = socket.split();
        let mut in_hand = InHand::new();
        let mut live = Live {
            taking: true,
            writable: true,
            closing_by: None,
        };
        let mut heard = tokio::time::Instant::now();
        // The first ping goes at once (Lark's SDKs do; DingTalk's gateway does not mind).
        let mut pinged: Option<tokio::time::Instant> = None;
        loop {
            if in_hand.is_empty() && (!live.taking || live.closing_by.is_some()) {
                break;
            }
            let may_read = live.taking && in_hand.len() < max_in_flight;
            if !may_read {
                // Not reading (all slots busy publishing) is not the platform's silence: its
                // messages and pongs wait in the socket meanwhile.
                heard = tokio::time::Instant::now();
            }
            let silence = P::silence(&self.client, &self.conn);
            // Recomputed each time round: a period shortened by the platform applies at once.
            let every = P::ping_every(&self.client, &self.conn);
            let ping_at = pinged.map_or(heard, |at| at + every);
            let closing_by = live.closing_by;
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if live.taking => {
                    // Stop taking pushes; what is in hand is finished and answered below.
                    live.taking = false;
                    self.end(End::Shutdown);
                }
                Some(answer) = in_hand.next(), if !in_hand.is_empty() => {
                    self.answer(&mut sink, answer, &mut live).await;
                }
                read = messages.next(), if may_read => {
                    heard = tokio::time::Instant::now();
                    self.read(read, &mut sink, &mut in_hand, &mut live).await;
                }
                _ = tokio::time::sleep_until(ping_at), if live.taking && live.writable => {
                    pinged = Some(tokio::time::Instant::now());
                    let ping = P::ping(&self.client, &self.conn);
                    if !matches!(tokio::time::timeout(every, sink.send(ping)).await, Ok(Ok(()))) {
                        self.lose(&mut live, End::Error);
                    }
                }
                _ = tokio::time::sleep_until(heard + silence), if live.taking => {
                    tracing::warn!(platform = P::PLATFORM, app = %self.client.app, "{} silent for too long; replacing it", P::NAME);
                    self.lose(&mut live, End::PingTimeout);
                }
                _ = tokio::time::sleep_until(closing_by.unwrap_or_else(tokio::time::Instant::now)), if closing_by.is_some() => {
                    // What is still in hand was never answered: the platform pushes it again.
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
        let message = match read {
            // WebSocket pings are answered by the library; any traffic counts as alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return,
            Some(Ok(Message::Close(_))) => return self.lose(live, End::Closed),
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::debug!(platform = P::PLATFORM, app = %self.client.app, error = %describe(&e), "read failed");
                let why = if is_drop(&e) {
                    End::Dropped
                } else {
                    End::Error
                };
                return self.lose(live, why);
            }
            None => return self.lose(live, End::Dropped),
        };
        match P::read(&self.client, &mut self.conn, message, Instant::now()) {
            Step::Publish(publish) => in_hand.push(publish),
            Step::Answer(answer) => self.answer(sink, answer, live).await,
            Step::Disconnect(answer) => {
                self.answer(sink, answer, live).await;
                live.closing_by = Some(tokio::time::Instant::now() + CLOSING_GRACE);
                self.end(End::Disconnect);
            }
            Step::Skip => {}
        }
    }

    /// The socket is gone (or given up): nothing more is read or written on it; what is in
    /// hand is still published, its answers dropped.
    fn lose(&mut self, live: &mut Live, why: End) {
        live.taking = false;
        live.writable = false;
        self.end(why);
    }

    /// Sends an answer while the socket can take it.
    async fn answer(&mut self, sink: &mut Sink, answer: Answer, live: &mut Live) {
        if live.writable && !self.send(sink, answer).await {
            self.lose(live, End::Error);
        }
    }

    /// Sends an answer; `false` when the socket cannot take it, or not within the silence
    /// bound (a platform that stopped reading would otherwise hold the connection forever).
    async fn send(&self, sink: &mut Sink, answer: Answer) -> bool {
        let bound = P::silence(&self.client, &self.conn);
        let ok = matches!(
            tokio::time::timeout(bound, sink.send(answer.message)).await,
            Ok(Ok(()))
        );
        if ok {
            self.client.state.metrics.stream_ack(
                P::PLATFORM,
                &self.client.app,
                answer.status,
                answer.received.elapsed(),
            );
        }
        ok
    }
}

/// Counts and logs a message skipped as invalid; the connection stays.
pub(super) fn invalid<P: Protocol>(
    client: &Client<P>,
    reason: &'static str,
    error: &dyn std::fmt::Display,
) {
    let app = &client.app;
    client
        .state
        .metrics
        .stream_invalid_frame(P::PLATFORM, app, reason);
    tracing::warn!(platform = P::PLATFORM, app = %app, reason, error = %error, "{} message skipped", P::NAME);
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
