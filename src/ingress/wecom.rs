//! `GET /callbacks/wecom/<app>` answers WeCom's URL verification with the decrypted echostr;
//! `POST /callbacks/wecom/<app>` verifies, decrypts and publishes a message or event push to
//! `wecom.<Event>` (events) or `wecom.msg.<MsgType>` (messages), and answers an empty 200 only
//! once the bus has it (or, for an exact repeat of a published request, without publishing).

use std::sync::Arc;

use bytes::Bytes;
use warp::reply::Response;
use warp::Reply;

use super::replay::{self, Signed};
use super::reply::ApiError;
use super::{Outcome, State};
use crate::platform::now_ms;
use crate::platform::wecom::callback::{self, CallbackError, Limits};
use crate::platform::Platform;

const PLATFORM: &str = Platform::WeCom.as_str();

/// Where the raw XML goes in the body when `keep_raw_xml` is set: `#` is no XML name
/// character, so no element of the message can collide with it.
pub const RAW_XML_FIELD: &str = "#xml";

pub async fn verify(app: String, query: String, state: Arc<State>) -> Response {
    let current = state.current();
    let known = current.wecom.contains_key(&app);
    let handler = async {
        let cfg = current
            .wecom
            .get(&app)
            .ok_or_else(|| super::unknown_app("WeCom"))?;
        let query = super::parse_query(&query)?;
        let params = callback::Params::from_query(&query).map_err(refusal)?;
        let echo = callback::verify_url(&cfg.crypt, &params, now_ms(), state.replay_window)
            .map_err(refusal)?;
        tracing::info!(platform = PLATFORM, app, "answered the URL verification");
        // Exactly the plaintext: no quotes, no newline.
        let response = warp::reply::with_header(echo, "content-type", "text/plain; charset=utf-8")
            .into_response();
        Ok((Outcome::Handshake("verify_url"), response))
    };
    super::serve_callback(&state, PLATFORM, &app, known, Box::pin(handler)).await
}

pub async fn callback(
    app: String,
    query: String,
    body: Result<Bytes, ApiError>,
    state: Arc<State>,
) -> Response {
    let current = state.current();
    let known = current.wecom.contains_key(&app);
    let handler = async {
        let cfg = current
            .wecom
            .get(&app)
            .ok_or_else(|| super::unknown_app("WeCom"))?;
        let body = body?;
        let query = super::parse_query(&query)?;
        let params = callback::Params::from_query(&query).map_err(refusal)?;
        // The request body and the opened event go out of scope with this block: only what
        // is published is held while the publish is awaited.
        let inbound = {
            let body = body;
            let event = callback::open(
                &cfg.crypt,
                &params,
                &body,
                now_ms(),
                state.replay_window,
                &Limits::default(),
            )
            .map_err(refusal)?;
            let (event_type, id) = (event.event_type(), event.ce_id());
            let tenant = event.tenant().map(str::to_owned);
            let payload = if cfg.keep_raw_xml {
                let mut fields = event.fields().clone();
                fields.insert(RAW_XML_FIELD.into(), event.xml.into());
                serde_json::to_vec(&fields).expect("a JSON object serialises")
            } else {
                event.body
            };
            super::Event {
                platform: PLATFORM,
                app: app.clone(),
                event_type,
                id,
                tenant,
                payload: Bytes::from(payload),
                recovered: false,
            }
        };
        let signed = Signed {
            platform: PLATFORM,
            app: &app,
            signature: params.signature,
            // Seconds; already checked against the window when there is one.
            signed_at_ms: params
                .timestamp
                .parse::<u64>()
                .ok()
                .map(|s| s.saturating_mul(1000)),
        };
        let outcome = replay::publish_once(&state, signed, inbound).await?;
        // WeCom takes an empty 200 as "received, no passive reply".
        Ok((outcome, warp::reply().into_response()))
    };
    super::serve_callback(&state, PLATFORM, &app, known, Box::pin(handler)).await
}

fn refusal(err: CallbackError) -> ApiError {
    ApiError::refusal(err.status(), err.code(), &err)
}
