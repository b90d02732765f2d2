//! DingTalk custom group robot (PROTOCOLS.md §3): the signed webhook URL, the `text` and
//! `markdown` bodies with their @mentions, cut to the size limit, and what an answer means.
//! Pure functions; sending is the caller's business.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::message::{Format, Mentions, Notification};
use crate::platform::outbound::{self, cut, non_empty, Answer, Class, RenderOptions};

/// Byte limit of a robot message's text. [U] PROTOCOLS.md gives no size limit for robots; 20000
/// bytes is the figure commonly cited for them.
pub const DEFAULT_MAX_BYTES: usize = 20_000;

/// DingTalk shows the markdown `title` only in pushes and the conversation list, where a long
/// one is cut anyway; cutting it ourselves keeps the part marker visible.
pub const TITLE_MAX_BYTES: usize = 64;

/// The robot's `sign` parameter: base64 of HMAC-SHA256 with key = secret over
/// `"{timestamp_ms}\n{secret}"` (PROTOCOLS.md §3.1). Lark swaps key and message.
pub fn sign(secret: &str, timestamp_ms: u64) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp_ms}\n{secret}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// The URL to post to: with a signing secret, `timestamp` and the URL-encoded `sign` appended;
/// without one (a robot secured by keywords or an IP whitelist), the webhook URL as it is.
pub fn signed_url(webhook_url: &str, secret: Option<&str>, timestamp_ms: u64) -> String {
    let Some(secret) = secret else {
        return webhook_url.to_owned();
    };
    // Form encoding turns the base64 `+`, `/` and `=` into %2B, %2F and %3D, as DingTalk wants.
    let query = serde_urlencoded::to_string([
        ("timestamp", timestamp_ms.to_string()),
        ("sign", sign(secret, timestamp_ms)),
    ])
    .expect("string pairs always encode");
    let separator = if !webhook_url.contains('?') {
        "?"
    } else if webhook_url.ends_with(['?', '&']) {
        ""
    } else {
        "&"
    };
    format!("{webhook_url}{separator}{query}")
}

/// The request bodies for a notification, one per part: `raw` as it is, otherwise a `text` or
/// `markdown` message cut to `opts.max_bytes` (default [`DEFAULT_MAX_BYTES`]). When there are
/// several parts, the title (or, without one, the text) is numbered, and the link and the
/// @mentions go with the last part only, so that people are notified once, when it is complete.
pub fn render(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    if let Some(raw) = &n.raw {
        return vec![raw.clone()];
    }
    let max = opts.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    let title = non_empty(n.title.as_deref());
    let url = non_empty(n.url.as_deref());
    let mentioned = mention_suffix(&n.mentions);
    match n.format {
        Format::Text => {
            let head = title.map_or(0, |t| t.len() + "\n".len());
            let tail = url.map(|u| format!("\n{u}")).unwrap_or_default() + &mentioned;
            cut(&n.text, max, head + tail.len(), opts.too_long)
                .into_iter()
                .map(|p| {
                    let content = p.compose(title, |t| format!("{t}\n"), &tail);
                    json!({
                        "msgtype": "text",
                        "text": {"content": content},
                        "at": at(&n.mentions, p.is_last()),
                    })
                })
                .collect()
        }
        Format::Markdown => {
            let head = title.map_or(0, |t| "#### ".len() + t.len() + "\n\n".len());
            let tail = url
                .map(|u| format!("\n\n[{}]({u})", opts.link_text))
                .unwrap_or_default()
                + &mentioned;
            let short = title.unwrap_or_else(|| first_line(&n.text));
            cut(&n.text, max, head + tail.len(), opts.too_long)
                .into_iter()
                .map(|p| {
                    // Without a title the message body shows none, so the number goes in the
                    // text; the notification title is numbered either way.
                    let text = p.compose(title, |t| format!("#### {t}\n\n"), &tail);
                    let suffix = p.title_suffix();
                    let shown = outbound::truncate_utf8(short, TITLE_MAX_BYTES - suffix.len());
                    json!({
                        "msgtype": "markdown",
                        "markdown": {"title": shown + &suffix, "text": text},
                        "at": at(&n.mentions, p.is_last()),
                    })
                })
                .collect()
        }
    }
}

/// Classifies the robot's answer. DingTalk answers HTTP 200 to errors too, so `errcode` decides
/// (PROTOCOLS.md §3.3).
pub fn classify(status: u16, body: &[u8]) -> Answer {
    outbound::classify(status, body, &["errcode"], |code| match code {
        // 130101 is the code observed; 410100 is the one newer docs name [U].
        130101 | 410100 => Class::RateLimited { pause: None },
        // "System busy".
        -1 => Class::Transient,
        // 310000 (keyword, timestamp, sign or IP whitelist), 300001 (no such token), 400004
        // (only the owner may @all), 90030 (quota): resending the same request cannot help.
        _ => Class::Permanent,
    })
}

/// The first line that says something, without markdown heading markers: what a reader takes
/// for the title when there is none.
fn first_line(text: &str) -> &str {
    text.lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// DingTalk only notifies a mentioned mobile or userId that also appears as `@…` in the text.
/// `@all` needs nothing in the text, only `isAtAll`.
fn mention_suffix(m: &Mentions) -> String {
    let names: Vec<String> = m
        .mobiles
        .iter()
        .chain(&m.user_ids)
        .map(|x| format!("@{x}"))
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!("\n\n{}", names.join(" "))
    }
}

/// The `at` object; `users` (internal account names) are resolved into mobiles and user ids
/// before rendering, so they are not looked at here.
fn at(m: &Mentions, last: bool) -> Value {
    if last {
        json!({"atMobiles": m.mobiles, "atUserIds": m.user_ids, "isAtAll": m.all})
    } else {
        json!({"atMobiles": [], "atUserIds": [], "isAtAll": false})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Value {
        let all: Value =
            serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json"))
                .unwrap();
        all["dingtalk_robot_sign"].clone()
    }

    fn mentions() -> Mentions {
        Mentions {
            users: vec!["zhangsan".into()],
            mobiles: vec!["13800000000".into()],
            user_ids: vec!["u1".into(), "u2".into()],
            all: false,
        }
    }

    fn no_at() -> Value {
        json!({"atMobiles": [], "atUserIds": [], "isAtAll": false})
    }

    /// Twenty numbered lines, then a paragraph with neither newline nor space, so the cutter
    /// has to cut between characters too.
    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(20, 60)
    }

    #[test]
    fn sign_matches_the_vector() {
        let v = vector();
        let secret = v["secret"].as_str().unwrap();
        let ts = v["timestamp_ms"].as_u64().unwrap();
        assert_eq!(
            sign(secret, ts),
            v["expected_sign_base64"].as_str().unwrap()
        );
        assert_eq!(
            signed_url(
                "https://oapi.dingtalk.com/robot/send?access_token=ACCESS_TOKEN",
                Some(secret),
                ts
            ),
            v["expected_url"].as_str().unwrap()
        );
        assert!(v["expected_url"]
            .as_str()
            .unwrap()
            .ends_with(v["expected_sign_urlencoded"].as_str().unwrap()));
    }

    #[test]
    fn signed_url_separators_and_no_secret() {
        let v = vector();
        let secret = v["secret"].as_str().unwrap();
        let tail = format!(
            "timestamp=1700000000000&sign={}",
            v["expected_sign_urlencoded"].as_str().unwrap()
        );
        assert_eq!(
            signed_url("https://robot.example/send", Some(secret), 1700000000000),
            format!("https://robot.example/send?{tail}")
        );
        assert_eq!(
            signed_url("https://robot.example/send?", Some(secret), 1700000000000),
            format!("https://robot.example/send?{tail}")
        );
        assert_eq!(
            signed_url(
                "https://robot.example/send?a=1&",
                Some(secret),
                1700000000000
            ),
            format!("https://robot.example/send?a=1&{tail}")
        );
        assert_eq!(
            signed_url("https://robot.example/send?access_token=x", None, 1),
            "https://robot.example/send?access_token=x"
        );
    }

    #[test]
    fn text_plain() {
        let n = Notification {
            text: "构建成功".into(),
            format: Format::Text,
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({"msgtype": "text", "text": {"content": "构建成功"}, "at": no_at()})]
        );
    }

    #[test]
    fn text_with_title_url_and_mentions() {
        let n = Notification {
            title: Some("构建失败".into()),
            text: "main 分支测试未通过".into(),
            format: Format::Text,
            url: Some("https://ci.example.com/7".into()),
            mentions: Mentions {
                all: true,
                ..mentions()
            },
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msgtype": "text",
                "text": {"content": "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7\n\n@13800000000 @u1 @u2"},
                "at": {"atMobiles": ["13800000000"], "atUserIds": ["u1", "u2"], "isAtAll": true},
            })]
        );
    }

    #[test]
    fn at_all_alone_adds_nothing_to_the_text() {
        let n = Notification {
            text: "全员注意".into(),
            format: Format::Text,
            mentions: Mentions {
                all: true,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msgtype": "text",
                "text": {"content": "全员注意"},
                "at": {"atMobiles": [], "atUserIds": [], "isAtAll": true},
            })]
        );
    }

    #[test]
    fn markdown_plain_takes_the_first_line_as_title() {
        let n = Notification {
            text: "\n## 发布完成\n版本 1.2.3".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msgtype": "markdown",
                "markdown": {"title": "发布完成", "text": "\n## 发布完成\n版本 1.2.3"},
                "at": no_at(),
            })]
        );
    }

    #[test]
    fn markdown_with_title_url_and_mentions() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            link_text: "打开".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &opts),
            [json!({
                "msgtype": "markdown",
                "markdown": {
                    "title": "Bug #12",
                    "text": "#### Bug #12\n\n张三创建了 Bug\n\n[打开](https://zentao.example.com/bug-view-12.html)\n\n@13800000000 @u1 @u2",
                },
                "at": {"atMobiles": ["13800000000"], "atUserIds": ["u1", "u2"], "isAtAll": false},
            })]
        );
    }

    #[test]
    fn markdown_title_is_cut_to_64_bytes() {
        let n = Notification {
            title: Some("很长的标题".repeat(10)),
            text: "x".into(),
            ..Default::default()
        };
        let body = &render(&n, &RenderOptions::default())[0];
        let title = body["markdown"]["title"].as_str().unwrap();
        assert!(title.len() <= TITLE_MAX_BYTES, "{title}");
        assert!(title.starts_with("很长的标题") && title.ends_with(outbound::TRUNCATED));
        // The heading in the text keeps the whole title.
        assert!(body["markdown"]["text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("#### {}", "很长的标题".repeat(10))));
    }

    #[test]
    fn raw_passes_through() {
        let raw = json!({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x"}});
        let n = Notification {
            text: "ignored".into(),
            raw: Some(raw.clone()),
            mentions: mentions(),
            ..Default::default()
        };
        assert_eq!(render(&n, &RenderOptions::default()), [raw]);
    }

    #[test]
    fn long_text_is_split_with_mentions_on_the_last_part() {
        let text = long_chinese();
        let n = Notification {
            title: Some("部署失败".into()),
            text: text.clone(),
            format: Format::Text,
            url: Some("https://ci.example.com/1".into()),
            mentions: Mentions {
                all: true,
                ..mentions()
            },
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(300),
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let tail = "\nhttps://ci.example.com/1\n\n@13800000000 @u1 @u2";
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let content = b["text"]["content"].as_str().unwrap();
            assert!(content.len() <= 300, "part {i}: {} bytes", content.len());
            let rest = content
                .strip_prefix(&format!("部署失败 ({}/{k})\n", i + 1))
                .unwrap();
            if i + 1 < k {
                assert_eq!(b["at"], no_at());
                assert!(!rest.contains('@') && !rest.contains("https://"), "{rest}");
                joined.push_str(rest);
            } else {
                assert_eq!(
                    b["at"],
                    json!({"atMobiles": ["13800000000"], "atUserIds": ["u1", "u2"], "isAtAll": true})
                );
                joined.push_str(rest.strip_suffix(tail).unwrap());
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn long_markdown_without_title_is_numbered_in_text_and_title() {
        let text = long_chinese();
        let n = Notification {
            text: text.clone(),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(400),
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let marker = format!("{}/{k}", i + 1);
            // The first line is longer than a notification title may be: cut, then numbered.
            let title = b["markdown"]["title"].as_str().unwrap();
            assert!(title.len() <= TITLE_MAX_BYTES, "{title}");
            assert!(title.starts_with("第1行：数据库连接池耗尽"), "{title}");
            assert!(title.ends_with(&format!("{} ({marker})", outbound::TRUNCATED)));
            let md = b["markdown"]["text"].as_str().unwrap();
            assert!(md.len() <= 400, "part {i}: {} bytes", md.len());
            let rest = md.strip_prefix(&format!("({marker}) ")).unwrap();
            if i + 1 < k {
                assert_eq!(b["at"], no_at());
                joined.push_str(rest);
            } else {
                assert_eq!(b["at"]["atUserIds"], json!(["u1", "u2"]));
                joined.push_str(rest.strip_suffix("\n\n@13800000000 @u1 @u2").unwrap());
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn many_parts_widen_the_marker() {
        let text = "a".repeat(64 * 15);
        let n = Notification {
            text: text.clone(),
            format: Format::Text,
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(10),
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        assert_eq!(bodies.len(), 15);
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let content = b["text"]["content"].as_str().unwrap();
            joined.push_str(content.strip_prefix(&format!("({}/15) ", i + 1)).unwrap());
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn truncation_keeps_one_part_with_everything() {
        let n = Notification {
            title: Some("部署失败".into()),
            text: long_chinese(),
            format: Format::Text,
            url: Some("https://ci.example.com/1".into()),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(300),
            too_long: outbound::TooLong::Truncate,
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        assert_eq!(bodies.len(), 1);
        let content = bodies[0]["text"]["content"].as_str().unwrap();
        assert!(content.len() <= 300, "{} bytes", content.len());
        assert!(content.starts_with("部署失败\n第1行"));
        assert!(content.ends_with(&format!(
            "{}\nhttps://ci.example.com/1\n\n@13800000000 @u1 @u2",
            outbound::TRUNCATED
        )));
        assert_eq!(bodies[0]["at"]["atMobiles"], json!(["13800000000"]));
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (200, r#"{"errcode":0,"errmsg":"ok"}"#, Class::Ok, Some(0)),
            (
                200,
                r#"{"errcode":130101,"errmsg":"send too fast"}"#,
                Class::RateLimited { pause: None },
                Some(130101),
            ),
            (
                200,
                r#"{"errcode":410100,"errmsg":"too fast"}"#,
                Class::RateLimited { pause: None },
                Some(410100),
            ),
            (
                200,
                r#"{"errcode":-1,"errmsg":"busy"}"#,
                Class::Transient,
                Some(-1),
            ),
            (
                200,
                r#"{"errcode":310000,"errmsg":"sign not match"}"#,
                Class::Permanent,
                Some(310000),
            ),
            (200, r#"{"errcode":300001}"#, Class::Permanent, Some(300001)),
            (200, r#"{"errcode":400004}"#, Class::Permanent, Some(400004)),
            (200, r#"{"errcode":90030}"#, Class::Permanent, Some(90030)),
            (200, "<html>gateway</html>", Class::Transient, None),
            (200, r#"{"ok":true}"#, Class::Transient, None),
            (429, "", Class::RateLimited { pause: None }, None),
            (502, "bad gateway", Class::Transient, None),
            (503, r#"{"errcode":-1}"#, Class::Transient, Some(-1)),
            (404, "not found", Class::Permanent, None),
            (400, r#"{"errcode":0}"#, Class::Permanent, Some(0)),
        ];
        for (status, body, class, code) in cases {
            let a = classify(*status, body.as_bytes());
            assert_eq!(
                (a.class, a.code, a.status),
                (*class, *code, *status),
                "{status} {body}"
            );
            assert_eq!(a.detail, outbound::detail(body.as_bytes()));
        }
    }
}
