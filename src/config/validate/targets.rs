//! `[targets.<name>]`: each target's endpoint, limits, rendering and shaping, and the limits
//! the targets of one app must share.

use std::collections::BTreeMap;

use super::super::raw::{Config, TargetConfig};
use super::catalog::Shaping;
use super::checker::Checker;
use crate::notify::target::Target;
use crate::notify::template::Templates;
use crate::platform::outbound::RenderOptions;
use crate::platform::{AppCredentials, Endpoint, Kind};

pub(super) fn targets(
    config: &Config,
    templates: &Templates,
    c: &mut Checker,
) -> BTreeMap<String, Target> {
    let mut targets = BTreeMap::new();
    for (name, t) in &config.targets {
        let key = format!("targets.{name}");
        c.name(&key, name, "target");
        shaping(t).check(&key, templates, c);
        for u in &t.users {
            if !config.users.contains_key(u) {
                c.problem(
                    format!("{key}.users"),
                    format!("no [users.{u}] is configured"),
                );
            }
        }
        if let Some(t) = target(t, name, &key, c) {
            targets.insert(name.clone(), t);
        }
    }
    shared_app_limits(&targets, c);
    targets
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

fn shaping(t: &TargetConfig) -> Shaping<'_> {
    Shaping {
        template: t.template.as_ref(),
        recipients: &t.recipients,
        mention: &t.mention,
        exclude_actor: t.exclude_actor,
    }
}

fn target(t: &TargetConfig, name: &str, key: &str, c: &mut Checker) -> Option<Target> {
    let before = c.count();
    let kind = Kind::parse(&t.kind);
    if kind.is_none() {
        let kinds: Vec<&str> = Kind::ALL.iter().map(Kind::as_str).collect();
        c.problem(
            format!("{key}.kind"),
            format!(
                "unknown target kind {:?}; expected one of {}",
                t.kind,
                kinds.join(", ")
            ),
        );
    }
    let endpoint = match kind {
        Some(k) if k.is_app() => app_endpoint(t, k, key, c),
        Some(k) => robot_endpoint(t, k, key, c),
        None => None,
    };
    let limits = c.limits(&format!("{key}.rate_limit"), t.rate_limit.as_ref());
    let limits = limits.unwrap_or_else(|| kind.map(|k| k.default_limits()).unwrap_or_default());
    let member_key = format!("{key}.member_rate_limit");
    if t.member_rate_limit.is_some() && !kind.is_some_and(|k| k.is_app()) {
        c.problem(&member_key, "only app targets have per-member limits");
    }
    let member_limits = c
        .limits(&member_key, t.member_rate_limit.as_ref())
        .unwrap_or_else(|| kind.map(|k| k.default_member_limits()).unwrap_or_default());
    let pause = match &t.pause_on_rate_limit {
        Some(p) => c.duration(&format!("{key}.pause_on_rate_limit"), p),
        None => kind.map(|k| k.default_pause()).unwrap_or_default(),
    };
    if t.max_bytes.is_some_and(|m| m < 64) {
        c.problem(format!("{key}.max_bytes"), "must be at least 64");
    }
    let is_app = kind.is_some_and(|k| k.is_app());
    if kind.is_some() && !is_app && !t.recipients.is_empty() {
        c.problem(
            format!("{key}.recipients"),
            "group bots post to their group; use mention to @ people",
        );
    }
    if is_app && !t.mention.is_empty() {
        c.problem(
            format!("{key}.mention"),
            "app messages cannot @mention; use recipients to send to people",
        );
    }
    if !t.users.is_empty() && !kind.is_some_and(|k| k.is_app()) {
        c.problem(
            format!("{key}.users"),
            "only app targets have recipients (group bots post to their group)",
        );
    }
    if c.count() > before {
        return None;
    }
    let defaults = RenderOptions::default();
    Some(Target {
        name: name.to_owned(),
        kind: kind?,
        endpoint: endpoint?,
        limits,
        member_limits,
        pause_on_rate_limit: pause,
        render: RenderOptions {
            max_bytes: t.max_bytes,
            too_long: t.too_long,
            link_text: t.link_text.clone().unwrap_or(defaults.link_text),
            lark_markdown: t.lark_markdown,
        },
        users: t.users.clone(),
        composition: shaping(t).composition(),
    })
}

fn robot_endpoint(t: &TargetConfig, kind: Kind, key: &str, c: &mut Checker) -> Option<Endpoint> {
    for (field, set) in [
        ("app_id", t.app_id.is_some()),
        ("app_secret", t.app_secret.is_some()),
        ("corp_id", t.corp_id.is_some()),
        ("agent_id", t.agent_id.is_some()),
        ("base_url", t.base_url.is_some()),
    ] {
        if set {
            c.problem(
                format!("{key}.{field}"),
                "only app targets (dingtalk_work, wecom_app, lark_app) take app credentials",
            );
        }
    }
    let Some(url) = &t.url else {
        c.problem(format!("{key}.url"), "group bots need their webhook URL");
        return None;
    };
    if !(url.expose().starts_with("http://") || url.expose().starts_with("https://")) {
        // The URL holds the robot's token: name the problem, never echo the value.
        c.problem(format!("{key}.url"), "must be an http(s) webhook URL");
    }
    if kind == Kind::WeComRobot && t.secret.is_some() {
        c.problem(
            format!("{key}.secret"),
            "WeCom robots are not signed (the key in the URL is the credential)",
        );
    }
    Some(Endpoint::Robot {
        url: url.clone(),
        secret: t.secret.clone(),
    })
}

fn app_endpoint(t: &TargetConfig, kind: Kind, key: &str, c: &mut Checker) -> Option<Endpoint> {
    let before = c.count();
    for (field, set) in [("url", t.url.is_some()), ("secret", t.secret.is_some())] {
        if set {
            c.problem(
                format!("{key}.{field}"),
                "app targets take app_id/app_secret (and corp_id, agent_id), not a webhook",
            );
        }
    }
    let (id_field, id) = match kind {
        Kind::WeComApp => ("corp_id", &t.corp_id),
        _ => ("app_id", &t.app_id),
    };
    if kind == Kind::WeComApp && t.app_id.is_some() {
        c.problem(
            format!("{key}.app_id"),
            "WeCom apps are named by corp_id and agent_id",
        );
    }
    if id.as_deref().is_none_or(|v| v.trim().is_empty()) {
        c.problem(format!("{key}.{id_field}"), "must be set for this kind");
    }
    if t.app_secret.as_ref().is_none_or(|s| s.expose().is_empty()) {
        c.problem(format!("{key}.app_secret"), "must be set for this kind");
    }
    let agent_id = match (kind, &t.agent_id) {
        (Kind::LarkApp, None) => 0,
        (Kind::LarkApp, Some(_)) => {
            c.problem(format!("{key}.agent_id"), "Lark apps have no agent id");
            0
        }
        (_, None) => {
            c.problem(format!("{key}.agent_id"), "must be set for this kind");
            0
        }
        (_, Some(a)) => a.trim().parse().unwrap_or_else(|_| {
            c.problem(format!("{key}.agent_id"), format!("{a:?} is not a number"));
            0
        }),
    };
    let base_url = t
        .base_url
        .as_deref()
        .unwrap_or(kind.default_base_url())
        .trim_end_matches('/')
        .to_owned();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        c.problem(format!("{key}.base_url"), "must be an http(s) URL");
    }
    if c.count() > before {
        return None;
    }
    Some(Endpoint::App(AppCredentials {
        base_url,
        app_id: id.clone().unwrap_or_default().trim().to_owned(),
        secret: t.app_secret.clone().unwrap_or_default(),
        agent_id,
    }))
}
