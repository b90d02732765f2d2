//! The in-process bus's dead letters, which live in the daemon: `/dlq/<target>` on its
//! internal listener (`--url`, else `server.internal_listen`), as a client (`--token` or
//! `IMBRIDGE_TOKEN`) allowed to use the target.

use std::time::Duration;

use reqwest::StatusCode;

use super::{DlqError, Request};
use crate::config::Settings;
use crate::notify::dlq::{Filter, Letter};

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Store {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Store {
    pub fn new(settings: &Settings, req: &Request) -> Result<Store, DlqError> {
        let url = match (&req.url, settings.server.internal_listen) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(addr)) => format!("http://{addr}"),
            (None, None) => {
                return Err(DlqError::Usage(
                    "the in-process bus's dead letters are in the daemon: give --url of its \
                     internal listener (or set server.internal_listen)"
                        .into(),
                ))
            }
        };
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| DlqError::Usage(e.to_string()))?;
        Ok(Store {
            http,
            url,
            token: req.token.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn list(&self, target: &str, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        let mut query: Vec<(&str, String)> = vec![("limit", filter.limit().to_string())];
        for (k, v) in [
            ("reason", &filter.reason),
            ("since", &filter.since),
            ("id", &filter.id),
        ] {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        let response = self
            .request(reqwest::Method::GET, &format!("/dlq/{target}"))
            .query(&query)
            .send()
            .await
            .map_err(unreachable)?;
        let response = checked(response).await?;
        response
            .json()
            .await
            .map_err(|e| DlqError::Unavailable(format!("reading the daemon's answer: {e}")))
    }

    pub async fn replay(&self, target: &str, letter: &Letter) -> Result<String, DlqError> {
        let path = format!("/dlq/{target}/{}/replay", letter.id);
        let response = self
            .request(reqwest::Method::POST, &path)
            .send()
            .await
            .map_err(unreachable)?;
        let answer: serde_json::Value = checked(response)
            .await?
            .json()
            .await
            .map_err(|e| DlqError::Unavailable(format!("reading the daemon's answer: {e}")))?;
        Ok(match answer["duplicate"].as_bool() {
            Some(true) => " (already replayed: dropped as a duplicate)".into(),
            _ => String::new(),
        })
    }

    pub async fn remove(&self, target: &str, letter: &Letter) -> Result<(), DlqError> {
        let path = format!("/dlq/{target}/{}", letter.id);
        let response = self
            .request(reqwest::Method::DELETE, &path)
            .send()
            .await
            .map_err(unreachable)?;
        checked(response).await.map(drop)
    }
}

fn unreachable(e: reqwest::Error) -> DlqError {
    DlqError::Unavailable(format!("the daemon's internal listener: {e}"))
}

/// A success, or the refusal as an error: a usage problem when the request was wrong (bad
/// token, target not allowed, no such letter), unavailable otherwise.
async fn checked(response: reqwest::Response) -> Result<reqwest::Response, DlqError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let message = format!("the daemon refused ({status}): {}", body.trim());
    if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
        Err(DlqError::Usage(message))
    } else {
        Err(DlqError::Unavailable(message))
    }
}
