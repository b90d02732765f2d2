//! `/api/<platform>/<app>/<path>` on the internal listener: the platform API gateway. A
//! `[clients.<name>]` calls the platform's API as the app, without ever holding the app's
//! secret or access token: imbridge adds the token (`notify::gateway`).
//!
//! Order of checks, each refusing with nothing forwarded: the client's token (401), the app
//! (404: no API credentials, or no such app), the path normalised and matched against the
//! client's `api` globs (403), and only then the body is read (413, 408). The client's own
//! `Authorization` (its imbridge token) and hop-by-hop headers are never forwarded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Reply as _;

use super::clients::Client;
use super::reply::ApiError;
use super::{notify, PendingBody, State};
use crate::metrics::UNKNOWN_APP;
use crate::notify::gateway::{Call, GatewayError, Reply};
use crate::platform::api::{self, PathError};
use crate::platform::Platform;

/// A refusal, with how long to wait when it is a 429.
#[derive(Debug)]
pub struct Refused {
    pub error: ApiError,
    pub retry_after: Option<Duration>,
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            retry_after: None,
        }
    }
}

/// One call as a caller made it, before its path is checked.
pub struct Incoming<'a> {
    pub platform: &'a str,
    pub app: &'a str,
    /// What follows `/api/<platform>/<app>/`, still percent-encoded.
    pub raw_path: &'a str,
    pub method: Method,
    pub query: String,
    /// Already without the headers never forwarded.
    pub headers: Vec<(String, String)>,
}

/// The HTTP route's handler.
pub async fn call(
    method: Method,
    full: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
    body: PendingBody,
    state: Arc<State>,
) -> Response {
    let started = Instant::now();
    let rest = full.as_str().strip_prefix("/api/").unwrap_or_default();
    let mut parts = rest.splitn(3, '/');
    let (platform, app) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let incoming = Incoming {
        platform,
        app,
        raw_path: parts.next().unwrap_or_default(),
        method,
        query,
        headers: forwarded_headers(&headers),
    };
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    let result = match notify::authenticate(&state, notify::bearer(authorization)) {
        Ok(client) => serve(&state, &client, incoming, body.read()).await,
        Err(e) => Err(e.into()),
    };
    let response = match result {
        Ok(reply) => into_response(reply),
        Err(refused) => refusal(&state, refused),
    };
    let (platform, app) = labels(&state, platform, app);
    state
        .metrics
        .api_request(platform, app, response.status().as_u16(), started.elapsed());
    response
}

/// Metric labels: names nobody configured share one, so arbitrary paths create no series.
pub fn labels<'a>(state: &State, platform: &'a str, app: &'a str) -> (&'a str, &'a str) {
    let known = state.current().gateway.app(platform, app).is_some();
    let platform = match Platform::ALL.iter().any(|p| p.as_str() == platform) {
        true => platform,
        false => UNKNOWN_APP,
    };
    (platform, if known { app } else { UNKNOWN_APP })
}

/// What HTTP and NATS callers share: the app, the path against the client's globs, the body
/// (read only once all that checked out), the call.
pub async fn serve(
    state: &State,
    client: &Client,
    incoming: Incoming<'_>,
    body: impl std::future::Future<Output = Result<Bytes, ApiError>>,
) -> Result<Reply, Refused> {
    let (platform, name) = (incoming.platform, incoming.app);
    let gateway = state.current().gateway.clone();
    if gateway.app(platform, name).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_app",
            "no app of that platform and name has API credentials",
        )
        .into());
    }
    let path = allowed_path(client, platform, name, incoming.raw_path)?;
    let call = Call {
        method: incoming.method,
        path,
        query: incoming.query,
        headers: incoming.headers,
        body: body.await?,
    };
    gateway
        .call(platform, name, &call)
        .await
        .map_err(|e| refused(&e))
}

/// The normalised path, if the client's globs allow it.
fn allowed_path(
    client: &Client,
    platform: &str,
    app: &str,
    raw: &str,
) -> Result<Vec<String>, ApiError> {
    let forbidden =
        |message: String| ApiError::new(StatusCode::FORBIDDEN, "path_forbidden", message);
    let segments = api::normalise(raw).map_err(|e: PathError| forbidden(e.to_string()))?;
    let path = format!("{platform}/{app}/{}", segments.join("/"));
    if !client.may_call(&path) {
        return Err(forbidden(format!(
            "client {:?} may not call this path (see its api globs)",
            client.name
        )));
    }
    Ok(segments)
}

/// A gateway failure as the caller sees it.
fn refused(e: &GatewayError) -> Refused {
    let (status, code) = match e {
        GatewayError::UnknownApp => (StatusCode::NOT_FOUND, "unknown_app"),
        GatewayError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        GatewayError::Token(_) => (StatusCode::BAD_GATEWAY, "token_failed"),
        GatewayError::Upstream(a) if a.detail.starts_with("timeout") => {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        }
        GatewayError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_failed"),
        GatewayError::TooLarge(_) => (StatusCode::BAD_GATEWAY, "response_too_large"),
        GatewayError::Shutdown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
    };
    let retry_after = match e {
        GatewayError::RateLimited { retry_after } => Some(*retry_after),
        _ => None,
    };
    Refused {
        error: ApiError::new(status, code, e.to_string()),
        retry_after,
    }
}

/// The refusal's JSON, with `Retry-After` on a 429 and the Bearer challenge on a 401; logged
/// (4xx at debug and summed up, as anyone on the internal network can send them).
fn refusal(state: &State, refused: Refused) -> Response {
    let e = refused.error;
    if e.status.is_server_error() {
        tracing::warn!(code = e.code, message = %e.message, "API call failed");
    } else {
        tracing::debug!(code = e.code, message = %e.message, "API call refused");
        state.refusals.record("internal", e.code);
    }
    let unauthorized = e.status == StatusCode::UNAUTHORIZED;
    let mut response = e.into_response();
    if unauthorized {
        let challenge = HeaderValue::from_static("Bearer");
        response.headers_mut().insert("www-authenticate", challenge);
    }
    if let Some(after) = refused.retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(after.as_secs()));
    }
    response
}

fn into_response(reply: Reply) -> Response {
    let mut response = Response::new(reply.body.into());
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    for (name, value) in reply.headers {
        let (Ok(name), Ok(value)) = (
            warp::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    response
}

/// The request headers that may go to the platform: not those [`api::is_dropped_request_header`]
/// names, nor any the `Connection` header names (hop-by-hop by declaration).
fn forwarded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let declared: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            !api::is_dropped_request_header(name.as_str())
                && !declared.iter().any(|d| d == name.as_str())
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect()
}
