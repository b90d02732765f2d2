//! The HTTP side: warp filters (routes), handlers, and one place where every error becomes a
//! short JSON `{code, message}`. The ingress port takes platform callbacks; the admin port
//! (separate, so it can stay private) serves metrics and probes.

pub mod admin;
pub mod dingtalk;
pub mod notify;
pub mod reply;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use warp::{Buf, Filter, Rejection, Reply};

use crate::bus::Bus;
use crate::config::DingTalkApp;
use crate::metrics::Metrics;
use crate::notify::pipeline::Notifier;
use reply::ApiError;

/// What the handlers share.
pub struct State {
    pub dingtalk: BTreeMap<String, DingTalkApp>,
    pub bus: Arc<Bus>,
    pub metrics: Metrics,
    pub replay_window: Option<Duration>,
    pub subject_prefix: String,
    pub notifier: Arc<Notifier>,
}

/// Every ingress route, with the rejection handler applied.
pub fn routes(
    state: Arc<State>,
    max_body_bytes: u64,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let dingtalk = warp::path!("callbacks" / "dingtalk" / String)
        .and(warp::post())
        .and(query())
        .and(body(max_body_bytes))
        .and(with(state.clone()))
        .then(dingtalk::callback);
    let notify = warp::path!("notify" / String)
        .and(warp::post())
        .and(query())
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(body(max_body_bytes))
        .and(with(state))
        .then(notify::post);
    dingtalk.or(notify).recover(reply::recover)
}

fn with<T: Clone + Send>(value: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || value.clone())
}

/// The raw query string ("" when there is none); the handler parses it, so that a malformed
/// one is refused and counted like any other bad input.
fn query() -> impl Filter<Extract = (String,), Error = Infallible> + Copy {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Parses a query string into a map; the first value of a repeated key wins.
pub fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_query", "query string could not be parsed"))?;
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        map.entry(k).or_insert(v);
    }
    Ok(map)
}

/// The request body, or a 413 refusal past `max` bytes whether or not the client announced its
/// length (chunked bodies are counted as they arrive). A refusal is a value, not a rejection,
/// so the handler counts it under its platform and app.
fn body(max: u64) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .then(move |length: Option<u64>, stream| read_limited(length, stream, max))
}

async fn read_limited<S, B>(length: Option<u64>, stream: S, max: u64) -> Result<Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if length.is_some_and(|l| l > max) {
        return Err(ApiError::too_large(max));
    }
    let mut stream = Box::pin(stream);
    let mut buf = BytesMut::new();
    while let Some(mut chunk) = stream
        .try_next()
        .await
        .map_err(|_| ApiError::bad_request("body_read", "could not read the request body"))?
    {
        if (buf.len() + chunk.remaining()) as u64 > max {
            return Err(ApiError::too_large(max));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}
