//! `[targets.<name>]`: where notifications go.

use serde::{Deserialize, Serialize};

use crate::platform::outbound::{LarkMarkdown, TooLong};
use crate::secret::{lenient_opt_string, lenient_string, Secret};

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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TargetConfig {
    /// Group bots: "dingtalk_robot", "wecom_robot", "lark_robot". App messages to bound users:
    /// "dingtalk_work" (work notification), "wecom_app", "lark_app".
    #[serde(deserialize_with = "lenient_string")]
    pub kind: String,
    /// Group bots: the full webhook URL, token or key included (a secret).
    #[serde(default)]
    pub url: Option<Secret>,
    /// Group bots: signing secret (DingTalk "SEC…", Lark custom-bot secret).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// App messages: DingTalk AppKey or Lark App ID.
    #[serde(default, alias = "app_key")]
    pub app_id: Option<String>,
    /// App messages: DingTalk AppSecret, WeCom app Secret or Lark App Secret.
    #[serde(default, alias = "corp_secret")]
    pub app_secret: Option<Secret>,
    /// WeCom app messages: the corp id.
    #[serde(default)]
    pub corp_id: Option<String>,
    /// DingTalk work notifications and WeCom app messages: the app's AgentId.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub agent_id: Option<String>,
    /// App messages: the platform's API base URL, for private deployments and tests. Defaults:
    /// https://oapi.dingtalk.com, https://qyapi.weixin.qq.com, https://open.feishu.cn.
    #[serde(default)]
    pub base_url: Option<String>,
    /// App messages: accounts (keys of `[users]`) that receive a message naming no recipient.
    #[serde(default)]
    pub users: Vec<String>,
    /// Never more than N requests in any window: "20/min", "5/s", "100/60s", or a list.
    /// Defaults: DingTalk and WeCom robots 20/min, Lark bots and apps ["5/s", "100/min"],
    /// DingTalk work notifications 20/s, WeCom apps none (their limit is per member).
    #[serde(default)]
    pub rate_limit: Option<OneOrMany>,
    /// App messages: limits per recipient, shared by every target of the same app. Default
    /// for WeCom apps ["30/min", "1000/h"] (the platform silently drops the excess).
    #[serde(default)]
    pub member_rate_limit: Option<OneOrMany>,
    /// How long to stop sending after the platform says "too fast". Defaults: DingTalk robots
    /// 10m (it bans the robot that long), others 1m.
    #[serde(default)]
    pub pause_on_rate_limit: Option<String>,
    /// "split" (several messages) or "truncate" a text over the platform's size limit.
    #[serde(default)]
    pub too_long: TooLong,
    /// Byte limit of the text; default is the platform's limit for the message type.
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Text of the link rendered for a notification's url.
    #[serde(default)]
    pub link_text: Option<String>,
    /// Lark bots and apps: render markdown as an interactive "card" or a rich-text "post".
    #[serde(default)]
    pub lark_markdown: LarkMarkdown,
    /// Name of a `[templates.<name>]` turning what is published straight to `notify.<name>`
    /// into a notification (a route's rule may name its own for what it forwards).
    #[serde(default)]
    pub template: Option<String>,
    /// App messages: payload fields holding accounts (keys of `[users]`) to send to, e.g.
    /// ["assignedTo", "mailto"]; comma-separated or comma-wrapped lists are split.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Group bots: payload fields holding accounts to @mention, e.g. ["assignedTo"].
    #[serde(default)]
    pub mention: Vec<String>,
    /// Leave the payload's `actor` out of recipients and mentions, as ZenTao does: people are
    /// not notified of their own actions. Default true.
    #[serde(default)]
    pub exclude_actor: Option<bool>,
}
