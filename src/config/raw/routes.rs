//! `[routes.<name>]`, `[users.<account>]` and `[templates.<name>]`: how messages are forwarded
//! and shaped, and who people are on each platform.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::targets::OneOrMany;
use crate::message::Format;
use crate::secret::lenient_opt_string;

/// `[routes.<name>]`: a message on `notify.<name>` (or, with `from`, an inbound event) is
/// matched on its fields and forwarded to the targets of every rule that matches (each target
/// at most once). The keys at the top level are one rule (the shorthand); `rules` adds more.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RouteConfig {
    /// Inbound subjects to read instead of `notify.<name>`, as NATS patterns without the bus
    /// prefix and starting with the platform, e.g. ["dingtalk.bpms_instance_change.*.finish"]:
    /// the route then matches and renders the platform's event itself, so "an approval
    /// finished → tell the group" is configuration. Each pattern has its own durable consumer,
    /// which starts with the events stored after it was first created (a new route does not
    /// replay the stream's history). NATS and in-process buses only.
    pub from: Vec<String>,
    /// Shorthand for one rule: these targets...
    pub targets: Vec<String>,
    /// ...when every field listed matches (empty: everything)...
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, OneOrMany>,
    /// ...shaped with this template...
    pub template: Option<String>,
    /// ...sent to the accounts in these payload fields (app targets)...
    pub recipients: Vec<String>,
    /// ...@mentioning the accounts in these (group bots)...
    pub mention: Vec<String>,
    /// ...leaving out the payload's `actor` or not.
    pub exclude_actor: Option<bool>,
    /// More rules, each with its own match, targets and shaping.
    pub rules: Vec<RuleConfig>,
}

impl RouteConfig {
    /// The rule the top-level keys make, if they name targets or a match.
    pub fn shorthand(&self) -> Option<RuleConfig> {
        if self.targets.is_empty() && self.matches.is_empty() {
            return None;
        }
        Some(RuleConfig {
            targets: self.targets.clone(),
            matches: self.matches.clone(),
            template: self.template.clone(),
            recipients: self.recipients.clone(),
            mention: self.mention.clone(),
            exclude_actor: self.exclude_actor,
        })
    }
}

/// `[[routes.<name>.rules]]`: targets, the fields a message must match to reach them, and how
/// it is shaped for them (each unset key takes the target's own).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct RuleConfig {
    /// Names of `[targets.<name>]`.
    pub targets: Vec<String>,
    /// Field → accepted values. A payload value that is a comma-separated or comma-wrapped
    /// list (ZenTao's `product` is ",1,2,") matches when any item is accepted. A missing
    /// field matches nothing.
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, OneOrMany>,
    /// Name of a `[templates.<name>]` rendering the payload into title, text, url, mentions.
    pub template: Option<String>,
    /// Payload fields holding accounts (keys of `[users]`) that receive app messages, e.g.
    /// ["assignedTo", "mailto"]; comma-separated or comma-wrapped lists are split.
    pub recipients: Vec<String>,
    /// Payload fields holding accounts to @mention in group-bot messages, e.g. ["assignedTo"].
    pub mention: Vec<String>,
    /// Leave the payload's `actor` out of recipients and mentions, as ZenTao does: people are
    /// not notified of their own actions. Default true; a rule without it takes the target's.
    pub exclude_actor: Option<bool>,
}

/// `[users.<account>]`: one person's ids on each platform, for `to.users`, `mentions.users`,
/// templates and routes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct UserConfig {
    /// Display name used by templates' `mention()`.
    pub name: Option<String>,
    /// DingTalk userId.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub dingtalk: Option<String>,
    /// WeCom userid.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub wecom: Option<String>,
    /// Lark open_id ("ou_…"), union_id ("on_…") or user_id.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub lark: Option<String>,
    /// Mobile number (DingTalk and WeCom robots mention by mobile).
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub mobile: Option<String>,
    /// Email (Lark app messages can be addressed by email).
    pub email: Option<String>,
}

/// `[templates.<name>]`: minijinja sources turning a payload into a notification. Every string
/// but `format` is a template.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TemplateConfig {
    /// The title (DingTalk markdown and Lark cards show it); empty output means no title.
    pub title: Option<String>,
    /// The message text (required); empty output is an error, as an empty message would be.
    pub text: Option<String>,
    /// A link to the object; empty output means none.
    pub url: Option<String>,
    /// How `text` is meant: `markdown` (the default) or `text`; `link()` follows it.
    pub format: Format,
    /// Account names to @mention, separated by commas or spaces, in addition to those the text
    /// mentions with `mention()`. `{{ mailto|accounts }}` works as it is.
    pub mentions: Option<String>,
    /// Account names receiving app messages (work notifications), separated likewise.
    pub to: Option<String>,
}
