//! WeCom group robot (PROTOCOLS.md §6.1): the `text` and `markdown` bodies with their
//! @mentions, cut to the size limits, and what an answer means. There is no signing: the `key`
//! in the webhook URL is the credential. Pure functions; sending is the caller's business.

use serde_json::{json, Value};

use crate::message::{Format, Mentions, Notification};
use crate::platform::outbound::{self, cut, non_empty, Answer, Class, RenderOptions};

/// Byte limit of a `text` message's content (PROTOCOLS.md §6.1).
pub const TEXT_MAX_BYTES: usize = 2048;

/// Byte limit of a `markdown` message's content (PROTOCOLS.md §6.1).
pub const MARKDOWN_MAX_BYTES: usize = 4096;

/// The request bodies for a notification, one per part: `raw` as it is, otherwise a `text` or
/// `markdown` message cut to `opts.max_bytes` (default: the limit of the message type sent).
/// When there are several parts, the title (or, without one, the text) is numbered, and the
/// link and the @mentions go with the last part only, so that people are notified once, when it
/// is complete.
pub fn render(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    if let Some(raw) = &n.raw {
        return vec![raw.clone()];
    }
    let m = &n.mentions;
    // WeCom markdown mentions only by userid (`<@userid>`), never by mobile nor everyone. As
    // ZenTao does, such a notification goes as text instead: reaching the people matters more
    // than the formatting, which then shows as written.
    if n.format == Format::Text || m.all || !m.mobiles.is_empty() {
        render_text(n, opts)
    } else {
        render_markdown(n, opts)
    }
}

fn render_text(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    // The platform's limits are hard: a configured max_bytes can only lower them.
    let max = opts.max_bytes.unwrap_or(TEXT_MAX_BYTES).min(TEXT_MAX_BYTES);
    // A title may take at most a quarter of the message, so that the text always fits.
    let title = non_empty(n.title.as_deref()).map(|t| outbound::truncate_utf8(t, max / 4));
    let title = title.as_deref();
    let tail = non_empty(n.url.as_deref())
        .map(|u| format!("\n{u}"))
        .unwrap_or_default();
    let head = title.map_or(0, |t| t.len() + "\n".len());
    cut(&n.text, max, head + tail.len(), opts.too_long)
        .into_iter()
        .map(|p| {
            let content = p.compose(title, |t| format!("{t}\n"), &tail);
            let (users, mobiles) = if p.is_last() {
                mentioned(&n.mentions)
            } else {
                (Vec::new(), Vec::new())
            };
            json!({
                "msgtype": "text",
                "text": {
                    "content": content,
                    "mentioned_list": users,
                    "mentioned_mobile_list": mobiles,
                },
            })
        })
        .collect()
}

fn render_markdown(n: &Notification, opts: &RenderOptions) -> Vec<Value> {
    let max = opts
        .max_bytes
        .unwrap_or(MARKDOWN_MAX_BYTES)
        .min(MARKDOWN_MAX_BYTES);
    let title = non_empty(n.title.as_deref()).map(|t| outbound::truncate_utf8(t, max / 4));
    let title = title.as_deref();
    let mut tail = non_empty(n.url.as_deref())
        .map(|u| format!("\n[{}]({u})", opts.link_text))
        .unwrap_or_default();
    if !n.mentions.user_ids.is_empty() {
        let ats: Vec<String> = n
            .mentions
            .user_ids
            .iter()
            .map(|id| format!("<@{id}>"))
            .collect();
        tail.push('\n');
        tail.push_str(&ats.join(" "));
    }
    let head = title.map_or(0, |t| "**".len() + t.len() + "**\n".len());
    cut(&n.text, max, head + tail.len(), opts.too_long)
        .into_iter()
        .map(|p| {
            let content = p.compose(title, |t| format!("**{t}**\n"), &tail);
            json!({"msgtype": "markdown", "markdown": {"content": content}})
        })
        .collect()
}

/// `mentioned_list` and `mentioned_mobile_list`; `users` (internal account names) are resolved
/// into user ids and mobiles before rendering, so they are not looked at here.
fn mentioned(m: &Mentions) -> (Vec<String>, Vec<String>) {
    let mut users = m.user_ids.clone();
    if m.all {
        users.push("@all".to_owned());
    }
    (users, m.mobiles.clone())
}

/// Classifies the robot's answer. WeCom answers HTTP 200 to errors too, so `errcode` decides;
/// `errmsg` wording changes and is never looked at (PROTOCOLS.md §6.1).
pub fn classify(status: u16, body: &[u8]) -> Answer {
    outbound::classify(status, body, &["errcode"], |code| match code {
        // Over 20 messages a minute.
        45009 => Class::RateLimited { pause: None },
        // System busy; too many concurrent requests.
        -1 | 45033 => Class::Transient,
        // 40008 (bad msgtype), 45002 (too large), 93000 (bad key), ...: resending the same
        // request cannot help.
        _ => Class::Permanent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Mentions {
        Mentions {
            users: vec!["zhangsan".into()],
            user_ids: vec!["zhangsan".into(), "lisi".into()],
            ..Default::default()
        }
    }

    fn long_chinese() -> String {
        crate::platform::outbound::fixtures::long_chinese(40, 120)
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
            [json!({
                "msgtype": "text",
                "text": {"content": "构建成功", "mentioned_list": [], "mentioned_mobile_list": []},
            })]
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
                mobiles: vec!["13800000000".into()],
                all: true,
                ..ids()
            },
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msgtype": "text",
                "text": {
                    "content": "构建失败\nmain 分支测试未通过\nhttps://ci.example.com/7",
                    "mentioned_list": ["zhangsan", "lisi", "@all"],
                    "mentioned_mobile_list": ["13800000000"],
                },
            })]
        );
    }

    #[test]
    fn markdown_plain() {
        let n = Notification {
            text: "## 发布完成\n版本 1.2.3".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({"msgtype": "markdown", "markdown": {"content": "## 发布完成\n版本 1.2.3"}})]
        );
    }

    #[test]
    fn markdown_with_title_url_and_user_ids() {
        let n = Notification {
            title: Some("Bug #12".into()),
            text: "张三创建了 Bug".into(),
            url: Some("https://zentao.example.com/bug-view-12.html".into()),
            mentions: ids(),
            ..Default::default()
        };
        assert_eq!(
            render(&n, &RenderOptions::default()),
            [json!({
                "msgtype": "markdown",
                "markdown": {
                    "content": "**Bug #12**\n张三创建了 Bug\n[查看详情](https://zentao.example.com/bug-view-12.html)\n<@zhangsan> <@lisi>",
                },
            })]
        );
    }

    #[test]
    fn markdown_mentioning_mobiles_or_all_goes_as_text() {
        for mentions in [
            Mentions {
                mobiles: vec!["13800000000".into()],
                ..Default::default()
            },
            Mentions {
                all: true,
                ..Default::default()
            },
        ] {
            let n = Notification {
                title: Some("Bug #12".into()),
                text: "张三创建了 [Bug](https://zentao.example.com/bug-view-12.html)".into(),
                mentions: mentions.clone(),
                ..Default::default()
            };
            let (users, mobiles) = mentioned(&mentions);
            assert_eq!(
                render(&n, &RenderOptions::default()),
                [json!({
                    "msgtype": "text",
                    "text": {
                        "content": "Bug #12\n张三创建了 [Bug](https://zentao.example.com/bug-view-12.html)",
                        "mentioned_list": users,
                        "mentioned_mobile_list": mobiles,
                    },
                })]
            );
        }
    }

    #[test]
    fn default_limits_follow_the_message_type() {
        let text = "a".repeat(3000);
        let md = Notification {
            text: text.clone(),
            ..Default::default()
        };
        assert_eq!(render(&md, &RenderOptions::default()).len(), 1);
        let plain = Notification {
            format: Format::Text,
            ..md
        };
        let bodies = render(&plain, &RenderOptions::default());
        assert_eq!(bodies.len(), 2);
        assert!(bodies
            .iter()
            .all(|b| b["text"]["content"].as_str().unwrap().len() <= TEXT_MAX_BYTES));
    }

    #[test]
    fn raw_passes_through() {
        let raw = json!({"msgtype": "news", "news": {"articles": [{"title": "t", "url": "u"}]}});
        let n = Notification {
            text: "ignored".into(),
            raw: Some(raw.clone()),
            mentions: ids(),
            ..Default::default()
        };
        assert_eq!(render(&n, &RenderOptions::default()), [raw]);
    }

    #[test]
    fn long_markdown_is_split_with_mentions_on_the_last_part() {
        let text = long_chinese();
        let n = Notification {
            title: Some("部署失败".into()),
            text: text.clone(),
            url: Some("https://ci.example.com/1".into()),
            mentions: ids(),
            ..Default::default()
        };
        let opts = RenderOptions {
            max_bytes: Some(500),
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        let k = bodies.len();
        assert!(k > 2, "{k}");
        let tail = "\n[查看详情](https://ci.example.com/1)\n<@zhangsan> <@lisi>";
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            assert_eq!(b["msgtype"], "markdown");
            let content = b["markdown"]["content"].as_str().unwrap();
            assert!(content.len() <= 500, "part {i}: {} bytes", content.len());
            let rest = content
                .strip_prefix(&format!("**部署失败 ({}/{k})**\n", i + 1))
                .unwrap();
            if i + 1 < k {
                assert!(!rest.contains("<@") && !rest.contains("https://"), "{rest}");
                joined.push_str(rest);
            } else {
                joined.push_str(rest.strip_suffix(tail).unwrap());
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn long_text_without_title_is_numbered_in_the_text() {
        let text = long_chinese();
        let n = Notification {
            text: text.clone(),
            format: Format::Text,
            mentions: Mentions {
                mobiles: vec!["13800000000".into()],
                all: true,
                ..ids()
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
        let mut joined = String::new();
        for (i, b) in bodies.iter().enumerate() {
            let content = b["text"]["content"].as_str().unwrap();
            assert!(content.len() <= 300, "part {i}: {} bytes", content.len());
            joined.push_str(content.strip_prefix(&format!("({}/{k}) ", i + 1)).unwrap());
            if i + 1 < k {
                assert_eq!(b["text"]["mentioned_list"], json!([]));
                assert_eq!(b["text"]["mentioned_mobile_list"], json!([]));
            } else {
                assert_eq!(
                    b["text"]["mentioned_list"],
                    json!(["zhangsan", "lisi", "@all"])
                );
                assert_eq!(b["text"]["mentioned_mobile_list"], json!(["13800000000"]));
            }
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn truncation_keeps_one_part_with_everything() {
        let n = Notification {
            title: Some("部署失败".into()),
            text: long_chinese(),
            url: Some("https://ci.example.com/1".into()),
            mentions: ids(),
            ..Default::default()
        };
        let opts = RenderOptions {
            too_long: outbound::TooLong::Truncate,
            ..Default::default()
        };
        let bodies = render(&n, &opts);
        assert_eq!(bodies.len(), 1);
        let content = bodies[0]["markdown"]["content"].as_str().unwrap();
        assert!(
            content.len() <= MARKDOWN_MAX_BYTES,
            "{} bytes",
            content.len()
        );
        assert!(content.starts_with("**部署失败**\n第1行"));
        assert!(content.ends_with(&format!(
            "{}\n[查看详情](https://ci.example.com/1)\n<@zhangsan> <@lisi>",
            outbound::TRUNCATED
        )));
    }

    #[test]
    fn classifies_answers() {
        let cases: &[(u16, &str, Class, Option<i64>)] = &[
            (200, r#"{"errcode":0,"errmsg":"ok"}"#, Class::Ok, Some(0)),
            (
                200,
                r#"{"errcode":45009,"errmsg":"api freq out of limit"}"#,
                Class::RateLimited { pause: None },
                Some(45009),
            ),
            (
                200,
                r#"{"errcode":-1,"errmsg":"system busy"}"#,
                Class::Transient,
                Some(-1),
            ),
            (200, r#"{"errcode":45033}"#, Class::Transient, Some(45033)),
            (200, r#"{"errcode":40008}"#, Class::Permanent, Some(40008)),
            (200, r#"{"errcode":45002}"#, Class::Permanent, Some(45002)),
            (200, r#"{"errcode":93000}"#, Class::Permanent, Some(93000)),
            (200, "<html>gateway</html>", Class::Transient, None),
            (200, r#"{"ok":true}"#, Class::Transient, None),
            (429, "", Class::RateLimited { pause: None }, None),
            (500, "", Class::Transient, None),
            (403, "forbidden", Class::Permanent, None),
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
