//! The platform API gateway as NATS request/reply, for systems that already live on the bus:
//! a request on `api.<platform>.<app>` (after `bus.subject_prefix`) carries
//! `{"method", "path", "query"?, "headers"?, "body"?}` and is answered
//! `{"status", "headers", "body"}`, the same call and answer as `/api/<platform>/<app>/<path>`.
//!
//! The bus is trusted: anyone who may publish on these subjects calls as the one client
//! `api.nats_client` names, under that client's `api` globs (restrict who may publish on
//! `api.>` with NATS permissions). Replicas answer as one queue group, so each request is
//! served once; at most [`MAX_IN_FLIGHT`] at a time per replica, the rest answered 503.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use warp::http::{Method, StatusCode};

use super::api::{self, Incoming, Refused};
use super::reply::ApiError;
use super::State;
use crate::bus;
use crate::platform::api as protocol;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// Calls one replica serves at once from the bus.
pub const MAX_IN_FLIGHT: usize = 64;

/// The queue group every replica's subscription joins.
pub const QUEUE_GROUP: &str = "imbridge-api";

/// A request's envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default)]
    query: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// A string is sent as it is; any other JSON value as JSON.
    #[serde(default)]
    body: Option<Value>,
}

fn default_method() -> String {
    "GET".into()
}

/// The answer's envelope: `body` is the platform's JSON when its answer is JSON, else text.
#[derive(Debug, Serialize)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Value,
}

/// Starts the responder when `api.nats_client` names a client and the bus is NATS.
pub fn spawn(
    state: Arc<State>,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    let name = state.current().gateway.settings().nats_client.clone()?;
    let Some(nats) = state.bus.nats() else {
        tracing::warn!("api.nats_client is set but the bus is not NATS: no API request/reply");
        return None;
    };
    // Looked up again for every request, so that a reload changing what it may call applies.
    let client = state.current().clients.find(&name)?.name.clone();
    let nats = nats.client().clone();
    let subject = bus::with_prefix(&state.subject_prefix, "api.*.*");
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let stop = shutdown.clone();
    Some(
        supervisor.spawn("api_nats".into(), shutdown.clone(), move || {
            let (state, client, nats) = (state.clone(), client.clone(), nats.clone());
            run(
                state,
                client,
                nats,
                subject.clone(),
                limit.clone(),
                stop.clone(),
            )
        }),
    )
}

async fn run(
    state: Arc<State>,
    client: String,
    nats: async_nats::Client,
    subject: String,
    limit: Arc<Semaphore>,
    shutdown: Shutdown,
) {
    let mut sub = loop {
        match nats
            .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
            .await
        {
            Ok(sub) => break sub,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe for API requests; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(subject = %subject, client = %client, "serving API requests on the bus");
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg { Some(msg) => msg, None => return },
            _ = shutdown.cancelled() => break,
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let busy = refusal_answer(&ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many API requests in flight on this replica",
            ));
            let _ = nats.publish(reply, busy).await;
            continue;
        };
        let (state, client, nats) = (state.clone(), client.clone(), nats.clone());
        tokio::spawn(async move {
            let answer = answer(&state, &client, &msg.subject, &msg.payload).await;
            if let Err(e) = nats.publish(reply, answer).await {
                tracing::debug!(error = %e, "API answer not sent");
            }
            drop(permit);
        });
    }
    let _ = sub.unsubscribe().await;
}

/// One request's answer, as bytes to publish.
async fn answer(state: &State, client: &str, subject: &str, payload: &[u8]) -> Bytes {
    let started = std::time::Instant::now();
    // `[prefix.]api.<platform>.<app>`
    let mut tokens = subject.rsplitn(3, '.');
    let app = tokens.next().unwrap_or_default();
    let platform = tokens.next().unwrap_or_default();
    let result = match parse(state, payload) {
        Ok((envelope, method, body)) => {
            let path = envelope.path.trim_start_matches('/');
            let incoming = Incoming {
                platform,
                app,
                raw_path: path,
                method,
                query: envelope.query.clone(),
                headers: headers(&envelope),
            };
            match state.current().clients.find(client) {
                Some(client) => api::serve(state, client, incoming, async { Ok(body) }).await,
                None => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "client_removed",
                    "api.nats_client names a client the configuration no longer has",
                )
                .into()),
            }
        }
        Err(e) => Err(e.into()),
    };
    let (status, bytes) = match result {
        Ok(reply) => (reply.status, reply_answer(reply)),
        Err(Refused { error, retry_after }) => {
            let mut bytes = refusal_answer(&error);
            if let Some(after) = retry_after {
                bytes = with_retry_after(&bytes, after.as_secs());
            }
            (error.status.as_u16(), bytes)
        }
    };
    let (platform, app) = api::labels(state, platform, app);
    state
        .metrics
        .api_request(platform, app, status, started.elapsed());
    bytes
}

/// The envelope, its method and its body's bytes; 413 past `api.max_request_bytes`.
fn parse(state: &State, payload: &[u8]) -> Result<(Envelope, Method, Bytes), ApiError> {
    let max = state.current().gateway.settings().max_request_bytes;
    if payload.len() as u64 > max {
        return Err(ApiError::too_large(max));
    }
    let envelope: Envelope = serde_json::from_slice(payload).map_err(|_| {
        ApiError::bad_request(
            "invalid_envelope",
            "expected {\"method\", \"path\", \"query\"?, \"headers\"?, \"body\"?}",
        )
    })?;
    let method = Method::from_bytes(envelope.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| ApiError::bad_request("invalid_method", "not an HTTP method"))?;
    let body = match &envelope.body {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => Bytes::from(serde_json::to_vec(v).expect("a value serialises")),
    };
    Ok((envelope, method, body))
}

/// The envelope's headers that may be forwarded, with a JSON content type for a JSON body
/// that names none.
fn headers(envelope: &Envelope) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = envelope
        .headers
        .iter()
        .filter(|(name, _)| !protocol::is_dropped_request_header(name))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    let json_body = matches!(envelope.body, Some(Value::Object(_) | Value::Array(_)));
    if json_body && !out.iter().any(|(n, _)| n == "content-type") {
        out.push(("content-type".into(), "application/json".into()));
    }
    out
}

fn reply_answer(reply: crate::notify::gateway::Reply) -> Bytes {
    let body = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into_owned()));
    let answer = Answer {
        status: reply.status,
        headers: reply.headers.into_iter().collect(),
        body,
    };
    Bytes::from(serde_json::to_vec(&answer).expect("an answer serialises"))
}

/// A 429's envelope says when to try again, as the HTTP answer's `Retry-After` does.
fn with_retry_after(answer: &[u8], secs: u64) -> Bytes {
    let mut v: Value = serde_json::from_slice(answer).expect("our own answer parses");
    v["headers"]["retry-after"] = Value::String(secs.to_string());
    Bytes::from(serde_json::to_vec(&v).expect("an answer serialises"))
}

fn refusal_answer(e: &ApiError) -> Bytes {
    let answer = Answer {
        status: e.status.as_u16(),
        headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
        body: serde_json::json!({"code": e.code, "message": e.message}),
    };
    Bytes::from(serde_json::to_vec(&answer).expect("an answer serialises"))
}
