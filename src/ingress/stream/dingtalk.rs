//! DingTalk Stream mode (STREAMS.md §A): per app, register with `connections/open`, dial the
//! WebSocket it names, publish every event, robot message and card action it pushes, and ACK
//! each frame, events only once the bus has them. Every loss (a `disconnect`, a dropped
//! socket, a connection gone quiet, a refused registration) ends in a fresh registration,
//! tickets being single-use; the rest is [`connection`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use tokio_tungstenite::tungstenite::Message;

use super::connection::{self, Answer, Client, ConnectError, Protocol, Socket, Step};
use super::DingTalkStreamApp;
use crate::ingress;
use crate::platform::dingtalk::stream::{self, Frame, OpenError, Push, PushKind};
use crate::platform::Platform;

const PLATFORM: &str = Platform::DingTalk.as_str();

/// Starts one supervised task per stream-mode app; each returns on `shutdown` once its
/// connections have ACKed what they held.
pub fn spawn(
    apps: &std::collections::BTreeMap<String, DingTalkStreamApp>,
    shared: super::Shared<'_>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let apps = apps.iter().map(|(name, app)| (name.clone(), app.clone()));
    connection::spawn_all(apps, shared)
}

impl Protocol for DingTalkStreamApp {
    type Conn = ();
    const PLATFORM: &'static str = PLATFORM;
    const NAME: &'static str = "DingTalk Stream";

    fn egress(&self) -> &crate::egress::Egress {
        &self.egress
    }

    /// Registers (a fresh ticket every time: tickets are single-use, A.1) and dials.
    async fn connect(client: &Client<Self>) -> Result<(Socket, ()), ConnectError> {
        let endpoint = open(client).await?;
        let app = &client.protocol;
        let socket = connection::dial(&endpoint.url(), app.allow_insecure, &client.settings)
            .await
            .map_err(connection::DialError::into_connect_error)?;
        Ok((socket, ()))
    }

    /// A WebSocket ping every interval (A.6).
    fn ping(_: &Client<Self>, _: &()) -> Message {
        Message::Ping(Bytes::new())
    }

    fn ping_every(client: &Client<Self>, _: &()) -> Duration {
        client.settings.ping_interval
    }

    fn silence(client: &Client<Self>, _: &()) -> Duration {
        client.settings.ping_interval * 2
    }

    fn read(client: &Arc<Client<Self>>, _: &mut (), msg: Message, received: Instant) -> Step {
        match msg {
            Message::Text(text) => frame(client, text.as_str(), received),
            // dt-go ignores non-text messages; counted here so it shows.
            _ => {
                let e = stream::FrameError::NotText;
                connection::invalid(client.as_ref(), e.label(), &e);
                Step::Skip
            }
        }
    }
}

/// `POST {api_base}/v1.0/gateway/connections/open`.
async fn open(client: &Client<DingTalkStreamApp>) -> Result<stream::Endpoint, ConnectError> {
    let app = &client.protocol;
    let local_ip = local_ip(&app.api_base).await;
    let body = stream::OpenRequest {
        client_id: &app.client_id,
        client_secret: app.client_secret.expose(),
        subscriptions: &stream::SUBSCRIPTIONS,
        ua: stream::USER_AGENT,
        local_ip: &local_ip,
    };
    let url = format!("{}{}", app.api_base, stream::OPEN_PATH);
    // Without `accept` the gateway may answer XML (dt-node).
    let request = client.http.post(url).header("accept", "application/json");
    let (status, answer) = connection::register(request, &body).await?;
    stream::open_answer(status, &answer).map_err(|e| match e {
        OpenError::Refused(_) => ConnectError::Refused(e.to_string()),
        other => ConnectError::Register {
            label: other.label(),
            message: other.to_string(),
        },
    })
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

/// What one text frame calls for.
fn frame(client: &Arc<Client<DingTalkStreamApp>>, text: &str, received: Instant) -> Step {
    let answer = |text: String, status| {
        Step::Answer(Answer {
            message: Message::text(text),
            status,
            received,
        })
    };
    let frame = match stream::parse(text, client.settings.max_frame_bytes) {
        Ok(frame) => frame,
        Err(e) => {
            connection::invalid(client.as_ref(), e.label(), &e);
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
    let metrics = &client.state.metrics;
    metrics.stream_frame(PLATFORM, &client.app, frame.kind());
    match frame {
        Frame::Ping { message_id, data } => answer(stream::ack_ping(&message_id, &data), "ping"),
        Frame::Disconnect { message_id, reason } => {
            tracing::info!(platform = PLATFORM, app = %client.app, reason = reason.as_deref().unwrap_or(""), "DingTalk announced a disconnect");
            Step::Disconnect(Answer {
                message: Message::text(stream::ack(&message_id, 200, "OK", "{}")),
                status: "system",
                received,
            })
        }
        Frame::OtherSystem { message_id, topic } => {
            tracing::debug!(platform = PLATFORM, app = %client.app, topic = %crate::bus::header_value(&topic), "system frame ignored");
            answer(stream::ack(&message_id, 200, "OK", "{}"), "system")
        }
        Frame::UnknownTopic { message_id, .. } => {
            answer(stream::ack_unknown(&message_id), "unknown")
        }
        Frame::Publish(push) => {
            // A panic here takes down the connection and, passed on, the app's task: the
            // supervisor restarts it, and the unACKed push is pushed again.
            crate::supervise::failpoint("dingtalk-stream-frame", &client.app);
            Step::Publish(publish(client.clone(), push, received).boxed())
        }
    }
}

/// Publishes one push and says how to ACK it: success only once the bus has it.
async fn publish(client: Arc<Client<DingTalkStreamApp>>, push: Push, received: Instant) -> Answer {
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
        message: Message::text(text),
        status,
        received,
    }
}
