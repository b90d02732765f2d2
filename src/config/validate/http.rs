//! `[http]` and the per-target and per-app `proxy`: every outbound client's [`Egress`],
//! resolved here once so the rest of the daemon never looks at a proxy setting again.
//!
//! Proxy URLs may hold a password: problems name the key, never the value.

use std::collections::BTreeMap;

use super::checker::Checker;
use crate::config::raw::{Config, HttpConfig, TargetConfig};
use crate::egress::{is_no_proxy_entry, Egress};
use crate::ingress::stream::{DingTalkStreamApp, LarkStreamApp};
use crate::notify::target::Target;
use crate::platform::api::ApiApp;
use crate::platform::dingtalk::oapi::DingTalkOapi;
use crate::secret::Secret;

/// What an override says for a direct connection: explicit, so that an empty value (an
/// environment variable set to nothing, say) is not quietly read as either meaning.
const DIRECT: &str = "none";

/// `[http]`: the egress of everything that does not say otherwise.
pub(super) fn global(raw: &HttpConfig, c: &mut Checker) -> Egress {
    for entry in &raw.no_proxy {
        if !is_no_proxy_entry(entry.trim()) {
            c.problem(
                "http.no_proxy",
                "entries must be host names (\"internal.example.com\", \".corp\"), IP \
                 addresses, CIDR blocks (\"10.0.0.0/8\") or \"*\"",
            );
            break;
        }
    }
    match raw.proxy.as_ref().map(|p| p.expose().trim()) {
        None | Some("") => Egress::Direct,
        Some(url) => parse("http.proxy", url, &no_proxy(raw), c),
    }
}

/// A target's or an app's `proxy` over the global egress.
fn resolve(
    key: &str,
    raw: Option<&Secret>,
    global: &Egress,
    http: &HttpConfig,
    c: &mut Checker,
) -> Egress {
    match raw.map(|p| p.expose().trim()) {
        None => global.clone(),
        Some(DIRECT) => Egress::Direct,
        Some("") => {
            c.problem(
                key,
                "is empty: set \"none\" for a direct connection, or remove it to use \
                 [http] proxy",
            );
            global.clone()
        }
        Some(url) => parse(key, url, &no_proxy(http), c),
    }
}

fn parse(key: &str, url: &str, no_proxy: &[String], c: &mut Checker) -> Egress {
    Egress::proxy(url, no_proxy).unwrap_or_else(|e| {
        c.problem(key, e.to_string());
        Egress::Direct
    })
}

fn no_proxy(raw: &HttpConfig) -> Vec<String> {
    raw.no_proxy.iter().map(|e| e.trim().to_owned()).collect()
}

/// What the egress is set on: the validated targets and apps.
pub(super) struct Clients<'a> {
    pub targets: &'a mut BTreeMap<String, Target>,
    pub dingtalk_oapi: &'a mut BTreeMap<String, DingTalkOapi>,
    pub dingtalk_streams: &'a mut BTreeMap<String, DingTalkStreamApp>,
    pub lark_streams: &'a mut BTreeMap<String, LarkStreamApp>,
    /// By `<platform>/<name>`.
    pub api_apps: &'a mut BTreeMap<String, ApiApp>,
}

/// Sets every target's and app's egress; warns that stream WebSockets are dialed directly.
pub(super) fn apply(
    config: &Config,
    raw_targets: &BTreeMap<String, TargetConfig>,
    global: &Egress,
    to: Clients<'_>,
    c: &mut Checker,
) {
    let http = &config.http;
    for (name, target) in to.targets.iter_mut() {
        let raw = raw_targets.get(name).and_then(|t| t.common.proxy.as_ref());
        target.egress = resolve(&format!("targets.{name}.proxy"), raw, global, http, c);
    }
    let mut apps = BTreeMap::new();
    let raw_apps = &config.apps;
    let each = raw_apps
        .dingtalk
        .iter()
        .map(|(n, a)| ("dingtalk", n, a.proxy.as_ref()));
    let each = each.chain(
        raw_apps
            .wecom
            .iter()
            .map(|(n, a)| ("wecom", n, a.proxy.as_ref())),
    );
    let each = each.chain(
        raw_apps
            .lark
            .iter()
            .map(|(n, a)| ("lark", n, a.proxy.as_ref())),
    );
    for (platform, name, raw) in each {
        let key = format!("apps.{platform}.{name}.proxy");
        apps.insert(
            format!("{platform}/{name}"),
            resolve(&key, raw, global, http, c),
        );
    }
    let egress = |platform: &str, name: &str| apps.get(&format!("{platform}/{name}")).cloned();
    for (name, app) in to.dingtalk_oapi.iter_mut() {
        app.egress = egress("dingtalk", name).unwrap_or_default();
    }
    for (name, app) in to.api_apps.iter_mut() {
        app.egress = apps.get(name).cloned().unwrap_or_default();
    }
    for (name, app) in to.dingtalk_streams.iter_mut() {
        app.egress = egress("dingtalk", name).unwrap_or_default();
        warn_websocket(c, "dingtalk", name, &app.egress);
    }
    for (name, app) in to.lark_streams.iter_mut() {
        app.egress = egress("lark", name).unwrap_or_default();
        warn_websocket(c, "lark", name, &app.egress);
    }
}

/// The WebSocket client here (tokio-tungstenite) dials the platform's endpoint itself and
/// takes no proxy: say so rather than let a proxied app look fully proxied.
fn warn_websocket(c: &mut Checker, platform: &str, name: &str, egress: &Egress) {
    if egress.is_proxied() {
        c.warning(
            format!("apps.{platform}.{name}.proxy"),
            "the stream registration goes through the proxy, but the WebSocket it hands out \
             is dialed directly (imbridge cannot proxy WebSockets): the platform's stream \
             endpoint must be reachable without it",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global_of(proxy: Option<&str>, no_proxy: &[&str]) -> (Egress, Vec<String>) {
        let raw = HttpConfig {
            proxy: proxy.map(Secret::new),
            no_proxy: no_proxy.iter().map(|s| s.to_string()).collect(),
        };
        let mut c = Checker::default();
        let e = global(&raw, &mut c);
        let problems = match c.finish() {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        };
        (e, problems)
    }

    #[test]
    fn the_global_proxy_is_checked_by_key_never_by_value() {
        assert_eq!(global_of(None, &[]).0, Egress::Direct);
        assert_eq!(global_of(Some(""), &[]).0, Egress::Direct);
        let (e, problems) = global_of(Some("http://u:p@proxy:3128"), &["10.0.0.0/8", ".corp"]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            e,
            Egress::Proxy {
                url: "http://u:p@proxy:3128".into(),
                no_proxy: vec!["10.0.0.0/8".into(), ".corp".into()],
            }
        );
        let (_, problems) = global_of(Some("socks5://u:s3cret@proxy:1080"), &["*.corp"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("http.proxy")));
        assert!(problems.iter().any(|p| p.contains("http.no_proxy")));
        assert!(!problems.iter().any(|p| p.contains("s3cret")));
    }

    #[test]
    fn overrides_are_a_url_none_or_unset() {
        let http = HttpConfig::default();
        let global = Egress::proxy("http://proxy:3128", &[]).unwrap();
        let mut c = Checker::default();
        let none = Secret::new("none");
        let other = Secret::new("https://other:443");
        let empty = Secret::new("");
        assert_eq!(resolve("k", None, &global, &http, &mut c), global);
        assert_eq!(
            resolve("k", Some(&none), &global, &http, &mut c),
            Egress::Direct
        );
        assert!(resolve("k", Some(&other), &global, &http, &mut c).is_proxied());
        assert_eq!(c.count(), 0);
        resolve("targets.x.proxy", Some(&empty), &global, &http, &mut c);
        assert_eq!(c.count(), 1);
    }
}
