//! DingTalk work notifications (PROTOCOLS.md §4, the old-style API): the access token from
//! `gettoken`, the `asyncsend_v2` bodies (the robot's text and markdown messages, without
//! mentions, cut to the `msg` limit, per chunk of recipients) and what an answer means. Pure
//! functions; fetching and sending are the caller's business.

use serde_json::{json, Value};

use super::robot;
use crate::message::{Mentions, Notification};
use crate::platform::outbound::{
    self, endpoint, query, Answer, Class, IssuedToken, RenderOptions, TokenRequest,
};

/// Where the API lives unless a target says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://oapi.dingtalk.com";

/// Byte limit of the serialised `msg` object (PROTOCOLS.md §4).
pub const MSG_MAX_BYTES: usize = 2048;

/// Recipients per call for an internal app (PROTOCOLS.md §4; ISV apps get 1000).
pub const MAX_USERS: usize = 5000;

/// A title may take at most a quarter of a message, so that the text always has room.
const TITLE_MAX_BYTES: usize = MSG_MAX_BYTES / 4;

/// Below this text limit a part is mostly envelope: stop cutting finer and let the platform
/// judge (only an enormous URL gets there).
const MIN_TEXT_BYTES: usize = 256;

/// `GET {base}/gettoken?appkey=…&appsecret=…`.
pub fn token_request(base: &str, app_key: &str, app_secret: &str) -> TokenRequest {
    let q = query(&[("appkey", app_key), ("appsecret", app_secret)]);
    TokenRequest {
        url: endpoint(base, &format!("/gettoken?{q}")),
        json: None,
    }
}

/// The token from a `gettoken` answer: `errcode` 0 with `access_token` and `expires_in`.
/// Wrong credentials (40089, 40001, …) are permanent; "system busy", 5xx and answers that are
/// not the platform's are transient.
pub fn parse_token(status: u16, body: &[u8]) -> Result<IssuedToken, Answer> {
    outbound::parse_token(
        status,
        body,
        "errcode",
        "access_token",
        "expires_in",
        |code| match code {
            -1 => Class::Transient,
            _ => Class::Permanent,
        },
    )
}

/// `{base}/topapi/message/corpconversation/asyncsend_v2?access_token=…`. The URL holds the
/// token: never log it.
pub fn send_url(base: &str, token: &str) -> String {
    let q = query(&[("access_token", token)]);
    endpoint(
        base,
        &format!("/topapi/message/corpconversation/asyncsend_v2?{q}"),
    )
}

/// The request bodies for a notification: one per part and per chunk of at most
/// [`MAX_USERS`] recipients, `{"agent_id", "userid_list": "a,b", "msg"}`, parts in order so
/// that every recipient gets them in order when the bodies are sent in order.
///
/// `msg` is the robot's text or markdown message without `at` (a work notification cannot
/// mention anyone, so mentions are left out of the text too), cut so that its JSON is at most
/// [`MSG_MAX_BYTES`]; `raw` goes in as `msg` unchanged. Empty and repeated user ids are
/// skipped; with no user id left there is nothing to send and no body: what that means is the
/// caller's decision.
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
    let msgs = match &n.raw {
        Some(raw) => vec![raw.clone()],
        None => messages(n, opts),
    };
    msgs.iter()
        .flat_map(|msg| {
            users.chunks(MAX_USERS).map(move |chunk| {
                json!({"agent_id": agent_id, "userid_list": chunk.join(","), "msg": msg})
            })
        })
        .collect()
}

/// The `msg` objects, each serialised within [`MSG_MAX_BYTES`]. JSON escaping and the
/// message's envelope make the serialised size exceed the text's, so measure and cut finer
/// while a message is over.
fn messages(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    let n = Notification {
        title: n
            .title
            .as_deref()
            .map(|t| outbound::truncate_utf8(t, TITLE_MAX_BYTES)),
        mentions: Mentions::default(),
        to: None,
        raw: None,
        ..n.clone()
    };
    let mut max = opts.max_bytes.unwrap_or(MSG_MAX_BYTES).min(MSG_MAX_BYTES);
    loop {
        let opts = RenderOptions {
            max_bytes: Some(max),
            ..opts.clone()
        };
        let msgs: Vec<Value> = robot::render(&n, &opts)
            .into_iter()
            .map(|mut body| {
                if let Some(fields) = body.as_object_mut() {
                    fields.remove("at");
                }
                body
            })
            .collect();
        let largest = msgs.iter().map(json_len).max().unwrap_or(0);
        if largest <= MSG_MAX_BYTES || max <= MIN_TEXT_BYTES {
            return msgs;
        }
        max = max
            .saturating_sub(largest - MSG_MAX_BYTES)
            .max(MIN_TEXT_BYTES);
    }
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
}

/// Classifies an `asyncsend_v2` answer. DingTalk answers HTTP 200 to errors too, so `errcode`
/// decides. `errcode` 0 only means the task was accepted: delivery is asynchronous, and the
/// per-user limits drop messages silently (PROTOCOLS.md §4).
pub fn classify(status: u16, body: &[u8]) -> Answer {
    let mut answer = outbound::classify(status, body, &["errcode"], |code| match code {
        // App or corporation QPM exceeded. [U] 1430003 ("OAPI protection") is a throttle too as
        // far as anyone says: pausing costs less than dead-lettering a message that would go.
        143103 | 143104 | 1430003 => Class::RateLimited { pause: None },
        -1 => Class::Transient,
        // 143105 (daily per-user limit), 143106 (duplicate content), bad agent_id or msg, ...:
        // resending the same request cannot help.
        _ => Class::Permanent,
    });
    if answer.code.is_some_and(is_token_rejected) {
        // The message is fine; the token is not. The caller refreshes it and retries once; a
        // second refusal is worth a retry later, not a dead letter.
        answer.class = Class::Transient;
    }
    answer
}

/// Whether `code` says the access token is invalid (40014) or expired (42001): forget it,
/// fetch another and send again. [U] These are the codes DingTalk's old-style API shares with
/// WeCom's; PROTOCOLS.md names none for DingTalk.
pub fn is_token_rejected(code: i64) -> bool {
    matches!(code, 40014 | 42001)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Format;
    use crate::platform::outbound::TooLong;
    use std::time::Duration;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user{i}")).collect()
    }

    fn mentions() -> Mentions {
        Mentions {
            users: vec!["zhangsan".into()],
            mobiles: vec!["13800000000".into()],
            user_ids: vec!["u1".into()],
            all: true,
        }
    }

    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(40, 150)
    }

    #[test]
    fn token_request_is_a_get_with_encoded_credentials() {
        let req = token_request("https://oapi.dingtalk.com/", "ding key", "s+c/r=t&x");
        assert_eq!(
            req.url,
            "https://oapi.dingtalk.com/gettoken?appkey=ding+key&appsecret=s%2Bc%2Fr%3Dt%26x"
        );
        assert_eq!(req.json, None);
    }

    #[test]
    fn parses_tokens() {
        let ok = br#"{"errcode":0,"errmsg":"ok","access_token":"abc123","expires_in":7200}"#;
        assert_eq!(
            parse_token(200, ok).unwrap(),
            IssuedToken {
                token: "abc123".into(),
                expires_in: Duration::from_secs(7200)
            }
        );
        let cases: &[(u16, &str, Class)] = &[
            (
                200,
                r#"{"errcode":40089,"errmsg":"不合法的corpid或corpsecret"}"#,
                Class::Permanent,
            ),
            (200, r#"{"errcode":40001}"#, Class::Permanent),
            (
                200,
                r#"{"errcode":-1,"errmsg":"系统繁忙"}"#,
                Class::Transient,
            ),
            (502, "bad gateway", Class::Transient),
            (200, "<html>proxy</html>", Class::Transient),
            (200, r#"{"errcode":0,"errmsg":"ok"}"#, Class::Transient),
            (429, "", Class::RateLimited { pause: None }),
            (404, "not found", Class::Permanent),
        ];
        for (status, body, class) in cases {
            let a = parse_token(*status, body.as_bytes()).unwrap_err();
            assert_eq!((a.class, a.status), (*class, *status), "{status} {body}");
        }
    }

    #[test]
    fn send_url_carries_the_token() {
        assert_eq!(
            send_url("http://127.0.0.1:9/", "t/1"),
            "http://127.0.0.1:9/topapi/message/corpconversation/asyncsend_v2?access_token=t%2F1"
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
            render(&n, &RenderOptions::default(), 42, &users(2)),
            [json!({
                "agent_id": 42,
                "userid_list": "user0,user1",
                "msg": {
                    "msgtype": "text",
                    "text": {"content": "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7"},
                },
            })]
        );
    }

    #[test]
    fn markdown_with_title_and_url() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            mentions: mentions(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default(), 42, &["u1".into()]),
            [json!({
                "agent_id": 42,
                "userid_list": "u1",
                "msg": {
                    "msgtype": "markdown",
                    "markdown": {
                        "title": "Bug #12",
                        "text": "#### Bug #12\n\n张三创建了 Bug\n\n[查看详情](https://zentao.example.com/bug-view-12.html)",
                    },
                },
            })]
        );
    }

    #[test]
    fn long_text_is_split_so_each_msg_fits() {
        for (format, field) in [
            (Format::Text, "/text/content"),
            (Format::Markdown, "/markdown/text"),
        ] {
            let text = long_chinese();
            let n = Notification {
                text: text.clone(),
                format,
                ..Default::default()
            };
            let bodies = render(&n, &RenderOptions::default(), 1, &users(1));
            let k = bodies.len();
            assert!(k > 2, "{k}");
            let mut joined = String::new();
            for (i, b) in bodies.iter().enumerate() {
                assert!(json_len(&b["msg"]) <= MSG_MAX_BYTES, "part {i}");
                let content = b["msg"].pointer(field).unwrap().as_str().unwrap();
                joined.push_str(content.strip_prefix(&format!("({}/{k}) ", i + 1)).unwrap());
            }
            assert_eq!(joined, text, "{format:?}");
        }
    }

    #[test]
    fn escaping_counts_against_the_limit() {
        // Every quote and newline doubles when serialised.
        let n = Notification {
            title: Some("\"标题\"".repeat(200)),
            text: "\"a\"\n".repeat(2000),
            format: Format::Text,
            url: Some("https://ci.example.com/1".into()),
            ..Default::default()
        };
        for too_long in [TooLong::Split, TooLong::Truncate] {
            let opts = RenderOptions {
                max_bytes: Some(100_000),
                too_long,
                ..Default::default()
            };
            let bodies = render(&n, &opts, 1, &users(1));
            assert!(!bodies.is_empty());
            for b in &bodies {
                assert!(json_len(&b["msg"]) <= MSG_MAX_BYTES, "{too_long:?}");
            }
        }
    }

    #[test]
    fn recipients_are_chunked_per_part() {
        let n = Notification {
            text: "x".repeat(3000),
            format: Format::Text,
            ..Default::default()
        };
        let mut ids = users(12_001);
        ids.push(String::new());
        ids.push("user7".into());
        let bodies = render(&n, &RenderOptions::default(), 7, &ids);
        assert_eq!(bodies.len(), 2 * 3);
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| b["userid_list"].as_str().unwrap().split(',').count())
            .collect();
        assert_eq!(sizes, [5000, 5000, 2001, 5000, 5000, 2001]);
        assert!(bodies[..3].iter().all(|b| b["msg"]["text"]["content"]
            .as_str()
            .unwrap()
            .starts_with("(1/2) ")));
        assert!(bodies[2]["userid_list"]
            .as_str()
            .unwrap()
            .ends_with("user12000"));
        assert!(render(&n, &RenderOptions::default(), 7, &[]).is_empty());
    }

    #[test]
    fn raw_goes_in_as_msg() {
        let raw = json!({"msgtype": "oa", "oa": {"head": {"text": "t"}, "body": {"content": "c"}}});
        let n = Notification {
            raw: Some(raw.clone()),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default(), 9, &users(1)),
            [json!({"agent_id": 9, "userid_list": "user0", "msg": raw})]
        );
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (
                200,
                r#"{"errcode":0,"errmsg":"ok","task_id":1,"request_id":"r"}"#,
                Class::Ok,
                Some(0),
            ),
            (
                200,
                r#"{"errcode":143103}"#,
                Class::RateLimited { pause: None },
                Some(143103),
            ),
            (
                200,
                r#"{"errcode":143104}"#,
                Class::RateLimited { pause: None },
                Some(143104),
            ),
            (
                200,
                r#"{"errcode":1430003}"#,
                Class::RateLimited { pause: None },
                Some(1430003),
            ),
            (200, r#"{"errcode":-1}"#, Class::Transient, Some(-1)),
            (200, r#"{"errcode":40014}"#, Class::Transient, Some(40014)),
            (200, r#"{"errcode":42001}"#, Class::Transient, Some(42001)),
            (401, r#"{"errcode":42001}"#, Class::Transient, Some(42001)),
            (200, r#"{"errcode":143105}"#, Class::Permanent, Some(143105)),
            (200, r#"{"errcode":143106}"#, Class::Permanent, Some(143106)),
            (200, r#"{"errcode":40035}"#, Class::Permanent, Some(40035)),
            (200, "<html>gateway</html>", Class::Transient, None),
            (429, "", Class::RateLimited { pause: None }, None),
            (503, "", Class::Transient, None),
            (400, r#"{"errcode":0}"#, Class::Permanent, Some(0)),
        ];
        for (status, body, class, code) in cases {
            let a = classify(*status, body.as_bytes());
            assert_eq!(
                (a.class, a.code, a.status),
                (*class, *code, *status),
                "{status} {body}"
            );
        }
        assert!(is_token_rejected(40014) && is_token_rejected(42001));
        assert!(!is_token_rejected(0) && !is_token_rejected(40089));
    }
}
