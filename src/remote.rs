//! The daemon's internal listener as one-off commands reach it (`imbridge dlq` on the
//! in-process bus, `imbridge send`): its address (`--url`, else `server.internal_listen`) and
//! a client token (`--token` or `IMBRIDGE_TOKEN`), sent as `Authorization: Bearer`.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;

/// Why the daemon could not be asked, or refused.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The command line or configuration is wrong (no address; the daemon refused the request
    /// as a client error: bad token, target not allowed, no such thing).
    #[error("{0}")]
    Usage(String),
    /// The daemon could not be reached, or failed.
    #[error("{0}")]
    Unavailable(String),
}

/// A client of the daemon's internal listener.
pub struct Daemon {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Daemon {
    /// `url` (from the command line) wins over `internal_listen` (from the configuration);
    /// without either, the command does not know where the daemon is.
    pub fn new(
        url: Option<&str>,
        internal_listen: Option<SocketAddr>,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Daemon, RemoteError> {
        let url = match (url, internal_listen) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => {
                return Err(RemoteError::Usage(
                    "this is done by the daemon: give --url of its internal listener (or set \
                     server.internal_listen)"
                        .into(),
                ))
            }
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| RemoteError::Usage(e.to_string()))?;
        Ok(Daemon { http, url, token })
    }

    /// A request to `path`, with the client token when there is one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }
}

/// A request that never got an answer.
pub fn unreachable(e: reqwest::Error) -> RemoteError {
    RemoteError::Unavailable(format!("the daemon's internal listener: {e}"))
}

/// A success, or the refusal as an error: a usage problem when the request was wrong (bad
/// token, target not allowed, no such thing), unavailable otherwise.
pub async fn checked(response: reqwest::Response) -> Result<reqwest::Response, RemoteError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(refusal(status, response).await)
}

/// The daemon's refusal with `status`, classified as [`checked`] does.
pub async fn refusal(status: StatusCode, response: reqwest::Response) -> RemoteError {
    let body = response.text().await.unwrap_or_default();
    let message = format!("the daemon refused ({status}): {}", body.trim());
    if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
        RemoteError::Usage(message)
    } else {
        RemoteError::Unavailable(message)
    }
}
