//! `POST /callbacks/dingtalk/<app>`: verify, decrypt, publish, and only then answer the
//! encrypted `success` DingTalk requires; an exact repeat of a published request gets the
//! same answer and is not published again.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use warp::reply::Response;
use warp::Reply;

use super::replay::{self, Signed};
use super::reply::ApiError;
use super::{Outcome, State};
use crate::platform::dingtalk::callback::{self, CallbackError};
use crate::platform::now_ms;
use crate::platform::Platform;

const PLATFORM: &str = Platform::DingTalk.as_str();

pub async fn callback(
    app: String,
    query: String,
    body: Result<Bytes, ApiError>,
    state: Arc<State>,
) -> Response {
    let known = state.current().dingtalk.contains_key(&app);
    super::serve_callback(
        &state,
        PLATFORM,
        &app,
        known,
        Box::pin(handle(&app, &query, body, &state)),
    )
    .await
}

async fn handle(
    app: &str,
    query: &str,
    body: Result<Bytes, ApiError>,
    state: &State,
) -> Result<(Outcome, Response), ApiError> {
    let current = state.current();
    let Some(cfg) = current.dingtalk.get(app) else {
        return Err(super::unknown_app("DingTalk"));
    };
    let body = body?;
    let query = super::parse_query(query)?;
    let params = callback::Params::from_query(&query).map_err(refusal)?;
    let event = callback::open(&cfg.crypt, &params, &body, now_ms(), state.replay_window)
        .map_err(refusal)?;
    // What is kept of the request while the publish is awaited: the signature and its time.
    let signature = params.signature.to_owned();
    // Milliseconds; already checked against the window when there is one.
    let signed_at_ms = params.timestamp.parse().ok();
    drop((body, query));

    let reply = || warp::reply::json(&callback::reply(&cfg.crypt, now_ms())).into_response();
    if event.is_check_url() {
        tracing::info!(platform = PLATFORM, app, "answered the check_url handshake");
        return Ok((Outcome::Handshake("check_url"), reply()));
    }
    let signed = Signed {
        platform: PLATFORM,
        app,
        signature: &signature,
        signed_at_ms,
    };
    let id = event_id(app, &event.plaintext);
    let callback::Event {
        plaintext,
        event_type,
        corp_id,
    } = event;
    let outcome = replay::publish_once(
        state,
        signed,
        self::event(
            app,
            event_type.unwrap_or_default(),
            id,
            corp_id,
            Bytes::from(plaintext),
        ),
    )
    .await?;
    Ok((outcome, reply()))
}

/// One DingTalk event for the bus, however it arrived (HTTP callback or Stream mode), so a
/// subscriber cannot tell the two apart: published to `dingtalk.<event_type>` (sanitised, plus
/// the app's business tokens) with `ce-source` = `dingtalk/<app>` and the corpId as tenant.
pub fn event(
    app: &str,
    event_type: String,
    id: String,
    tenant: Option<String>,
    payload: Bytes,
) -> super::Event {
    super::Event {
        platform: PLATFORM,
        app: app.to_owned(),
        event_type,
        id,
        tenant,
        payload,
        recovered: false,
    }
}

/// DingTalk HTTP pushes carry no event id, so the id is a hash of what identifies the event:
/// platform, app and the decrypted payload (which includes its own timestamp). A retry of the
/// same push gets the same id; JetStream drops it inside its duplicate window. Stream pushes
/// without an id of their own (card actions) get one the same way.
pub fn event_id(app: &str, plaintext: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(PLATFORM.as_bytes());
    h.update([0]);
    h.update(app.as_bytes());
    h.update([0]);
    h.update(plaintext);
    hex::encode(&h.finalize()[..16])
}

fn refusal(err: CallbackError) -> ApiError {
    ApiError::refusal(err.status(), err.code(), &err)
}
