//! `POST /notify/<target>` on the internal listener: the same notification body as the bus (or
//! a ZenTao/Sanplex webhook payload, JSON or form). Publishes to `notify.<target>` and answers
//! 202 with the message id; with `?wait=true` delivers synchronously and answers with the
//! outcome and the platform's error code.
//!
//! Every request is a `[clients.<name>]`'s, by its token (`Authorization: Bearer …`, or a
//! `token` query parameter for webhook senders that cannot set a header), and may use only
//! the targets and body fields that client is allowed; refusals are 401 and 403 and nothing is
//! published. The token is never logged nor echoed: refusals name the failure only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::clients::{Client, Denied};
use super::reply::ApiError;
use super::{PendingBody, State};
use crate::bus::CloudEvent;
use crate::metrics::UNKNOWN_APP;
use crate::notify::compose::ComposeError;
use crate::notify::notifier::NotifyError;
use crate::notify::verdict::{Reason, Verdict};
use crate::platform::outbound::Answer;
use crate::secret::redact;

pub async fn post(
    target: String,
    query: String,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    body: PendingBody,
    state: Arc<State>,
) -> Response {
    let known = state.notifier.has_target(&target) || state.notifier.has_route(&target);
    let result = match authorize(&target, &query, authorization.as_deref(), &state) {
        Ok((client, query)) => {
            handle(&target, &query, &client, idempotency_key, body, &state).await
        }
        Err(e) => Err(e),
    };
    let label = if known { target.as_str() } else { UNKNOWN_APP };
    let (outcome, response) = match result {
        Ok((outcome, response)) => (outcome, response),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(target = label, code = e.code, message = %e.message, "notify request not accepted");
            } else {
                // A flood of bad requests must not flood the log: counted, summed up at info.
                tracing::debug!(target = label, code = e.code, message = %e.message, "notify request refused");
                state.refusals.record("internal", e.code);
            }
            let (code, unauthorized) = (e.code, e.status == StatusCode::UNAUTHORIZED);
            let mut response = e.into_response();
            if unauthorized {
                let challenge = warp::http::HeaderValue::from_static("Bearer");
                response.headers_mut().insert("www-authenticate", challenge);
            }
            (code, response)
        }
    };
    state.metrics.notify_request(label, outcome);
    response
}

/// The client the request is from, if it may use `target` at all, and the parsed query.
/// Checked before anything else, so an unknown caller learns nothing, not even which targets
/// exist.
pub(super) fn authorize(
    target: &str,
    query: &str,
    authorization: Option<&str>,
    state: &State,
) -> Result<(Client, HashMap<String, String>), ApiError> {
    let query = super::parse_query(query)?;
    let token = bearer(authorization).or(query.get("token").map(String::as_str));
    let client = authenticate(state, token)?;
    if !client.may_use(target) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "target_forbidden",
            format!("client {:?} may not send to this target", client.name),
        ));
    }
    Ok((client, query))
}

/// The token of an `Authorization: Bearer <token>` header.
pub(super) fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization.and_then(|h| {
        let (scheme, token) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    })
}

/// The client holding `token`, or the 401 refusal saying why there is none.
pub(super) fn authenticate(state: &State, token: Option<&str>) -> Result<Client, ApiError> {
    state
        .current()
        .clients
        .authenticate(token)
        .map_err(|denied| {
            let (code, message) = match denied {
                Denied::Missing => (
                    "token_missing",
                    "a client token is required (Authorization: Bearer <token>)",
                ),
                Denied::Wrong => ("token_invalid", "the client token is not valid"),
            };
            ApiError::new(StatusCode::UNAUTHORIZED, code, message)
        })
}

/// Refuses body fields the client may not use: recipients it names itself, and platform-native
/// bodies. A form-encoded (ZenTao) body has neither.
fn check_fields(client: &Client, body: &[u8]) -> Result<(), ApiError> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return Ok(());
    };
    let present = |v: Option<&serde_json::Value>| {
        v.is_some_and(|v| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Array(a) => !a.is_empty(),
            _ => true,
        })
    };
    let mentions = fields.get("mentions");
    let names_recipients = present(fields.get("to"))
        || present(mentions.and_then(|m| m.get("user_ids")))
        || present(mentions.and_then(|m| m.get("mobiles")));
    if names_recipients && !client.allow_recipients {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "recipients_forbidden",
            "this client may not choose recipients (to, mentions.user_ids, mentions.mobiles)",
        ));
    }
    if present(fields.get("raw")) && !client.allow_raw {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "raw_forbidden",
            "this client may not send platform-native raw bodies",
        ));
    }
    Ok(())
}

async fn handle(
    target: &str,
    query: &HashMap<String, String>,
    client: &Client,
    idempotency_key: Option<String>,
    body: PendingBody,
    state: &State,
) -> Result<(&'static str, Response), ApiError> {
    let is_route = state.notifier.has_route(target);
    if !state.notifier.has_target(target) && !is_route {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_target",
            "no notification target or route of that name is configured",
        ));
    }
    // Read only now: the client is known and the target exists.
    let body = body.read().await?;
    check_fields(client, &body)?;
    let wait = matches!(query.get("wait").map(String::as_str), Some("true" | "1"));
    if wait && is_route {
        return Err(ApiError::bad_request(
            "wait_on_route",
            "?wait=true delivers to one target; a route forwards to several (post without wait)",
        ));
    }
    if wait {
        return deliver_now(target, idempotency_key, &body, state).await;
    }

    // What the target would make of it is checked now, so the caller hears of a bad body or a
    // template failing on it instead of finding it among the dead letters. (A synchronous
    // delivery above prepares it once, and refuses it the same way.)
    state.notifier.check(target, &body).map_err(refusal)?;

    // The in-process bus keeps nothing nobody consumes: refuse rather than accept and drop.
    if state.bus.memory().is_some() && !state.notifier.is_consuming() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "notify_disabled",
            "notify.enabled is false and the memory bus has no other consumer",
        ));
    }

    // The bus carries JSON: a form-encoded ZenTao payload is converted, a JSON body is kept
    // byte for byte.
    // What the body is decides, not the Content-Type: curl sends JSON labelled as a form
    // unless told otherwise, and it parsed as JSON above.
    let is_form = serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err();
    let payload = if is_form {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
            .map_err(|e| ApiError::bad_request("invalid_message", e.to_string()))?;
        let object: serde_json::Map<String, serde_json::Value> = pairs
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        Bytes::from(serde_json::to_vec(&object).expect("a map serialises"))
    } else {
        body
    };
    let id = match idempotency_key {
        Some(k) if !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic()) => k,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 128 printable ASCII characters",
            ))
        }
        None => hex::encode(rand::random::<[u8; 16]>()),
    };
    if !state
        .idempotency
        .check(&format!("{target}\n{id}"), &payload, Instant::now())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was used with another body",
        ));
    }
    let event = CloudEvent {
        id,
        source: "imbridge/http".into(),
        ty: format!("notify.{target}"),
        time: SystemTime::now(),
        content_type: "application/json",
        app: target.to_owned(),
        tenant: None,
    };
    let (msg, _) = super::store(state, &event, payload, "notification").await?;
    Ok((
        "accepted",
        warp::reply::with_status(
            warp::reply::json(&json!({ "id": msg.id, "subject": msg.subject })),
            StatusCode::ACCEPTED,
        )
        .into_response(),
    ))
}

/// `?wait=true`: delivers through the target's queue and limiter and answers with the verdict.
async fn deliver_now(
    target: &str,
    idempotency_key: Option<String>,
    body: &[u8],
    state: &State,
) -> Result<(&'static str, Response), ApiError> {
    let seed = idempotency_key
        .clone()
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    match state.notifier.deliver_now(target, body, seed).await {
        Ok(Verdict::Delivered { parts, answer }) => Ok((
            "delivered",
            warp::reply::json(&json!({
                "status": "delivered",
                "parts": parts,
                "answer": answer_json(&answer),
            }))
            .into_response(),
        )),
        Ok(Verdict::Failed {
            reason,
            attempts,
            answer,
        }) => Ok((
            "failed",
            warp::reply::with_status(
                warp::reply::json(&json!({
                    "code": reason.label(),
                    "message": "the platform did not accept the notification",
                    "attempts": attempts,
                    "answer": answer.as_ref().map(answer_json),
                })),
                StatusCode::BAD_GATEWAY,
            )
            .into_response(),
        )),
        Err(NotifyError::Compose(e)) => Err(refusal(e)),
        Err(e @ NotifyError::Timeout) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "wait_timeout",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}

/// A body the target cannot use: 400 when it is no message at all, 422 when it is one the
/// target cannot send (template failing, nobody to send to, people named outside `to` and
/// `mentions`, a broadcast, too many people; the message names the field). The message may
/// quote the body, so credentials in it are masked.
fn refusal(e: ComposeError) -> ApiError {
    let message = redact(&e.to_string()).into_owned();
    match e {
        ComposeError::Invalid(_) => ApiError::bad_request("invalid_message", message),
        e => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::from(&e).label(),
            message,
        ),
    }
}

/// The platform's verdict and error code, never its answer body: a body can tell a caller which
/// user ids exist, or echo what it should not.
fn answer_json(a: &Answer) -> serde_json::Value {
    json!({
        "class": a.class.label(),
        "status": a.status,
        "code": a.code,
    })
}
