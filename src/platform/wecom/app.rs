//! WeCom app messages (PROTOCOLS.md §6.2): the access token from `gettoken`, the
//! `message/send` bodies (the robot's text and markdown messages, without mentions, per chunk
//! of recipients), what an answer means and which recipients it refused. Pure functions;
//! fetching and sending are the caller's business.

use serde_json::{json, Value};

use super::robot;
use crate::message::{Mentions, Notification};
use crate::platform::outbound::{
    self, endpoint, query, Answer, Class, IssuedToken, RenderOptions, TokenRequest,
};

/// Where the API lives unless a target says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://qyapi.weixin.qq.com";

/// Byte limit of the content of a `text` or `markdown` app message. [U] PROTOCOLS.md gives no
/// figure for app messages; 2048 is WeCom's figure for both types, and the smaller of the
/// robot's, so a message cut to it is accepted either way.
pub const CONTENT_MAX_BYTES: usize = 2048;

/// Recipients per call: `touser` takes at most 1000 user ids.
pub const MAX_USERS: usize = 1000;

/// `GET {base}/cgi-bin/gettoken?corpid=…&corpsecret=…`.
pub fn token_request(base: &str, corp_id: &str, secret: &str) -> TokenRequest {
    let q = query(&[("corpid", corp_id), ("corpsecret", secret)]);
    TokenRequest {
        url: endpoint(base, &format!("/cgi-bin/gettoken?{q}")),
        json: None,
    }
}

/// The token from a `gettoken` answer: `errcode` 0 with `access_token` and `expires_in`.
/// Wrong credentials (40001 secret, 40013 corpid, …) are permanent; "system busy", 5xx and
/// answers that are not the platform's are transient; the frequency limits pause.
pub fn parse_token(status: u16, body: &[u8]) -> Result<IssuedToken, Answer> {
    outbound::parse_token(
        status,
        body,
        "errcode",
        "access_token",
        "expires_in",
        by_code,
    )
}

/// `{base}/cgi-bin/message/send?access_token=…`. The URL holds the token: never log it.
pub fn send_url(base: &str, token: &str) -> String {
    let q = query(&[("access_token", token)]);
    endpoint(base, &format!("/cgi-bin/message/send?{q}"))
}

/// The request bodies for a notification: one per part and per chunk of at most
/// [`MAX_USERS`] recipients, the robot's message with `touser` (`"a|b"`) and `agentid` added,
/// parts in order so that every recipient gets them in order when the bodies are sent in
/// order.
///
/// App messages cannot mention anyone: mentions are left out (so markdown stays markdown,
/// where the robot would fall back to text to reach mobiles). Content is cut to
/// [`CONTENT_MAX_BYTES`]. `raw` gets `touser` and `agentid` set. Empty and repeated user ids
/// are skipped; with no user id left there is nothing to send and no body: what that means
/// is the caller's decision.
pub fn render(
    n: &Notification,
    opts: &RenderOptions,
    agent_id: u64,
    user_ids: &[String],
) -> Vec<Value> {
    let users = outbound::recipients(user_ids);
    if users.is_empty() {
        return Vec::new();
    }
    let messages = match &n.raw {
        Some(raw) => vec![raw.clone()],
        None => messages(n, opts),
    };
    let mut bodies = Vec::new();
    for message in &messages {
        for chunk in users.chunks(MAX_USERS) {
            let mut body = message.clone();
            // Only a raw body can be something else; WeCom refuses it, which is the answer
            // the sender should see.
            if let Some(fields) = body.as_object_mut() {
                fields.insert("touser".into(), json!(chunk.join("|")));
                fields.insert("agentid".into(), json!(agent_id));
            }
            bodies.push(body);
        }
    }
    bodies
}

/// The robot's messages for `n` without mentions, cut to the app message limit, without the
/// robot-only mention lists.
fn messages(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    let n = Notification {
        mentions: Mentions::default(),
        to: None,
        raw: None,
        ..n.clone()
    };
    let opts = RenderOptions {
        max_bytes: Some(
            opts.max_bytes
                .unwrap_or(CONTENT_MAX_BYTES)
                .min(CONTENT_MAX_BYTES),
        ),
        ..opts.clone()
    };
    robot::render(&n, &opts)
        .into_iter()
        .map(|mut body| {
            if let Some(text) = body.get_mut("text").and_then(Value::as_object_mut) {
                text.remove("mentioned_list");
                text.remove("mentioned_mobile_list");
            }
            body
        })
        .collect()
}

/// Classifies a `message/send` answer. WeCom answers HTTP 200 to errors too, so `errcode`
/// decides; `errmsg` wording changes and is never looked at. Recipients outside the app's
/// scope are no error: see [`invalid_users`].
pub fn classify(status: u16, body: &[u8]) -> Answer {
    let mut answer = outbound::classify(status, body, &["errcode"], by_code);
    if answer.code.is_some_and(is_token_rejected) {
        // The message is fine; the token is not. The caller refreshes it and retries once; a
        // second refusal is worth a retry later, not a dead letter.
        answer.class = Class::Transient;
    }
    answer
}

fn by_code(code: i64) -> Class {
    match code {
        // API frequency and concurrency limits.
        45009 | 45033 => Class::RateLimited { pause: None },
        // System busy.
        -1 => Class::Transient,
        // 81013 (no valid recipient), 40008 (bad msgtype), 45002 (too large), 60020 (IP not
        // allowed), ...: resending the same request cannot help.
        _ => Class::Permanent,
    }
}

/// Whether `code` says the access token expired (42001), is invalid (40014) or is missing
/// (41001): forget it, fetch another and send again.
pub fn is_token_rejected(code: i64) -> bool {
    matches!(code, 42001 | 40014 | 41001)
}

/// The recipients WeCom did not deliver to (outside the app's visible scope, or unknown): the
/// answer's `invaliduser`, `"a|b"`. Nothing when the answer says nothing.
pub fn invalid_users(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    match v.get("invaliduser") {
        Some(Value::String(s)) => s
            .split('|')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect(),
        // [U] Documented as a string; a list is read too rather than lose the report.
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .filter(|u| !u.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Format;
    use std::time::Duration;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user{i}")).collect()
    }

    fn mentions() -> Mentions {
        Mentions {
            users: vec!["zhangsan".into()],
            mobiles: vec!["13800000000".into()],
            user_ids: vec!["zhangsan".into()],
            all: true,
        }
    }

    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(40, 150)
    }

    #[test]
    fn token_request_is_a_get_with_encoded_credentials() {
        let req = token_request("https://qyapi.weixin.qq.com", "ww1", "a b+c");
        assert_eq!(
            req.url,
            "https://qyapi.weixin.qq.com/cgi-bin/gettoken?corpid=ww1&corpsecret=a+b%2Bc"
        );
        assert_eq!(req.json, None);
    }

    #[test]
    fn parses_tokens() {
        let ok = br#"{"errcode":0,"errmsg":"ok","access_token":"tok","expires_in":7200}"#;
        assert_eq!(
            parse_token(200, ok).unwrap(),
            IssuedToken {
                token: "tok".into(),
                expires_in: Duration::from_secs(7200)
            }
        );
        let cases: &[(u16, &str, Class)] = &[
            (
                200,
                r#"{"errcode":40001,"errmsg":"invalid credential, hint: [x]"}"#,
                Class::Permanent,
            ),
            (200, r#"{"errcode":40013}"#, Class::Permanent),
            (200, r#"{"errcode":-1}"#, Class::Transient),
            (
                200,
                r#"{"errcode":45009}"#,
                Class::RateLimited { pause: None },
            ),
            (500, "", Class::Transient),
            (200, "garbage", Class::Transient),
            (200, r#"{"errcode":0,"access_token":""}"#, Class::Transient),
        ];
        for (status, body, class) in cases {
            let a = parse_token(*status, body.as_bytes()).unwrap_err();
            assert_eq!((a.class, a.status), (*class, *status), "{status} {body}");
        }
    }

    #[test]
    fn send_url_carries_the_token() {
        assert_eq!(
            send_url("http://127.0.0.1:9", "tok"),
            "http://127.0.0.1:9/cgi-bin/message/send?access_token=tok"
        );
    }

    #[test]
    fn text_with_title_and_url_without_mentions() {
        let n = Notification {
            title: Some("构建失败".into()),
            text: "main 分支测试未通过".into(),
            format: Format::Text,
            url: Some("https://ci.example.com/7".into()),
            mentions: mentions(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default(), 1000002, &users(2)),
            [json!({
                "touser": "user0|user1",
                "agentid": 1000002,
                "msgtype": "text",
                "text": {"content": "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7"},
            })]
        );
    }

    #[test]
    fn markdown_with_title_and_url_stays_markdown() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            // The robot would go to text to reach the mobile and @all.
            mentions: mentions(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default(), 5, &["zhangsan".into()]),
            [json!({
                "touser": "zhangsan",
                "agentid": 5,
                "msgtype": "markdown",
                "markdown": {
                    "content": "**Bug #12**\n张三创建了 Bug\n[查看详情](https://zentao.example.com/bug-view-12.html)",
                },
            })]
        );
    }

    #[test]
    fn long_content_is_split_at_2048_bytes() {
        for (format, field) in [
            (Format::Text, "/text/content"),
            (Format::Markdown, "/markdown/content"),
        ] {
            let text = long_chinese();
            let n = Notification {
                title: Some("部署失败".into()),
                text: text.clone(),
                format,
                ..Default::default()
            };
            let opts = RenderOptions {
                max_bytes: Some(10_000),
                ..Default::default()
            };
            let bodies = render(&n, &opts, 1, &users(1));
            let k = bodies.len();
            assert!(k > 2, "{k}");
            let mut joined = String::new();
            for (i, b) in bodies.iter().enumerate() {
                let content = b.pointer(field).unwrap().as_str().unwrap();
                assert!(content.len() <= CONTENT_MAX_BYTES, "part {i}");
                let (_, rest) = content.split_once('\n').unwrap();
                assert!(content.contains(&format!("部署失败 ({}/{k})", i + 1)));
                joined.push_str(rest);
            }
            assert_eq!(joined, text, "{format:?}");
        }
    }

    #[test]
    fn recipients_are_chunked_per_part() {
        let n = Notification {
            text: "x".repeat(3000),
            format: Format::Text,
            ..Default::default()
        };
        let mut ids = users(2500);
        ids.insert(3, " ".into());
        ids.push("user0".into());
        let bodies = render(&n, &RenderOptions::default(), 7, &ids);
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| b["touser"].as_str().unwrap().split('|').count())
            .collect();
        assert_eq!(sizes, [1000, 1000, 500, 1000, 1000, 500]);
        assert!(bodies[..3]
            .iter()
            .all(|b| b["text"]["content"].as_str().unwrap().starts_with("(1/2) ")));
        assert!(render(&n, &RenderOptions::default(), 7, &[]).is_empty());
    }

    #[test]
    fn raw_gets_recipients_and_agent() {
        let raw =
            json!({"msgtype": "textcard", "textcard": {"title": "t", "url": "u"}, "touser": "old"});
        let n = Notification {
            raw: Some(raw),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default(), 9, &users(2)),
            [json!({
                "msgtype": "textcard",
                "textcard": {"title": "t", "url": "u"},
                "touser": "user0|user1",
                "agentid": 9,
            })]
        );
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (
                200,
                r#"{"errcode":0,"errmsg":"ok","invaliduser":"","msgid":"m"}"#,
                Class::Ok,
                Some(0),
            ),
            (
                200,
                r#"{"errcode":45009}"#,
                Class::RateLimited { pause: None },
                Some(45009),
            ),
            (
                200,
                r#"{"errcode":45033}"#,
                Class::RateLimited { pause: None },
                Some(45033),
            ),
            (200, r#"{"errcode":-1}"#, Class::Transient, Some(-1)),
            (200, r#"{"errcode":42001}"#, Class::Transient, Some(42001)),
            (200, r#"{"errcode":40014}"#, Class::Transient, Some(40014)),
            (200, r#"{"errcode":41001}"#, Class::Transient, Some(41001)),
            (403, r#"{"errcode":40014}"#, Class::Transient, Some(40014)),
            (200, r#"{"errcode":81013}"#, Class::Permanent, Some(81013)),
            (200, r#"{"errcode":45002}"#, Class::Permanent, Some(45002)),
            (200, "not json", Class::Transient, None),
            (429, "", Class::RateLimited { pause: None }, None),
            (502, "", Class::Transient, None),
            (404, "", Class::Permanent, None),
        ];
        for (status, body, class, code) in cases {
            let a = classify(*status, body.as_bytes());
            assert_eq!(
                (a.class, a.code, a.status),
                (*class, *code, *status),
                "{status} {body}"
            );
        }
        for code in [42001, 40014, 41001] {
            assert!(is_token_rejected(code));
        }
        assert!(!is_token_rejected(40001) && !is_token_rejected(0));
    }

    #[test]
    fn reads_invalid_users() {
        assert_eq!(
            invalid_users(br#"{"errcode":0,"invaliduser":"a|b|","invalidparty":"1"}"#),
            ["a", "b"]
        );
        assert_eq!(invalid_users(br#"{"invaliduser":["c"]}"#), ["c"]);
        assert!(invalid_users(br#"{"errcode":0,"invaliduser":""}"#).is_empty());
        assert!(invalid_users(br#"{"errcode":0}"#).is_empty());
        assert!(invalid_users(b"garbage").is_empty());
    }
}
