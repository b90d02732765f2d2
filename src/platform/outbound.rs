//! What every outbound (bot/app message) client shares: how a platform's answer is classified,
//! and how a long text is cut at a byte limit without breaking a UTF-8 character.

use std::time::Duration;

/// What to do after a send, decided from the platform's answer (HTTP status and body: an
/// HTTP 200 with a non-zero error code is still an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Accepted.
    Ok,
    /// Throttled: pause the target (for `pause` when the platform says how long, otherwise the
    /// target's configured pause) and keep its queue.
    RateLimited { pause: Option<Duration> },
    /// Network error, timeout, 5xx, "system busy": retry with backoff.
    Transient,
    /// Bad signature, invalid token, bad message: retrying cannot help; dead-letter at once.
    Permanent,
}

impl Class {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::RateLimited { .. } => "rate_limited",
            Class::Transient => "transient",
            Class::Permanent => "permanent",
        }
    }
}

/// A classified answer, with the platform's code and a short description for logs and
/// dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub class: Class,
    /// The platform's error code (`errcode`, `code`, `StatusCode`) when it sent one.
    pub code: Option<i64>,
    /// HTTP status, or 0 when no answer came (network error, timeout).
    pub status: u16,
    /// The answer body (truncated), or the transport error.
    pub detail: String,
}

/// What to do with a text longer than the platform allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Send it as several messages.
    #[default]
    Split,
    /// Send the beginning, marked as cut.
    Truncate,
}

/// How a Lark group bot renders markdown: an interactive card (the default, as ZenTao does) or
/// a rich-text post.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LarkMarkdown {
    #[default]
    Card,
    Post,
}

/// Per-target rendering choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Byte limit of the message text; `None` takes the platform's default for the message type.
    pub max_bytes: Option<usize>,
    pub too_long: TooLong,
    /// Text of the link rendered for `url` in markdown.
    pub link_text: String,
    pub lark_markdown: LarkMarkdown,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            max_bytes: None,
            too_long: TooLong::Split,
            link_text: "查看详情".into(),
            lark_markdown: LarkMarkdown::Card,
        }
    }
}

/// Marker appended to a truncated text.
pub const TRUNCATED: &str = "…";

/// Cuts `text` into parts of at most `max` bytes each, never inside a UTF-8 character,
/// preferring to cut after a newline, then after a space, in the last quarter of a part.
/// `max` is raised to 4 when smaller, so that any character fits.
pub fn split_utf8(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(4);
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let window = &rest[..cut];
        let floor = cut - cut / 4;
        let nice = window
            .rfind('\n')
            .filter(|&i| i + 1 >= floor)
            .or_else(|| window.rfind(' ').filter(|&i| i + 1 >= floor))
            .map(|i| i + 1);
        let cut = nice.unwrap_or(cut);
        parts.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest);
    }
    parts
}

/// The beginning of `text`, at most `max` bytes including the [`TRUNCATED`] marker, cut on a
/// character boundary; `text` itself when it fits.
pub fn truncate_utf8(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{TRUNCATED}", &text[..cut])
}

/// Cuts `text` to fit `budget` bytes per part, by splitting or truncating.
pub fn fit(text: &str, budget: usize, too_long: TooLong) -> Vec<String> {
    match too_long {
        TooLong::Split => split_utf8(text, budget)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        TooLong::Truncate => vec![truncate_utf8(text, budget.max(TRUNCATED.len() + 4))],
    }
}

/// However small the limit and however much else shares the field, a part carries at least this
/// much text, so that a tiny limit cannot turn one message into hundreds of requests.
const MIN_BUDGET: usize = 64;

/// An empty title or URL is as good as none.
pub(crate) fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.trim().is_empty())
}

/// One request's share of a text that may have been cut into several.
#[derive(Debug)]
pub(crate) struct Part {
    pub text: String,
    /// 1-based.
    pub number: usize,
    pub count: usize,
}

impl Part {
    pub fn is_last(&self) -> bool {
        self.number == self.count
    }

    /// `" (2/3)"` after a title; nothing when the text is whole.
    pub fn title_suffix(&self) -> String {
        if self.count > 1 {
            format!(" ({}/{})", self.number, self.count)
        } else {
            String::new()
        }
    }

    /// The part's field: the numbered title wrapped by `heading` (or, without a title, the
    /// number in front of the text), the text, then `tail` (link, mentions) on the last part.
    pub fn compose(
        &self,
        title: Option<&str>,
        heading: impl Fn(&str) -> String,
        tail: &str,
    ) -> String {
        let mut out = match title {
            Some(t) => heading(&format!("{t}{}", self.title_suffix())),
            None => self.text_prefix(),
        };
        out.push_str(&self.text);
        if self.is_last() {
            out.push_str(tail);
        }
        out
    }

    /// `"(2/3) "` before a text shown without a title; nothing when the text is whole.
    pub fn text_prefix(&self) -> String {
        if self.count > 1 {
            format!("({}/{}) ", self.number, self.count)
        } else {
            String::new()
        }
    }
}

/// Cuts `text` so that each part, plus the `overhead` bytes of what shares its field (title,
/// link, mentions) and a part marker when there are several parts, fits in `max` bytes.
pub(crate) fn cut(text: &str, max: usize, overhead: usize, too_long: TooLong) -> Vec<Part> {
    let budget = |marker: usize| max.saturating_sub(overhead + marker).max(MIN_BUDGET);
    let texts = if too_long == TooLong::Truncate || text.len() <= budget(0) {
        fit(text, budget(0), too_long)
    } else {
        // A marker " (i/k)" is 2·digits + 4 bytes, and the number of digits depends on how many
        // parts there are: reserve room for one digit, and widen until the count fits.
        let mut digits = 1u32;
        loop {
            let texts = fit(text, budget(2 * digits as usize + 4), TooLong::Split);
            if texts.len() < 10usize.pow(digits) {
                break texts;
            }
            digits += 1;
        }
    };
    let count = texts.len();
    texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| Part {
            text,
            number: i + 1,
            count,
        })
        .collect()
}

/// Classifies an answer the way every bot platform needs: 429 is "too fast", 5xx transient,
/// any other non-2xx permanent; a 2xx is decided by the body's error code (the first of
/// `code_fields` present), 0 being success and `by_code` deciding the rest. A 2xx without a
/// code is not the platform's answer (a proxy's page, say), so nothing says the message is
/// wrong: transient.
pub fn classify(
    status: u16,
    body: &[u8],
    code_fields: &[&str],
    by_code: impl Fn(i64) -> Class,
) -> Answer {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let code = parsed.as_ref().and_then(|v| {
        code_fields
            .iter()
            .find_map(|f| v.get(*f).and_then(serde_json::Value::as_i64))
    });
    let class = if status == 429 {
        Class::RateLimited { pause: None }
    } else if status >= 500 {
        Class::Transient
    } else if !(200..300).contains(&status) {
        Class::Permanent
    } else {
        match code {
            Some(0) => Class::Ok,
            Some(c) => by_code(c),
            None => Class::Transient,
        }
    };
    Answer {
        class,
        code,
        status,
        detail: detail(body),
    }
}

/// Truncates an answer body for logs and dead-letter headers.
pub fn detail(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    truncate_utf8(s.trim(), 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_on_newlines_then_spaces_then_characters() {
        assert_eq!(split_utf8("aaaa\nbbbb\ncccc", 10), ["aaaa\nbbbb\n", "cccc"]);
        assert_eq!(split_utf8("aaaa bbbb cccc", 10), ["aaaa bbbb ", "cccc"]);
        assert_eq!(split_utf8("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        // 你 is 3 bytes: a 4-byte limit holds one.
        assert_eq!(split_utf8("你好吗", 4), ["你", "好", "吗"]);
        assert_eq!(split_utf8("", 10), [""]);
    }

    #[test]
    fn truncates_with_marker() {
        assert_eq!(truncate_utf8("short", 10), "short");
        let t = truncate_utf8("你好你好你好", 10);
        assert!(t.len() <= 10, "{t}");
        assert_eq!(t, "你好…");
    }

    proptest! {
        #[test]
        fn split_parts_fit_and_rejoin(text in "\\PC{0,300}", max in 4usize..64) {
            let parts = split_utf8(&text, max);
            prop_assert!(parts.iter().all(|p| p.len() <= max));
            prop_assert_eq!(parts.concat(), text);
        }

        #[test]
        fn truncation_fits(text in "\\PC{0,300}", max in 8usize..64) {
            let t = truncate_utf8(&text, max);
            prop_assert!(t.len() <= max);
        }
    }
}
