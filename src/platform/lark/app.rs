//! Lark / Feishu app (bot) messages (PROTOCOLS.md §8.2): the tenant access token, the
//! `im/v1/messages` bodies (the robot's text, post and card messages with `content` as a JSON
//! string and a `uuid` for idempotency), the receive id type, and what an answer means. Pure
//! functions; fetching and sending are the caller's business.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::robot;
use crate::message::Notification;
use crate::platform::outbound::{
    self, endpoint, query, Answer, Class, IssuedToken, RenderOptions, TokenRequest,
};

/// Where the API lives unless a target says otherwise (Lark outside China:
/// `https://open.larksuite.com`).
pub const DEFAULT_BASE_URL: &str = "https://open.feishu.cn";

/// Largest request body sent. [U] Lark documents 150 KB for text and 30 KB for cards and
/// posts; the smaller figure is kept for all, and the robot's rendering stays well under it
/// unless JSON-quoting `content` inflates it.
pub const BODY_MAX_BYTES: usize = 30 * 1024;

/// Longest `uuid` Lark accepts.
pub const UUID_MAX_CHARS: usize = 50;

/// Below this text limit a part is mostly envelope: stop cutting finer (the robot stops there
/// too).
const MIN_TEXT_BYTES: usize = 1024;

/// `POST {base}/open-apis/auth/v3/tenant_access_token/internal` with the app's credentials.
pub fn token_request(base: &str, app_id: &str, app_secret: &str) -> TokenRequest {
    TokenRequest {
        url: endpoint(base, "/open-apis/auth/v3/tenant_access_token/internal"),
        json: Some(json!({"app_id": app_id, "app_secret": app_secret})),
    }
}

/// The token from a `tenant_access_token/internal` answer: `code` 0 with
/// `tenant_access_token` and `expire` (seconds). Wrong credentials (10003, 10014, …) are
/// permanent, whatever the HTTP status; 5xx and answers that are not the platform's are
/// transient.
pub fn parse_token(status: u16, body: &[u8]) -> Result<IssuedToken, Answer> {
    outbound::parse_token(
        status,
        body,
        "code",
        "tenant_access_token",
        "expire",
        by_code,
    )
    .map_err(|mut answer| {
        if answer.code.is_some_and(is_rate_limit) {
            answer.class = Class::RateLimited { pause: None };
        }
        answer
    })
}

/// The `receive_id_type` an id calls for: `ou_…` an open_id, `on_…` a union_id, `oc_…` a
/// chat, anything with `@` an email, and anything else a user_id.
pub fn receive_id_type(id: &str) -> &'static str {
    if id.starts_with("ou_") {
        "open_id"
    } else if id.starts_with("on_") {
        "union_id"
    } else if id.starts_with("oc_") {
        "chat_id"
    } else if id.contains('@') {
        "email"
    } else {
        "user_id"
    }
}

/// `{base}/open-apis/im/v1/messages?receive_id_type=…`. The token goes in the
/// `Authorization: Bearer <token>` header, which the caller adds.
pub fn send_url(base: &str, receive_id_type: &str) -> String {
    let q = query(&[("receive_id_type", receive_id_type)]);
    endpoint(base, &format!("/open-apis/im/v1/messages?{q}"))
}

/// The request bodies for a notification to one receiver, one per part:
/// `{"receive_id", "msg_type", "content": "<JSON string>", "uuid"}`, from the robot's
/// rendering (text → `{"text": …}`, post → its language object, card → the card).
///
/// `uuid` is [`uuid`]`(uuid_seed, part)`: a message delivered again (after a crash, a retry)
/// gets the same uuids, and Lark drops the repeat. The seed must therefore be stable for one
/// message and one receiver, and differ otherwise. `raw` is `{msg_type, content}` (`content`
/// an object or a JSON string; a robot-style `card` is taken as the content) and gets
/// `receive_id` and `uuid` set.
pub fn render(
    n: &Notification,
    opts: &RenderOptions,
    receive_id: &str,
    uuid_seed: &str,
) -> Vec<Value> {
    let messages = match &n.raw {
        Some(raw) => vec![from_raw(raw)],
        None => messages(n, opts),
    };
    messages
        .into_iter()
        .enumerate()
        .map(|(i, mut body)| {
            if let Some(fields) = body.as_object_mut() {
                fields.insert("receive_id".into(), json!(receive_id));
                fields.insert("uuid".into(), json!(uuid(uuid_seed, i + 1)));
            }
            body
        })
        .collect()
}

/// The idempotency key of part `part` (1-based): the first 32 hex digits of
/// SHA-256(`"{seed}/{part}"`), well within [`UUID_MAX_CHARS`] whatever the seed's length.
pub fn uuid(seed: &str, part: usize) -> String {
    let digest = Sha256::digest(format!("{seed}/{part}").as_bytes());
    hex::encode(&digest[..16])
}

/// The robot's messages turned into app message bodies (without receiver and uuid), cut
/// finer while one is over [`BODY_MAX_BYTES`]: quoting `content` as a string escapes every
/// quote and newline again.
fn messages(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    let mut max = opts.max_bytes.unwrap_or(robot::DEFAULT_MAX_BYTES);
    loop {
        let opts = RenderOptions {
            max_bytes: Some(max),
            ..opts.clone()
        };
        let bodies: Vec<Value> = robot::render(n, &opts).iter().map(from_robot).collect();
        // Room for the receiver and uuid added afterwards.
        let room = BODY_MAX_BYTES - 256;
        let largest = bodies
            .iter()
            .map(|b| serde_json::to_vec(b).map_or(0, |v| v.len()))
            .max()
            .unwrap_or(0);
        if largest <= room || max <= MIN_TEXT_BYTES {
            return bodies;
        }
        max = max.saturating_sub(largest - room).max(MIN_TEXT_BYTES);
    }
}

/// A robot body as an app body: the same content, moved into a JSON string.
fn from_robot(body: &Value) -> Value {
    let msg_type = body["msg_type"].as_str().unwrap_or("text");
    let content = match msg_type {
        "post" => &body["content"]["post"],
        "interactive" => &body["card"],
        _ => &body["content"],
    };
    json!({"msg_type": msg_type, "content": content.to_string()})
}

/// A raw body with its content as a JSON string. Anything else than an object is left alone:
/// Lark refuses it, which is the answer the sender should see.
fn from_raw(raw: &Value) -> Value {
    let mut body = raw.clone();
    if let Some(fields) = body.as_object_mut() {
        if !fields.contains_key("content") {
            if let Some(card) = fields.remove("card") {
                fields.insert("content".into(), card);
            }
        }
        if let Some(content) = fields.get_mut("content") {
            if !content.is_string() {
                *content = Value::String(content.to_string());
            }
        }
    }
    body
}

/// Classifies an `im/v1/messages` answer. Lark answers business errors with HTTP 400 and a
/// `code`, so token, rate-limit and recipient codes are recognised whatever the HTTP status;
/// any other non-2xx goes by its status.
pub fn classify(status: u16, body: &[u8]) -> Answer {
    let mut answer = outbound::classify(status, body, &["code"], by_code);
    match answer.code {
        // The message is fine; the token is not. The caller refreshes it and retries once; a
        // second refusal is worth a retry later, not a dead letter.
        Some(code) if is_token_rejected(code) => answer.class = Class::Transient,
        Some(code) if is_rate_limit(code) => answer.class = Class::RateLimited { pause: None },
        _ => {}
    }
    answer
}

fn by_code(code: i64) -> Class {
    if is_rate_limit(code) {
        Class::RateLimited { pause: None }
    } else {
        // Recipient errors (see `is_recipient_error`), 10014 (bad app secret), 230002 (bot
        // not in the chat), ...: resending the same request cannot help.
        Class::Permanent
    }
}

/// 11232 (tenant: 100/min, 5/s) and 230020 (per chat). [U] 99991400 is Lark's generic API
/// frequency limit; pausing costs less than dead-lettering a message that would go.
fn is_rate_limit(code: i64) -> bool {
    matches!(code, 11232 | 230020 | 99991400)
}

/// Whether `code` says the tenant access token is missing, invalid or expired: forget it,
/// fetch another and send again. [U] The set is Lark's access-token family (99991661
/// missing, 99991663 invalid tenant token, 99991677 expired, …) as SDKs handle them;
/// PROTOCOLS.md lists none.
pub fn is_token_rejected(code: i64) -> bool {
    matches!(
        code,
        99991661 | 99991663 | 99991664 | 99991665 | 99991668 | 99991677
    )
}

/// Whether `code` says the receiver cannot get the message: the bot cannot reach this user
/// (230013), or the receive id is not valid (230001, 99992351, 99992361). Permanent for
/// this receiver only.
pub fn is_recipient_error(code: i64) -> bool {
    matches!(code, 230013 | 230001 | 99992351 | 99992361)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Format, Mentions};
    use crate::platform::outbound::LarkMarkdown;
    use std::time::Duration;

    fn content(body: &Value) -> Value {
        serde_json::from_str(body["content"].as_str().expect("content is a string"))
            .expect("content is JSON")
    }

    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(20, 60)
    }

    #[test]
    fn token_request_posts_the_credentials() {
        let req = token_request("https://open.feishu.cn/", "cli_1", "s3cret");
        assert_eq!(
            req.url,
            "https://open.feishu.cn/open-apis/auth/v3/tenant_access_token/internal"
        );
        assert_eq!(
            req.json,
            Some(json!({"app_id": "cli_1", "app_secret": "s3cret"}))
        );
    }

    #[test]
    fn parses_tokens() {
        let ok = br#"{"code":0,"msg":"ok","tenant_access_token":"t-abc","expire":7140}"#;
        assert_eq!(
            parse_token(200, ok).unwrap(),
            IssuedToken {
                token: "t-abc".into(),
                expires_in: Duration::from_secs(7140)
            }
        );
        let cases: &[(u16, &str, Class)] = &[
            (
                200,
                r#"{"code":10014,"msg":"app secret invalid"}"#,
                Class::Permanent,
            ),
            (400, r#"{"code":10014}"#, Class::Permanent),
            (
                400,
                r#"{"code":99991400}"#,
                Class::RateLimited { pause: None },
            ),
            (503, "", Class::Transient),
            (200, "garbage", Class::Transient),
            (200, r#"{"code":0,"msg":"ok"}"#, Class::Transient),
        ];
        for (status, body, class) in cases {
            let a = parse_token(*status, body.as_bytes()).unwrap_err();
            assert_eq!((a.class, a.status), (*class, *status), "{status} {body}");
        }
    }

    #[test]
    fn receive_id_types() {
        for (id, t) in [
            ("ou_7d8a6e6df7621556ce0d21922b676706ccs", "open_id"),
            ("on_94a1ee5551019f18cd73d9f111898cf2", "union_id"),
            ("oc_a0553eda9014c201e6969b478895c230", "chat_id"),
            ("zhangsan@example.com", "email"),
            ("4d7a3c6g", "user_id"),
        ] {
            assert_eq!(receive_id_type(id), t, "{id}");
        }
        assert_eq!(
            send_url("http://127.0.0.1:9/", "open_id"),
            "http://127.0.0.1:9/open-apis/im/v1/messages?receive_id_type=open_id"
        );
    }

    #[test]
    fn uuid_is_stable_short_and_per_part() {
        assert_eq!(uuid("msg-1", 1), "26f674d32d92d72c122e0d247758b003");
        assert_eq!(uuid("msg-1", 2), "53dd47f6007e8ca43f3aa7559830700f");
        let long = "x".repeat(500);
        assert!(uuid(&long, 1).len() <= UUID_MAX_CHARS);
    }

    #[test]
    fn text_with_title_url_and_mentions() {
        let n = Notification {
            title: Some("构建失败".into()),
            text: "main 分支测试未通过".into(),
            format: Format::Text,
            url: Some("https://ci.example.com/7".into()),
            mentions: Mentions {
                user_ids: vec!["ou_1".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let bodies = render(&n, &RenderOptions::default(), "ou_9", "msg-1");
        assert_eq!(
            bodies,
            [json!({
                "receive_id": "ou_9",
                "msg_type": "text",
                "content": r#"{"text":"构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7 <at user_id=\"ou_1\"></at>"}"#,
                "uuid": "26f674d32d92d72c122e0d247758b003",
            })]
        );
        assert_eq!(
            content(&bodies[0]),
            json!({"text": "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7 <at user_id=\"ou_1\"></at>"})
        );
    }

    #[test]
    fn card_with_title_and_url() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            ..Default::default()
        };
        let bodies = render(&n, &RenderOptions::default(), "a@example.com", "msg-1");
        assert_eq!(bodies.len(), 1);
        assert_eq!(bodies[0]["msg_type"], "interactive");
        assert_eq!(bodies[0]["receive_id"], "a@example.com");
        assert_eq!(
            content(&bodies[0]),
            json!({
                "header": {"title": {"tag": "plain_text", "content": "Bug #12"}, "template": "blue"},
                "elements": [{"tag": "markdown", "content":
                    "张三创建了 Bug\n[查看详情](https://zentao.example.com/bug-view-12.html)"}],
            })
        );
    }

    #[test]
    fn post_content_is_the_language_object() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            ..Default::default()
        };
        let opts = RenderOptions {
            lark_markdown: LarkMarkdown::Post,
            ..Default::default()
        };
        let bodies = render(&n, &opts, "ou_9", "msg-1");
        assert_eq!(bodies[0]["msg_type"], "post");
        assert_eq!(
            content(&bodies[0]),
            json!({"zh_cn": {
                "title": "Bug #12",
                "content": [
                    [{"tag": "text", "text": "张三创建了 Bug"}],
                    [{"tag": "a", "text": "查看详情", "href": "https://zentao.example.com/bug-view-12.html"}],
                ],
            }})
        );
    }

    #[test]
    fn long_text_is_split_with_a_uuid_per_part() {
        let text = long_chinese();
        let n = Notification {
            text: text.clone(),
            format: Format::Text,
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(300),
            ..Default::default()
        };
        let bodies = render(&n, &opts, "ou_9", "msg-1");
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            assert_eq!(b["uuid"], uuid("msg-1", i + 1));
            let t = content(b)["text"].as_str().unwrap().to_owned();
            joined.push_str(t.strip_prefix(&format!("({}/{k}) ", i + 1)).unwrap());
        }
        assert_eq!(joined, text);
        // Delivered again, the same uuids.
        assert_eq!(render(&n, &opts, "ou_9", "msg-1"), bodies);
    }

    #[test]
    fn quoting_content_counts_against_the_limit() {
        let n = Notification {
            text: "\"a\"\n".repeat(20_000),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(100_000),
            ..Default::default()
        };
        let bodies = render(&n, &opts, "ou_9", "msg-1");
        assert!(bodies.len() > 1);
        for b in &bodies {
            assert!(serde_json::to_vec(b).unwrap().len() <= BODY_MAX_BYTES);
        }
    }

    #[test]
    fn raw_gets_receiver_and_uuid() {
        let cases = [
            json!({"msg_type": "share_chat", "content": {"share_chat_id": "oc_1"}}),
            json!({"msg_type": "share_chat", "content": "{\"share_chat_id\":\"oc_1\"}"}),
        ];
        for raw in cases {
            let n = Notification {
                raw: Some(raw),
                ..Default::default()
            };
            let bodies = render(&n, &RenderOptions::default(), "ou_9", "msg-1");
            assert_eq!(bodies.len(), 1);
            assert_eq!(bodies[0]["receive_id"], "ou_9");
            assert_eq!(bodies[0]["uuid"], uuid("msg-1", 1));
            assert_eq!(bodies[0]["msg_type"], "share_chat");
            assert_eq!(content(&bodies[0]), json!({"share_chat_id": "oc_1"}));
        }
        let n = Notification {
            raw: Some(json!({"msg_type": "interactive", "card": {"elements": []}})),
            ..Default::default()
        };
        let body = &render(&n, &RenderOptions::default(), "ou_9", "s")[0];
        assert!(body.get("card").is_none());
        assert_eq!(content(body), json!({"elements": []}));
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (
                200,
                r#"{"code":0,"msg":"success","data":{"message_id":"om_1"}}"#,
                Class::Ok,
                Some(0),
            ),
            (
                200,
                r#"{"code":11232}"#,
                Class::RateLimited { pause: None },
                Some(11232),
            ),
            (
                400,
                r#"{"code":11232}"#,
                Class::RateLimited { pause: None },
                Some(11232),
            ),
            (
                400,
                r#"{"code":230020}"#,
                Class::RateLimited { pause: None },
                Some(230020),
            ),
            (429, "", Class::RateLimited { pause: None }, None),
            (500, "", Class::Transient, None),
            (200, "not json", Class::Transient, None),
            (400, r#"{"code":230013}"#, Class::Permanent, Some(230013)),
            (400, r#"{"code":230001}"#, Class::Permanent, Some(230001)),
            (
                400,
                r#"{"code":99992351}"#,
                Class::Permanent,
                Some(99992351),
            ),
            (
                400,
                r#"{"code":99992361}"#,
                Class::Permanent,
                Some(99992361),
            ),
            (400, r#"{"code":230002}"#, Class::Permanent, Some(230002)),
            (400, "bad request", Class::Permanent, None),
        ];
        for (status, body, class, code) in cases {
            let a = classify(*status, body.as_bytes());
            assert_eq!(
                (a.class, a.code, a.status),
                (*class, *code, *status),
                "{status} {body}"
            );
        }
        for code in [99991661, 99991663, 99991664, 99991665, 99991668, 99991677] {
            assert!(is_token_rejected(code), "{code}");
            for status in [200, 400, 401, 403, 500] {
                let body = format!(r#"{{"code":{code},"msg":"invalid access token"}}"#);
                let a = classify(status, body.as_bytes());
                assert_eq!(
                    (a.class, a.code),
                    (Class::Transient, Some(code)),
                    "{status}"
                );
            }
        }
        for code in [230013, 230001, 99992351, 99992361] {
            assert!(is_recipient_error(code));
        }
        assert!(!is_recipient_error(230002) && !is_token_rejected(0));
    }
}
