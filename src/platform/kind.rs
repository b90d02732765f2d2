//! The kinds of notification target and everything that differs between them: each operation
//! a send needs is one method here with one `match`, delegating to the platform's module.
//! Adding a kind means one new file under `platform/` and one arm per method, and nothing in
//! `notify` changes.

use std::time::Duration;

use super::outbound::{Answer, IssuedToken, Origin, RenderOptions, Request, TokenRequest};
use super::webhook::{self, Webhook};
use super::{dingtalk, lark, wecom};
use crate::message::{MentionId, Notification, UserBinding};
use crate::secret::Secret;

/// A chat platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Platform {
    DingTalk,
    WeCom,
    Lark,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::DingTalk, Platform::WeCom, Platform::Lark];

    /// The name in subjects (`dingtalk.<event>`), callback paths and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Platform::DingTalk => "dingtalk",
            Platform::WeCom => "wecom",
            Platform::Lark => "lark",
        }
    }

    /// The public API the platform's apps are reached at.
    pub fn default_base_url(&self) -> &'static str {
        match self {
            Platform::DingTalk => dingtalk::work::DEFAULT_BASE_URL,
            Platform::WeCom => wecom::app::DEFAULT_BASE_URL,
            Platform::Lark => lark::app::DEFAULT_BASE_URL,
        }
    }
}

/// The kinds of notification target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    DingTalkRobot,
    WeComRobot,
    LarkRobot,
    DingTalkWork,
    WeComApp,
    LarkApp,
    /// Any HTTP endpoint, sent the event itself (CloudEvents binary mode, signed).
    Webhook,
}

/// At most `max` requests in any sliding window of length `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

impl Limit {
    pub fn new(max: u32, window: Duration) -> Self {
        Limit { max, window }
    }
}

/// Where a target's requests go.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A group bot's webhook.
    Robot { url: Secret, secret: Option<Secret> },
    /// An app's API.
    App(AppCredentials),
    /// A generic webhook receiver.
    Webhook(Box<Webhook>),
}

impl Endpoint {
    /// The app's agent id (DingTalk and WeCom app messages name it); 0 otherwise.
    pub fn agent_id(&self) -> u64 {
        match self {
            Endpoint::App(a) => a.agent_id,
            Endpoint::Robot { .. } | Endpoint::Webhook(_) => 0,
        }
    }
}

/// An app's credentials: DingTalk AppKey/AppSecret + AgentId, WeCom corp id/Secret + AgentId,
/// Lark App ID/App Secret.
#[derive(Debug, Clone)]
pub struct AppCredentials {
    /// Without a trailing slash.
    pub base_url: String,
    /// DingTalk AppKey, WeCom corp id, Lark App ID.
    pub app_id: String,
    pub secret: Secret,
    /// DingTalk and WeCom; 0 for Lark.
    pub agent_id: u64,
}

/// One request ready to send: the URL (it may hold a credential: never log it), the JSON
/// body, a bearer token when the platform wants one in a header, and the headers, method and
/// timeout of a webhook (whose signature covers the body's exact bytes, hence bytes here).
pub struct HttpRequest {
    pub url: String,
    pub body: Vec<u8>,
    pub bearer: Option<String>,
    pub method: webhook::Method,
    pub headers: Vec<(String, String)>,
    pub timeout: Option<Duration>,
}

/// The recipients of one message, for the kinds that address people rather than a group.
pub struct Addressing<'a> {
    /// Platform ids, in order, without repeats.
    pub recipients: &'a [String],
    /// Stable per message and target: Lark's idempotency `uuid` derives from it.
    pub seed: &'a str,
    /// Webhooks: the inbound event's CloudEvents type and source, for a route on events.
    pub origin: Option<&'a Origin>,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::DingTalkRobot,
        Kind::WeComRobot,
        Kind::LarkRobot,
        Kind::DingTalkWork,
        Kind::WeComApp,
        Kind::LarkApp,
        Kind::Webhook,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::DingTalkRobot => "dingtalk_robot",
            Kind::WeComRobot => "wecom_robot",
            Kind::LarkRobot => "lark_robot",
            Kind::DingTalkWork => "dingtalk_work",
            Kind::WeComApp => "wecom_app",
            Kind::LarkApp => "lark_app",
            Kind::Webhook => "webhook",
        }
    }

    /// The chat platform; none for a webhook.
    pub fn platform(&self) -> Option<Platform> {
        match self {
            Kind::DingTalkRobot | Kind::DingTalkWork => Some(Platform::DingTalk),
            Kind::WeComRobot | Kind::WeComApp => Some(Platform::WeCom),
            Kind::LarkRobot | Kind::LarkApp => Some(Platform::Lark),
            Kind::Webhook => None,
        }
    }

    /// Whether any JSON object is a body it sends as it is (a webhook: a program reads it, so
    /// an event that is no notification goes unchanged, and the people it names are data,
    /// nobody is mentioned); chat kinds send notifications, and a raw body that names people
    /// is refused there.
    pub fn carries_events(&self) -> bool {
        matches!(self, Kind::Webhook)
    }

    /// App messages go to bound users through an app's API; group bots to one chat.
    pub fn is_app(&self) -> bool {
        matches!(self, Kind::DingTalkWork | Kind::WeComApp | Kind::LarkApp)
    }

    /// The platform's documented limits (PROTOCOLS.md §3.3, §4, §6, §8).
    pub fn default_limits(&self) -> Vec<Limit> {
        let min = Duration::from_secs(60);
        match self {
            Kind::DingTalkRobot | Kind::WeComRobot => vec![Limit::new(20, min)],
            // Lark's tenant-level limit for app messages (code 11232) is the custom bots' too.
            Kind::LarkRobot | Kind::LarkApp => {
                vec![Limit::new(5, Duration::from_secs(1)), Limit::new(100, min)]
            }
            // [U] DingTalk documents only app/corp QPM codes (143103/143104), not the numbers;
            // 20 per second keeps far below any figure quoted for them.
            Kind::DingTalkWork => vec![Limit::new(20, Duration::from_secs(1))],
            // WeCom limits app messages per member (below), not per request; a webhook's
            // receiver says its own limits, if any, through `rate_limit`.
            Kind::WeComApp | Kind::Webhook => Vec::new(),
        }
    }

    /// Per-recipient limits of app messages (PROTOCOLS.md §6.2: WeCom drops the excess
    /// silently, so it must never be reached).
    pub fn default_member_limits(&self) -> Vec<Limit> {
        match self {
            Kind::WeComApp => vec![
                Limit::new(30, Duration::from_secs(60)),
                Limit::new(1000, Duration::from_secs(3600)),
            ],
            _ => Vec::new(),
        }
    }

    /// DingTalk bans a robot for 10 minutes after a burst; the others recover with the window.
    pub fn default_pause(&self) -> Duration {
        match self {
            Kind::DingTalkRobot => Duration::from_secs(600),
            _ => Duration::from_secs(60),
        }
    }

    /// The public API of the kind's platform (none for a webhook).
    pub fn default_base_url(&self) -> &'static str {
        self.platform().map_or("", |p| p.default_base_url())
    }

    /// The id a group bot of this kind mentions a person by: DingTalk prefers the mobile (its
    /// text shows "@138…" either way), WeCom the userid (markdown can only mention userids),
    /// Lark the open_id. Apps mention nobody.
    pub fn mention_id(&self, user: &UserBinding) -> Option<MentionId> {
        match self {
            Kind::DingTalkRobot => user
                .mobile()
                .map(MentionId::Mobile)
                .or_else(|| user.dingtalk().map(MentionId::UserId)),
            Kind::WeComRobot => user
                .wecom()
                .map(MentionId::UserId)
                .or_else(|| user.mobile().map(MentionId::Mobile)),
            Kind::LarkRobot => user.lark().map(MentionId::UserId),
            Kind::DingTalkWork | Kind::WeComApp | Kind::LarkApp | Kind::Webhook => None,
        }
    }

    /// The id an app of this kind sends to a person by. Lark falls back to the email, which
    /// its API takes as a receive id too. Group bots address nobody.
    pub fn recipient_id(&self, user: &UserBinding) -> Option<String> {
        match self {
            Kind::DingTalkWork => user.dingtalk(),
            Kind::WeComApp => user.wecom(),
            Kind::LarkApp => user.lark().or_else(|| user.email()),
            Kind::DingTalkRobot | Kind::WeComRobot | Kind::LarkRobot | Kind::Webhook => None,
        }
    }

    /// The requests for a notification: one per part, and for app messages per chunk of
    /// recipients (Lark: per recipient, its API takes one receive id).
    pub fn render(
        &self,
        n: &Notification,
        opts: &RenderOptions,
        endpoint: &Endpoint,
        to: &Addressing<'_>,
    ) -> Vec<Request> {
        let agent_id = endpoint.agent_id();
        match self {
            Kind::DingTalkRobot => Request::to_group(dingtalk::robot::render(n, opts)),
            Kind::WeComRobot => Request::to_group(wecom::robot::render(n, opts)),
            Kind::LarkRobot => Request::to_group(lark::robot::render(n, opts)),
            Kind::DingTalkWork => Request::listing(
                dingtalk::work::render(n, opts, agent_id, to.recipients),
                "userid_list",
                ',',
            ),
            Kind::WeComApp => Request::listing(
                wecom::app::render(n, opts, agent_id, to.recipients),
                "touser",
                '|',
            ),
            Kind::LarkApp => to
                .recipients
                .iter()
                .flat_map(|r| {
                    lark::app::render(n, opts, r, &format!("{}/{r}", to.seed))
                        .into_iter()
                        .map(|body| Request {
                            body,
                            members: vec![r.clone()],
                            event_id: None,
                            origin: None,
                        })
                })
                .collect(),
            // The seed is per message and target: the same event id on every redelivery.
            Kind::Webhook => vec![Request {
                body: webhook::render(n),
                members: Vec::new(),
                event_id: Some(to.seed.to_owned()),
                origin: to.origin.cloned(),
            }],
        }
    }

    /// Signs (bots) or authorises (apps, with `token`) one request at `now_ms`.
    pub fn http_request(
        &self,
        endpoint: &Endpoint,
        request: &Request,
        token: Option<&str>,
        now_ms: u64,
    ) -> HttpRequest {
        let token = token.unwrap_or_default();
        let mut body = request.body.clone();
        if let Endpoint::Webhook(hook) = endpoint {
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let id = request.event_id.as_deref().unwrap_or_default();
            return HttpRequest {
                url: hook.url.expose().to_owned(),
                headers: webhook::headers(hook, id, request.origin.as_ref(), &bytes, now_ms),
                body: bytes,
                bearer: None,
                method: hook.method,
                timeout: hook.timeout,
            };
        }
        let (url, bearer) = match (self, endpoint) {
            (_, Endpoint::Robot { url, secret }) => {
                let secret = secret.as_ref().map(Secret::expose);
                match self {
                    Kind::DingTalkRobot => (
                        dingtalk::robot::signed_url(url.expose(), secret, now_ms),
                        None,
                    ),
                    Kind::LarkRobot => {
                        lark::robot::apply_signature(&mut body, secret, now_ms / 1000);
                        (url.expose().to_owned(), None)
                    }
                    _ => (url.expose().to_owned(), None),
                }
            }
            (Kind::DingTalkWork, Endpoint::App(app)) => {
                (dingtalk::work::send_url(&app.base_url, token), None)
            }
            (Kind::WeComApp, Endpoint::App(app)) => {
                (wecom::app::send_url(&app.base_url, token), None)
            }
            (_, Endpoint::App(app)) => {
                let ty = lark::app::receive_id_type(request.first_member());
                (
                    lark::app::send_url(&app.base_url, ty),
                    Some(token.to_owned()),
                )
            }
            (_, Endpoint::Webhook(hook)) => (hook.url.expose().to_owned(), None),
        };
        HttpRequest {
            url,
            body: serde_json::to_vec(&body).unwrap_or_default(),
            bearer,
            method: webhook::Method::Post,
            headers: Vec::new(),
            timeout: None,
        }
    }

    /// Where a request goes, without credentials (`imbridge render` prints it).
    pub fn describe(&self, endpoint: &Endpoint, request: &Request) -> String {
        match (endpoint, self) {
            (Endpoint::Robot { .. }, _) => format!("POST <{} webhook>", self.as_str()),
            (Endpoint::Webhook(hook), _) => format!("{} <webhook url>", hook.method.as_str()),
            (Endpoint::App(a), Kind::DingTalkWork) => format!(
                "POST {}/topapi/message/corpconversation/asyncsend_v2?access_token=<token>",
                a.base_url
            ),
            (Endpoint::App(a), Kind::WeComApp) => format!(
                "POST {}/cgi-bin/message/send?access_token=<token>",
                a.base_url
            ),
            (Endpoint::App(a), _) => {
                let ty = lark::app::receive_id_type(request.first_member());
                lark::app::send_url(&a.base_url, ty)
            }
        }
    }

    /// The platform's answer to a send, as this kind's API means it. `retry_after` is the
    /// answer's `Retry-After`, which only a webhook's receiver is taken at its word for.
    pub fn classify(
        &self,
        endpoint: &Endpoint,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Answer {
        match self {
            Kind::DingTalkRobot => dingtalk::robot::classify(status, body),
            Kind::WeComRobot => wecom::robot::classify(status, body),
            Kind::LarkRobot => lark::robot::classify(status, body),
            Kind::DingTalkWork => dingtalk::work::classify(status, body),
            Kind::WeComApp => wecom::app::classify(status, body),
            Kind::LarkApp => lark::app::classify(status, body),
            Kind::Webhook => {
                let success = match endpoint {
                    Endpoint::Webhook(hook) => &hook.success[..],
                    _ => &webhook::DEFAULT_SUCCESS[..],
                };
                webhook::classify(success, status, retry_after, body)
            }
        }
    }

    /// Whether the answer's status alone decides (a webhook receiver's body follows no
    /// schema), so that an answer too large to read is still judged by it.
    pub fn judges_by_status(&self) -> bool {
        matches!(self, Kind::Webhook)
    }

    /// Recipients an accepted send names as not reached: WeCom's `invaliduser`, read from the
    /// whole answer (an answer's detail is cut short).
    pub fn invalid_users(&self, body: &[u8]) -> Vec<String> {
        match self {
            Kind::WeComApp => wecom::app::invalid_users(body),
            _ => Vec::new(),
        }
    }

    /// How to ask for an access token; `None` for group bots, which need none.
    pub fn token_request(&self, endpoint: &Endpoint) -> Option<TokenRequest> {
        let Endpoint::App(app) = endpoint else {
            return None;
        };
        let (base, id, secret) = (&app.base_url, &app.app_id, app.secret.expose());
        match self {
            Kind::DingTalkWork => Some(dingtalk::work::token_request(base, id, secret)),
            Kind::WeComApp => Some(wecom::app::token_request(base, id, secret)),
            Kind::LarkApp => Some(lark::app::token_request(base, id, secret)),
            Kind::DingTalkRobot | Kind::WeComRobot | Kind::LarkRobot | Kind::Webhook => None,
        }
    }

    /// The token in a token endpoint's answer, or why there is none.
    pub fn parse_token(&self, status: u16, body: &[u8]) -> Result<IssuedToken, Answer> {
        match self {
            Kind::DingTalkWork => dingtalk::work::parse_token(status, body),
            Kind::WeComApp => wecom::app::parse_token(status, body),
            _ => lark::app::parse_token(status, body),
        }
    }

    /// Whether an answer's code means the access token was refused (expired or revoked).
    pub fn is_token_rejected(&self, code: i64) -> bool {
        match self {
            Kind::DingTalkWork => dingtalk::work::is_token_rejected(code),
            Kind::WeComApp => wecom::app::is_token_rejected(code),
            Kind::LarkApp => lark::app::is_token_rejected(code),
            Kind::DingTalkRobot | Kind::WeComRobot | Kind::LarkRobot | Kind::Webhook => false,
        }
    }

    /// Whether an answer's code means that one recipient cannot be reached, while the others
    /// of the same message still can (Lark sends one request per recipient).
    pub fn is_recipient_error(&self, code: i64) -> bool {
        match self {
            Kind::LarkApp => lark::app::is_recipient_error(code),
            _ => false,
        }
    }
}
