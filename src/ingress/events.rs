//! `GET /events?subject=<pattern>[&bodies=false]` on the internal listener: a live
//! Server-Sent Events tail of what is published on the bus on subjects matching a NATS-style
//! pattern (the subject prefix is added to it), one event per message:
//!
//! ```text
//! event: dingtalk.user_add_org
//! id: <ce-id>
//! data: {"subject":"dingtalk.user_add_org","headers":{"ce-id":"…",…},"body":{…}}
//! ```
//!
//! Any configured client may open one (what the bus carries is no target's; a deployment that
//! must hide events from some clients gives them no token on this listener), at most
//! `server.max_event_streams` at once per client (429 beyond). `bodies=false` leaves the body
//! out, for watching traffic without reading it. A client that falls [`BUFFER`] messages
//! behind is dropped (the stream ends with an `overflow` event, counted in
//! `imbridge_event_stream_overflows_total`) rather than buffered for; every stream ends when
//! the daemon shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt};
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::sse::Event;
use warp::Reply;

use super::reply::ApiError;
use super::State;
use crate::bus::tail::{self, Tail, Tailed};

/// Messages a stream may fall behind before it is dropped.
pub const BUFFER: usize = 256;

/// The open streams per client, and how many each may have.
#[derive(Debug, Clone)]
pub struct Streams {
    open: Arc<Mutex<HashMap<String, usize>>>,
    max_per_client: usize,
}

impl Streams {
    pub fn new(max_per_client: usize) -> Streams {
        Streams {
            open: Arc::default(),
            max_per_client,
        }
    }

    /// A slot for one more stream of `client`, held until dropped; `None` at the limit.
    fn acquire(&self, client: &str) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(client.to_owned()).or_default();
        if *count >= self.max_per_client {
            return None;
        }
        *count += 1;
        Some(Slot {
            streams: self.clone(),
            client: client.to_owned(),
        })
    }
}

/// One open stream, counted until it ends (whichever way).
struct Slot {
    streams: Streams,
    client: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

pub async fn get(query: String, authorization: Option<String>, state: Arc<State>) -> Response {
    match open(&query, authorization.as_deref(), &state).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(code = e.code, message = %e.message, "event stream refused");
            state.refusals.record("internal", e.code);
            let unauthorized = e.status == StatusCode::UNAUTHORIZED;
            let mut response = e.into_response();
            if unauthorized {
                let challenge = warp::http::HeaderValue::from_static("Bearer");
                response.headers_mut().insert("www-authenticate", challenge);
            }
            response
        }
    }
}

async fn open(
    query: &str,
    authorization: Option<&str>,
    state: &State,
) -> Result<Response, ApiError> {
    let query = super::parse_query(query)?;
    let token = super::notify::bearer(authorization).or(query.get("token").map(String::as_str));
    let client = super::notify::authenticate(state, token)?;
    let pattern = query.get("subject").map(String::as_str).unwrap_or_default();
    if !tail::is_valid_pattern(pattern) {
        return Err(ApiError::bad_request(
            "invalid_subject",
            "subject must be a NATS subject pattern: dot-separated tokens of [A-Za-z0-9_-], \
             `*` for one token, `>` last for the rest (e.g. dingtalk.>)",
        ));
    }
    let bodies = !matches!(query.get("bodies").map(String::as_str), Some("false" | "0"));
    let slot = state.events.acquire(&client.name).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            "this client has server.max_event_streams event streams open already",
        )
    })?;
    let pattern = crate::bus::with_prefix(&state.subject_prefix, pattern);
    let tail = state.bus.tail(&pattern, BUFFER).await.map_err(|e| {
        tracing::debug!(error = %e, "event stream: cannot subscribe");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            format!("cannot follow the bus ({}), retry later", e.label()),
        )
    })?;
    tracing::debug!(client = %client.name, %pattern, "event stream opened");
    let events = stream(tail, bodies, slot, state);
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}

/// The SSE events of one tail: a first comment (the subscription is in place: what is
/// published from now on is sent), one event per message, and an `overflow` event if the
/// client fell behind; it ends at shutdown.
fn stream(
    tail: Tail,
    bodies: bool,
    slot: Slot,
    state: &State,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let gauge = Counted::new(state.metrics.event_streams.clone());
    let overflows = state.metrics.event_stream_overflows_total.clone();
    let shutdown = state.shutdown.clone();
    let messages = futures::stream::unfold(
        (tail, slot, gauge, overflows),
        move |(mut tail, slot, gauge, overflows)| async move {
            match tail.next().await {
                Some(m) => Some((event(&m, bodies), (tail, slot, gauge, overflows))),
                None => {
                    if tail.overflowed() {
                        overflows.inc();
                        let e = Event::default()
                            .event("overflow")
                            .data("this client fell behind; the stream is closed");
                        return Some((e, (tail, slot, gauge, overflows)));
                    }
                    None
                }
            }
        },
    );
    let first = Event::default().comment("subscribed");
    let closed = Box::pin(async move { shutdown.cancelled().await });
    futures::stream::once(async move { first })
        .chain(messages)
        .take_until(closed)
        .map(Ok)
}

/// Counts an open stream in the gauge until dropped, however the stream ends.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: prometheus::IntGauge) -> Counted {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One message as an SSE event: `event` its subject, `id` its ce-id.
fn event(m: &Tailed, bodies: bool) -> Event {
    let headers: serde_json::Map<String, serde_json::Value> = m
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut data = json!({ "subject": m.subject, "headers": headers });
    if bodies {
        // JSON bodies as JSON, anything else as text.
        data["body"] = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
        });
    }
    let mut e = Event::default()
        .event(m.subject.clone())
        .data(data.to_string());
    if let Some(id) = m.header("ce-id") {
        e = e.id(id.replace(['\r', '\n'], " "));
    }
    e
}
