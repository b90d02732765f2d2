//! `[targets.<name>]`: each target's endpoint, limits, rendering and shaping, and the limits
//! the targets of one app must share. Keys a kind does not take were refused when the table
//! was read (`raw::targets`); what is left here is what the values say.

use std::collections::BTreeMap;

use super::catalog::Shaping;
use super::checker::Checker;
use crate::config::raw::{AppKeys, Config, KindKeys, TargetConfig, WebhookKeys};
use crate::notify::guard::Policy;
use crate::notify::target::Target;
use crate::notify::template::Templates;
use crate::platform::outbound::RenderOptions;
use crate::platform::webhook::{self, Method, Webhook};
use crate::platform::{AppCredentials, Endpoint, Kind};
use crate::secret::Secret;

/// The most requests one webhook target keeps in flight: each holds a bus message and a
/// connection, and a receiver needing more is better served by several targets or replicas.
const MAX_CONCURRENCY: i64 = 64;

pub(super) fn targets(
    config: &Config,
    read: &BTreeMap<String, TargetConfig>,
    templates: &Templates,
    c: &mut Checker,
) -> BTreeMap<String, Target> {
    for name in config.targets.keys() {
        c.name(&format!("targets.{name}"), name, "target");
    }
    let mut targets = BTreeMap::new();
    for (name, t) in read {
        let key = format!("targets.{name}");
        shaping(t).check(&key, templates, c);
        for u in t.kind.app().map_or(&[][..], |a| &a.users) {
            if !config.users.contains_key(u) {
                c.problem(
                    format!("{key}.users"),
                    format!("no [users.{u}] is configured"),
                );
            }
        }
        let policy = Policy {
            allow_broadcast: t.common.allow_broadcast,
            max_recipients: config.notify.max_recipients,
        };
        if let Some(t) = target(t, name, &key, policy, c) {
            targets.insert(name.clone(), t);
        }
    }
    shared_app_limits(&targets, c);
    targets
}

fn target(
    t: &TargetConfig,
    name: &str,
    key: &str,
    policy: Policy,
    c: &mut Checker,
) -> Option<Target> {
    let before = c.count();
    let kind = t.kind.kind();
    let mut endpoint = endpoint(t, key, c);
    if let Some(Endpoint::Webhook(hook)) = &mut endpoint {
        hook.source = format!("/imbridge/targets/{name}");
    }
    let limits = c
        .limits(&format!("{key}.rate_limit"), t.common.rate_limit.as_ref())
        .unwrap_or_else(|| kind.default_limits());
    let member_rate_limit = t.kind.app().and_then(|a| a.member_rate_limit.as_ref());
    let member_limits = c
        .limits(&format!("{key}.member_rate_limit"), member_rate_limit)
        .unwrap_or_else(|| kind.default_member_limits());
    let pause_on_rate_limit = match &t.common.pause_on_rate_limit {
        Some(p) => c.duration(&format!("{key}.pause_on_rate_limit"), p),
        None => kind.default_pause(),
    };
    if t.common.max_bytes.is_some_and(|m| m < 64) {
        c.problem(format!("{key}.max_bytes"), "must be at least 64");
    }
    let concurrency = match &t.kind {
        KindKeys::Webhook(own) => own.concurrency.unwrap_or(1),
        _ => 1,
    };
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        c.problem(
            format!("{key}.concurrency"),
            format!("must be from 1 to {MAX_CONCURRENCY}"),
        );
    }
    if c.count() > before {
        return None;
    }
    let render = RenderOptions {
        max_bytes: t.common.max_bytes,
        too_long: t.common.too_long,
        link_text: (t.common.link_text.clone()).unwrap_or(RenderOptions::default().link_text),
        lark_markdown: t.kind.lark_markdown(),
    };
    Some(Target {
        name: name.to_owned(),
        kind,
        endpoint: endpoint?,
        limits,
        member_limits,
        pause_on_rate_limit,
        render,
        users: t.kind.app().map(|a| a.users.clone()).unwrap_or_default(),
        composition: shaping(t).composition(),
        policy,
        concurrency: concurrency as usize,
        // Set by `http::apply`, with every target's and app's `proxy` known.
        egress: Default::default(),
    })
}

/// The target's template and exclude_actor, with the mentions of a group bot or the
/// recipients of an app.
fn shaping(t: &TargetConfig) -> Shaping<'_> {
    Shaping {
        template: t.common.template.as_ref(),
        recipients: t.kind.app().map_or(&[], |a| &a.recipients),
        mention: t.kind.robot().map_or(&[], |r| &r.mention),
        exclude_actor: t.common.exclude_actor,
    }
}

fn endpoint(t: &TargetConfig, key: &str, c: &mut Checker) -> Option<Endpoint> {
    let kind = t.kind.kind();
    let insecure = t.common.allow_insecure_http;
    match &t.kind {
        KindKeys::DingTalkRobot(robot, own) => {
            webhook(robot.url.as_ref(), own.secret.as_ref(), insecure, key, c)
        }
        KindKeys::WeComRobot(robot) => webhook(robot.url.as_ref(), None, insecure, key, c),
        KindKeys::LarkRobot(robot, own) => {
            webhook(robot.url.as_ref(), own.secret.as_ref(), insecure, key, c)
        }
        KindKeys::DingTalkWork(app, own) => {
            let id = ("app_id", own.app_id.as_deref());
            api(
                kind,
                app,
                id,
                Some(own.agent_id.as_deref()),
                (key, insecure),
                c,
            )
        }
        KindKeys::WeComApp(app, own) => {
            let id = ("corp_id", own.corp_id.as_deref());
            api(
                kind,
                app,
                id,
                Some(own.agent_id.as_deref()),
                (key, insecure),
                c,
            )
        }
        KindKeys::LarkApp(app, own) => {
            let id = ("app_id", own.app_id.as_deref());
            api(kind, app, id, None, (key, insecure), c)
        }
        KindKeys::Webhook(own) => generic_webhook(own, (key, insecure), c),
    }
}

/// A generic webhook: its URL, method, timeout and success codes, each checked by its key.
fn generic_webhook(
    own: &WebhookKeys,
    (key, insecure): (&str, bool),
    c: &mut Checker,
) -> Option<Endpoint> {
    let before = c.count();
    let url = own.url.as_ref().filter(|u| !u.expose().trim().is_empty());
    match url {
        // The URL may hold a token: name the problem, never echo the value.
        Some(url) => scheme(url.expose(), insecure, &format!("{key}.url"), "URL", c),
        None => c.problem(format!("{key}.url"), "a webhook needs the URL it posts to"),
    }
    let method = match own.method.as_deref() {
        None => Method::Post,
        Some(m) => Method::parse(m).unwrap_or_else(|| {
            c.problem(format!("{key}.method"), "must be \"POST\" or \"PUT\"");
            Method::Post
        }),
    };
    let timeout = (own.timeout.as_deref()).map(|t| c.duration(&format!("{key}.timeout"), t));
    let success = match &own.success {
        None => webhook::DEFAULT_SUCCESS.to_vec(),
        Some(codes) if codes.is_empty() => {
            c.problem(format!("{key}.success"), "must name at least one status");
            Vec::new()
        }
        Some(codes) => codes
            .iter()
            .filter_map(|&code| match u16::try_from(code) {
                Ok(code @ 200..=299) => Some(code),
                _ => {
                    c.problem(
                        format!("{key}.success"),
                        format!("{code} is not a 2xx status"),
                    );
                    None
                }
            })
            .collect(),
    };
    for name in own.headers.keys() {
        let valid = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok();
        if !valid || name.to_ascii_lowercase().starts_with("ce-") || reserved(name) {
            c.problem(
                format!("{key}.headers.{name}"),
                "is not a header name a webhook may set",
            );
        }
    }
    for (name, value) in &own.headers {
        if reqwest::header::HeaderValue::from_str(value.expose()).is_err() {
            // A secret: name the header, never echo the value.
            c.problem(
                format!("{key}.headers.{name}"),
                "is not a valid header value",
            );
        }
    }
    if c.count() > before {
        return None;
    }
    Some(Endpoint::Webhook(Box::new(Webhook {
        url: url.cloned().unwrap_or_default(),
        secret: own.secret.clone().filter(|s| !s.expose().is_empty()),
        headers: (own.headers.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        method,
        timeout,
        success,
        source: String::new(),
    })))
}

/// Headers the daemon sets itself: a target's own would contradict the signature or the body.
fn reserved(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "content-type" | "content-length" | "host" | "transfer-encoding"
    ) || name == webhook::SIGNATURE_HEADER
}

/// A group bot's webhook.
fn webhook(
    url: Option<&Secret>,
    secret: Option<&Secret>,
    insecure: bool,
    key: &str,
    c: &mut Checker,
) -> Option<Endpoint> {
    let Some(url) = url else {
        c.problem(format!("{key}.url"), "group bots need their webhook URL");
        return None;
    };
    // The URL holds the robot's token: name the problem, never echo the value.
    scheme(
        url.expose(),
        insecure,
        &format!("{key}.url"),
        "webhook URL",
        c,
    );
    Some(Endpoint::Robot {
        url: url.clone(),
        secret: secret.cloned(),
    })
}

/// An app's API and credentials. `id` is the key naming the app and its value; `agent_id` is
/// `None` for the kinds that have none.
fn api(
    kind: Kind,
    app: &AppKeys,
    (id_key, id): (&str, Option<&str>),
    agent_id: Option<Option<&str>>,
    (key, insecure): (&str, bool),
    c: &mut Checker,
) -> Option<Endpoint> {
    let before = c.count();
    if id.is_none_or(|v| v.trim().is_empty()) {
        c.problem(format!("{key}.{id_key}"), "must be set for this kind");
    }
    let secret = app.app_secret.as_ref().filter(|s| !s.expose().is_empty());
    if secret.is_none() {
        c.problem(format!("{key}.app_secret"), "must be set for this kind");
    }
    let agent_id = match agent_id {
        None => 0,
        Some(None) => {
            c.problem(format!("{key}.agent_id"), "must be set for this kind");
            0
        }
        Some(Some(a)) => a.trim().parse().unwrap_or_else(|_| {
            c.problem(format!("{key}.agent_id"), "is not a number");
            0
        }),
    };
    let base_url = app.base_url.as_deref().unwrap_or(kind.default_base_url());
    let base_url = base_url.trim_end_matches('/').to_owned();
    scheme(&base_url, insecure, &format!("{key}.base_url"), "URL", c);
    if c.count() > before {
        return None;
    }
    Some(Endpoint::App(AppCredentials {
        base_url,
        app_id: id.unwrap_or_default().trim().to_owned(),
        secret: secret.cloned().unwrap_or_default(),
        agent_id,
    }))
}

/// Platform requests carry credentials (a bot's token in its URL, an app's secret and access
/// tokens): `https://` only, unless the target says `allow_insecure_http`.
fn scheme(url: &str, insecure: bool, key: &str, what: &str, c: &mut Checker) {
    let url = url.trim_start();
    let lower = |n: usize| url.get(..n).map(str::to_ascii_lowercase);
    if lower(8).as_deref() == Some("https://") {
        return;
    }
    if lower(7).as_deref() == Some("http://") {
        if !insecure {
            c.problem(
                key,
                format!(
                    "is an http:// {what}: credentials would travel in clear; use https:// \
                     (or set allow_insecure_http = true on this target)"
                ),
            );
        }
        return;
    }
    c.problem(key, format!("must be an https:// {what}"));
}

/// Targets of one app share its limits on the platform, and so in the limiter: they must say
/// the same, or each would prune the shared logs by its own.
fn shared_app_limits(targets: &BTreeMap<String, Target>, c: &mut Checker) {
    let mut by_app: BTreeMap<(Kind, String, u64), &Target> = BTreeMap::new();
    for t in targets.values() {
        let Endpoint::App(a) = &t.endpoint else {
            continue;
        };
        let key = (t.kind, a.app_id.clone(), a.agent_id);
        match by_app.get(&key) {
            Some(first) if first.limits != t.limits || first.member_limits != t.member_limits => {
                c.problem(
                    format!("targets.{}", t.name),
                    format!(
                        "shares its app with targets.{} but not its rate_limit and \
                         member_rate_limit: one app has one set of limits",
                        first.name
                    ),
                );
            }
            Some(_) => {}
            None => {
                by_app.insert(key, t);
            }
        }
    }
}
