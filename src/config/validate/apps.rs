//! `[apps.dingtalk.<name>]`, `[apps.wecom.<name>]`, `[apps.lark.<name>]`: the apps whose
//! callbacks the ingress accepts.

use std::collections::BTreeMap;

use super::checker::Checker;
use crate::config::raw::{
    AppsConfig, DingTalkAppConfig, LarkAppConfig, StreamsConfig, WeComAppConfig,
};
use crate::ingress::stream::{DingTalkStreamApp, LarkStreamApp, StreamSettings};
use crate::ingress::subject::{self, SubjectKeys, Subjects};
use crate::platform::dingtalk::callback::DingTalkApp;
use crate::platform::dingtalk::oapi::{self, DingTalkOapi};
use crate::platform::lark::callback::LarkApp;
use crate::platform::msgcrypt::{self, MsgCrypt};
use crate::platform::wecom::callback::WeComApp;
use crate::platform::AppCredentials;
use crate::platform::Platform;
use crate::secret::Secret;

/// DingTalk apps by how their events arrive: callbacks (`mode = "http"`, the default) or a
/// Stream-mode connection (`mode = "stream"`). Each mode requires its own keys only.
pub(super) fn dingtalk(
    apps: &BTreeMap<String, DingTalkAppConfig>,
    c: &mut Checker,
) -> DingTalkApps {
    let mut http = BTreeMap::new();
    let mut streams = BTreeMap::new();
    let mut oapi = BTreeMap::new();
    for (name, app) in apps {
        let key = format!("apps.dingtalk.{name}");
        c.name(&key, name, "app");
        if let Some(o) = dingtalk_oapi(&key, app, c) {
            oapi.insert(name.clone(), o);
        }
        match app.mode.as_str() {
            "" | "http" => {
                unused_keys(
                    &key,
                    "http",
                    &[
                        ("client_id", !app.client_id.is_empty()),
                        ("client_secret", !app.client_secret.expose().is_empty()),
                    ],
                    c,
                );
                let receiver = Receiver {
                    field: "receiver_id",
                    value: &app.receiver_id,
                    what: "corpId, appKey or suiteKey",
                };
                if let Some(crypt) = crypt(&key, &app.token, &app.aes_key, receiver, c) {
                    http.insert(name.clone(), DingTalkApp { crypt });
                }
            }
            "stream" => {
                unused_keys(
                    &key,
                    "stream",
                    &[
                        ("token", !app.token.expose().is_empty()),
                        ("aes_key", !app.aes_key.expose().is_empty()),
                        ("receiver_id", !app.receiver_id.is_empty()),
                    ],
                    c,
                );
                if let Some(s) = dingtalk_stream(&key, app, c) {
                    streams.insert(name.clone(), s);
                }
            }
            other => c.problem(
                format!("{key}.mode"),
                format!(
                    "{other:?} is not a mode: use \"http\" (callbacks) or \"stream\" (Stream mode)"
                ),
            ),
        }
    }
    DingTalkApps {
        http,
        streams,
        oapi,
    }
}

/// DingTalk apps, validated, by what imbridge does with them.
pub(super) struct DingTalkApps {
    /// Callbacks (`mode = "http"`).
    pub(super) http: BTreeMap<String, DingTalkApp>,
    /// Stream-mode connections.
    pub(super) streams: BTreeMap<String, DingTalkStreamApp>,
    /// The apps with server-API credentials, of either mode.
    pub(super) oapi: BTreeMap<String, DingTalkOapi>,
}

/// An app's server-API side, when it has credentials: `app_key` and `app_secret` (in stream
/// mode the Client ID and Secret, the same pair, serve when they are unset).
fn dingtalk_oapi(key: &str, app: &DingTalkAppConfig, c: &mut Checker) -> Option<DingTalkOapi> {
    let stream = app.mode == "stream";
    let app_key = match app.app_key.trim() {
        "" if stream => app.client_id.trim(),
        k => k,
    };
    let secret = match app.app_secret.expose() {
        "" if stream => &app.client_secret,
        _ => &app.app_secret,
    };
    let has_key = !app_key.is_empty();
    let has_secret = !secret.expose().is_empty();
    let before = c.count();
    match (has_key, has_secret) {
        (true, false) => c.problem(
            format!("{key}.app_secret"),
            "must be set with app_key (the app's AppSecret)",
        ),
        (false, true) => c.problem(
            format!("{key}.app_key"),
            "must be set with app_secret (the app's AppKey)",
        ),
        _ => {}
    }
    let recover_failed = app.recover_failed.as_deref().map(|d| {
        let field = format!("{key}.recover_failed");
        let every = c.duration(&field, d);
        if every.is_zero() {
            c.problem(
                &field,
                "must be greater than 0 (leave it out to turn it off)",
            );
        }
        every
    });
    for (i, tag) in app.callback_tags.iter().enumerate() {
        if !crate::bus::is_valid_token(tag) {
            c.problem(
                format!("{key}.callback_tags[{i}]"),
                "is not an event name (letters, digits, _ and -), e.g. \"bpms_instance_change\"",
            );
        }
    }
    let needs_credentials = recover_failed.is_some() || !app.callback_tags.is_empty();
    if needs_credentials && !has_key && !has_secret {
        c.problem(
            format!("{key}.app_key"),
            "must be set (with app_secret) for recover_failed and callback_tags: they call \
             DingTalk's server API",
        );
    }
    let base = |value: &Option<String>, default: &str, field: &str, c: &mut Checker| {
        let url = value
            .as_deref()
            .unwrap_or(default)
            .trim()
            .trim_end_matches('/')
            .to_owned();
        base_url(&url, app.allow_insecure_http, &format!("{key}.{field}"), c);
        url
    };
    let oapi_base = base(&app.oapi_base, oapi::OAPI_BASE, "oapi_base", c);
    // In stream mode dingtalk_stream() checks api_base already.
    let api_base = match stream {
        true => app
            .api_base
            .clone()
            .unwrap_or_else(|| oapi::API_BASE.to_owned()),
        false => base(&app.api_base, oapi::API_BASE, "api_base", c),
    };
    if c.count() > before || !has_key {
        return None;
    }
    Some(DingTalkOapi {
        credentials: AppCredentials {
            base_url: oapi_base,
            app_id: app_key.to_owned(),
            secret: secret.clone(),
            agent_id: 0,
        },
        api_base: api_base.trim().trim_end_matches('/').to_owned(),
        callback_tags: app.callback_tags.clone(),
        recover_failed,
        allow_insecure: app.allow_insecure_http,
        // Set by `http::apply`, with every app's `proxy` known.
        egress: Default::default(),
    })
}

/// The keys of a stream-mode app: the Client ID and Secret, and where to register.
fn dingtalk_stream(
    key: &str,
    app: &DingTalkAppConfig,
    c: &mut Checker,
) -> Option<DingTalkStreamApp> {
    let before = c.count();
    if app.client_id.trim().is_empty() {
        c.problem(
            format!("{key}.client_id"),
            "must be set in stream mode (the app's Client ID / AppKey)",
        );
    }
    if app.client_secret.expose().is_empty() {
        c.problem(
            format!("{key}.client_secret"),
            "must be set in stream mode (the app's Client Secret / AppSecret)",
        );
    }
    let api_base = app
        .api_base
        .as_deref()
        .unwrap_or(DINGTALK_API_BASE)
        .trim()
        .trim_end_matches('/')
        .to_owned();
    base_url(
        &api_base,
        app.allow_insecure_http,
        &format!("{key}.api_base"),
        c,
    );
    if c.count() > before {
        return None;
    }
    Some(DingTalkStreamApp {
        client_id: app.client_id.trim().to_owned(),
        client_secret: app.client_secret.clone(),
        api_base,
        allow_insecure: app.allow_insecure_http,
        // Set by `http::apply`, with every app's `proxy` known.
        egress: Default::default(),
    })
}

/// `[streams]`: durations parsed, each non-zero, the backoff in order.
pub(super) fn streams(raw: &StreamsConfig, c: &mut Checker) -> StreamSettings {
    let mut duration = |field: &str, value: &str| {
        let key = format!("streams.{field}");
        let d = c.duration(&key, value);
        if humantime::parse_duration(value).is_ok_and(|d| d.is_zero()) {
            c.problem(key, "must be greater than 0");
        }
        d
    };
    let settings = StreamSettings {
        ping_interval: duration("ping_interval", &raw.ping_interval),
        reconnect_initial: duration("reconnect_initial", &raw.reconnect_initial),
        reconnect_max: duration("reconnect_max", &raw.reconnect_max),
        auth_retry: duration("auth_retry", &raw.auth_retry),
        connect_timeout: duration("connect_timeout", &raw.connect_timeout),
        down_grace: c.duration("streams.down_grace", &raw.down_grace),
        down_fails_readiness: raw.down_fails_readiness,
        max_frame_bytes: raw.max_frame_bytes,
        max_in_flight: raw.max_in_flight,
    };
    if settings.reconnect_max < settings.reconnect_initial {
        c.problem(
            "streams.reconnect_max",
            "must not be shorter than streams.reconnect_initial",
        );
    }
    for (key, value) in [
        ("streams.max_frame_bytes", settings.max_frame_bytes),
        ("streams.max_in_flight", settings.max_in_flight),
    ] {
        if value == 0 {
            c.problem(key, "must be greater than 0");
        }
    }
    settings
}

/// DingTalk's OpenAPI, where Stream connections are registered.
const DINGTALK_API_BASE: &str = "https://api.dingtalk.com";

/// The registration carries the client secret: `https://` only, unless the app says
/// `allow_insecure_http`.
pub(super) fn base_url(url: &str, insecure: bool, key: &str, c: &mut Checker) {
    let lower = url.to_ascii_lowercase();
    let rest = if let Some(rest) = lower.strip_prefix("https://") {
        rest
    } else if let Some(rest) = lower.strip_prefix("http://") {
        if !insecure {
            c.problem(
                key,
                "is an http:// URL: the client secret would travel in clear; use https:// \
                 (or set allow_insecure_http = true on this app)",
            );
        }
        rest
    } else {
        c.problem(
            key,
            "must be an https:// URL, e.g. https://api.dingtalk.com",
        );
        return;
    };
    if rest.is_empty() || reqwest::Url::parse(url).is_err() {
        c.problem(key, "is not a valid URL");
    }
}

/// Keys of the other mode are ignored: said, so that a half-switched app is noticed.
fn unused_keys(key: &str, mode: &str, set: &[(&str, bool)], c: &mut Checker) {
    for (field, is_set) in set {
        if *is_set {
            c.warning(
                format!("{key}.{field}"),
                format!("is not used in {mode} mode"),
            );
        }
    }
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

/// Lark apps by how their events arrive: callbacks (`mode = "http"`, the default) or the
/// long connection (`mode = "websocket"`). Each mode requires its own keys only.
pub(super) fn lark(
    apps: &BTreeMap<String, LarkAppConfig>,
    c: &mut Checker,
) -> (BTreeMap<String, LarkApp>, BTreeMap<String, LarkStreamApp>) {
    let mut http = BTreeMap::new();
    let mut streams = BTreeMap::new();
    for (name, app) in apps {
        let key = format!("apps.lark.{name}");
        c.name(&key, name, "app");
        match app.mode.as_str() {
            // app_id, app_secret and domain serve the API gateway in this mode (config::
            // validate::api checks them).
            "" | "http" => {
                http.insert(name.clone(), lark_http(&key, app, c));
            }
            "websocket" => {
                let set = |s: &Option<Secret>| s.as_ref().is_some_and(|s| !s.expose().is_empty());
                unused_keys(
                    &key,
                    "websocket",
                    &[
                        ("verification_token", set(&app.verification_token)),
                        ("encrypt_key", set(&app.encrypt_key)),
                        ("allow_unsigned", app.allow_unsigned),
                    ],
                    c,
                );
                if let Some(s) = lark_stream(&key, app, c) {
                    streams.insert(name.clone(), s);
                }
            }
            other => c.problem(
                format!("{key}.mode"),
                format!(
                    "{other:?} is not a mode: use \"http\" (callbacks) or \"websocket\" (the long \
                     connection)"
                ),
            ),
        }
    }
    (http, streams)
}

/// The keys of a websocket-mode app: the App ID and Secret, and where to ask for the endpoint.
fn lark_stream(key: &str, app: &LarkAppConfig, c: &mut Checker) -> Option<LarkStreamApp> {
    let before = c.count();
    if app.app_id.trim().is_empty() {
        c.problem(
            format!("{key}.app_id"),
            "must be set in websocket mode (the app's App ID, cli_…)",
        );
    }
    if app.app_secret.expose().is_empty() {
        c.problem(
            format!("{key}.app_secret"),
            "must be set in websocket mode (the app's App Secret)",
        );
    }
    let domain = app
        .domain
        .as_deref()
        .unwrap_or(LARK_DOMAIN)
        .trim()
        .trim_end_matches('/')
        .to_owned();
    base_url(
        &domain,
        app.allow_insecure_http,
        &format!("{key}.domain"),
        c,
    );
    if c.count() > before {
        return None;
    }
    Some(LarkStreamApp {
        app_id: app.app_id.trim().to_owned(),
        app_secret: app.app_secret.clone(),
        domain,
        allow_insecure: app.allow_insecure_http,
        // Set by `http::apply`, with every app's `proxy` known.
        egress: Default::default(),
    })
}

/// Feishu's OpenAPI, where the long connection's endpoint is asked for.
const LARK_DOMAIN: &str = "https://open.feishu.cn";

/// The keys of an http-mode app: the verification token and encrypt key.
fn lark_http(key: &str, app: &LarkAppConfig, c: &mut Checker) -> LarkApp {
    let set = |s: &Option<Secret>| {
        s.as_ref()
            .map(|s| s.expose().to_owned())
            .filter(|s| !s.is_empty())
    };
    let (verification_token, encrypt_key) = (set(&app.verification_token), set(&app.encrypt_key));
    if verification_token.is_none() && encrypt_key.is_none() {
        c.problem(
            key,
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
    LarkApp {
        verification_token,
        encrypt_key,
    }
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
