//! From a message body to what one target sends: the template or the default rendering, the
//! recipients and mentions named by payload fields (ZenTao's assignee and `mailto`), and the
//! user bindings that turn internal account names into each platform's ids. Pure: no bus, no
//! HTTP, so `imbridge render` shows exactly what the daemon would send.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::message::{self, MessageError, Notification, Recipients};
use super::template::{Context, TemplateError, Templates};
use crate::config::{Route, Rule, Shaping, Target, TargetKind, UserConfig};

/// Internal accounts and their platform ids (`[users.<account>]`).
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: BTreeMap<String, UserConfig>,
    /// Display names by account, for templates' `mention()`.
    names: Arc<HashMap<String, String>>,
}

/// How a group bot @mentions someone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MentionId {
    Mobile(String),
    UserId(String),
}

fn bound(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl Directory {
    pub fn new(users: BTreeMap<String, UserConfig>) -> Self {
        let names = users
            .iter()
            .filter_map(|(account, u)| Some((account.clone(), bound(&u.name)?)))
            .collect();
        Directory {
            users,
            names: Arc::new(names),
        }
    }

    /// The id a group bot of `kind` mentions `account` by: DingTalk prefers the mobile (its
    /// text shows "@138…" either way), WeCom the userid (markdown can only mention userids),
    /// Lark the open_id.
    pub fn mention(&self, kind: TargetKind, account: &str) -> Option<MentionId> {
        let u = self.users.get(account)?;
        match kind {
            TargetKind::DingTalkRobot => bound(&u.mobile)
                .map(MentionId::Mobile)
                .or_else(|| bound(&u.dingtalk).map(MentionId::UserId)),
            TargetKind::WeComRobot => bound(&u.wecom)
                .map(MentionId::UserId)
                .or_else(|| bound(&u.mobile).map(MentionId::Mobile)),
            TargetKind::LarkRobot => bound(&u.lark).map(MentionId::UserId),
            _ => None,
        }
    }

    /// The id an app of `kind` sends to `account` by. Lark falls back to the email, which its
    /// API takes as a receive id too.
    pub fn recipient(&self, kind: TargetKind, account: &str) -> Option<String> {
        let u = self.users.get(account)?;
        match kind {
            TargetKind::DingTalkWork => bound(&u.dingtalk),
            TargetKind::WeComApp => bound(&u.wecom),
            TargetKind::LarkApp => bound(&u.lark).or_else(|| bound(&u.email)),
            _ => None,
        }
    }
}

/// What a target sends for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Mentions resolved into `mobiles`/`user_ids`; `users` emptied.
    pub notification: Notification,
    /// App messages: platform ids, in order, without repeats.
    pub recipients: Vec<String>,
    /// Accounts named but not bound on this target's platform (reported, then skipped).
    pub unbound: Vec<String>,
    /// Stable per message and target: Lark's idempotency `uuid` is derived from it, so a
    /// redelivered message is not shown twice.
    pub seed: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(transparent)]
    Invalid(#[from] MessageError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("no recipient can be reached on this platform (unbound: {})", .unbound.join(", "))]
    NoRecipients { unbound: Vec<String> },
}

/// Everything `prepare` needs besides the message.
pub struct Shaper<'a> {
    pub templates: &'a Templates,
    pub users: &'a Directory,
}

impl Shaper<'_> {
    /// Turns `body` into what `target` sends. `rule` is the route rule that forwarded the
    /// message, if any: its shaping takes precedence over the target's own.
    pub fn prepare(
        &self,
        body: &[u8],
        target: &Target,
        rule: Option<(&str, &Rule)>,
        seed: String,
    ) -> Result<Prepared, ShapeError> {
        let shaping = match rule {
            Some((_, r)) => r.shaping.over(&target.shaping),
            None => target.shaping.clone(),
        };
        let map = message::payload(body)?;
        let payload = Value::Object(map.clone());
        let mut n = match &shaping.template {
            Some(name) => {
                let r = self.templates.render(
                    name,
                    &Context {
                        payload: &payload,
                        target: &target.name,
                        kind: target.kind.as_str(),
                        route: rule.map(|(route, _)| route),
                        names: &self.users.names,
                    },
                )?;
                // A notification keeps its own recipients and mentions; its text is the
                // template's.
                let base = message::from_payload(map).map(|p| p.notification).ok();
                let mut n = base.unwrap_or_default();
                // The template decides what is said; a platform-native body would override it.
                n.raw = None;
                n.title = r.title;
                n.text = r.text;
                n.url = r.url.or(n.url);
                n.format = r.format;
                n.mentions.users.extend(r.mentions);
                n.to.get_or_insert_with(Recipients::default)
                    .users
                    .extend(r.to);
                n
            }
            None => message::from_payload(map)?.notification,
        };

        let from_fields = |fields: &[String]| -> Vec<String> {
            fields
                .iter()
                .flat_map(|f| accounts(payload.get(f)))
                .collect()
        };
        n.mentions.users.extend(from_fields(&shaping.mention));
        let to_fields = from_fields(&shaping.recipients);
        // Whether anyone was named for this message (before the actor is left out): only a
        // message naming nobody goes to the target's default users.
        let named = !to_fields.is_empty()
            || n.to
                .as_ref()
                .is_some_and(|t| !t.users.is_empty() || !t.user_ids.is_empty());
        if !to_fields.is_empty() {
            n.to.get_or_insert_with(Recipients::default)
                .users
                .extend(to_fields);
        }
        // People are not notified of their own actions, as in ZenTao, whoever named them.
        if let Some(actor) = payload.get("actor").and_then(Value::as_str) {
            if shaping.exclude_actor.unwrap_or(true) && !actor.is_empty() {
                n.mentions.users.retain(|a| a != actor);
                if let Some(to) = n.to.as_mut() {
                    to.users.retain(|a| a != actor);
                }
            }
        }

        let mut unbound = Vec::new();
        let mention_users = std::mem::take(&mut n.mentions.users);
        if !target.kind.is_app() {
            for account in dedup(mention_users) {
                match self.users.mention(target.kind, &account) {
                    Some(MentionId::Mobile(m)) => n.mentions.mobiles.push(m),
                    Some(MentionId::UserId(id)) => n.mentions.user_ids.push(id),
                    None => unbound.push(account),
                }
            }
            n.mentions.mobiles = dedup(std::mem::take(&mut n.mentions.mobiles));
            n.mentions.user_ids = dedup(std::mem::take(&mut n.mentions.user_ids));
        }

        let mut recipients = Vec::new();
        if target.kind.is_app() {
            let to = n.to.take().unwrap_or_default();
            let accounts = if named {
                to.users
            } else {
                target.users.clone()
            };
            // Platform ids go into a separated list ("a|b", "a,b"): one holding a separator,
            // or WeCom's "@all", would reach people nobody named.
            for id in to.user_ids {
                let id = id.trim().to_owned();
                if id.is_empty() || id.starts_with('@') || id.contains(['|', ',', ' ']) {
                    unbound.push(id);
                } else {
                    recipients.push(id);
                }
            }
            for account in dedup(accounts) {
                match self.users.recipient(target.kind, &account) {
                    Some(id) => recipients.push(id),
                    None => unbound.push(account),
                }
            }
            recipients = dedup(recipients);
            if recipients.is_empty() {
                return Err(ShapeError::NoRecipients { unbound });
            }
        }
        Ok(Prepared {
            notification: n,
            recipients,
            unbound,
            seed,
        })
    }
}

impl Shaping {
    /// This (a route rule's) shaping, with the target's where this one says nothing.
    pub fn over(&self, base: &Shaping) -> Shaping {
        Shaping {
            template: self.template.clone().or_else(|| base.template.clone()),
            recipients: if self.recipients.is_empty() {
                base.recipients.clone()
            } else {
                self.recipients.clone()
            },
            mention: if self.mention.is_empty() {
                base.mention.clone()
            } else {
                self.mention.clone()
            },
            exclude_actor: self.exclude_actor.or(base.exclude_actor),
        }
    }
}

impl Route {
    /// The targets `payload` goes to, each with the first rule that matches and names it, in
    /// the order of the rules: what the route forwards, and which rule's shaping each target
    /// applies.
    pub fn forwards(&self, payload: &Value) -> Vec<(&str, &Rule)> {
        let mut out: Vec<(&str, &Rule)> = Vec::new();
        for rule in self.rules.iter().filter(|r| r.matches(payload)) {
            for t in &rule.targets {
                if !out.iter().any(|(seen, _)| seen == t) {
                    out.push((t, rule));
                }
            }
        }
        out
    }
}

impl Rule {
    /// Every field listed matches: the payload's value, or any item of a comma-separated or
    /// comma-wrapped list (ZenTao's `product` is ",1,2,"), is one of the accepted values. A
    /// field the payload lacks matches nothing, as in ZenTao, where a webhook scoped to
    /// products ignores actions without one.
    pub fn matches(&self, payload: &Value) -> bool {
        self.matches.iter().all(|(field, accepted)| {
            items(payload.get(field))
                .iter()
                .any(|v| accepted.iter().any(|a| a == v))
        })
    }
}

/// The values of a field: a string split on commas, numbers and booleans as text, arrays item
/// by item; empty items dropped.
fn items(v: Option<&Value>) -> Vec<String> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(a)) => a.iter().flat_map(|v| items(Some(v))).collect(),
        Some(Value::Object(_)) => Vec::new(),
        Some(other) => vec![other.to_string()],
    }
}

/// Account names in a payload field: comma- or whitespace-separated, as ZenTao writes
/// `mailto` (",wangwu,zhaoliu,").
fn accounts(v: Option<&Value>) -> Vec<String> {
    items(v)
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_owned)
        .collect()
}

/// Keeps the first of each, in order.
fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use figment::providers::{Format as _, Toml};

    const CONFIG: &str = r#"
[users.zhangsan]
name = "张三"
dingtalk = "ding-zs"
wecom = "ZhangSan"
lark = "ou_zs"
mobile = "13800000001"

[users.lisi]
wecom = "LiSi"
mobile = "13800000002"
email = "lisi@example.com"

[users.wangwu]
dingtalk = "ding-ww"

[targets.robot]
kind = "dingtalk_robot"
url = "https://oapi.dingtalk.com/robot/send?access_token=t"
mention = ["assignedTo"]

[targets.wecom]
kind = "wecom_app"
corp_id = "corp"
app_secret = "s"
agent_id = 1000002
recipients = ["assignedTo", "mailto"]

[targets.lark]
kind = "lark_app"
app_id = "cli_1"
app_secret = "s"
users = ["zhangsan", "lisi"]

[targets.ding]
kind = "dingtalk_work"
app_key = "key"
app_secret = "s"
agent_id = "42"
template = "short"

[templates.short]
title = "{{ objectType }} #{{ objectID }}"
text = "{{ mention(actor) }} {{ action }} {{ link('it', 'https://z/' ~ objectID) }}"
to = "{{ mailto }}"

[routes.zentao]
rules = [
  { targets = ["robot"], match = { product = ["1"] } },
  { targets = ["wecom", "robot"], match = { objectType = ["bug", "task"] }, recipients = ["mailto"] },
]
"#;

    fn settings() -> Settings {
        crate::config::from_figment(figment::Figment::from(Toml::string(CONFIG))).unwrap()
    }

    fn prepare(s: &Settings, target: &str, body: &str) -> Result<Prepared, ShapeError> {
        let users = Directory::new(s.users.clone());
        let shaper = Shaper {
            templates: &s.templates,
            users: &users,
        };
        shaper.prepare(body.as_bytes(), &s.targets[target], None, "id".into())
    }

    const ZENTAO: &str = r#"{"objectType":"bug","objectID":"12","product":",1,2,","action":"assigned","actor":"wangwu","assignedTo":"zhangsan","mailto":",lisi,wangwu,nobody,","text":"x"}"#;

    #[test]
    fn payload_fields_become_mentions_and_recipients_through_bindings() {
        let s = settings();
        let p = prepare(&s, "robot", ZENTAO).unwrap();
        // DingTalk robots mention by mobile first.
        assert_eq!(p.notification.mentions.mobiles, ["13800000001"]);
        assert!(p.notification.mentions.users.is_empty());
        assert!(p.recipients.is_empty());

        let p = prepare(&s, "wecom", ZENTAO).unwrap();
        // The actor (wangwu) is left out, as ZenTao does; nobody is unbound.
        assert_eq!(p.recipients, ["ZhangSan", "LiSi"]);
        assert_eq!(p.unbound, ["nobody"]);
    }

    #[test]
    fn default_users_and_lark_email_fallback() {
        let s = settings();
        let p = prepare(&s, "lark", r#"{"text":"hi"}"#).unwrap();
        assert_eq!(p.recipients, ["ou_zs", "lisi@example.com"]);
        // Explicit recipients replace the defaults; platform ids pass through.
        let p = prepare(
            &s,
            "lark",
            r#"{"text":"hi","to":{"users":["lisi"],"user_ids":["ou_x"]}}"#,
        )
        .unwrap();
        assert_eq!(p.recipients, ["ou_x", "lisi@example.com"]);
    }

    #[test]
    fn platform_ids_with_separators_or_at_all_are_refused() {
        let s = settings();
        let p = prepare(
            &s,
            "wecom",
            r#"{"text":"hi","to":{"user_ids":["ok","@all","a|b","c,d"]}}"#,
        )
        .unwrap();
        assert_eq!(p.recipients, ["ok"]);
        assert_eq!(p.unbound, ["@all", "a|b", "c,d"]);
    }

    #[test]
    fn no_reachable_recipient_is_an_error_naming_the_unbound() {
        let s = settings();
        let e = prepare(&s, "wecom", r#"{"text":"hi","to":{"users":["wangwu"]}}"#).unwrap_err();
        match e {
            ShapeError::NoRecipients { unbound } => assert_eq!(unbound, ["wangwu"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn templates_render_any_object_and_name_recipients() {
        let s = settings();
        let by_zhangsan = ZENTAO.replace(r#""actor":"wangwu""#, r#""actor":"zhangsan""#);
        let p = prepare(&s, "ding", &by_zhangsan).unwrap();
        assert_eq!(p.notification.title.as_deref(), Some("bug #12"));
        assert_eq!(p.notification.text, "@张三 assigned [it](https://z/12)");
        // `to` rendered ",lisi,wangwu,nobody,": only wangwu is bound on DingTalk.
        assert_eq!(p.recipients, ["ding-ww"]);
        assert_eq!(p.unbound, ["lisi", "nobody"]);
        // The actor is left out whoever names them, here the template.
        match prepare(&s, "ding", ZENTAO) {
            Err(ShapeError::NoRecipients { unbound }) => assert_eq!(unbound, ["lisi", "nobody"]),
            other => panic!("{other:?}"),
        }
        // Not a notification nor ZenTao: fine with a template.
        let p = prepare(
            &s,
            "ding",
            r#"{"objectType":"x","objectID":"1","actor":"a","mailto":"wangwu"}"#,
        )
        .unwrap();
        assert_eq!(p.recipients, ["ding-ww"]);
        // Without one, it is invalid.
        assert!(matches!(
            prepare(&s, "robot", r#"{"build":"7"}"#),
            Err(ShapeError::Invalid(_))
        ));
    }

    #[test]
    fn rules_match_fields_and_comma_lists() {
        let s = settings();
        let route = &s.routes["zentao"];
        let payload: Value = serde_json::from_str(ZENTAO).unwrap();
        assert!(route.rules[0].matches(&payload));
        assert!(route.rules[1].matches(&payload));
        let other: Value =
            serde_json::from_str(r#"{"objectType":"story","product":",3,"}"#).unwrap();
        assert!(!route.rules[0].matches(&other));
        assert!(!route.rules[1].matches(&other));
        // A missing field matches nothing; numbers compare as text.
        let number: Value = serde_json::from_str(r#"{"product":1}"#).unwrap();
        assert!(route.rules[0].matches(&number));
        assert!(!route.rules[0].matches(&serde_json::json!({})));
    }

    #[test]
    fn a_rules_shaping_wins_over_the_targets() {
        let s = settings();
        let rule = &s.routes["zentao"].rules[1];
        let users = Directory::new(s.users.clone());
        let shaper = Shaper {
            templates: &s.templates,
            users: &users,
        };
        let p = shaper
            .prepare(
                ZENTAO.as_bytes(),
                &s.targets["wecom"],
                Some(("zentao", rule)),
                "id".into(),
            )
            .unwrap();
        // Only mailto: the assignee is not a recipient through this rule.
        assert_eq!(p.recipients, ["LiSi"]);
    }
}
