//! The in-process bus's dead letters, which live in the daemon: `/dlq/<target>` on its
//! internal listener (`--url`, else `server.internal_listen`), as a client (`--token` or
//! `IMBRIDGE_TOKEN`) allowed to use the target.

use std::time::Duration;

use super::{DlqError, Request};
use crate::config::Settings;
use crate::notify::dlq::{Filter, Letter};
use crate::remote::{checked, unreachable, Daemon, RemoteError};

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Store {
    daemon: Daemon,
}

impl From<RemoteError> for DlqError {
    fn from(e: RemoteError) -> DlqError {
        match e {
            RemoteError::Usage(m) => DlqError::Usage(m),
            RemoteError::Unavailable(m) => DlqError::Unavailable(m),
        }
    }
}

impl Store {
    pub fn new(settings: &Settings, req: &Request) -> Result<Store, DlqError> {
        let daemon = Daemon::new(
            req.url.as_deref(),
            settings.server.internal_listen,
            req.token.clone(),
            TIMEOUT,
        )?;
        Ok(Store { daemon })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.daemon.request(method, path)
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
        checked(response).await?;
        Ok(())
    }
}
