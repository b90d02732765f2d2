//! `[targets.<name>]`: where notifications go, in the shape of the target's `kind`.
//!
//! Every kind takes the [`CommonKeys`]; group bots take the [`RobotKeys`], app targets the
//! [`AppKeys`]; and each kind its own few keys besides ([`KindKeys`] pairs them up). A key
//! none of a kind's parts takes is refused as unknown, naming the key: `app_secret` on a
//! group bot, `url` on an app, `app_id` on a WeCom app.
//!
//! A table is read in two steps, by [`read`]: `kind` first, then the parts that kind takes,
//! each through serde, noting the keys it skipped. A serde enum tagged by `kind` would do it in
//! one, but it buffers the table, which hides skipped keys from `serde_ignored` (so they could
//! only be refused one at a time), and it stops extraction at an unknown kind.

use std::collections::BTreeSet;

use figment::value::{Dict, Tag, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::ignored::{Checked, Unknown};
use crate::platform::outbound::{LarkMarkdown, TooLong};
use crate::platform::Kind;
use crate::secret::{lenient_opt_string, Secret};

/// One or several values (`rate_limit = "20/min"` or `rate_limit = ["5/s", "100/min"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One `[targets.<name>]` table, read for its kind.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub common: CommonKeys,
    pub kind: KindKeys,
}

/// What each kind takes besides the [`CommonKeys`]: the group-bot or app keys, and its own.
#[derive(Debug, Clone)]
pub enum KindKeys {
    DingTalkRobot(RobotKeys, SignedRobotKeys),
    WeComRobot(RobotKeys),
    LarkRobot(RobotKeys, LarkRobotKeys),
    DingTalkWork(AppKeys, DingTalkWorkKeys),
    WeComApp(AppKeys, WeComAppKeys),
    LarkApp(AppKeys, LarkAppKeys),
    Webhook(WebhookKeys),
}

/// Keys every kind takes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CommonKeys {
    /// Never more than N requests in any window: "20/min", "5/s", "100/60s", or a list.
    /// Defaults: DingTalk and WeCom robots 20/min, Lark bots and apps ["5/s", "100/min"],
    /// DingTalk work notifications 20/s, WeCom apps none (their limit is per member).
    pub rate_limit: Option<OneOrMany>,
    /// How long to stop sending after the platform says "too fast". Defaults: DingTalk robots
    /// 10m (it bans the robot that long), others 1m.
    pub pause_on_rate_limit: Option<String>,
    /// "split" (several messages) or "truncate" a text over the platform's size limit.
    pub too_long: TooLong,
    /// Byte limit of the text; default is the platform's limit for the message type.
    pub max_bytes: Option<usize>,
    /// Text of the link rendered for a notification's url.
    pub link_text: Option<String>,
    /// Name of a `[templates.<name>]` turning what is published straight to `notify.<name>`
    /// into a notification (a route's rule may name its own for what it forwards).
    pub template: Option<String>,
    /// Leave the payload's `actor` out of recipients and mentions, as ZenTao does: people are
    /// not notified of their own actions. Default true.
    pub exclude_actor: Option<bool>,
    /// Let messages reach everyone: `mentions.all` (`@all`, `isAtAll`), and in raw bodies
    /// departments, tags and `to_all_user`. Default false: such a message is refused.
    pub allow_broadcast: bool,
    /// Accept an `http://` url or base_url. Default false: requests to a platform carry its
    /// credentials (a webhook's, its signature and headers), so only `https://` is accepted
    /// (tests and private gateways set this).
    pub allow_insecure_http: bool,
    /// This target's proxy, over `[http] proxy` (its token fetches included): a URL, or
    /// "none" for a direct connection. Unset: `[http] proxy`. A secret.
    pub proxy: Option<Secret>,
}

/// Group bots (`dingtalk_robot`, `wecom_robot`, `lark_robot`): they post to one chat.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RobotKeys {
    /// The full webhook URL, token or key included (a secret).
    pub url: Option<Secret>,
    /// Payload fields holding accounts to @mention, e.g. ["assignedTo"].
    pub mention: Vec<String>,
}

/// DingTalk robots may be signed. (WeCom robots are not: the key in the URL is the
/// credential.)
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SignedRobotKeys {
    /// The signing secret ("SEC…").
    pub secret: Option<Secret>,
}

/// Lark custom bots may be signed, and choose how markdown is rendered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LarkRobotKeys {
    /// The custom bot's signing secret.
    pub secret: Option<Secret>,
    /// Render markdown as an interactive "card" or a rich-text "post".
    pub lark_markdown: LarkMarkdown,
}

/// App targets (`dingtalk_work`, `wecom_app`, `lark_app`): they send through an app's API to
/// people, never @mentioning.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AppKeys {
    /// DingTalk AppSecret, WeCom app Secret or Lark App Secret.
    #[serde(alias = "corp_secret")]
    pub app_secret: Option<Secret>,
    /// The platform's API base URL, for private deployments and tests. Defaults:
    /// https://oapi.dingtalk.com, https://qyapi.weixin.qq.com, https://open.feishu.cn.
    pub base_url: Option<String>,
    /// Accounts (keys of `[users]`) that receive a message naming no recipient.
    pub users: Vec<String>,
    /// Payload fields holding accounts (keys of `[users]`) to send to, e.g.
    /// ["assignedTo", "mailto"]; comma-separated or comma-wrapped lists are split.
    pub recipients: Vec<String>,
    /// Limits per recipient, shared by every target of the same app. Default for WeCom apps
    /// ["30/min", "1000/h"] (the platform silently drops the excess).
    pub member_rate_limit: Option<OneOrMany>,
}

/// DingTalk work notifications: the app's AppKey and AgentId.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DingTalkWorkKeys {
    /// The AppKey.
    #[serde(alias = "app_key")]
    pub app_id: Option<String>,
    /// The AgentId.
    #[serde(deserialize_with = "lenient_opt_string")]
    pub agent_id: Option<String>,
}

/// WeCom app messages: the app is named by the corp id and its AgentId.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WeComAppKeys {
    /// The corp id (企业ID).
    pub corp_id: Option<String>,
    /// The app's AgentId.
    #[serde(deserialize_with = "lenient_opt_string")]
    pub agent_id: Option<String>,
}

/// Lark app messages: the App ID, and how markdown is rendered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LarkAppKeys {
    /// The App ID ("cli_…").
    #[serde(alias = "app_key")]
    pub app_id: Option<String>,
    /// Render markdown as an interactive "card" or a rich-text "post".
    pub lark_markdown: LarkMarkdown,
}

/// Generic webhooks (`webhook`): the event posted to any HTTP endpoint, CloudEvents binary
/// mode, signed when `secret` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WebhookKeys {
    /// The receiver's URL (a secret: it may carry a token).
    pub url: Option<Secret>,
    /// Signs each request (`imbridge-signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
    /// t + "." + body)>`); unsigned without it.
    pub secret: Option<Secret>,
    /// Extra request headers, e.g. `{ authorization = "Bearer …" }`; values are secrets, and
    /// may come from the environment (`IMBRIDGE_TARGETS__<NAME>__HEADERS__<HEADER>`).
    pub headers: std::collections::BTreeMap<String, Secret>,
    /// "POST" (default) or "PUT".
    pub method: Option<String>,
    /// Per request, e.g. "5s"; default `notify.request_timeout`.
    pub timeout: Option<String>,
    /// Statuses meaning delivered. Default [200, 201, 202, 204]; 408, 429 and 5xx are always
    /// retried, any other status dead-letters the event.
    pub success: Option<Vec<i64>>,
    /// Requests in flight at once, 1 to 64. Default 1, which keeps the queue's order; more
    /// lets a slow receiver take several events at a time, in no particular order.
    pub concurrency: Option<i64>,
}

impl KindKeys {
    pub fn kind(&self) -> Kind {
        match self {
            KindKeys::DingTalkRobot(..) => Kind::DingTalkRobot,
            KindKeys::WeComRobot(..) => Kind::WeComRobot,
            KindKeys::LarkRobot(..) => Kind::LarkRobot,
            KindKeys::DingTalkWork(..) => Kind::DingTalkWork,
            KindKeys::WeComApp(..) => Kind::WeComApp,
            KindKeys::LarkApp(..) => Kind::LarkApp,
            KindKeys::Webhook(..) => Kind::Webhook,
        }
    }

    /// The group-bot keys, for a group bot.
    pub fn robot(&self) -> Option<&RobotKeys> {
        match self {
            KindKeys::DingTalkRobot(r, _) | KindKeys::LarkRobot(r, _) | KindKeys::WeComRobot(r) => {
                Some(r)
            }
            _ => None,
        }
    }

    /// The app keys, for an app target.
    pub fn app(&self) -> Option<&AppKeys> {
        match self {
            KindKeys::DingTalkWork(a, _) | KindKeys::WeComApp(a, _) | KindKeys::LarkApp(a, _) => {
                Some(a)
            }
            _ => None,
        }
    }

    /// Lark's markdown rendering; the default for the kinds that do not choose one.
    pub fn lark_markdown(&self) -> LarkMarkdown {
        match self {
            KindKeys::LarkRobot(_, own) => own.lark_markdown,
            KindKeys::LarkApp(_, own) => own.lark_markdown,
            _ => LarkMarkdown::default(),
        }
    }
}

/// A target table, read: its shape, and the keys its kind does not take (relative to the
/// table: `app_secret`).
#[derive(Debug)]
pub struct Read {
    pub target: TargetConfig,
    pub unknown: Vec<String>,
}

/// Why a target table could not be read into a kind's shape.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Missing, or not a string.
    #[error("must be set to one of {}", kinds())]
    NoKind,
    /// The kind given is not named: it may be a secret set on the wrong key.
    #[error("unknown target kind; expected one of {kinds}", kinds = kinds())]
    UnknownKind(String),
    /// Values of the wrong type, each with its path in the table.
    #[error("{} value(s) of the wrong type", .0.len())]
    Values(Vec<figment::Error>),
}

fn kinds() -> String {
    let kinds: Vec<&str> = Kind::ALL.iter().map(Kind::as_str).collect();
    kinds.join(", ")
}

/// Reads one `[targets.<name>]` table: its `kind`, then the parts that kind takes.
pub fn read(table: &Dict) -> Result<Read, ReadError> {
    let name = table.get("kind").and_then(Value::as_str);
    let name = name.ok_or(ReadError::NoKind)?;
    let kind = Kind::parse(name).ok_or_else(|| ReadError::UnknownKind(name.to_owned()))?;
    let mut rest = table.clone();
    rest.remove("kind");
    let mut parts = Parts::new(rest);
    let common = parts.read();
    let keys = match kind {
        Kind::DingTalkRobot => KindKeys::DingTalkRobot(parts.read(), parts.read()),
        Kind::WeComRobot => KindKeys::WeComRobot(parts.read()),
        Kind::LarkRobot => KindKeys::LarkRobot(parts.read(), parts.read()),
        Kind::DingTalkWork => KindKeys::DingTalkWork(parts.read(), parts.read()),
        Kind::WeComApp => KindKeys::WeComApp(parts.read(), parts.read()),
        Kind::LarkApp => KindKeys::LarkApp(parts.read(), parts.read()),
        Kind::Webhook => KindKeys::Webhook(parts.read()),
    };
    let unknown = parts.finish()?;
    let target = TargetConfig { common, kind: keys };
    Ok(Read { target, unknown })
}

/// Why a kind refuses a key someone may well write there, to follow "unknown field".
pub fn refusal(kind: Kind, key: &str) -> Option<&'static str> {
    Some(match key {
        "app_id" | "app_key" if kind == Kind::WeComApp => {
            "WeCom apps are named by corp_id and agent_id"
        }
        "agent_id" if kind == Kind::LarkApp => "Lark apps have no agent id",
        "secret" if kind == Kind::WeComRobot => {
            "WeCom robots are not signed (the key in the URL is the credential)"
        }
        "lark_markdown" => "only Lark targets render markdown as a card or a post",
        "mention" | "recipients" | "users" if kind == Kind::Webhook => {
            "a webhook posts the event to its URL and addresses nobody"
        }
        _ if kind.is_app() => match key {
            "url" | "secret" => {
                "app targets take app_id/app_secret (and corp_id, agent_id), not a webhook"
            }
            "mention" => "app messages cannot @mention; use recipients to send to people",
            _ => return None,
        },
        "app_id" | "app_key" | "app_secret" | "corp_secret" | "corp_id" | "agent_id"
        | "base_url" => {
            "only app targets (dingtalk_work, wecom_app, lark_app) take app credentials"
        }
        "member_rate_limit" => "only app targets have per-member limits",
        "users" => "only app targets have recipients (group bots post to their group)",
        "recipients" => "group bots post to their group; use mention to @ people",
        _ => return None,
    })
}

/// A table read part by part: a key is known when some part takes it.
struct Parts {
    table: Value,
    keys: Vec<String>,
    taken: BTreeSet<String>,
    /// Unknown keys inside a key some part took (a webhook's `headers` is the one table, and takes any key).
    nested: Vec<Unknown>,
    errors: Vec<figment::Error>,
}

impl Parts {
    fn new(table: Dict) -> Self {
        Parts {
            keys: table.keys().cloned().collect(),
            table: Value::Dict(Tag::Default, table),
            taken: BTreeSet::new(),
            nested: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// One part; its default when a value has the wrong type (the error is kept).
    fn read<T: DeserializeOwned + Default>(&mut self) -> T {
        match self.table.deserialize::<Checked<T>>() {
            Ok(Checked { value, unknown }) => {
                let (skipped, nested): (Vec<Unknown>, Vec<Unknown>) =
                    unknown.into_iter().partition(|u| u.path.len() == 1);
                let skipped: BTreeSet<&str> = skipped.iter().map(|u| u.path[0].as_str()).collect();
                let taken = self.keys.iter().filter(|k| !skipped.contains(k.as_str()));
                self.taken.extend(taken.cloned());
                self.nested.extend(nested);
                value
            }
            Err(e) => {
                self.errors.push(e);
                T::default()
            }
        }
    }

    /// The keys no part took; with a wrong value, which keys were taken is not known, so only
    /// the errors are.
    fn finish(self) -> Result<Vec<String>, ReadError> {
        if !self.errors.is_empty() {
            return Err(ReadError::Values(self.errors));
        }
        let mut unknown: Vec<String> = self
            .keys
            .into_iter()
            .filter(|k| !self.taken.contains(k))
            .collect();
        unknown.extend(self.nested.iter().map(Unknown::key));
        Ok(unknown)
    }
}
