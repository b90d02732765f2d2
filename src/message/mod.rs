//! The notification message model of the bus contract (DESIGN.md §1 "Outbound"), and the
//! ZenTao/Sanplex "default" webhook payload, which is accepted too and rendered into one.

pub mod html;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How `text` is meant: markdown (the default) or plain text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Markdown,
    Text,
}

/// Whom to @mention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mentions {
    /// Internal account names, resolved through the user bindings.
    pub users: Vec<String>,
    /// Mobile numbers (DingTalk and WeCom can mention by mobile).
    pub mobiles: Vec<String>,
    /// Platform user ids (DingTalk userId, WeCom userid, Lark open_id).
    pub user_ids: Vec<String>,
    /// Everyone in the group.
    pub all: bool,
}

impl Mentions {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.mobiles.is_empty() && self.user_ids.is_empty() && !self.all
    }
}

/// Recipients of app messages (work notifications); group bots ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipients {
    pub users: Vec<String>,
    pub user_ids: Vec<String>,
}

/// One notification, as published to `notify.<target>` or posted to `/notify/<target>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub format: Format,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Mentions::is_empty")]
    pub mentions: Mentions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Recipients>,
    /// A platform-native body sent as it is (signing fields are still added where the
    /// platform wants them in the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
}

/// One person's ids on each platform (`[users.<account>]`): the user bindings that turn
/// internal account names into platform ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserBinding {
    /// Display name, for templates' `mention()`.
    pub name: Option<String>,
    pub dingtalk: Option<String>,
    pub wecom: Option<String>,
    /// Lark open_id ("ou_…"), union_id ("on_…") or user_id.
    pub lark: Option<String>,
    pub mobile: Option<String>,
    pub email: Option<String>,
}

/// A configured id, unless it is blank.
fn bound(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl UserBinding {
    pub fn name(&self) -> Option<String> {
        bound(&self.name)
    }
    pub fn dingtalk(&self) -> Option<String> {
        bound(&self.dingtalk)
    }
    pub fn wecom(&self) -> Option<String> {
        bound(&self.wecom)
    }
    pub fn lark(&self) -> Option<String> {
        bound(&self.lark)
    }
    pub fn mobile(&self) -> Option<String> {
        bound(&self.mobile)
    }
    pub fn email(&self) -> Option<String> {
        bound(&self.email)
    }
}

/// How a group bot @mentions someone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MentionId {
    Mobile(String),
    UserId(String),
}

/// Why a message body is not a notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("body is neither a notification nor a ZenTao/Sanplex payload: {0}")]
    Invalid(String),
    #[error("notification has neither text nor raw")]
    Empty,
}

/// The ZenTao/Sanplex "default" webhook payload (PROTOCOLS.md §9.2): only the fields the admin
/// selected are present, all as raw database strings (`product` is comma-wrapped: ",1,").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZenTao {
    #[serde(rename = "objectType")]
    pub object_type: String,
    #[serde(rename = "objectID", default)]
    pub object_id: String,
    #[serde(default)]
    pub product: String,
    /// `execution`, or `project` in older versions.
    #[serde(default, alias = "project")]
    pub execution: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub date: String,
    #[serde(default)]
    pub comment: String,
    /// ZenTao's own line: `<realname><action><object> [#<id>::<name>](<link>)`.
    #[serde(default)]
    pub text: String,
}

impl ZenTao {
    /// A ZenTao payload names its object type; a notification never does.
    fn from_map(map: &BTreeMap<String, serde_json::Value>) -> Option<ZenTao> {
        if !map.contains_key("objectType") {
            return None;
        }
        let s = |k: &str| match map.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        Some(ZenTao {
            object_type: s("objectType"),
            object_id: s("objectID"),
            product: s("product"),
            execution: if map.contains_key("execution") {
                s("execution")
            } else {
                s("project")
            },
            action: s("action"),
            actor: s("actor"),
            date: s("date"),
            comment: s("comment"),
            text: s("text"),
        })
    }

    /// Product ids of the comma-wrapped list (",1,2," → ["1", "2"]).
    pub fn products(&self) -> Vec<&str> {
        self.product.split(',').filter(|p| !p.is_empty()).collect()
    }

    /// A title and markdown text. ZenTao's own `text` line is the best summary when selected;
    /// otherwise one is composed from the other fields.
    pub fn to_notification(&self) -> Notification {
        let summary = if self.text.trim().is_empty() {
            let actor = if self.actor.is_empty() {
                "someone"
            } else {
                &self.actor
            };
            format!(
                "{actor} {} {} #{}",
                if self.action.is_empty() {
                    "changed"
                } else {
                    &self.action
                },
                self.object_type,
                self.object_id
            )
        } else {
            self.text.trim().to_owned()
        };
        // The title has the same form without the markdown link, as ZenTao's own title.
        let title = strip_markdown_link(&summary);
        let mut text = summary;
        if !self.comment.trim().is_empty() {
            text.push_str("\n\n> ");
            // ZenTao comments are HTML from its rich-text editor; chat messages want text.
            let comment = html::html_to_text(self.comment.trim());
            text.push_str(&comment.trim().replace('\n', "\n> "));
        }
        if !self.date.is_empty() {
            text.push_str(&format!("\n\n{}", self.date));
        }
        Notification {
            title: Some(title),
            text,
            ..Default::default()
        }
    }
}

/// `[#12::Login fails](https://…)` → `#12::Login fails`.
fn strip_markdown_link(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find("](").and_then(|close| {
            after[close + 2..]
                .find(')')
                .map(|end| (close, close + 2 + end))
        }) {
            Some((close, end)) => {
                out.push_str(&rest[..open]);
                out.push_str(&after[..close]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// A parsed message body: what to render, and the ZenTao payload when that is what came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub notification: Notification,
    pub zentao: Option<ZenTao>,
    /// The body as a JSON object (a form-encoded one converted), for routes and templates:
    /// it keeps fields neither model knows (a Sanplex `assignedTo`, say).
    pub payload: serde_json::Value,
}

/// Parses a message body: a notification or a ZenTao payload, as JSON or (ZenTao's other
/// content type) `application/x-www-form-urlencoded`.
pub fn parse(body: &[u8]) -> Result<Parsed, MessageError> {
    from_payload(payload(body)?)
}

/// The body as a JSON object: JSON, or a ZenTao form converted (values are strings).
pub fn payload(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, MessageError> {
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(MessageError::Invalid("not a JSON object".into())),
        Err(json_err) => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
                .map_err(|_| MessageError::Invalid(json_err.to_string()))?;
            // Any text parses as some form; only ZenTao sends forms.
            if !pairs.iter().any(|(k, _)| k == "objectType") {
                return Err(MessageError::Invalid(json_err.to_string()));
            }
            Ok(pairs
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect())
        }
    }
}

/// A notification or a ZenTao payload, from the body's object.
pub fn from_payload(
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<Parsed, MessageError> {
    let fields: BTreeMap<String, serde_json::Value> = map.clone().into_iter().collect();
    let payload = serde_json::Value::Object(map);
    if let Some(z) = ZenTao::from_map(&fields) {
        return Ok(Parsed {
            notification: z.to_notification(),
            zentao: Some(z),
            payload,
        });
    }
    let n: Notification = serde_json::from_value(payload.clone())
        .map_err(|e| MessageError::Invalid(e.to_string()))?;
    if n.text.trim().is_empty() && n.raw.is_none() {
        return Err(MessageError::Empty);
    }
    // Every platform's message body is an object; anything else would be sent as it is, to
    // nobody (an app message's recipients are added to the object), only to be refused there.
    if n.raw.as_ref().is_some_and(|raw| !raw.is_object()) {
        return Err(MessageError::Invalid("raw must be a JSON object".into()));
    }
    Ok(Parsed {
        notification: n,
        zentao: None,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_notification() {
        let p = parse(br#"{"title":"T","text":"hi","format":"text","mentions":{"mobiles":["138"],"all":true}}"#).unwrap();
        assert_eq!(p.notification.title.as_deref(), Some("T"));
        assert_eq!(p.notification.format, Format::Text);
        assert_eq!(p.notification.mentions.mobiles, ["138"]);
        assert!(p.notification.mentions.all);
        assert!(p.zentao.is_none());
    }

    #[test]
    fn rejects_unknown_fields_empty_and_non_objects() {
        assert!(matches!(
            parse(br#"{"text":"x","colour":"red"}"#),
            Err(MessageError::Invalid(_))
        ));
        assert_eq!(parse(br#"{"title":"only"}"#), Err(MessageError::Empty));
        assert!(matches!(parse(b"[1]"), Err(MessageError::Invalid(_))));
        assert!(matches!(parse(b"garbage"), Err(MessageError::Invalid(_))));
        assert!(parse(br#"{"raw":{"msgtype":"text"}}"#).is_ok());
    }

    #[test]
    fn raw_that_is_not_an_object_is_refused() {
        // Found by the notify_body fuzz target: a wecom_app target rendered it as a request
        // with no recipients.
        for body in [
            "{\"raw\":\t\t\t\t\t444444444444444444444444444444444}",
            r#"{"raw":"text"}"#,
            r#"{"raw":[{"msgtype":"text"}]}"#,
            r#"{"text":"hi","raw":true}"#,
        ] {
            assert_eq!(
                parse(body.as_bytes()),
                Err(MessageError::Invalid("raw must be a JSON object".into())),
                "{body}"
            );
        }
        // null is no raw body at all.
        assert!(parse(br#"{"text":"hi","raw":null}"#).is_ok());
    }

    #[test]
    fn zentao_json_payload_is_rendered() {
        let body = r#"{"objectType":"bug","objectID":"12","product":",1,","execution":"3","action":"opened","actor":"zhangsan","date":"2024-01-01 10:00:00","comment":"<p>Steps&nbsp;attached</p>","text":"张三创建了Bug [#12::Login fails](https://zentao.example.com/bug-view-12.html)"}"#;
        let p = parse(body.as_bytes()).unwrap();
        let z = p.zentao.unwrap();
        assert_eq!(z.products(), ["1"]);
        assert_eq!(z.execution, "3");
        assert_eq!(
            p.notification.title.as_deref(),
            Some("张三创建了Bug #12::Login fails")
        );
        assert_eq!(
            p.notification.text,
            "张三创建了Bug [#12::Login fails](https://zentao.example.com/bug-view-12.html)\n\n> Steps attached\n\n2024-01-01 10:00:00"
        );
    }

    #[test]
    fn zentao_form_payload_and_project_alias() {
        let body = "objectType=task&objectID=7&project=2&action=finished&actor=lisi&text=%E6%9D%8E%E5%9B%9B%E5%AE%8C%E6%88%90%E4%BA%86%E4%BB%BB%E5%8A%A1";
        let p = parse(body.as_bytes()).unwrap();
        let z = p.zentao.unwrap();
        assert_eq!(z.execution, "2");
        assert_eq!(z.object_type, "task");
        assert_eq!(p.notification.text, "李四完成了任务");
    }

    #[test]
    fn zentao_without_text_gets_a_composed_line() {
        let p = parse(br#"{"objectType":"story","objectID":"5","action":"closed","actor":"wang"}"#)
            .unwrap();
        assert_eq!(p.notification.text, "wang closed story #5");
    }
}
