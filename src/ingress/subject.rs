//! Business-level subjects: `[apps.<platform>.<app>.subjects]` appends tokens taken from the
//! event body to an inbound event's subject, so a subscriber can pick one business process
//! with a plain wildcard (`dingtalk.bpms_instance_change.PROC-1.>`) or one Kafka topic.
//!
//! Each token is a JSON pointer into the event as published (DingTalk and Lark JSON, WeCom's
//! flat JSON object). A value becomes one subject token and never more: anything outside
//! `[A-Za-z0-9_-]` (dots, `*`, `>`, spaces) becomes `_`, so an event's own content can neither
//! add subject levels nor turn into a wildcard; an absent field, `null`, an object or an array
//! is `_`, so the subject keeps its depth and a wildcard per level still matches.

use std::collections::BTreeMap;

use serde_json::Value;

/// The most characters one token keeps; longer values are cut, so a subject (and the Kafka
/// topic named after it, at most 249 characters) stays bounded whatever the event carries.
pub const MAX_TOKEN_CHARS: usize = 64;

/// The most pointers per event type, for the same reason.
pub const MAX_TOKENS: usize = 3;

/// The key under `subjects` that applies to every event type without a key of its own.
pub const ANY_TYPE: &str = "*";

/// One app's pointers, by the platform's event type (unsanitised, as the platform names it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectKeys {
    by_type: BTreeMap<String, Vec<String>>,
}

impl SubjectKeys {
    /// Pointers already validated: each starts with `/`, at most [`MAX_TOKENS`] per type.
    pub fn new(by_type: BTreeMap<String, Vec<String>>) -> Self {
        SubjectKeys { by_type }
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The tokens to append for an event of `event_type` with this body; none when no pointer
    /// applies, so the subject is exactly the one without business keys.
    pub fn tokens(&self, event_type: &str, payload: &[u8]) -> Vec<String> {
        let Some(pointers) = self
            .by_type
            .get(event_type)
            .or_else(|| self.by_type.get(ANY_TYPE))
            .filter(|p| !p.is_empty())
        else {
            return Vec::new();
        };
        // A body that is not JSON has none of the fields: every token falls back to `_`.
        let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        pointers.iter().map(|p| token(body.pointer(p))).collect()
    }
}

/// Every configured app's keys, by platform and app name.
#[derive(Debug, Clone, Default)]
pub struct Subjects {
    by_app: BTreeMap<(String, String), SubjectKeys>,
}

impl Subjects {
    /// Records `keys` for `app` of `platform`; empty keys are not kept.
    pub fn insert(&mut self, platform: &str, app: &str, keys: SubjectKeys) {
        if !keys.is_empty() {
            self.by_app
                .insert((platform.to_owned(), app.to_owned()), keys);
        }
    }

    /// The tokens for one event of `app` (see [`SubjectKeys::tokens`]).
    pub fn tokens(
        &self,
        platform: &str,
        app: &str,
        event_type: &str,
        payload: &[u8],
    ) -> Vec<String> {
        if self.by_app.is_empty() {
            return Vec::new();
        }
        self.by_app
            .get(&(platform.to_owned(), app.to_owned()))
            .map(|keys| keys.tokens(event_type, payload))
            .unwrap_or_default()
    }
}

/// One subject token from a field's value: strings as they are, numbers and booleans as JSON
/// writes them, anything else `_`; then sanitised and cut to [`MAX_TOKEN_CHARS`].
pub fn token(value: Option<&Value>) -> String {
    let text = match value {
        Some(Value::String(s)) => s.clone(),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
        _ => String::new(),
    };
    let token: String = text
        .chars()
        .take(MAX_TOKEN_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if token.is_empty() {
        "_".to_owned()
    } else {
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(pairs: &[(&str, &[&str])]) -> SubjectKeys {
        SubjectKeys::new(
            pairs
                .iter()
                .map(|(t, p)| (t.to_string(), p.iter().map(|s| s.to_string()).collect()))
                .collect(),
        )
    }

    #[test]
    fn tokens_follow_the_pointers_of_the_event_type() {
        let k = keys(&[("bpms_instance_change", &["/processCode", "/type"])]);
        let body = br#"{"processCode":"PROC-123","type":"finish"}"#;
        assert_eq!(
            k.tokens("bpms_instance_change", body),
            ["PROC-123", "finish"]
        );
        assert!(k.tokens("user_add_org", body).is_empty());
    }

    #[test]
    fn any_type_applies_when_the_type_has_no_key() {
        let k = keys(&[("*", &["/a"]), ("x", &["/b"])]);
        let body = br#"{"a":"A","b":"B"}"#;
        assert_eq!(k.tokens("x", body), ["B"]);
        assert_eq!(k.tokens("y", body), ["A"]);
    }

    #[test]
    fn absent_fields_and_non_scalars_are_underscore() {
        let k = keys(&[("t", &["/missing", "/obj", "/arr", "/null", "/empty"])]);
        let body = br#"{"obj":{},"arr":[1],"null":null,"empty":""}"#;
        assert_eq!(k.tokens("t", body), ["_"; 5]);
        assert_eq!(k.tokens("t", b"<xml/>"), ["_"; 5]);
    }

    #[test]
    fn numbers_and_booleans_are_written_as_json() {
        assert_eq!(token(Some(&json!(42))), "42");
        assert_eq!(token(Some(&json!(1.5))), "1_5");
        assert_eq!(token(Some(&json!(true))), "true");
    }

    #[test]
    fn hostile_values_stay_one_plain_token() {
        for (value, want) in [
            ("PROC.1.>", "PROC_1__"),
            ("*", "_"),
            (">", "_"),
            ("a b\tc", "a_b_c"),
            ("审批", "__"),
            ("..", "__"),
        ] {
            assert_eq!(token(Some(&json!(value))), want, "{value:?}");
        }
        let long = "x".repeat(10_000);
        assert_eq!(token(Some(&json!(long))).len(), MAX_TOKEN_CHARS);
    }

    #[test]
    fn apps_without_keys_get_no_tokens() {
        let mut s = Subjects::default();
        s.insert("dingtalk", "empty", SubjectKeys::default());
        s.insert("dingtalk", "main", keys(&[("t", &["/a"])]));
        assert!(s
            .tokens("dingtalk", "empty", "t", br#"{"a":"A"}"#)
            .is_empty());
        assert!(s.tokens("wecom", "main", "t", br#"{"a":"A"}"#).is_empty());
        assert_eq!(s.tokens("dingtalk", "main", "t", br#"{"a":"A"}"#), ["A"]);
    }
}
