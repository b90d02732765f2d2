//! The HTTP client every request to a platform goes through, and how answers are read: no
//! redirects followed (a platform that answers with one is misconfigured, or someone wants the
//! signed request sent elsewhere), no answer read past a size cap, and through the configured
//! proxy ([`Egress`]) or none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::egress::Egress;

/// The most of an answer read: platform answers are small JSON, and nothing a platform (or
/// whatever answers in its place) sends may grow the process without bound.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why an answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("answer over {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// The client for platform requests: `timeout` per request, no redirects, leaving through
/// `egress` (a configured proxy, or none: never one from the environment).
pub fn client(timeout: Duration, egress: &Egress) -> Result<reqwest::Client, reqwest::Error> {
    let builder = egress.apply(reqwest::Client::builder())?;
    builder
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("imbridge/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Clients by egress, built on first use and shared: one connection pool per proxy setting,
/// whichever targets and apps use it. Egresses come from the config only, so the map stays as
/// small as the number of distinct proxies configured (reloads included).
#[derive(Clone)]
pub struct Clients {
    timeout: Duration,
    built: Arc<Mutex<HashMap<Egress, reqwest::Client>>>,
}

impl Clients {
    /// Builds the direct client at once, so a client that cannot be built at all (no TLS
    /// roots) stops the start rather than every send.
    pub fn new(timeout: Duration) -> Result<Clients, reqwest::Error> {
        let clients = Clients {
            timeout,
            built: Arc::default(),
        };
        clients.get(&Egress::Direct)?;
        Ok(clients)
    }

    /// The client leaving through `egress`.
    pub fn get(&self, egress: &Egress) -> Result<reqwest::Client, reqwest::Error> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = built.get(egress) {
            return Ok(client.clone());
        }
        let made = client(self.timeout, egress)?;
        built.insert(egress.clone(), made.clone());
        Ok(made)
    }
}

/// The answer's body, up to [`MAX_ANSWER_BYTES`].
pub async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, ReadError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
