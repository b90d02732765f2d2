//! The platform API gateway's engine: one call of an app's API on a client's behalf, with the
//! app's access token from the token cache the notify targets use (one token, one fetch per
//! credential, whoever needs it), under the app's rate limit held by the notify limiter
//! across replicas. A token the platform refuses is forgotten and the call made once more with
//! a new one. Who may call what is the caller's business (`ingress::api`): this only calls.
//!
//! Bodies are read whole, both ways, under caps: the request's, because the call may be made
//! twice (a refused token); the answer's, because it is read for a token refusal and
//! scrubbed of the token before anyone sees it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::limiter::{Key, LimiterError, Scope};
use super::sender::TokenUser;
use super::worker::Shared;
use crate::platform::api::{self, ApiApp, Placement};
use crate::platform::outbound::{transport_answer, Answer};

/// `[api]`, validated.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_request_bytes: u64,
    pub max_response_bytes: u64,
    /// How long a call waits for the app's rate limit before it is answered 429.
    pub max_wait: Duration,
    /// One platform request, from sending to the answer's last byte.
    pub timeout: Duration,
    /// The client whose `api` globs apply to NATS request/reply on `api.<platform>.<app>`;
    /// request/reply is off when `None`.
    pub nats_client: Option<String>,
}

/// One call, its path already normalised and allowed.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: reqwest::Method,
    /// Normalised segments (see [`api::normalise`]).
    pub path: Vec<String>,
    /// The raw query, as the client sent it.
    pub query: String,
    /// Headers to forward: the caller dropped the ones never forwarded.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// The platform's answer as the caller gets it: the token scrubbed out.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Why a call got no platform answer; each is a status for the caller.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No app of that platform and name has API credentials: 404.
    #[error("no app of that name has API credentials")]
    UnknownApp,
    /// The app's rate limit had no slot within `api.max_wait`: 429.
    #[error("the app's API rate limit is reached")]
    RateLimited { retry_after: Duration },
    /// No access token could be had: 502 (the platform's code, never the secret).
    #[error("no access token: {}", describe(.0))]
    Token(Answer),
    /// The platform did not answer (or not in time): 504 on a timeout, else 502.
    #[error("the platform did not answer: {}", .0.detail)]
    Upstream(Answer),
    /// The platform's answer was over `api.max_response_bytes`: 502.
    #[error("the platform's answer is over {0} bytes")]
    TooLarge(u64),
    /// Shutting down: 503.
    #[error("shutting down")]
    Shutdown,
}

fn describe(answer: &Answer) -> String {
    match answer.code {
        Some(code) => format!("{} (code {code})", answer.class.label()),
        None => format!("{} (HTTP {})", answer.class.label(), answer.status),
    }
}

pub struct Gateway {
    /// By `<platform>/<app>`.
    apps: BTreeMap<String, ApiApp>,
    shared: Arc<Shared>,
    /// By egress: each app's proxy, or none.
    http: super::http::Clients,
    settings: ApiSettings,
}

impl Gateway {
    pub(super) fn new(
        apps: BTreeMap<String, ApiApp>,
        settings: ApiSettings,
        shared: Arc<Shared>,
    ) -> Result<Gateway, reqwest::Error> {
        Ok(Gateway {
            apps,
            http: super::http::Clients::new(settings.timeout)?,
            shared,
            settings,
        })
    }

    pub fn settings(&self) -> &ApiSettings {
        &self.settings
    }

    /// The app `<platform>/<name>`, when it has API credentials.
    pub fn app(&self, platform: &str, name: &str) -> Option<&ApiApp> {
        self.apps.get(&format!("{platform}/{name}"))
    }

    /// Every app with API credentials, as `(platform, name)`.
    pub fn apps(&self) -> impl Iterator<Item = (&str, &str)> {
        self.apps.keys().filter_map(|k| k.split_once('/'))
    }

    /// `<platform>/<name>`'s access token from the cache every target and API call of the app
    /// share (fetched when missing): for the daemon's own calls of the app's API (recovering
    /// DingTalk's failed pushes). `Ok(None)` for an app without credentials.
    pub async fn token(&self, platform: &str, name: &str) -> Result<Option<String>, Answer> {
        let Some(app) = self.app(platform, name) else {
            return Ok(None);
        };
        let user = TokenUser::Api {
            platform,
            app: name,
        };
        let sender = &self.shared.sender;
        sender
            .app_token(app.token_kind(), &app.credentials, &app.egress, user)
            .await
    }

    /// Forgets a token of `<platform>/<name>` the platform refused.
    pub fn forget_token(&self, platform: &str, name: &str, token: &str) {
        if let Some(app) = self.app(platform, name) {
            let sender = &self.shared.sender;
            sender.invalidate_app(app.token_kind(), &app.credentials, token);
        }
    }

    /// Calls `<platform>/<name>`'s API: token, rate limit, request; on a refused token once
    /// more with a fresh one. The answer comes back whatever its status, the token scrubbed.
    pub async fn call(
        &self,
        platform: &str,
        name: &str,
        call: &Call,
    ) -> Result<Reply, GatewayError> {
        let app = self.app(platform, name).ok_or(GatewayError::UnknownApp)?;
        let deadline = SystemTime::now() + self.settings.max_wait;
        let user = TokenUser::Api {
            platform,
            app: name,
        };
        let (kind, credentials) = (app.token_kind(), &app.credentials);
        let mut retried = false;
        loop {
            let sender = &self.shared.sender;
            let token = match sender.app_token(kind, credentials, &app.egress, user).await {
                Ok(Some(token)) => token,
                Ok(None) => String::new(),
                Err(answer) => return Err(GatewayError::Token(answer)),
            };
            self.acquire(app, deadline).await?;
            let reply = self.send(app, call, &token).await?;
            if !retried && app.is_token_rejected(reply.status, &reply.body) {
                // Revoked, or expired early: the next caller must not get it either.
                tracing::info!(
                    platform,
                    app = name,
                    "the platform refused the access token; fetching another"
                );
                self.shared.sender.invalidate_app(kind, credentials, &token);
                retried = true;
                continue;
            }
            return Ok(scrub(reply, &token));
        }
    }

    /// A slot of the app's rate limit, shared by every replica; 429 past the wait bound.
    async fn acquire(&self, app: &ApiApp, deadline: SystemTime) -> Result<(), GatewayError> {
        let key_name = limit_key(app);
        let key = Key {
            name: &key_name,
            scope: Scope::Target,
            limits: &app.limits,
        };
        let shared = &self.shared;
        let margin = shared.settings.rate_limit_margin;
        match shared
            .limiter
            .acquire_all(&[key], margin, deadline, &shared.shutdown)
            .await
        {
            Ok(_) => Ok(()),
            Err(LimiterError::Shutdown) => Err(GatewayError::Shutdown),
            Err(LimiterError::Deadline) => {
                // The shortest window is when a slot is surely free again.
                let window = app
                    .limits
                    .iter()
                    .map(|l| l.window)
                    .min()
                    .unwrap_or_default();
                let secs = window.as_secs_f64().ceil().max(1.0) as u64;
                Err(GatewayError::RateLimited {
                    retry_after: Duration::from_secs(secs),
                })
            }
        }
    }

    /// One request to the platform, its answer read under the cap.
    async fn send(&self, app: &ApiApp, call: &Call, token: &str) -> Result<Reply, GatewayError> {
        let path = api::encode_path(&call.path);
        let upstream = app.upstream(&path);
        let in_query = upstream.placement == Placement::Query;
        let query = api::forward_query(&call.query, in_query.then_some(token));
        let mut url = format!("{}/{path}", upstream.base);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        let client = (self.http.get(&app.egress))
            .map_err(|e| GatewayError::Upstream(transport_answer(e, 0)))?;
        let mut request = client.request(call.method.clone(), url);
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request = match upstream.placement {
            Placement::Query => request,
            Placement::DingTalkHeader => request.header(api::DINGTALK_TOKEN_HEADER, token),
            Placement::Bearer => request.bearer_auth(token),
        };
        let response = request
            .body(call.body.clone())
            .send()
            .await
            .map_err(|e| GatewayError::Upstream(transport_answer(e, 0)))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| !api::is_dropped_response_header(name.as_str()))
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
            .collect();
        let body = self.read(response, status).await?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// The answer's body, up to `api.max_response_bytes`.
    async fn read(
        &self,
        mut response: reqwest::Response,
        status: u16,
    ) -> Result<Bytes, GatewayError> {
        let max = self.settings.max_response_bytes;
        if response.content_length().is_some_and(|n| n > max) {
            return Err(GatewayError::TooLarge(max));
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > max {
                        return Err(GatewayError::TooLarge(max));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(Bytes::from(body)),
                Err(e) => return Err(GatewayError::Upstream(transport_answer(e, status))),
            }
        }
    }
}

/// The rate-limit key of an app's API calls: one per platform app whichever replica calls,
/// hashed so it is a valid bus token whatever the app id. Apart from the notify targets' keys:
/// `api_rate_limit` is the gateway's own budget.
fn limit_key(app: &ApiApp) -> String {
    use sha2::{Digest, Sha256};
    let id = format!("{}|{}", app.platform.as_str(), app.credentials.app_id);
    format!("api_{}", &hex::encode(Sha256::digest(id))[..24])
}

/// The token out of everything passed back: a platform may echo the request (an error page
/// quoting the URL, a debug field), and the client must never learn the token.
fn scrub(mut reply: Reply, token: &str) -> Reply {
    if token.is_empty() {
        return reply;
    }
    const MASK: &str = "***";
    for (_, value) in &mut reply.headers {
        if value.contains(token) {
            *value = value.replace(token, MASK);
        }
    }
    let needle = token.as_bytes();
    if reply.body.windows(needle.len()).any(|w| w == needle) {
        let mut out = Vec::with_capacity(reply.body.len());
        let mut rest = &reply.body[..];
        while let Some(i) = rest.windows(needle.len()).position(|w| w == needle) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(MASK.as_bytes());
            rest = &rest[i + needle.len()..];
        }
        out.extend_from_slice(rest);
        reply.body = Bytes::from(out);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_scrubbed_from_headers_and_body() {
        let reply = Reply {
            status: 400,
            headers: vec![("x-echo".into(), "url?access_token=tok123".into())],
            body: Bytes::from_static(b"{\"url\":\"/x?access_token=tok123&tok123\"}"),
        };
        let reply = scrub(reply, "tok123");
        assert_eq!(reply.headers[0].1, "url?access_token=***");
        assert_eq!(&reply.body[..], b"{\"url\":\"/x?access_token=***&***\"}");
    }
}
