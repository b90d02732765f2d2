//! `[api]` and the apps the platform API gateway calls for: each app's credentials (DingTalk
//! `app_key`/`app_secret`, WeCom `corp_id`/`app_secret`, Lark `app_id`/`app_secret`) and its
//! `api_rate_limit`.

use std::collections::BTreeMap;

use super::apps::base_url;
use super::checker::Checker;
use crate::bus::EngineSettings;
use crate::config::raw::{AppsConfig, Config, OneOrMany};
use crate::notify::gateway::ApiSettings;
use crate::platform::api::{self, ApiApp};
use crate::platform::dingtalk::oapi::DingTalkOapi;
use crate::platform::{AppCredentials, Limit, Platform};

/// `[api]`: sizes and durations non-zero, and the NATS client a configured client on a NATS
/// bus.
pub(super) fn settings(raw: &Config, engine: &EngineSettings, c: &mut Checker) -> ApiSettings {
    let api = &raw.api;
    let mut duration = |field: &str, value: &str| {
        let key = format!("api.{field}");
        let d = c.duration(&key, value);
        if humantime::parse_duration(value).is_ok_and(|d| d.is_zero()) {
            c.problem(key, "must be greater than 0");
        }
        d
    };
    let max_wait = duration("max_wait", &api.max_wait);
    let timeout = duration("timeout", &api.timeout);
    for (key, value) in [
        ("api.max_request_bytes", api.max_request_bytes),
        ("api.max_response_bytes", api.max_response_bytes),
    ] {
        if value == 0 {
            c.problem(key, "must be greater than 0");
        }
    }
    let nats_client = api
        .nats_client
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if let Some(name) = nats_client {
        match raw.clients.get(name) {
            None => c.problem(
                "api.nats_client",
                format!("{name:?} is no [clients.<name>]"),
            ),
            Some(client) if client.api.is_empty() => c.problem(
                "api.nats_client",
                format!("clients.{name} has no api globs: it could call nothing"),
            ),
            Some(_) => {}
        }
        if !matches!(engine, EngineSettings::Nats(_)) {
            c.problem(
                "api.nats_client",
                "request/reply needs bus.kind = \"nats\" (unset it on other buses)",
            );
        }
    }
    ApiSettings {
        max_request_bytes: api.max_request_bytes,
        max_response_bytes: api.max_response_bytes,
        max_wait,
        timeout,
        nats_client: nats_client.map(str::to_owned),
    }
}

/// Every app with API credentials, by `<platform>/<name>`. DingTalk's are validated already
/// (`oapi`, shared with the callback registration); WeCom's and Lark's here.
pub(super) fn apps(
    raw: &AppsConfig,
    oapi: &BTreeMap<String, DingTalkOapi>,
    c: &mut Checker,
) -> BTreeMap<String, ApiApp> {
    let mut out = BTreeMap::new();
    dingtalk(raw, oapi, &mut out, c);
    wecom(raw, &mut out, c);
    lark(raw, &mut out, c);
    out
}

fn dingtalk(
    raw: &AppsConfig,
    oapi: &BTreeMap<String, DingTalkOapi>,
    out: &mut BTreeMap<String, ApiApp>,
    c: &mut Checker,
) {
    for (name, app) in &raw.dingtalk {
        let key = format!("apps.dingtalk.{name}");
        let limits = limits(&key, app.api_rate_limit.as_ref(), Platform::DingTalk, c);
        let Some(o) = oapi.get(name) else {
            unused_limit(
                &key,
                app.api_rate_limit.is_some(),
                "app_key and app_secret",
                c,
            );
            continue;
        };
        let app = ApiApp {
            platform: Platform::DingTalk,
            credentials: o.credentials.clone(),
            api_base: o.api_base.clone(),
            limits,
            // Set by `http::apply`, with every target's and app's `proxy` known.
            egress: Default::default(),
        };
        out.insert(format!("dingtalk/{name}"), app);
    }
}

fn wecom(raw: &AppsConfig, out: &mut BTreeMap<String, ApiApp>, c: &mut Checker) {
    for (name, app) in &raw.wecom {
        let key = format!("apps.wecom.{name}");
        let limits = limits(&key, app.api_rate_limit.as_ref(), Platform::WeCom, c);
        let base = base(
            &key,
            "api_base",
            app.api_base.as_deref(),
            Platform::WeCom,
            app.allow_insecure_http,
            c,
        );
        if app.app_secret.expose().is_empty() {
            unused_limit(&key, app.api_rate_limit.is_some(), "app_secret", c);
            continue;
        }
        let credentials = AppCredentials {
            base_url: base.clone(),
            app_id: app.corp_id.trim().to_owned(),
            secret: app.app_secret.clone(),
            agent_id: 0,
        };
        // corp_id is checked with the callback keys.
        let app = api_app(Platform::WeCom, credentials, base, limits);
        out.insert(format!("wecom/{name}"), app);
    }
}

/// Lark apps of either mode with an App ID and Secret.
fn lark(raw: &AppsConfig, out: &mut BTreeMap<String, ApiApp>, c: &mut Checker) {
    for (name, app) in &raw.lark {
        let key = format!("apps.lark.{name}");
        let limits = limits(&key, app.api_rate_limit.as_ref(), Platform::Lark, c);
        let (has_id, has_secret) = (
            !app.app_id.trim().is_empty(),
            !app.app_secret.expose().is_empty(),
        );
        match (has_id, has_secret) {
            (true, true) => {}
            (false, false) => {
                unused_limit(
                    &key,
                    app.api_rate_limit.is_some(),
                    "app_id and app_secret",
                    c,
                );
                continue;
            }
            // Websocket mode says so already.
            _ if app.mode == "websocket" => continue,
            (true, false) => {
                c.problem(
                    format!("{key}.app_secret"),
                    "must be set with app_id (the app's App Secret)",
                );
                continue;
            }
            (false, true) => {
                c.problem(
                    format!("{key}.app_id"),
                    "must be set with app_secret (the app's App ID, cli_…)",
                );
                continue;
            }
        }
        let base = base(
            &key,
            "domain",
            app.domain.as_deref(),
            Platform::Lark,
            app.allow_insecure_http,
            c,
        );
        let credentials = AppCredentials {
            base_url: base.clone(),
            app_id: app.app_id.trim().to_owned(),
            secret: app.app_secret.clone(),
            agent_id: 0,
        };
        out.insert(
            format!("lark/{name}"),
            api_app(Platform::Lark, credentials, base, limits),
        );
    }
}

fn api_app(
    platform: Platform,
    credentials: AppCredentials,
    api_base: String,
    limits: Vec<Limit>,
) -> ApiApp {
    ApiApp {
        platform,
        credentials,
        api_base,
        limits,
        // Set by `http::apply`, with every target's and app's `proxy` known.
        egress: Default::default(),
    }
}

/// The configured base URL without a trailing slash, or the platform's.
fn base(
    key: &str,
    field: &str,
    value: Option<&str>,
    platform: Platform,
    insecure: bool,
    c: &mut Checker,
) -> String {
    let url = value
        .unwrap_or(platform.default_base_url())
        .trim()
        .trim_end_matches('/')
        .to_owned();
    base_url(&url, insecure, &format!("{key}.{field}"), c);
    url
}

/// `api_rate_limit`, or the platform's default.
fn limits(key: &str, value: Option<&OneOrMany>, platform: Platform, c: &mut Checker) -> Vec<Limit> {
    let key = format!("{key}.api_rate_limit");
    let limits = c.limits(&key, value);
    if limits
        .as_ref()
        .is_some_and(|l| l.iter().any(|l| l.max > MAX_LOGGED))
    {
        c.problem(
            &key,
            format!(
                "at most {MAX_LOGGED} calls per window: the limiter keeps one entry per call \
                 in the window, shared by every replica (say \"150/s\" rather than \"9000/min\")"
            ),
        );
    }
    limits.unwrap_or_else(|| api::default_limits(platform))
}

/// The most calls one window of `api_rate_limit` may allow: each is an entry of the shared log
/// written on every call.
const MAX_LOGGED: u32 = 1000;

fn unused_limit(key: &str, set: bool, missing: &str, c: &mut Checker) {
    if set {
        c.warning(
            format!("{key}.api_rate_limit"),
            format!("is not used: the app has no API gateway without {missing}"),
        );
    }
}
