//! Lark / Feishu long connection (STREAMS.md §B): per app, ask `{domain}/callback/ws/endpoint`
//! for a URL (a new one for every connection), dial it, publish every event pushed (reassembled
//! from its fragments), and answer each with the frame itself carrying `{"code":200}` only once
//! the bus has it (`{"code":500}`, so Lark pushes it again, when not). Pings are protobuf
//! frames at the period Lark's `ClientConfig` sets, and a pong carrying a new one applies at
//! once; reconnects wait as it says. The rest is [`connection`]'s.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use tokio_tungstenite::tungstenite::{self, Message};

use super::connection::{self, Answer, Client, ConnectError, DialError, Protocol, Socket, Step};
use super::LarkStreamApp;
use crate::ingress;
use crate::platform::lark::callback;
use crate::platform::lark::ws::{
    self, ClientConfig, Endpoint, FragmentError, Fragments, Frame, FrameKind,
};
use crate::platform::Platform;

const PLATFORM: &str = Platform::Lark.as_str();

/// Where the endpoint is asked for, under the app's domain.
const ENDPOINT_PATH: &str = "/callback/ws/endpoint";

/// An incomplete fragmented message is dropped this long after its latest part (the SDKs'
/// cache lifetime, STREAMS.md §B.4).
const FRAGMENT_DEADLINE: Duration = Duration::from_secs(5);

/// Incomplete fragmented messages one connection holds at most; the oldest goes first.
const MAX_FRAGMENT_SETS: usize = 256;

/// No frame at all for this many ping periods means the connection is dead: none of the SDKs
/// has a pong timeout (STREAMS.md §B.6), so this is imbridge's own bound [U].
const SILENT_PINGS: u32 = 3;

/// Starts one supervised task per websocket-mode app; each returns on `shutdown` once its
/// connections have answered what they held.
pub fn spawn(
    apps: &std::collections::BTreeMap<String, LarkStreamApp>,
    shared: super::Shared<'_>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let apps = apps.iter().map(|(name, app)| {
        let lark = Lark {
            app: app.clone(),
            config: Mutex::new(ClientConfig::default()),
        };
        (name.clone(), lark)
    });
    connection::spawn_all(apps, shared)
}

/// One app: its settings, and the latest `ClientConfig` Lark sent (an endpoint answer or a
/// pong), which outlives the connection it came on: reconnects wait as it says.
pub(super) struct Lark {
    app: LarkStreamApp,
    config: Mutex<ClientConfig>,
}

impl Lark {
    fn config(&self) -> ClientConfig {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_config(&self, config: ClientConfig) {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config;
    }
}

/// One connection's state.
pub(super) struct Conn {
    /// From the URL's query: every ping carries it.
    service_id: i32,
    /// The ping period and reconnect settings in force on this connection.
    config: ClientConfig,
    fragments: Fragments,
}

impl Protocol for Lark {
    type Conn = Conn;
    const PLATFORM: &'static str = PLATFORM;
    const NAME: &'static str = "Lark long connection";

    fn egress(&self) -> &crate::egress::Egress {
        &self.app.egress
    }

    async fn connect(client: &Client<Self>) -> Result<(Socket, Conn), ConnectError> {
        let (url, config) = endpoint(client).await?;
        client.protocol.set_config(config);
        let app = &client.protocol.app;
        let socket = connection::dial(&url, app.allow_insecure, &client.settings)
            .await
            .map_err(handshake_refusal)?;
        let (service_id, device_id) = ws::connection_ids(&url);
        tracing::debug!(platform = PLATFORM, app = %client.app, device_id = device_id.as_deref().unwrap_or(""), service_id, "Lark long connection opened");
        let max_bytes = client.settings.max_frame_bytes;
        Ok((
            socket,
            Conn {
                service_id,
                config,
                fragments: Fragments::new(FRAGMENT_DEADLINE, MAX_FRAGMENT_SETS, max_bytes),
            },
        ))
    }

    fn ping(_: &Client<Self>, conn: &Conn) -> Message {
        Message::binary(Frame::ping(conn.service_id).to_bytes())
    }

    fn ping_every(_: &Client<Self>, conn: &Conn) -> Duration {
        conn.config.ping_every()
    }

    fn silence(_: &Client<Self>, conn: &Conn) -> Duration {
        conn.config.ping_every() * SILENT_PINGS
    }

    fn read(client: &Arc<Client<Self>>, conn: &mut Conn, msg: Message, received: Instant) -> Step {
        let bytes = match msg {
            Message::Binary(bytes) => bytes,
            _ => {
                let why = "a text message (the protocol is binary protobuf)";
                connection::invalid(client.as_ref(), "not_binary", &why);
                return Step::Skip;
            }
        };
        if bytes.len() > client.settings.max_frame_bytes {
            let why = format!("{} bytes, over streams.max_frame_bytes", bytes.len());
            connection::invalid(client.as_ref(), "oversize", &why);
            return Step::Skip;
        }
        let frame = match Frame::decode_bytes(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                connection::invalid(client.as_ref(), "not_protobuf", &e);
                return Step::Skip;
            }
        };
        let kind = frame.kind();
        let metrics = &client.state.metrics;
        metrics.stream_frame(PLATFORM, &client.app, kind.label());
        match kind {
            FrameKind::Pong => {
                pong(client, conn, &frame);
                Step::Skip
            }
            // The SDKs ignore the server's pings, and neither handle nor answer card frames
            // (STREAMS.md §B.4, §B.6): counted above, nothing more.
            FrameKind::Ping | FrameKind::Card => Step::Skip,
            FrameKind::Event => event(client, conn, frame, received),
            FrameKind::Other => {
                let why = format!(
                    "method {} type {:?}",
                    frame.method,
                    frame.header("type").unwrap_or("")
                );
                connection::invalid(client.as_ref(), "unknown_type", &why);
                Step::Skip
            }
        }
    }

    /// After a loss, the first attempt waits a random time below `ReconnectNonce` (so that
    /// clients do not all come back at once); the next ones `ReconnectInterval` apart, give
    /// or take a fifth. `ReconnectCount` is not honoured: the daemon never gives up on an app
    /// (STREAMS.md §B.7 has the SDKs stop; a bridge that stops is an outage).
    fn retry_delay(client: &Client<Self>, failures: u32) -> Duration {
        let config = client.protocol.config();
        if failures <= 1 {
            let nonce = Duration::from_secs(config.reconnect_nonce);
            return crate::backoff::delay(1, nonce, nonce).min(nonce);
        }
        let interval = Duration::from_secs(config.reconnect_interval);
        interval + crate::backoff::delay(1, interval / 5, interval / 5)
    }
}

/// `POST {domain}/callback/ws/endpoint`: the URL to dial and the `ClientConfig`.
async fn endpoint(client: &Client<Lark>) -> Result<(String, ClientConfig), ConnectError> {
    let app = &client.protocol.app;
    let url = format!("{}{ENDPOINT_PATH}", app.domain);
    // The gateway reads `locale` (lk-node: "consumed by gateway").
    let request = client.http.post(url).header("locale", "zh");
    let body = ws::endpoint_request(&app.app_id, app.app_secret.expose());
    let (status, body) = connection::register(request, &body).await?;
    match ws::endpoint(status, &body) {
        Endpoint::Connect { url, config } => Ok((url, config)),
        Endpoint::Retry(why) => Err(ConnectError::Register {
            label: "open_failed",
            message: crate::secret::redact(&why).into_owned(),
        }),
        Endpoint::Refused(why) => Err(ConnectError::Refused(
            crate::secret::redact(&why).into_owned(),
        )),
    }
}

/// A refused handshake says why in its `handshake-*` headers: the app's fault (too many
/// connections, banned) counts as refused credentials; anything else is retried.
fn handshake_refusal(e: DialError) -> ConnectError {
    let DialError::Ws(ws) = &e else {
        return e.into_connect_error();
    };
    let tungstenite::Error::Http(response) = ws.as_ref() else {
        return e.into_connect_error();
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, message, code) = (
        header("handshake-status"),
        header("handshake-msg"),
        header("handshake-autherrcode"),
    );
    let why = format!(
        "HTTP {}, handshake-status {}, handshake-autherrcode {}: {}",
        response.status().as_u16(),
        status.as_deref().unwrap_or("-"),
        code.as_deref().unwrap_or("-"),
        crate::bus::header_value(message.as_deref().unwrap_or("")),
    );
    if ws::handshake_refused_by_client(status.as_deref(), code.as_deref()) {
        ConnectError::Refused(why)
    } else {
        ConnectError::Handshake(why)
    }
}

/// A pong with a payload carries a new `ClientConfig`: its keys apply at once, to this
/// connection's pings and to the app's next reconnects.
fn pong(client: &Client<Lark>, conn: &mut Conn, frame: &Frame) {
    let Some(payload) = frame.payload.as_deref().filter(|p| !p.is_empty()) else {
        return;
    };
    if conn.config.apply(payload) {
        client.protocol.set_config(conn.config);
        tracing::info!(platform = PLATFORM, app = %client.app, ping_interval_s = conn.config.ping_interval, reconnect_interval_s = conn.config.reconnect_interval, "Lark updated the connection's settings");
    } else {
        let why = "a pong whose payload is not a ClientConfig object";
        connection::invalid(client, "invalid_pong", &why);
    }
}

/// A data frame of an event: its fragment taken, and the whole event published once complete.
fn event(client: &Arc<Client<Lark>>, conn: &mut Conn, frame: Frame, received: Instant) -> Step {
    let added = conn.fragments.add(&frame, Instant::now());
    let expired = conn.fragments.take_dropped();
    for _ in 0..expired {
        let why = "a fragmented message incomplete past its deadline, or evicted";
        connection::invalid(client.as_ref(), "fragments_expired", &why);
    }
    match added {
        Ok(None) => Step::Skip,
        Ok(Some(payload)) => {
            crate::supervise::failpoint("lark-stream-frame", &client.app);
            Step::Publish(publish(client.clone(), frame, payload, received).boxed())
        }
        Err(e) => {
            let reason = match e {
                FragmentError::Malformed => "bad_fragment",
                FragmentError::TooLarge => "oversize",
            };
            connection::invalid(client.as_ref(), reason, &format!("{e:?}"));
            Step::Skip
        }
    }
}

/// Publishes one event and answers the frame that completed it: 200 only once the bus has
/// it, 500 when it does not (Lark pushes it again) or when the payload is no event.
async fn publish(
    client: Arc<Client<Lark>>,
    frame: Frame,
    payload: Vec<u8>,
    received: Instant,
) -> Answer {
    let app = client.app.as_str();
    let state = &client.state;
    let answer = |stored: bool, status| Answer {
        message: Message::binary(frame.answer(stored, received.elapsed()).to_bytes()),
        status,
        received,
    };
    let event = match callback::pushed_event(payload) {
        Ok(event) => event,
        Err(e) => {
            connection::invalid(client.as_ref(), e.code(), &e);
            // Not acknowledged: Lark keeps what it could not deliver, where it can be looked
            // at, rather than have imbridge drop it here.
            return answer(false, "invalid");
        }
    };
    let event = ingress::Event {
        platform: PLATFORM,
        app: app.to_owned(),
        event_type: event.event_type,
        id: event.event_id,
        tenant: event.tenant_key,
        payload: Bytes::from(event.body),
        recovered: false,
    };
    match ingress::publish(state, event).await {
        Ok(outcome) => {
            state.metrics.callback(PLATFORM, app, outcome.label());
            answer(true, "success")
        }
        Err(e) => {
            state.metrics.callback(PLATFORM, app, e.code);
            tracing::warn!(platform = PLATFORM, app, message = %e.message, "event not stored; Lark will push it again");
            answer(false, "failed")
        }
    }
}
