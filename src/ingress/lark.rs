//! `POST /callbacks/lark/<app>`: answers Lark's `url_verification` challenge at once, and
//! otherwise verifies (signature and its timestamp, verification token), decrypts and
//! publishes the event to `lark.<event_type>` with `ce-id` = the event's own id, answering 200
//! only once the bus has it (or, for an exact repeat of a published request, without
//! publishing).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::Reply;

use super::replay::{self, Signed};
use super::reply::ApiError;
use super::{Outcome, State};
use crate::platform::lark::callback::{self, CallbackError, Headers, Incoming};
use crate::platform::{now_ms, Platform};

const PLATFORM: &str = Platform::Lark.as_str();

pub async fn callback(
    app: String,
    headers: HeaderMap,
    body: Result<Bytes, ApiError>,
    state: Arc<State>,
) -> Response {
    let current = state.current();
    let known = current.lark.contains_key(&app);
    let handler = async {
        let cfg = current
            .lark
            .get(&app)
            .ok_or_else(|| super::unknown_app("Lark"))?;
        let body = body?;
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let signed = Headers {
            timestamp: header(callback::TIMESTAMP_HEADER),
            nonce: header(callback::NONCE_HEADER),
            signature: header(callback::SIGNATURE_HEADER),
        };
        let opened = callback::open(cfg, &signed, &body, now_ms(), state.replay_window);
        match opened.map_err(refusal)? {
            Incoming::Challenge { challenge } => {
                tracing::info!(
                    platform = PLATFORM,
                    app,
                    "answered the url_verification challenge"
                );
                let reply = warp::reply::json(&serde_json::json!({ "challenge": challenge }));
                Ok((
                    Outcome::Handshake("url_verification"),
                    reply.into_response(),
                ))
            }
            Incoming::Event(event) => {
                let (signature, signed_at_ms) = match signed.signature.filter(|_| cfg.is_signed()) {
                    Some(signature) => (Cow::Borrowed(signature), callback::signed_at_ms(&signed)),
                    // Without an encrypt key nothing is signed: an exact repeat of the body is
                    // what can still be recognised.
                    None => (Cow::Owned(replay::body_digest(&body)), None),
                };
                // Not held while the publish is awaited.
                drop(body);
                let request = Signed {
                    platform: PLATFORM,
                    app: &app,
                    signature: &signature,
                    signed_at_ms,
                };
                let outcome = replay::publish_once(
                    &state,
                    request,
                    super::Event {
                        platform: PLATFORM,
                        app: app.clone(),
                        event_type: event.event_type,
                        id: event.event_id,
                        tenant: event.tenant_key,
                        payload: Bytes::from(event.body),
                        recovered: false,
                    },
                )
                .await?;
                let reply = warp::reply::json(&serde_json::json!({ "msg": "success" }));
                Ok((outcome, reply.into_response()))
            }
        }
    };
    super::serve_callback(&state, PLATFORM, &app, known, Box::pin(handler)).await
}

fn refusal(err: CallbackError) -> ApiError {
    ApiError::refusal(err.http_status(), err.code(), &err)
}
