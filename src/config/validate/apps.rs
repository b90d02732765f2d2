//! `[apps.dingtalk.<name>]`, `[apps.wecom.<name>]`, `[apps.lark.<name>]`: the apps whose
//! callbacks the ingress accepts.

use std::collections::BTreeMap;

use super::checker::Checker;
use crate::config::raw::{AppsConfig, DingTalkAppConfig, LarkAppConfig, WeComAppConfig};
use crate::ingress::subject::{self, SubjectKeys, Subjects};
use crate::platform::dingtalk::callback::DingTalkApp;
use crate::platform::lark::callback::LarkApp;
use crate::platform::msgcrypt::{self, MsgCrypt};
use crate::platform::wecom::callback::WeComApp;
use crate::platform::Platform;
use crate::secret::Secret;

pub(super) fn dingtalk(
    apps: &BTreeMap<String, DingTalkAppConfig>,
    c: &mut Checker,
) -> BTreeMap<String, DingTalkApp> {
    let mut out = BTreeMap::new();
    for (name, app) in apps {
        let key = format!("apps.dingtalk.{name}");
        c.name(&key, name, "app");
        let receiver = Receiver {
            field: "receiver_id",
            value: &app.receiver_id,
            what: "corpId, appKey or suiteKey",
        };
        if let Some(crypt) = crypt(&key, &app.token, &app.aes_key, receiver, c) {
            out.insert(name.clone(), DingTalkApp { crypt });
        }
    }
    out
}

pub(super) fn wecom(
    apps: &BTreeMap<String, WeComAppConfig>,
    c: &mut Checker,
) -> BTreeMap<String, WeComApp> {
    let mut out = BTreeMap::new();
    for (name, app) in apps {
        let key = format!("apps.wecom.{name}");
        c.name(&key, name, "app");
        let receiver = Receiver {
            field: "corp_id",
            value: &app.corp_id,
            what: "the corpId",
        };
        if let Some(crypt) = crypt(&key, &app.token, &app.aes_key, receiver, c) {
            let keep_raw_xml = app.keep_raw_xml;
            out.insert(
                name.clone(),
                WeComApp {
                    crypt,
                    keep_raw_xml,
                },
            );
        }
    }
    out
}

pub(super) fn lark(
    apps: &BTreeMap<String, LarkAppConfig>,
    c: &mut Checker,
) -> BTreeMap<String, LarkApp> {
    let mut out = BTreeMap::new();
    for (name, app) in apps {
        let key = format!("apps.lark.{name}");
        c.name(&key, name, "app");
        let set = |s: &Option<Secret>| {
            s.as_ref()
                .map(|s| s.expose().to_owned())
                .filter(|s| !s.is_empty())
        };
        let (verification_token, encrypt_key) =
            (set(&app.verification_token), set(&app.encrypt_key));
        if verification_token.is_none() && encrypt_key.is_none() {
            c.problem(
                &key,
                "set verification_token or encrypt_key (or both): otherwise anyone who knows \
                 the URL can publish events",
            );
        }
        if verification_token.is_some() && encrypt_key.is_none() && !app.allow_unsigned {
            c.problem(
                format!("{key}.encrypt_key"),
                "is not set, so callbacks are not signed and the verification token, which \
                 travels inside every event published, is their only proof: anyone who can read \
                 the bus could forge them. Set the Encrypt Key from Lark's console, or \
                 allow_unsigned = true to accept that",
            );
        } else if encrypt_key.is_none() && app.allow_unsigned {
            c.warning(
                format!("{key}.allow_unsigned"),
                "callbacks are accepted unsigned: anyone who can read the bus could forge them",
            );
        } else if encrypt_key.is_some() && app.allow_unsigned {
            c.warning(
                format!("{key}.allow_unsigned"),
                "has no effect: an encrypt key is set, so callbacks must be signed",
            );
        }
        let app = LarkApp {
            verification_token,
            encrypt_key,
        };
        out.insert(name.clone(), app);
    }
    out
}

/// Every app's `subjects`: pointers that start with `/`, at most a few per event type, so an
/// event can only ever add that many bounded tokens to its subject.
pub(super) fn subjects(apps: &AppsConfig, c: &mut Checker) -> Subjects {
    let mut out = Subjects::default();
    let all = (apps
        .dingtalk
        .iter()
        .map(|(n, a)| (Platform::DingTalk.as_str(), n, &a.subjects)))
    .chain(
        apps.wecom
            .iter()
            .map(|(n, a)| (Platform::WeCom.as_str(), n, &a.subjects)),
    )
    .chain(
        apps.lark
            .iter()
            .map(|(n, a)| (Platform::Lark.as_str(), n, &a.subjects)),
    );
    for (platform, name, by_type) in all {
        let before = c.count();
        for (event_type, pointers) in by_type {
            let key = format!("apps.{platform}.{name}.subjects.{event_type}");
            if event_type.is_empty() {
                c.problem(
                    &key,
                    "names no event type: use the platform's type, or \"*\"",
                );
            }
            if pointers.len() > subject::MAX_TOKENS {
                c.problem(
                    &key,
                    format!(
                        "has {} pointers; at most {} tokens are appended to a subject",
                        pointers.len(),
                        subject::MAX_TOKENS
                    ),
                );
            }
            for (i, pointer) in pointers.iter().enumerate() {
                if !pointer.starts_with('/') {
                    c.problem(
                        format!("{key}[{i}]"),
                        format!(
                            "{pointer:?} is not a JSON pointer into the event: it must start \
                             with \"/\", e.g. \"/processCode\""
                        ),
                    );
                }
            }
        }
        if c.count() == before {
            out.insert(platform, name, SubjectKeys::new(by_type.clone()));
        }
    }
    out
}

/// The id the callbacks are encrypted for, as each platform names its key.
struct Receiver<'a> {
    field: &'static str,
    value: &'a str,
    /// What the id is, for the message when it is empty.
    what: &'static str,
}

/// The callback cipher DingTalk and WeCom share, or `None` after reporting why not.
fn crypt(
    key: &str,
    token: &Secret,
    aes_key: &Secret,
    receiver: Receiver<'_>,
    c: &mut Checker,
) -> Option<MsgCrypt> {
    let before = c.count();
    if token.expose().is_empty() {
        c.problem(format!("{key}.token"), "must not be empty");
    }
    if receiver.value.is_empty() {
        c.problem(
            format!("{key}.{}", receiver.field),
            format!("must not be empty ({})", receiver.what),
        );
    }
    let crypt = MsgCrypt::new(token.expose(), aes_key.expose(), receiver.value);
    if let Err(msgcrypt::KeyError) = crypt {
        c.problem(
            format!("{key}.aes_key"),
            "must be exactly 43 characters of [A-Za-z0-9]",
        );
    }
    if c.count() > before {
        return None;
    }
    crypt.ok()
}
