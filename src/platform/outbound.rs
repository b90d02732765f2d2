//! What every outbound (bot/app message) client shares: how a platform's answer is classified,
//! and how a long text is cut at a byte limit without breaking a UTF-8 character.

use std::time::Duration;

use crate::secret::redact;

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

/// The answer of a request that got no answer: a transport error, with its causes but without
/// the URL (a bot URL holds its token, a token request its secret). `status` is the HTTP
/// status when the headers came but the body did not, otherwise 0.
pub fn transport_answer(e: reqwest::Error, status: u16) -> Answer {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "transport error"
    };
    let e = e.without_url();
    let mut detail = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !text.contains("://") {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    Answer {
        class: Class::Transient,
        code: None,
        status,
        detail: redact(&detail).into_owned(),
    }
}

/// Truncates an answer body for logs and dead-letter headers, credentials masked: an answer
/// (an error page, say) may quote the request's URL.
pub fn detail(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    truncate_utf8(&redact(s.trim()), 512)
}

/// The user ids of an app message, trimmed, empty ones and repeats left out, in order.
pub fn recipients(user_ids: &[String]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    user_ids
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty() && seen.insert(*u))
        .collect()
}

/// The CloudEvents `type` and `source` of an inbound event a route on events forwards: a
/// webhook request carrying that event keeps them (`dingtalk.bpms_instance_change`,
/// `dingtalk/main`), so a receiver tells its events apart as a bus subscriber would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub ty: String,
    pub source: String,
}

/// One request to a platform.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub body: serde_json::Value,
    /// App messages: the recipients it goes to (for their limits and for reports).
    pub members: Vec<String>,
    /// Webhooks: the event's id, stable per message and target (a redelivery keeps it).
    pub event_id: Option<String>,
    /// Webhooks: the inbound event's type and source, when a route on events forwarded it.
    pub origin: Option<Origin>,
}

impl Request {
    /// Group bot bodies: no recipients of their own.
    pub fn to_group(bodies: Vec<serde_json::Value>) -> Vec<Request> {
        bodies
            .into_iter()
            .map(|body| Request {
                body,
                event_id: None,
                origin: None,
                members: Vec::new(),
            })
            .collect()
    }

    /// App message bodies whose `field` lists their recipients, separated by `separator`.
    pub fn listing(bodies: Vec<serde_json::Value>, field: &str, separator: char) -> Vec<Request> {
        bodies
            .into_iter()
            .map(|body| {
                let members = body[field]
                    .as_str()
                    .unwrap_or_default()
                    .split(separator)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                Request {
                    body,
                    members,
                    event_id: None,
                    origin: None,
                }
            })
            .collect()
    }

    /// The first recipient, or "" for group bots.
    pub fn first_member(&self) -> &str {
        self.members.first().map(String::as_str).unwrap_or("")
    }
}

/// An access token a platform issued, and how long it is valid from now.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub expires_in: Duration,
}

/// The token is a credential: logs see only its lifetime.
impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// How to ask for a token: GET `url` when `json` is None, else POST `json`.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub url: String,
    pub json: Option<serde_json::Value>,
}

/// The URL's query and the JSON body carry the app secret: neither is shown.
impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.url.split('?').next().unwrap_or_default();
        f.debug_struct("TokenRequest")
            .field("url", &format_args!("{path}?<redacted>"))
            .field("json", &self.json.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `base` (a configured base URL, with or without a trailing `/`) followed by `path`.
pub(crate) fn endpoint(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// A URL query string, form-encoded.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("string pairs always encode")
}

/// Lifetime assumed when a token answer does not say (all three platforms document 7200 s).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(7200);

/// Parses a token endpoint's answer: HTTP status and `code_field` are judged as by
/// [`classify`] with `by_code`; on success the token is `token_field` and its lifetime in
/// seconds `expiry_field`.
///
/// The answer body is never quoted whole in the detail, since a success body holds the token
/// and an error page may echo the request URL, which holds the secret: the detail keeps only
/// the code and message fields of a JSON answer.
pub(crate) fn parse_token(
    status: u16,
    body: &[u8],
    code_field: &str,
    token_field: &str,
    expiry_field: &str,
    by_code: impl Fn(i64) -> Class,
) -> Result<IssuedToken, Answer> {
    let mut answer = classify(status, body, &[code_field], by_code);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    answer.detail = token_detail(status, parsed.as_ref());
    if answer.class != Class::Ok {
        return Err(answer);
    }
    let Some(v) = parsed else {
        return Err(answer);
    };
    let token = v
        .get(token_field)
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        // A success without a token is not the platform's answer as documented: retrying may
        // reach one that is.
        answer.class = Class::Transient;
        answer.detail = format!("{} without {token_field}", answer.detail);
        return Err(answer);
    };
    // [U] A missing or unusable lifetime is taken as the documented 7200 s rather than
    // refused: should the token die earlier, the platform's token-rejected code makes the
    // caller fetch another.
    let expires_in = v
        .get(expiry_field)
        .and_then(|e| {
            e.as_u64()
                .or_else(|| e.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|&s| s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok(IssuedToken {
        token: token.to_owned(),
        expires_in,
    })
}

/// A token answer's detail: its code and message fields only, or what the body was.
fn token_detail(status: u16, parsed: Option<&serde_json::Value>) -> String {
    const KEPT: [&str; 4] = ["errcode", "errmsg", "code", "msg"];
    match parsed.and_then(serde_json::Value::as_object) {
        Some(fields) => {
            let kept: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .filter(|(k, _)| KEPT.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            truncate_utf8(&redact(&serde_json::Value::Object(kept).to_string()), 512)
        }
        None => format!("HTTP {status}, not a JSON object"),
    }
}

/// Texts the platforms' tests cut and split.
#[cfg(test)]
pub(crate) mod fixtures {
    /// `lines` numbered lines of an alert in Chinese (3-byte characters), then a run of
    /// `tail` × "告警未恢复" without any newline or space to cut at.
    pub fn long_chinese(lines: usize, tail: usize) -> String {
        let mut s: String = (1..=lines)
            .map(|i| format!("第{i}行：数据库连接池耗尽，请值班同学尽快处理。\n"))
            .collect();
        s.push_str(&"告警未恢复".repeat(tail));
        s
    }
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

    #[test]
    fn token_debug_shows_no_secret() {
        let t = IssuedToken {
            token: "t-secret".into(),
            expires_in: Duration::from_secs(7200),
        };
        let r = TokenRequest {
            url: "https://example.com/gettoken?appkey=k&appsecret=s3cret".into(),
            json: Some(serde_json::json!({"app_secret": "s3cret"})),
        };
        let shown = format!("{t:?} {r:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("https://example.com/gettoken?<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn endpoint_strips_the_trailing_slash() {
        assert_eq!(endpoint("http://h:1/", "/a?b=c"), "http://h:1/a?b=c");
        assert_eq!(endpoint("http://h:1", "/a"), "http://h:1/a");
        assert_eq!(query(&[("a", "x y"), ("b", "+/=")]), "a=x+y&b=%2B%2F%3D");
    }

    #[test]
    fn token_answers_never_quote_the_token() {
        let ok = br#"{"errcode":0,"access_token":"t-1","expires_in":"60"}"#;
        let t = parse_token(200, ok, "errcode", "access_token", "expires_in", |_| {
            Class::Permanent
        })
        .unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(60));
        let no_lifetime = br#"{"errcode":0,"access_token":"t-1","expires_in":-5}"#;
        let t = parse_token(
            200,
            no_lifetime,
            "errcode",
            "access_token",
            "expires_in",
            |_| Class::Permanent,
        )
        .unwrap();
        assert_eq!(t.expires_in, DEFAULT_TOKEN_LIFETIME);
        let odd = br#"{"errcode":0,"access_token":42,"extra":"t-1"}"#;
        let a = parse_token(200, odd, "errcode", "access_token", "expires_in", |_| {
            Class::Permanent
        })
        .unwrap_err();
        assert_eq!(a.class, Class::Transient);
        assert!(
            !a.detail.contains("t-1") && !a.detail.contains("42"),
            "{}",
            a.detail
        );
        let page = b"<html>Cannot GET /gettoken?appsecret=s3cret</html>";
        let a = parse_token(404, page, "errcode", "access_token", "expires_in", |_| {
            Class::Permanent
        })
        .unwrap_err();
        assert_eq!(
            (a.class, a.detail.as_str()),
            (Class::Permanent, "HTTP 404, not a JSON object")
        );
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
