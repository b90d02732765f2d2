//! Lark / Feishu custom bot (PROTOCOLS.md §8.1): the signature that goes into the body, the
//! `text`, `interactive` (card) and `post` bodies with their @mentions, cut to the size limit,
//! and what an answer means. Pure functions; sending is the caller's business.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::message::{Format, Mentions, Notification};
use crate::platform::outbound::{
    self, cut, non_empty, Answer, Class, LarkMarkdown, RenderOptions, TooLong,
};

/// Byte limit of a message's text: the request body may be 20 KB, and this leaves about 2 KB
/// for the envelope (msg_type, card header, JSON quoting).
pub const DEFAULT_MAX_BYTES: usize = 18_000;

/// A card or post needs a title; without one, the first line of the text stands in, cut to
/// this length since it is only a stand-in (a title given is kept whole).
pub const TITLE_MAX_BYTES: usize = 64;

/// The bot's `sign`: base64 of HMAC-SHA256 keyed with `"{timestamp_s}\n{secret}"` over an
/// empty message (PROTOCOLS.md §8.1). DingTalk's arrangement (key = secret, that string as the
/// message) gives another value, which Lark refuses with 19021.
pub fn sign(secret: &str, timestamp_s: u64) -> String {
    let key = format!("{timestamp_s}\n{secret}");
    let mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    BASE64.encode(mac.finalize().into_bytes())
}

/// Puts `timestamp` (a string of seconds) and `sign` at the top of the body when the bot has a
/// signing secret. A body that is not a JSON object (only a `raw` one can be) has nowhere to
/// put them and is left alone; Lark will refuse it either way.
pub fn apply_signature(body: &mut Value, secret: Option<&str>, timestamp_s: u64) {
    let (Some(secret), Some(fields)) = (secret, body.as_object_mut()) else {
        return;
    };
    fields.insert("timestamp".into(), Value::String(timestamp_s.to_string()));
    fields.insert("sign".into(), Value::String(sign(secret, timestamp_s)));
}

/// The request bodies for a notification, one per part: `raw` as it is, otherwise a `text`
/// message, or for markdown a card or a post as `opts.lark_markdown` says, cut to
/// `opts.max_bytes` (default [`DEFAULT_MAX_BYTES`]). When there are several parts, the title
/// (or, for text without one, the text) is numbered, and the link and the @mentions go with
/// the last part only, so that people are notified once, when it is complete.
///
/// Lark mentions by open_id or everyone, never by mobile: `mentions.mobiles` are left out.
pub fn render(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    if let Some(raw) = &n.raw {
        return vec![raw.clone()];
    }
    let mut max = opts.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    // The limit is on the whole body, and JSON escaping (quotes, newlines) and a post's
    // per-line wrappers grow it past the text: measure, and cut finer while a body is over.
    loop {
        let bodies = match (n.format, opts.lark_markdown) {
            (Format::Text, _) => render_text(n, max, opts.too_long),
            (Format::Markdown, LarkMarkdown::Card) => render_card(n, max, opts),
            (Format::Markdown, LarkMarkdown::Post) => render_post(n, max, opts),
        };
        let largest = bodies
            .iter()
            .map(|b| serde_json::to_vec(b).map_or(0, |v| v.len()))
            .max()
            .unwrap_or(0);
        if largest <= BODY_MAX_BYTES - SIGNATURE_ROOM || max <= 1024 {
            return bodies;
        }
        max = max
            .saturating_sub(largest - (BODY_MAX_BYTES - SIGNATURE_ROOM))
            .max(1024);
    }
}

/// Largest request body Lark accepts (PROTOCOLS.md §8.1).
pub const BODY_MAX_BYTES: usize = 20 * 1024;

/// Room left in a body for the `timestamp` and `sign` fields added when sending.
const SIGNATURE_ROOM: usize = 128;

fn render_text(n: &Notification, max: usize, too_long: TooLong) -> Vec<Value> {
    let title = non_empty(n.title.as_deref());
    let mut tail = non_empty(n.url.as_deref())
        .map(|u| format!("\n{u}"))
        .unwrap_or_default();
    for id in &n.mentions.user_ids {
        tail.push_str(&format!(" <at user_id=\"{id}\"></at>"));
    }
    if n.mentions.all {
        tail.push_str(" <at user_id=\"all\">所有人</at>");
    }
    let head = title.map_or(0, |t| t.len() + "\n".len());
    cut(&n.text, max, head + tail.len(), too_long)
        .into_iter()
        .map(|p| {
            let text = p.compose(title, |t| format!("{t}\n"), &tail);
            json!({"msg_type": "text", "content": {"text": text}})
        })
        .collect()
}

/// The card ZenTao sends: a blue header with the title, the text as one markdown element.
fn render_card(n: &Notification, max: usize, opts: &RenderOptions) -> Vec<Value> {
    let title = title_or_first_line(n);
    let mut tail = non_empty(n.url.as_deref())
        .map(|u| format!("\n[{}]({u})", opts.link_text))
        .unwrap_or_default();
    let ats: Vec<String> = mentioned(&n.mentions)
        .map(|id| format!("<at id={id}></at>"))
        .collect();
    if !ats.is_empty() {
        tail.push('\n');
        tail.push_str(&ats.join(" "));
    }
    // The limit is on the whole body, so the header counts too.
    cut(&n.text, max, title.len() + tail.len(), opts.too_long)
        .into_iter()
        .map(|p| {
            let mut text = p.text.clone();
            if p.is_last() {
                text.push_str(&tail);
            }
            json!({
                "msg_type": "interactive",
                "card": {
                    "header": {
                        "title": {"tag": "plain_text", "content": format!("{title}{}", p.title_suffix())},
                        "template": "blue",
                    },
                    "elements": [{"tag": "markdown", "content": text}],
                },
            })
        })
        .collect()
}

/// A rich-text post: one row per line of text (a post has no markdown), then a row with the
/// link, then a row with the mentions.
fn render_post(n: &Notification, max: usize, opts: &RenderOptions) -> Vec<Value> {
    let title = title_or_first_line(n);
    let url = non_empty(n.url.as_deref());
    let others = title.len()
        + url.map_or(0, |u| opts.link_text.len() + u.len())
        + mentioned(&n.mentions).map(str::len).sum::<usize>();
    cut(&n.text, max, others, opts.too_long)
        .into_iter()
        .map(|p| {
            let mut rows: Vec<Value> = p
                .text
                .lines()
                .map(|line| json!([{"tag": "text", "text": line}]))
                .collect();
            if p.is_last() {
                if let Some(u) = url {
                    rows.push(json!([{"tag": "a", "text": opts.link_text, "href": u}]));
                }
                let ats: Vec<Value> = mentioned(&n.mentions)
                    .map(|id| json!({"tag": "at", "user_id": id}))
                    .collect();
                if !ats.is_empty() {
                    rows.push(Value::Array(ats));
                }
            }
            json!({
                "msg_type": "post",
                "content": {"post": {"zh_cn": {
                    "title": format!("{title}{}", p.title_suffix()),
                    "content": rows,
                }}},
            })
        })
        .collect()
}

/// The ids to mention, `all` meaning everyone. `users` (internal account names) are resolved
/// into open_ids before rendering, so they are not looked at here.
fn mentioned(m: &Mentions) -> impl Iterator<Item = &str> {
    m.user_ids
        .iter()
        .map(String::as_str)
        .chain(m.all.then_some("all"))
}

/// Classifies the bot's answer. Lark answers HTTP 200 to errors too, so `code` decides, or
/// `StatusCode` from older deployments (PROTOCOLS.md §8.1).
pub fn classify(status: u16, body: &[u8]) -> Answer {
    outbound::classify(status, body, &["code", "StatusCode"], |code| match code {
        // 11232 is the frequency limit, the only documented one (HTTP 429 aside). 9499 is
        // "bad request": a fault of this message, so it fails this message only. Were it taken
        // as "too fast", one crafted message could pause the bot for everyone.
        11232 => Class::RateLimited { pause: None },
        // 19021 (sign or timestamp), 19001 (bad token), 19024 (keyword), 19022 (IP), ...:
        // resending the same request cannot help.
        _ => Class::Permanent,
    })
}

/// The title given, or else the first line that says something, without markdown heading
/// markers and cut to [`TITLE_MAX_BYTES`].
fn title_or_first_line(n: &Notification) -> String {
    if let Some(t) = non_empty(n.title.as_deref()) {
        return t.to_owned();
    }
    let first = n
        .text
        .lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .find(|l| !l.is_empty())
        .unwrap_or("");
    outbound::truncate_utf8(first, TITLE_MAX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Value {
        let all: Value =
            serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json"))
                .unwrap();
        all["lark"]["L5_custom_bot_sign"].clone()
    }

    fn mentions() -> Mentions {
        Mentions {
            users: vec!["zhangsan".into()],
            mobiles: vec!["13800000000".into()],
            user_ids: vec!["ou_1".into(), "ou_2".into()],
            all: false,
        }
    }

    fn post() -> RenderOptions {
        RenderOptions {
            lark_markdown: LarkMarkdown::Post,
            ..Default::default()
        }
    }

    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(20, 60)
    }

    #[test]
    fn sign_matches_the_l5_vector() {
        let v = vector();
        let secret = v["secret"].as_str().unwrap();
        let ts = v["timestamp_s"].as_u64().unwrap();
        assert_eq!(sign(secret, ts), v["expected_sign"].as_str().unwrap());
    }

    #[test]
    fn dingtalk_arrangement_gives_the_documented_wrong_value() {
        let v = vector();
        let secret = v["secret"].as_str().unwrap();
        let ts = v["timestamp_s"].as_u64().unwrap();
        let wrong = crate::platform::dingtalk::robot::sign(secret, ts);
        assert_eq!(
            wrong,
            v["dingtalk_style_(WRONG_for_lark)"].as_str().unwrap()
        );
        assert_ne!(wrong, sign(secret, ts));
    }

    #[test]
    fn signed_text_body_matches_the_vector() {
        let v = vector();
        let n = Notification {
            text: "hello".into(),
            format: Format::Text,
            ..Default::default()
        };
        let mut bodies = render(&n, &RenderOptions::default());
        assert_eq!(bodies.len(), 1);
        apply_signature(
            &mut bodies[0],
            v["secret"].as_str(),
            v["timestamp_s"].as_u64().unwrap(),
        );
        assert_eq!(bodies[0], v["expected_body"]);
    }

    #[test]
    fn no_secret_or_no_object_leaves_the_body_alone() {
        let mut body = json!({"msg_type": "text", "content": {"text": "hello"}});
        let before = body.clone();
        apply_signature(&mut body, None, 1700000000);
        assert_eq!(body, before);
        let mut array = json!([1, 2]);
        apply_signature(&mut array, Some("s"), 1700000000);
        assert_eq!(array, json!([1, 2]));
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
            [json!({"msg_type": "text", "content": {"text": "构建成功"}})]
        );
    }

    #[test]
    fn text_with_title_url_and_mentions_ignoring_mobiles() {
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
            [json!({"msg_type": "text", "content": {"text":
                "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7 <at user_id=\"ou_1\"></at> <at user_id=\"ou_2\"></at> <at user_id=\"all\">所有人</at>"
            }})]
        );
    }

    #[test]
    fn card_plain_takes_the_first_line_as_title() {
        let n = Notification {
            text: "## 发布完成\n版本 1.2.3".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msg_type": "interactive",
                "card": {
                    "header": {"title": {"tag": "plain_text", "content": "发布完成"}, "template": "blue"},
                    "elements": [{"tag": "markdown", "content": "## 发布完成\n版本 1.2.3"}],
                },
            })]
        );
    }

    #[test]
    fn card_with_title_url_and_mentions() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            mentions: Mentions {
                all: true,
                ..mentions()
            },
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msg_type": "interactive",
                "card": {
                    "header": {"title": {"tag": "plain_text", "content": "Bug #12"}, "template": "blue"},
                    "elements": [{"tag": "markdown", "content":
                        "张三创建了 Bug\n[查看详情](https://zentao.example.com/bug-view-12.html)\n<at id=ou_1></at> <at id=ou_2></at> <at id=all></at>"
                    }],
                },
            })]
        );
    }

    #[test]
    fn post_plain() {
        let n = Notification {
            text: "发布完成\n\n版本 1.2.3".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &post()),
            [json!({"msg_type": "post", "content": {"post": {"zh_cn": {
                "title": "发布完成",
                "content": [
                    [{"tag": "text", "text": "发布完成"}],
                    [{"tag": "text", "text": ""}],
                    [{"tag": "text", "text": "版本 1.2.3"}],
                ],
            }}}})]
        );
    }

    #[test]
    fn post_with_title_url_and_mentions() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug\n请处理".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            mentions: Mentions {
                all: true,
                ..mentions()
            },
            ..Default::default()
        };
        let opts = RenderOptions {
            link_text: "打开".into(),
            ..post()
        };
        assert_eq!(
            render(&n, &opts),
            [json!({"msg_type": "post", "content": {"post": {"zh_cn": {
                "title": "Bug #12",
                "content": [
                    [{"tag": "text", "text": "张三创建了 Bug"}],
                    [{"tag": "text", "text": "请处理"}],
                    [{"tag": "a", "text": "打开", "href": "https://zentao.example.com/bug-view-12.html"}],
                    [
                        {"tag": "at", "user_id": "ou_1"},
                        {"tag": "at", "user_id": "ou_2"},
                        {"tag": "at", "user_id": "all"},
                    ],
                ],
            }}}})]
        );
    }

    #[test]
    fn raw_passes_through() {
        let raw = json!({"msg_type": "share_chat", "content": {"share_chat_id": "oc_1"}});
        let n = Notification {
            text: "ignored".into(),
            raw: Some(raw.clone()),
            mentions: mentions(),
            ..Default::default()
        };
        assert_eq!(render(&n, &RenderOptions::default()), [raw]);
    }

    #[test]
    fn long_card_is_split_with_mentions_on_the_last_part() {
        let text = long_chinese();
        let n = Notification {
            title: Some("部署失败".into()),
            text: text.clone(),
            url: Some("https://ci.example.com/1".into()),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(300),
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let tail = "\n[查看详情](https://ci.example.com/1)\n<at id=ou_1></at> <at id=ou_2></at>";
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let header = b["card"]["header"]["title"]["content"].as_str().unwrap();
            assert_eq!(header, format!("部署失败 ({}/{k})", i + 1));
            let md = b["card"]["elements"][0]["content"].as_str().unwrap();
            assert!(
                header.len() + md.len() <= 300,
                "part {i}: {} bytes",
                header.len() + md.len()
            );
            if i + 1 < k {
                assert!(!md.contains("<at") && !md.contains("https://"), "{md}");
                joined.push_str(md);
            } else {
                joined.push_str(md.strip_suffix(tail).unwrap());
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn whole_bodies_stay_under_20_kb_however_the_text_escapes() {
        // Quotes and newlines double in JSON; a post adds a wrapper per line.
        let text = "\"a\"\n".repeat(9000);
        for lark_markdown in [LarkMarkdown::Card, LarkMarkdown::Post] {
            let n = Notification {
                text: text.clone(),
                ..Default::default()
            };
            let opts = RenderOptions {
                lark_markdown,
                ..Default::default()
            };
            let bodies = render(&n, &opts);
            assert!(bodies.len() > 1);
            for b in &bodies {
                let mut signed = b.clone();
                apply_signature(&mut signed, Some("secret"), 1_700_000_000);
                let len = serde_json::to_vec(&signed).unwrap().len();
                assert!(len <= BODY_MAX_BYTES, "{lark_markdown:?}: {len} bytes");
            }
        }
    }

    #[test]
    fn long_text_without_title_is_numbered_in_the_text() {
        let text = long_chinese();
        let n = Notification {
            text: text.clone(),
            format: Format::Text,
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
        let tail =
            r#" <at user_id="ou_1"></at> <at user_id="ou_2"></at> <at user_id="all">所有人</at>"#;
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let t = b["content"]["text"].as_str().unwrap();
            assert!(t.len() <= 300, "part {i}: {} bytes", t.len());
            let rest = t.strip_prefix(&format!("({}/{k}) ", i + 1)).unwrap();
            if i + 1 < k {
                assert!(!rest.contains("<at"), "{rest}");
                joined.push_str(rest);
            } else {
                joined.push_str(rest.strip_suffix(tail).unwrap());
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn long_post_is_split_by_parts_and_lines() {
        let text = long_chinese();
        let n = Notification {
            text: text.clone(),
            url: Some("https://ci.example.com/1".into()),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(400),
            ..post()
        };
        let bodies = render(&n, &opts);
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let mut lines = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let post = &b["content"]["post"]["zh_cn"];
            assert_eq!(
                post["title"],
                format!(
                    "{} ({}/{k})",
                    outbound::truncate_utf8(
                        "第1行：数据库连接池耗尽，请值班同学尽快处理。",
                        TITLE_MAX_BYTES
                    ),
                    i + 1
                )
            );
            let rows = post["content"].as_array().unwrap();
            let (text_rows, extra) = if i + 1 < k {
                (&rows[..], &[][..])
            } else {
                rows.split_at(rows.len() - 2)
            };
            for row in text_rows {
                assert_eq!(row[0]["tag"], "text");
                lines.push_str(row[0]["text"].as_str().unwrap());
            }
            assert!(
                text_rows
                    .iter()
                    .map(|r| r[0]["text"].as_str().unwrap().len())
                    .sum::<usize>()
                    <= 400
            );
            if i + 1 == k {
                assert_eq!(
                    extra,
                    [
                        json!([{"tag": "a", "text": "查看详情", "href": "https://ci.example.com/1"}]),
                        json!([{"tag": "at", "user_id": "ou_1"}, {"tag": "at", "user_id": "ou_2"}]),
                    ]
                );
            }
        }
        // Rows drop the newlines; the characters all come back, in order.
        assert_eq!(lines, text.replace('\n', ""));
    }

    #[test]
    fn truncation_keeps_one_part_with_everything() {
        let n = Notification {
            title: Some("部署失败".into()),
            text: long_chinese(),
            url: Some("https://ci.example.com/1".into()),
            mentions: mentions(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(300),
            too_long: TooLong::Truncate,
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        assert_eq!(bodies.len(), 1);
        assert_eq!(bodies[0]["card"]["header"]["title"]["content"], "部署失败");
        let md = bodies[0]["card"]["elements"][0]["content"]
            .as_str()
            .unwrap();
        assert!("部署失败".len() + md.len() <= 300, "{} bytes", md.len());
        assert!(md.starts_with("第1行"));
        assert!(md.ends_with(&format!(
            "{}\n[查看详情](https://ci.example.com/1)\n<at id=ou_1></at> <at id=ou_2></at>",
            outbound::TRUNCATED
        )));
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (
                200,
                r#"{"code":0,"msg":"success","data":{}}"#,
                Class::Ok,
                Some(0),
            ),
            (
                200,
                r#"{"Extra":null,"StatusCode":0,"StatusMessage":"success"}"#,
                Class::Ok,
                Some(0),
            ),
            (
                200,
                r#"{"code":11232,"msg":"frequency limited"}"#,
                Class::RateLimited { pause: None },
                Some(11232),
            ),
            (
                200,
                r#"{"code":9499,"msg":"Bad Request","StatusCode":9499}"#,
                Class::Permanent,
                Some(9499),
            ),
            (
                200,
                r#"{"code":19021,"msg":"sign match fail"}"#,
                Class::Permanent,
                Some(19021),
            ),
            (200, r#"{"code":19001}"#, Class::Permanent, Some(19001)),
            (200, r#"{"code":19024}"#, Class::Permanent, Some(19024)),
            (200, r#"{"code":19022}"#, Class::Permanent, Some(19022)),
            (
                200,
                r#"{"StatusCode":19001}"#,
                Class::Permanent,
                Some(19001),
            ),
            (200, r#"{"code":19002}"#, Class::Permanent, Some(19002)),
            (200, "not json", Class::Transient, None),
            (200, r#"{"ok":true}"#, Class::Transient, None),
            (429, "", Class::RateLimited { pause: None }, None),
            (503, "", Class::Transient, None),
            (
                400,
                r#"{"code":9499,"msg":"Bad Request"}"#,
                Class::Permanent,
                Some(9499),
            ),
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
