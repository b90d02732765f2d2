//! Secrets from the configuration: masked wherever they could be printed, and read leniently
//! from the environment, where a numeric token arrives as a number; and [`redact`], for text
//! that quotes a URL or a platform's answer.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A configured secret. It prints as `***` so it cannot leak through `Debug` into logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// Environment values are parsed as TOML-like values, so a numeric token such as `123456`
/// arrives as an integer; secrets and ids are strings whatever they look like.
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Visitor)
}

/// [`lenient_string`] for an optional value.
pub(crate) fn lenient_opt_string<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

/// What a redacted value is replaced with.
const MASK: &str = "***";

/// Names whose values are credentials wherever they appear in a URL's query or a JSON answer:
/// DingTalk's `access_token` and `sign`, WeCom's robot `key`, a client's `token`.
const SECRET_NAMES: [&str; 4] = ["access_token", "key", "sign", "token"];

/// `text` with the values of [`SECRET_NAMES`] masked: as query parameters (`?key=…`,
/// `&access_token=…`), as JSON string fields (`"token":"…"`), and the token in a Lark bot's
/// webhook path (`/hook/…`). For anything quoted from outside or holding a URL before it is
/// logged, put in an error, a dead letter, a metric or an answer. Names match whole
/// (`monkey=` is left alone) and in any case.
pub fn redact(text: &str) -> Cow<'_, str> {
    let lower = text.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    // (start, end) of every value to mask, in order.
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if let Some((start, end)) = secret_at(&lower, i) {
            if end > start {
                spans.push((start, end));
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end) in spans {
        out.push_str(&text[last..start]);
        out.push_str(MASK);
        last = end;
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

/// The span of a secret value whose name starts at `i` of the lowercased text.
fn secret_at(lower: &str, i: usize) -> Option<(usize, usize)> {
    let bytes = lower.as_bytes();
    // Bytes, not `str`: `i` may fall inside a character.
    let rest = &bytes[i..];
    if rest.starts_with(b"/hook/") {
        let start = i + "/hook/".len();
        return Some((start, value_end(bytes, start)));
    }
    let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
    if !boundary {
        return None;
    }
    let name = SECRET_NAMES
        .iter()
        .find(|n| rest.starts_with(n.as_bytes()))?;
    let after = i + name.len();
    match bytes.get(after) {
        Some(b'=') => Some((after + 1, value_end(bytes, after + 1))),
        // A JSON field: `"name"` then `:` then a string.
        Some(b'"') if i > 0 && bytes[i - 1] == b'"' => {
            let mut j = after + 1;
            while bytes.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            if bytes.get(j) != Some(&b':') {
                return None;
            }
            j += 1;
            while bytes.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            if bytes.get(j) != Some(&b'"') {
                return None;
            }
            let start = j + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            Some((start, end.min(bytes.len())))
        }
        _ => None,
    }
}

/// Where a query value or path segment starting at `start` ends.
fn value_end(bytes: &[u8], start: usize) -> usize {
    let stop = |b: u8| {
        b.is_ascii_whitespace()
            || matches!(
                b,
                b'&' | b'#' | b'"' | b'\'' | b'<' | b'>' | b'\\' | b'?' | b'/' | b')'
            )
    };
    (start..bytes.len())
        .find(|&j| stop(bytes[j]))
        .unwrap_or(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credential_values_in_urls_and_answers() {
        let cases = [
            (
                "https://oapi.dingtalk.com/robot/send?access_token=SECRET&timestamp=1&sign=abc%2B%3D",
                "https://oapi.dingtalk.com/robot/send?access_token=***&timestamp=1&sign=***",
            ),
            (
                "error for url (https://qyapi.weixin.qq.com/cgi-bin/webhook/send?KEY=k-1): 404",
                "error for url (https://qyapi.weixin.qq.com/cgi-bin/webhook/send?KEY=***): 404",
            ),
            (
                r#"{"errcode":1,"token": "t-1\"x","monkey":"ok","key":"k"}"#,
                r#"{"errcode":1,"token": "***","monkey":"ok","key":"***"}"#,
            ),
            (
                "see https://open.feishu.cn/open-apis/bot/v2/hook/abc-123?x=1 and /notify?token=t",
                "see https://open.feishu.cn/open-apis/bot/v2/hook/***?x=1 and /notify?token=***",
            ),
            ("<a href='/x?a=1&amp;token=zz'>", "<a href='/x?a=1&amp;token=***'>"),
        ];
        for (text, redacted) in cases {
            assert_eq!(redact(text), redacted, "{text}");
        }
        // Names match whole; nothing to mask borrows.
        for text in [
            "monkey=1&keyword=2&sign_type=x",
            "token",
            "",
            "key=",
            "é token= ü",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
        // Any text, however cut, is handled without a panic.
        let tricky = "\"token\":\"unterminated \\";
        assert_eq!(redact(tricky), "\"token\":\"***");
    }
}
