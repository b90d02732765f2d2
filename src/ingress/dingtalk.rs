//! `POST /callbacks/dingtalk/<app>`: verify, decrypt, publish, and only then answer the
//! encrypted `success` DingTalk requires.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::reply::ApiError;
use super::State;
use crate::bus::{self, CloudEvent, Message};
use crate::metrics::UNKNOWN_APP;
use crate::platform::dingtalk::callback::{self, CallbackError};
use crate::platform::now_ms;

const PLATFORM: &str = "dingtalk";

/// What a callback that was answered "success" amounted to (the metric outcome).
enum Outcome {
    Published,
    Duplicate,
    CheckUrl,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Duplicate => "duplicate",
            Outcome::CheckUrl => "check_url",
        }
    }
}

pub async fn callback(
    app: String,
    query: String,
    body: Result<Bytes, ApiError>,
    state: Arc<State>,
) -> Response {
    let started = Instant::now();
    let result = {
        let _in_flight = InFlight::start(&state.metrics.requests_in_flight);
        handle(&app, &query, body, &state).await
    };
    let app_label = if state.dingtalk.contains_key(&app) {
        app.as_str()
    } else {
        UNKNOWN_APP
    };
    let response = match result {
        Ok((outcome, reply)) => {
            state.metrics.callback(PLATFORM, app_label, outcome.label());
            warp::reply::json(&reply).into_response()
        }
        Err(err) => {
            state.metrics.callback(PLATFORM, app_label, err.code);
            if err.status.is_server_error() {
                tracing::warn!(platform = PLATFORM, app = app_label, code = err.code, message = %err.message, "callback not accepted; the platform will retry");
            } else {
                tracing::info!(platform = PLATFORM, app = app_label, code = err.code, message = %err.message, "callback refused");
            }
            err.into_response()
        }
    };
    state
        .metrics
        .callback_duration_seconds
        .with_label_values(&[PLATFORM])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle(
    app: &str,
    query: &str,
    body: Result<Bytes, ApiError>,
    state: &State,
) -> Result<(Outcome, callback::Reply), ApiError> {
    let Some(cfg) = state.dingtalk.get(app) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_app",
            "no DingTalk app of that name is configured",
        ));
    };
    let body = body?;
    let query = super::parse_query(query)?;
    let params = callback::Params::from_query(&query).map_err(refusal)?;
    let event = callback::open(&cfg.crypt, &params, &body, now_ms(), state.replay_window)
        .map_err(refusal)?;

    if event.is_check_url() {
        tracing::info!(platform = PLATFORM, app, "answered the check_url handshake");
        return Ok((Outcome::CheckUrl, callback::reply(&cfg.crypt, now_ms())));
    }

    let event_type = bus::sanitize_event_type(event.event_type.as_deref().unwrap_or(""));
    let ty = format!("{PLATFORM}.{event_type}");
    let subject = bus::with_prefix(&state.subject_prefix, &ty);
    let cloud_event = CloudEvent {
        id: event_id(app, &event.plaintext),
        source: format!("{PLATFORM}/{app}"),
        ty,
        time: SystemTime::now(),
        content_type: "application/json",
        app: app.to_owned(),
        tenant: event.corp_id.clone(),
    };
    let msg = Message::event(subject, &cloud_event, Bytes::from(event.plaintext));
    let ack = state.bus.publish(&msg).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            format!("event not stored, retry later: {e}"),
        )
    })?;
    tracing::debug!(platform = PLATFORM, app, subject = %msg.subject, id = %msg.id, duplicate = ack.duplicate, "published");
    let outcome = if ack.duplicate {
        Outcome::Duplicate
    } else {
        Outcome::Published
    };
    Ok((outcome, callback::reply(&cfg.crypt, now_ms())))
}

/// DingTalk HTTP pushes carry no event id, so the id is a hash of what identifies the event:
/// platform, app and the decrypted payload (which includes its own timestamp). A retry of the
/// same push gets the same id; JetStream drops it inside its duplicate window.
fn event_id(app: &str, plaintext: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(PLATFORM.as_bytes());
    h.update([0]);
    h.update(app.as_bytes());
    h.update([0]);
    h.update(plaintext);
    hex::encode(&h.finalize()[..16])
}

fn refusal(err: CallbackError) -> ApiError {
    use crate::platform::msgcrypt::DecryptError;
    let status = match &err {
        CallbackError::Signature => StatusCode::UNAUTHORIZED,
        CallbackError::Decrypt(DecryptError::ReceiverMismatch) => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, err.code(), err.to_string())
}

/// Counts a request in flight until dropped, even when the client goes away mid-request.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn start(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
