//! From a message body to what one target sends: the template or the default rendering, the
//! recipients and mentions named by payload fields (ZenTao's assignee and `mailto`), and the
//! user bindings that turn internal account names into each platform's ids. Pure: no bus, no
//! HTTP, so `imbridge render` shows exactly what the daemon would send.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::guard::Refusal;
use super::router::{items, Rule};
use super::target::{Composition, Target};
use super::template::{Context, People, TemplateError, Templates};
use crate::message::{self, MentionId, MessageError, Notification, Recipients, UserBinding};
use crate::platform::outbound::Origin;
use crate::platform::Kind;

/// Internal accounts and their platform ids (`[users.<account>]`).
#[derive(Debug, Clone, Default)]
pub struct Directory {
    users: BTreeMap<String, UserBinding>,
    /// Display names, for templates' `mention()` and `person()`.
    names: Arc<People>,
}

impl Directory {
    pub fn new(users: BTreeMap<String, UserBinding>) -> Self {
        let by_account = users
            .iter()
            .filter_map(|(account, u)| Some((account.clone(), u.name()?)))
            .collect();
        let mut by_id = HashMap::new();
        for (account, u) in &users {
            let shown = u.name().unwrap_or_else(|| account.clone());
            for (platform, id) in [
                ("dingtalk", &u.dingtalk),
                ("wecom", &u.wecom),
                ("lark", &u.lark),
            ] {
                if let Some(id) = id.as_deref().map(str::trim).filter(|id| !id.is_empty()) {
                    by_id.insert((platform.to_owned(), id.to_owned()), shown.clone());
                }
            }
        }
        Directory {
            users,
            names: Arc::new(People { by_account, by_id }),
        }
    }

    /// The id a group bot of `kind` mentions `account` by.
    pub fn mention(&self, kind: Kind, account: &str) -> Option<MentionId> {
        kind.mention_id(self.users.get(account)?)
    }

    /// The id an app of `kind` sends to `account` by.
    pub fn recipient(&self, kind: Kind, account: &str) -> Option<String> {
        kind.recipient_id(self.users.get(account)?)
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
    /// Webhooks: the inbound event's CloudEvents type and source, set by the reader of a
    /// message a route on events forwarded.
    pub origin: Option<Origin>,
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error(transparent)]
    Invalid(#[from] MessageError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("no recipient can be reached on this platform (unbound: {})", .unbound.join(", "))]
    NoRecipients { unbound: Vec<String> },
    /// It names people other than through `to` and `mentions`, sends to everyone where that is
    /// not allowed, or reaches too many.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Everything `prepare` needs besides the message.
pub struct Composer<'a> {
    pub templates: &'a Templates,
    pub users: &'a Directory,
}

impl Composer<'_> {
    /// Turns `body` into what `target` sends. `rule` is the route rule that forwarded the
    /// message, if any: its composition takes precedence over the target's own.
    pub fn prepare(
        &self,
        body: &[u8],
        target: &Target,
        rule: Option<(&str, &Rule)>,
        seed: String,
    ) -> Result<Prepared, ComposeError> {
        let composition = match rule {
            Some((_, r)) => r.composition.over(&target.composition),
            None => target.composition.clone(),
        };
        let map = message::payload(body)?;
        let payload = Value::Object(map.clone());
        let route = rule.map(|(route, _)| route);
        let mut n = match &composition.template {
            Some(name) => self.templated(name, map, &payload, target, route)?,
            // A webhook carries an event as it came (a route on inbound events forwarding it
            // to a system that cannot read the bus): what is no notification is its body.
            None if target.kind.carries_events() => match message::from_payload(map) {
                Ok(p) => p.notification,
                Err(_) => Notification {
                    raw: Some(payload.clone()),
                    ..Notification::default()
                },
            },
            None => message::from_payload(map)?.notification,
        };
        // A webhook's body goes to a program, not a chat: the people it names are data there,
        // nobody gets mentioned.
        if let Some(raw) = n.raw.as_ref().filter(|_| !target.kind.carries_events()) {
            target.policy.check_raw(raw)?;
        }
        target.policy.check_text(&n)?;
        let named = name_people(&mut n, &payload, &composition);
        let mut unbound = Vec::new();
        let mut recipients = Vec::new();
        if target.kind.is_app() {
            recipients = self.recipients(&mut n, target, named, &mut unbound);
            if recipients.is_empty() {
                return Err(ComposeError::NoRecipients { unbound });
            }
        } else {
            self.mentions(&mut n, target.kind, &mut unbound);
        }
        target.policy.check_resolved(&n, &recipients)?;
        Ok(Prepared {
            notification: n,
            recipients,
            unbound,
            seed,
            origin: None,
        })
    }

    /// The notification a template makes of the payload. It keeps the body's own recipients
    /// and mentions (when the body is a notification); its text is the template's.
    fn templated(
        &self,
        name: &str,
        map: serde_json::Map<String, Value>,
        payload: &Value,
        target: &Target,
        route: Option<&str>,
    ) -> Result<Notification, ComposeError> {
        let r = self.templates.render(
            name,
            &Context {
                payload,
                target: &target.name,
                kind: target.kind.as_str(),
                route,
                names: &self.users.names,
            },
        )?;
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
        Ok(n)
    }

    /// Group bots: the mentioned accounts as the ids the bot mentions by.
    fn mentions(&self, n: &mut Notification, kind: Kind, unbound: &mut Vec<String>) {
        let mention_users = std::mem::take(&mut n.mentions.users);
        for account in dedup(mention_users) {
            match self.users.mention(kind, &account) {
                Some(MentionId::Mobile(m)) => n.mentions.mobiles.push(m),
                Some(MentionId::UserId(id)) => n.mentions.user_ids.push(id),
                None => unbound.push(account),
            }
        }
        n.mentions.mobiles = dedup(std::mem::take(&mut n.mentions.mobiles));
        n.mentions.user_ids = dedup(std::mem::take(&mut n.mentions.user_ids));
    }

    /// App messages: the platform ids of the recipients (the target's default users when
    /// nobody was `named`), in order, without repeats. Mentions mean nothing to an app.
    fn recipients(
        &self,
        n: &mut Notification,
        target: &Target,
        named: bool,
        unbound: &mut Vec<String>,
    ) -> Vec<String> {
        n.mentions.users.clear();
        let to = n.to.take().unwrap_or_default();
        let accounts = if named {
            to.users
        } else {
            target.users.clone()
        };
        let mut recipients = Vec::new();
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
        dedup(recipients)
    }
}

/// Adds the accounts named by payload fields (`mention`, `recipients`) and leaves out the
/// actor. Returns whether anyone was named as a recipient (before the actor is left out): only
/// a message naming nobody goes to the target's default users.
fn name_people(n: &mut Notification, payload: &Value, composition: &Composition) -> bool {
    let from_fields = |fields: &[String]| -> Vec<String> {
        fields
            .iter()
            .flat_map(|f| accounts(payload.get(f)))
            .collect()
    };
    n.mentions.users.extend(from_fields(&composition.mention));
    let to_fields = from_fields(&composition.recipients);
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
        if composition.exclude_actor.unwrap_or(true) && !actor.is_empty() {
            n.mentions.users.retain(|a| a != actor);
            if let Some(to) = n.to.as_mut() {
                to.users.retain(|a| a != actor);
            }
        }
    }
    named
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

    fn prepare(s: &Settings, target: &str, body: &str) -> Result<Prepared, ComposeError> {
        let users = Directory::new(s.users.clone());
        let composer = Composer {
            templates: &s.templates,
            users: &users,
        };
        composer.prepare(body.as_bytes(), &s.targets[target], None, "id".into())
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
            ComposeError::NoRecipients { unbound } => assert_eq!(unbound, ["wangwu"]),
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
            Err(ComposeError::NoRecipients { unbound }) => assert_eq!(unbound, ["lisi", "nobody"]),
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
            Err(ComposeError::Invalid(_))
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
    fn a_rules_composition_wins_over_the_targets() {
        let s = settings();
        let rule = &s.routes["zentao"].rules[1];
        let users = Directory::new(s.users.clone());
        let composer = Composer {
            templates: &s.templates,
            users: &users,
        };
        let p = composer
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
