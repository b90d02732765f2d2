//! `/dlq/<target>` on the internal listener: the in-process bus's dead letters, which live in
//! the daemon, for `imbridge dlq` (on NATS and Kafka the command reads the bus itself).
//!
//! - `GET /dlq/<target>?reason=&since=&id=&limit=`: the letters, oldest first, as JSON.
//! - `POST /dlq/<target>/<id>/replay`: republishes to `notify.<target>`, then deletes it.
//! - `DELETE /dlq/<target>/<id>`: deletes it.
//!
//! Each request is authenticated as a client allowed to use `<target>`, as `POST /notify`.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use super::reply::ApiError;
use super::State;
use crate::bus::memory::{KeptMessage, MemoryBus};
use crate::bus::{self};
use crate::notify::dlq::{Filter, Letter};

/// `GET /dlq/<target>`.
pub async fn list(
    target: String,
    query: String,
    authorization: Option<String>,
    state: Arc<State>,
) -> Response {
    answer(list_letters(
        &target,
        &query,
        authorization.as_deref(),
        &state,
    ))
}

fn list_letters(
    target: &str,
    query: &str,
    authorization: Option<&str>,
    state: &State,
) -> Result<Response, ApiError> {
    let (_, query) = super::notify::authorize(target, query, authorization, state)?;
    let memory = memory(state)?;
    let limit = match query.get("limit") {
        Some(l) => Some(
            l.parse()
                .map_err(|_| ApiError::bad_request("invalid_limit", "limit is not a number"))?,
        ),
        None => None,
    };
    let filter = Filter {
        reason: query.get("reason").cloned(),
        since: match query.get("since") {
            // A duration back from now, or an RFC 3339 time, as on the command line.
            Some(raw) => Some(
                Filter::parse_since(raw, std::time::SystemTime::now())
                    .map_err(|e| ApiError::bad_request("invalid_since", e.to_string()))?,
            ),
            None => None,
        },
        id: query.get("id").cloned(),
        limit,
    };
    let letters: Vec<Letter> = memory
        .kept(&subject(state, target))
        .iter()
        .map(letter)
        .filter(|l| filter.matches(l))
        .take(filter.limit())
        .collect();
    Ok(warp::reply::json(&letters).into_response())
}

/// `POST /dlq/<target>/<id>/replay`: the publish first; the letter is deleted only once the
/// bus took it, so a refused publish leaves it where it was.
pub async fn replay(
    target: String,
    id: String,
    authorization: Option<String>,
    state: Arc<State>,
) -> Response {
    let replayed = async {
        let (memory, subject, kept) = find(&target, &id, authorization.as_deref(), &state)?;
        let msg = letter(&kept).replay(&state.subject_prefix, &target);
        let ack = state.bus.publish(&msg).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                e.to_string(),
            )
        })?;
        memory.delete_kept(&subject, kept.seq);
        let body = serde_json::json!({"replayed": id, "as": msg.id, "duplicate": ack.duplicate});
        Ok(warp::reply::json(&body).into_response())
    };
    answer(replayed.await)
}

/// `DELETE /dlq/<target>/<id>`.
pub async fn delete(
    target: String,
    id: String,
    authorization: Option<String>,
    state: Arc<State>,
) -> Response {
    answer(
        find(&target, &id, authorization.as_deref(), &state).map(|(memory, subject, kept)| {
            memory.delete_kept(&subject, kept.seq);
            StatusCode::NO_CONTENT.into_response()
        }),
    )
}

/// The authorised letter `id` of `target`, or why not.
fn find<'a>(
    target: &str,
    id: &str,
    authorization: Option<&str>,
    state: &'a State,
) -> Result<(&'a MemoryBus, String, KeptMessage), ApiError> {
    super::notify::authorize(target, "", authorization, state)?;
    let memory = memory(state)?;
    let subject = subject(state, target);
    let kept = id
        .parse::<u64>()
        .ok()
        .and_then(|seq| memory.kept(&subject).into_iter().find(|m| m.seq == seq))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such dead letter"))?;
    Ok((memory, subject, kept))
}

fn memory(state: &State) -> Result<&MemoryBus, ApiError> {
    state.bus.memory().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_in_process",
            "dead letters are on the bus: run imbridge dlq with the bus configuration",
        )
    })
}

fn subject(state: &State, target: &str) -> String {
    bus::with_prefix(&state.subject_prefix, &format!("dlq.notify.{target}"))
}

fn letter(kept: &KeptMessage) -> Letter {
    let r = &kept.received;
    Letter::new(
        kept.seq.to_string(),
        kept.time,
        r.subject.clone(),
        r.headers.clone(),
        &r.payload,
    )
}

fn answer(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(Reply::into_response)
}
