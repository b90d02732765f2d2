//! The only code that does HTTP to the platforms and webhooks: signs (bots, webhooks) or
//! authorises (apps, with managed access tokens) each request, sends it (following no redirect) and classifies the
//! answer, read up to a size cap, the way the target's kind means it. Never logs a URL: bot URLs hold their token, app URLs the access
//! token.

use std::time::{Duration, Instant};

use super::http::{self, ReadError};
use super::target::Target;
use super::token::{self, TokenCache};
use crate::egress::Egress;
use crate::metrics::Metrics;
use crate::platform::kind::HttpRequest;
use crate::platform::outbound::TokenRequest;
use crate::platform::outbound::{transport_answer, Answer, Class, IssuedToken, Request};
use crate::platform::webhook::{self, Method};
use crate::platform::{now_ms, AppCredentials, Endpoint, Kind};

/// A send's answer, and the access token it used (app messages).
pub struct Sent {
    pub answer: Answer,
    pub token: Option<String>,
    /// No token could be had: the answer is the token endpoint's.
    pub token_failed: bool,
    /// Recipients the platform accepted the message for but names as not reached.
    pub invalid_users: Vec<String>,
}

impl Sent {
    /// No access token could be had: the token endpoint's answer stands for the send's.
    pub fn no_token(answer: Answer) -> Sent {
        Sent {
            answer,
            token: None,
            token_failed: true,
            invalid_users: Vec::new(),
        }
    }
}

pub struct Sender {
    /// By egress: each target's and app's proxy, or none.
    http: http::Clients,
    tokens: TokenCache,
    metrics: Metrics,
}

impl Sender {
    pub fn new(request_timeout: Duration, metrics: Metrics) -> Result<Sender, reqwest::Error> {
        let http = http::Clients::new(request_timeout)?;
        Ok(Sender {
            http,
            tokens: TokenCache::default(),
            metrics,
        })
    }

    /// Signs or authorises one request, posts it and classifies the answer.
    pub async fn send(&self, target: &Target, request: &Request, token: Option<String>) -> Sent {
        let started = Instant::now();
        let http = target
            .kind
            .http_request(&target.endpoint, request, token.as_deref(), now_ms());
        let (answer, invalid_users) = self.post(target, http).await;
        tracing::debug!(target = %target.name, took = ?started.elapsed(), class = answer.class.label(), "sent");
        Sent {
            answer,
            token,
            token_failed: false,
            invalid_users,
        }
    }

    /// Sends a JSON body and classifies the answer the way the target's kind means it.
    async fn post(&self, target: &Target, http: HttpRequest) -> (Answer, Vec<String>) {
        let kind = target.kind;
        let method = match http.method {
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
        };
        let client = match self.http.get(&target.egress) {
            Ok(client) => client,
            Err(e) => return (transport_answer(e, 0), Vec::new()),
        };
        let mut request = client
            .request(method, http.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(http.body);
        for (name, value) in &http.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(token) = &http.bearer {
            request = request.bearer_auth(token);
        }
        if let Some(timeout) = http.timeout {
            request = request.timeout(timeout);
        }
        let resp = match request.send().await {
            Err(e) => return (transport_answer(e, 0), Vec::new()),
            Ok(resp) => resp,
        };
        let status = resp.status().as_u16();
        let reset = resp
            .headers()
            .get("x-ogw-ratelimit-reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let retry_after = webhook::retry_after(
            resp.headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
        );
        let bytes = match http::read_capped(resp).await {
            Ok(b) => b,
            Err(ReadError::Transport(e)) => return (transport_answer(e, status), Vec::new()),
            // The body would not be read anyway: the status decides.
            Err(ReadError::TooLarge) if kind.judges_by_status() => {
                let answer = kind.classify(&target.endpoint, status, retry_after, b"");
                return (answer, Vec::new());
            }
            // Not a platform's answer as documented: perhaps another one will be.
            Err(e @ ReadError::TooLarge) => {
                let detail = e.to_string();
                let answer = Answer {
                    class: Class::Transient,
                    code: None,
                    status,
                    detail,
                };
                return (answer, Vec::new());
            }
        };
        let mut answer = kind.classify(&target.endpoint, status, retry_after, &bytes);
        // Lark's gateway says when its quota resets.
        if let (Class::RateLimited { pause: None }, Some(secs)) = (answer.class, reset) {
            answer.class = Class::RateLimited {
                pause: Some(Duration::from_secs(secs.min(3600))),
            };
        }
        let invalid = if answer.class == Class::Ok {
            kind.invalid_users(&bytes)
        } else {
            Vec::new()
        };
        (answer, invalid)
    }

    /// An app target's access token (`None` for group bots), from the cache or fetched.
    pub async fn token(&self, target: &Target) -> Result<Option<String>, Answer> {
        let Endpoint::App(app) = &target.endpoint else {
            return Ok(None);
        };
        let user = TokenUser::Target(&target.name);
        self.app_token(target.kind, app, &target.egress, user).await
    }

    /// An app's access token, from the cache shared by every target and API call of the same
    /// credentials, or fetched (one flight per credential, see [`TokenCache`]). `Ok(None)`
    /// when the kind takes no token.
    pub async fn app_token(
        &self,
        kind: Kind,
        app: &AppCredentials,
        egress: &Egress,
        user: TokenUser<'_>,
    ) -> Result<Option<String>, Answer> {
        let Some(request) = kind.token_request(&Endpoint::App(app.clone())) else {
            return Ok(None);
        };
        let key = token_key(kind, app);
        self.tokens
            .get(&key, || self.fetch_token(kind, request, egress, user))
            .await
            .map(Some)
    }

    /// Forgets a token the platform refused, unless another send already replaced it.
    pub fn invalidate(&self, target: &Target, token: &str) {
        if let Endpoint::App(app) = &target.endpoint {
            self.invalidate_app(target.kind, app, token);
        }
    }

    /// [`Sender::invalidate`] by credentials.
    pub fn invalidate_app(&self, kind: Kind, app: &AppCredentials, token: &str) {
        self.tokens.invalidate(&token_key(kind, app), token);
    }

    /// Asks the platform for an access token, counting it under whoever needed it.
    async fn fetch_token(
        &self,
        kind: Kind,
        request: TokenRequest,
        egress: &Egress,
        user: TokenUser<'_>,
    ) -> Result<IssuedToken, Answer> {
        let result = match self.http.get(egress) {
            Ok(client) => token::fetch(&client, &request, |s, b| kind.parse_token(s, b)).await,
            Err(e) => Err(transport_answer(e, 0)),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(a) => a.class.label(),
        };
        match user {
            TokenUser::Target(name) => self.metrics.notify_token_fetch(name, outcome),
            TokenUser::Api { platform, app } => {
                self.metrics.api_token_fetch(platform, app, outcome)
            }
        }
        match &result {
            Ok(t) => {
                tracing::info!(for_ = %user, expires_in = ?t.expires_in, "access token fetched")
            }
            Err(a) => {
                tracing::warn!(for_ = %user, class = a.class.label(), code = ?a.code, detail = %a.detail, "access token refused")
            }
        }
        result
    }
}

/// Who needed a token: the metric and the log line of its fetch name it.
#[derive(Debug, Clone, Copy)]
pub enum TokenUser<'a> {
    Target(&'a str),
    Api { platform: &'a str, app: &'a str },
}

impl std::fmt::Display for TokenUser<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenUser::Target(name) => write!(f, "target {name}"),
            TokenUser::Api { platform, app } => write!(f, "api {platform}/{app}"),
        }
    }
}

/// Tokens are cached per credential: targets of the same app share one.
fn token_key(kind: Kind, app: &AppCredentials) -> String {
    use sha2::{Digest, Sha256};
    let secret = hex::encode(Sha256::digest(app.secret.expose()));
    format!(
        "{}|{}|{}|{}",
        kind.as_str(),
        app.base_url,
        app.app_id,
        &secret[..16]
    )
}
