//! Who a message reaches is chosen in one place: `to` and `mentions`, resolved through the user
//! bindings. Nothing else in a body may name people: a platform-native `raw` body naming
//! recipients or mentions (`touser`, `userid_list`, `receive_id`, `at.atMobiles`, …) is
//! refused, naming the field, as is `<at …>` or `<@…>` markup in a text. Sends to everyone (the
//! whole group, company, a department or a tag) need the target's `allow_broadcast`, and no
//! message reaches more than `notify.max_recipients` people. Pure: the HTTP intake and the bus
//! consumer refuse the same messages the same way.

use serde_json::Value;

use crate::message::Notification;

/// What a target lets one message ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `[targets.<name>] allow_broadcast`: `@all`, `isAtAll`, departments, tags, `to_all_user`.
    pub allow_broadcast: bool,
    /// `notify.max_recipients`: recipients and mentions of one message, once resolved.
    pub max_recipients: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow_broadcast: false,
            max_recipients: DEFAULT_MAX_RECIPIENTS,
        }
    }
}

/// Default of `notify.max_recipients`.
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;

/// Why a message is refused before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The body names people outside `to` and `mentions`.
    #[error(
        "{field} names recipients or mentions: they are chosen only through `to` and \
         `mentions` (and the user bindings)"
    )]
    Embedded { field: String },
    /// The message would reach everyone, and the target does not allow it.
    #[error(
        "{field} sends to everyone (the whole group or company, a department or a tag): \
         this target does not set allow_broadcast"
    )]
    Broadcast { field: String },
    #[error("{count} recipients and mentions: more than notify.max_recipients ({max})")]
    TooMany { count: usize, max: usize },
}

/// Keys by which a platform-native body names people (PROTOCOLS.md §3.2, §4, §6, §8), on any
/// platform: a key one platform reads is no message content on another.
const PERSON_KEYS: &[&str] = &[
    // DingTalk robot `at`, work notification.
    "atMobiles",
    "atUserIds",
    "atDingtalkIds",
    "userid_list",
    // WeCom robot mentions, app message.
    "mentioned_list",
    "mentioned_mobile_list",
    "touser",
    // Lark app message receiver, `at` elements of posts and cards.
    "receive_id",
    "open_id",
    "open_ids",
    "union_id",
    "union_ids",
    "user_id",
    "user_ids",
    "userid",
    "chat_id",
    "chat_ids",
    "email",
    "emails",
    "mobile",
    "mobiles",
];

/// Keys that send to everyone, a department or a tag.
const BROADCAST_KEYS: &[&str] = &["isAtAll", "to_all_user", "dept_id_list", "toparty", "totag"];

/// How deep JSON held in a string (Lark's `content`) is looked into. Deeper still, the
/// string is refused unread rather than let through unread.
const MAX_EMBEDDED_JSON: usize = 2;

impl Policy {
    /// Refuses a raw body naming people, and a broadcast unless allowed.
    pub fn check_raw(&self, raw: &Value) -> Result<(), Refusal> {
        self.walk(raw, &mut "raw".to_owned(), 0)
    }

    /// Refuses recipient markup in what a message says, whoever wrote it (the sender or a
    /// template): Lark turns `<at user_id="…">` into a mention, WeCom `<@userid>`.
    pub fn check_text(&self, n: &Notification) -> Result<(), Refusal> {
        for (field, text) in [
            ("title", n.title.as_deref()),
            ("text", Some(n.text.as_str())),
        ] {
            if let Some(text) = text {
                self.markup(text, field)?;
            }
        }
        Ok(())
    }

    /// Refuses `mentions.all` (and `@all` among the mention ids) unless broadcasts are
    /// allowed, and more than `max_recipients` people in all. `recipients` are an app
    /// message's, resolved.
    pub fn check_resolved(&self, n: &Notification, recipients: &[String]) -> Result<(), Refusal> {
        let m = &n.mentions;
        if !self.allow_broadcast {
            if m.all {
                return broadcast("mentions.all");
            }
            if m.user_ids.iter().chain(&m.mobiles).any(|id| is_all(id)) {
                return broadcast("mentions (@all)");
            }
        }
        let count = recipients.len() + m.user_ids.len() + m.mobiles.len();
        if count > self.max_recipients {
            return Err(Refusal::TooMany {
                count,
                max: self.max_recipients,
            });
        }
        Ok(())
    }

    fn walk(&self, v: &Value, path: &mut String, embedded: usize) -> Result<(), Refusal> {
        match v {
            Value::Object(fields) => {
                for (key, value) in fields {
                    let len = path.len();
                    path.push('.');
                    path.push_str(key);
                    self.field(key, value, path)?;
                    self.walk(value, path, embedded)?;
                    path.truncate(len);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.walk(item, path, embedded)?;
                    path.truncate(len);
                }
            }
            Value::String(s) => {
                self.markup(s, path)?;
                // Lark app bodies carry their content as a JSON string.
                if s.trim_start().starts_with(['{', '[']) {
                    if let Ok(inner) = serde_json::from_str::<Value>(s) {
                        if embedded >= MAX_EMBEDDED_JSON {
                            return Err(Refusal::Embedded {
                                field: format!("{path} (JSON nested too deep to check)"),
                            });
                        }
                        self.walk(&inner, path, embedded + 1)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One key of a raw body and its value.
    fn field(&self, key: &str, value: &Value, path: &str) -> Result<(), Refusal> {
        let person = PERSON_KEYS.contains(&key);
        if (!person && !BROADCAST_KEYS.contains(&key)) || names_nobody(value) {
            return Ok(());
        }
        // `"touser": "@all"`, `"mentioned_list": ["@all"]`, a Lark `"user_id": "all"`: everyone.
        let everyone = !person || ids(value).iter().all(|id| is_all(id));
        match (everyone, self.allow_broadcast) {
            (true, true) => Ok(()),
            (true, false) => broadcast(path),
            (false, _) => Err(Refusal::Embedded {
                field: path.to_owned(),
            }),
        }
    }

    /// `<at …>` (Lark) or `<@…>` (WeCom) in a text.
    fn markup(&self, text: &str, field: &str) -> Result<(), Refusal> {
        let lower = text.to_ascii_lowercase();
        for (i, _) in lower.match_indices("<at") {
            let rest = &lower[i + 3..];
            if !rest.starts_with(|c: char| c.is_ascii_whitespace() || c == '>') {
                continue;
            }
            let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
            let value = tag
                .split_once('=')
                .map(|(_, v)| v.trim().trim_matches(['"', '\'']).trim())
                .unwrap_or_default();
            if is_all(value) && self.allow_broadcast {
                continue;
            }
            let field = format!("{field} (<at> markup)");
            return if is_all(value) {
                broadcast(&field)
            } else {
                Err(Refusal::Embedded { field })
            };
        }
        let wecom = lower
            .match_indices("<@")
            .any(|(i, _)| lower[i + 2..].starts_with(|c: char| !c.is_whitespace() && c != '>'));
        if wecom {
            return Err(Refusal::Embedded {
                field: format!("{field} (<@…> markup)"),
            });
        }
        Ok(())
    }
}

fn broadcast(field: &str) -> Result<(), Refusal> {
    Err(Refusal::Broadcast {
        field: field.to_owned(),
    })
}

/// `@all`, or Lark's `all`.
fn is_all(id: &str) -> bool {
    matches!(id.trim(), "@all" | "all")
}

/// A value naming nobody: absent, false, empty.
fn names_nobody(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.iter().all(names_nobody),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// The ids a recipient field lists: an array's items, a string's `|`- or `,`-separated parts.
/// A value of another shape counts as one id that is not `@all`.
fn ids(v: &Value) -> Vec<String> {
    let split = |s: &str| -> Vec<String> {
        s.split(['|', ','])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match v {
        Value::String(s) => split(s),
        Value::Array(items) => items
            .iter()
            .flat_map(|i| match i {
                Value::String(s) => split(s),
                Value::Null => Vec::new(),
                other => vec![other.to_string()],
            })
            .collect(),
        other => vec![other.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STRICT: Policy = Policy {
        allow_broadcast: false,
        max_recipients: 3,
    };
    const BROADCAST: Policy = Policy {
        allow_broadcast: true,
        max_recipients: 3,
    };

    fn embedded(field: &str) -> Result<(), Refusal> {
        Err(Refusal::Embedded {
            field: field.into(),
        })
    }

    #[test]
    fn raw_bodies_naming_people_are_refused_by_field_on_every_platform() {
        let cases = [
            // DingTalk robot, work notification.
            (
                json!({"msgtype":"text","text":{"content":"hi"},"at":{"atMobiles":["138"]}}),
                "raw.at.atMobiles",
            ),
            (json!({"at":{"atUserIds":["u1"]}}), "raw.at.atUserIds"),
            (json!({"userid_list":"a,b"}), "raw.userid_list"),
            // WeCom robot and app.
            (
                json!({"msgtype":"text","text":{"content":"x","mentioned_list":["zhangsan"]}}),
                "raw.text.mentioned_list",
            ),
            (
                json!({"text":{"mentioned_mobile_list":["138","@all"]}}),
                "raw.text.mentioned_mobile_list",
            ),
            (json!({"touser":"bob|@all"}), "raw.touser"),
            // Lark app and post/card elements, also inside a JSON string.
            (
                json!({"receive_id":"ou_x","msg_type":"text"}),
                "raw.receive_id",
            ),
            (json!({"chat_id":"oc_1"}), "raw.chat_id"),
            (json!({"open_id":"ou_1"}), "raw.open_id"),
            (
                json!({"msg_type":"post","content":{"post":{"zh_cn":{"content":[[{"tag":"at","user_id":"ou_1"}]]}}}}),
                "raw.content.post.zh_cn.content[0][0].user_id",
            ),
            (
                json!({"msg_type":"post","content":"{\"zh_cn\":{\"content\":[[{\"tag\":\"at\",\"email\":\"a@b\"}]]}}"}),
                "raw.content.zh_cn.content[0][0].email",
            ),
            (
                json!({"msg_type":"text","content":{"text":"hi <at user_id=\"ou_1\">x</at>"}}),
                "raw.content.text (<at> markup)",
            ),
            (
                json!({"msgtype":"markdown","markdown":{"content":"hi <@zhangsan>"}}),
                "raw.markdown.content (<@…> markup)",
            ),
        ];
        for (raw, field) in cases {
            assert_eq!(STRICT.check_raw(&raw), embedded(field), "{raw}");
            // Allowing broadcasts allows no one in particular.
            assert_eq!(BROADCAST.check_raw(&raw), embedded(field), "{raw}");
        }
    }

    #[test]
    fn broadcasts_in_raw_bodies_need_allow_broadcast() {
        let cases = [
            (json!({"at":{"isAtAll":true}}), "raw.at.isAtAll"),
            (json!({"to_all_user":true}), "raw.to_all_user"),
            (json!({"dept_id_list":"1,2"}), "raw.dept_id_list"),
            (json!({"toparty":"1|2"}), "raw.toparty"),
            (json!({"totag":"3"}), "raw.totag"),
            (json!({"touser":"@all"}), "raw.touser"),
            (
                json!({"text":{"mentioned_list":["@all"]}}),
                "raw.text.mentioned_list",
            ),
            (
                json!({"content":[[{"tag":"at","user_id":"all"}]]}),
                "raw.content[0][0].user_id",
            ),
            (
                json!({"card":{"elements":[{"tag":"markdown","content":"<at id=all></at>"}]}}),
                "raw.card.elements[0].content (<at> markup)",
            ),
        ];
        for (raw, field) in cases {
            let refused = Err(Refusal::Broadcast {
                field: field.into(),
            });
            assert_eq!(STRICT.check_raw(&raw), refused, "{raw}");
            assert_eq!(BROADCAST.check_raw(&raw), Ok(()), "{raw}");
        }
    }

    #[test]
    fn raw_bodies_naming_nobody_pass() {
        for raw in [
            json!({"msgtype":"text","text":{"content":"a <attention> b, a<@ b"}}),
            json!({"msgtype":"text","text":{"content":"x"},"at":{"atMobiles":[],"isAtAll":false}}),
            json!({"msg_type":"interactive","card":{"elements":[{"tag":"div"}]}}),
            json!({"msg_type":"text","content":"{\"text\":\"hello\"}"}),
            json!({"toparty":"","to_all_user":false,"touser":null}),
        ] {
            assert_eq!(STRICT.check_raw(&raw), Ok(()), "{raw}");
        }
        // JSON in a string in a string in a string is not read: refused.
        let deep = json!({"c": json!({"c": json!({"c": "{}"}).to_string()}).to_string()});
        assert!(matches!(
            STRICT.check_raw(&deep),
            Err(Refusal::Embedded { field }) if field.starts_with("raw.c.c.c")
        ));
    }

    #[test]
    fn mention_markup_in_texts_is_refused() {
        let n = |title: Option<&str>, text: &str| Notification {
            title: title.map(str::to_owned),
            text: text.into(),
            ..Default::default()
        };
        assert_eq!(
            STRICT.check_text(&n(None, "deploy <at user_id=\"ou_9\"></at>")),
            embedded("text (<at> markup)")
        );
        assert_eq!(
            STRICT.check_text(&n(Some("<AT id=all>"), "x")),
            Err(Refusal::Broadcast {
                field: "title (<at> markup)".into()
            })
        );
        assert_eq!(BROADCAST.check_text(&n(Some("<at id=all>"), "x")), Ok(()));
        assert_eq!(
            STRICT.check_text(&n(None, "<@lisi> look")),
            embedded("text (<@…> markup)")
        );
        assert_eq!(
            STRICT.check_text(&n(Some("a < b"), "x <= y, <atom>")),
            Ok(())
        );
    }

    #[test]
    fn mentions_of_everyone_and_too_many_people_are_refused() {
        let mut n = Notification {
            text: "x".into(),
            ..Default::default()
        };
        n.mentions.all = true;
        assert_eq!(
            STRICT.check_resolved(&n, &[]),
            Err(Refusal::Broadcast {
                field: "mentions.all".into()
            })
        );
        assert_eq!(BROADCAST.check_resolved(&n, &[]), Ok(()));
        n.mentions.all = false;
        n.mentions.user_ids = vec!["@all".into()];
        assert!(matches!(
            STRICT.check_resolved(&n, &[]),
            Err(Refusal::Broadcast { .. })
        ));
        // Three people are the limit here: recipients and mentions count together.
        n.mentions.user_ids = vec!["u1".into()];
        n.mentions.mobiles = vec!["138".into()];
        assert_eq!(STRICT.check_resolved(&n, &["a".into()]), Ok(()));
        assert_eq!(
            STRICT.check_resolved(&n, &["a".into(), "b".into()]),
            Err(Refusal::TooMany { count: 4, max: 3 })
        );
    }
}
