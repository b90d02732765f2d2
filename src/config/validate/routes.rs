//! `[routes.<name>]`: rules forwarding `notify.<name>` (or inbound events, with `from`) to
//! targets by the message's fields.

use std::collections::BTreeMap;

use super::catalog::Shaping;
use super::checker::Checker;
use crate::config::raw::{Config, OneOrMany, RouteConfig, RuleConfig};
use crate::notify::router::{Route, Rule};
use crate::notify::target::Target;
use crate::notify::template::Templates;
use crate::platform::Platform;

pub(super) fn routes(
    config: &Config,
    templates: &Templates,
    c: &mut Checker,
) -> BTreeMap<String, Route> {
    let mut routes = BTreeMap::new();
    for (name, r) in &config.routes {
        let key = format!("routes.{name}");
        c.name(&key, name, "route");
        if config.targets.contains_key(name) {
            c.problem(
                &key,
                "a target has this name too: notify.<name> must mean one thing",
            );
        }
        let rules = route(r, &key, c)
            .into_iter()
            .map(|(key, rule)| self::rule(rule, &key, config, templates, c))
            .collect();
        let from = from(&r.from, &format!("{key}.from"), c);
        let route = Route {
            name: name.clone(),
            rules,
            from,
        };
        routes.insert(name.clone(), route);
    }
    routes
}

/// The inbound subject patterns a route reads: each must be a NATS pattern within one
/// platform's inbound subjects (`<platform>.>`), else the route would wait forever.
fn from(patterns: &[String], key: &str, c: &mut Checker) -> Vec<String> {
    if patterns.is_empty() {
        return Vec::new();
    }
    let mut seen = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let key = format!("{key}[{i}]");
        if let Err(why) = check_pattern(p) {
            c.problem(&key, why);
        } else if seen.contains(p) {
            c.problem(&key, "listed twice");
        }
        seen.push(p.clone());
    }
    seen
}

/// Why `p` is not a subject pattern matching some inbound event.
fn check_pattern(p: &str) -> Result<(), String> {
    let tokens: Vec<&str> = p.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        let ok = match *t {
            ">" => i == tokens.len() - 1,
            "*" => true,
            t => crate::bus::is_valid_token(t),
        };
        if !ok {
            return Err(format!(
                "{p:?} is not a subject pattern: tokens of [A-Za-z0-9_-], `*`, or `>` last"
            ));
        }
    }
    // Inbound subjects are `<platform>.<event type>[.<more>]`: at least two tokens. The
    // platform is spelled out: a NATS 2.9 consumer's filter must lie within one of the
    // stream's subjects (`<platform>.>`), so `*.x` or `>` would be refused at startup.
    let platform = Platform::ALL.iter().any(|pl| pl.as_str() == tokens[0]);
    if !platform || tokens.len() < 2 {
        let subjects: Vec<String> = Platform::ALL
            .iter()
            .map(|pl| format!("{}.>", pl.as_str()))
            .collect();
        return Err(format!(
            "{p:?} matches no inbound subject: it must lie within one of {} (the platform \
             spelled out, the bus prefix left out)",
            subjects.join(", ")
        ));
    }
    Ok(())
}

/// The route's rules, each with its key: the shorthand first, then `rules`.
fn route(r: &RouteConfig, key: &str, c: &mut Checker) -> Vec<(String, RuleConfig)> {
    let mut rules = Vec::new();
    match r.shorthand() {
        Some(rule) => rules.push((key.to_owned(), rule)),
        None if r.template.is_some() || !r.recipients.is_empty() || !r.mention.is_empty() => {
            c.problem(
                key,
                "template, recipients and mention apply to the route's own targets; set targets \
                 or move them into the rules",
            );
        }
        None => {}
    }
    for (i, rule) in r.rules.iter().enumerate() {
        rules.push((format!("{key}.rules[{i}]"), rule.clone()));
    }
    if rules.is_empty() {
        c.problem(format!("{key}.targets"), "a route needs targets or rules");
    }
    rules
}

fn rule(r: RuleConfig, key: &str, config: &Config, templates: &Templates, c: &mut Checker) -> Rule {
    if r.targets.is_empty() {
        c.problem(format!("{key}.targets"), "must name at least one target");
    }
    for t in &r.targets {
        if !config.targets.contains_key(t) {
            c.problem(
                format!("{key}.targets"),
                format!("no [targets.{t}] is configured"),
            );
        }
    }
    let matches = r
        .matches
        .iter()
        .map(|(field, values)| {
            (
                field.clone(),
                accepted(values, &format!("{key}.match.{field}"), c),
            )
        })
        .collect();
    let shaping = Shaping {
        template: r.template.as_ref(),
        recipients: &r.recipients,
        mention: &r.mention,
        exclude_actor: r.exclude_actor,
    };
    shaping.check(key, templates, c);
    let composition = shaping.composition();
    Rule {
        targets: r.targets,
        matches,
        composition,
    }
}

/// An inbound event is no notification: a chat target it reaches without a template (the
/// rule's or the target's own) would dead-letter every event as invalid. Valid all the same (a
/// publisher may shape its events as notifications), so a warning, naming the rule.
pub(super) fn warn_untemplated_events(
    routes: &BTreeMap<String, Route>,
    targets: &BTreeMap<String, Target>,
    c: &mut Checker,
) {
    for route in routes.values().filter(|r| r.on_events()) {
        for rule in &route.rules {
            for name in &rule.targets {
                let Some(target) = targets.get(name) else {
                    continue;
                };
                let templated =
                    rule.composition.template.is_some() || target.composition.template.is_some();
                if !templated && !target.kind.carries_events() {
                    c.warning(
                        format!("routes.{}", route.name),
                        format!(
                            "inbound events reach {name} ({}) without a template: \
                             events that are not notifications are dead-lettered there",
                            target.kind.as_str()
                        ),
                    );
                }
            }
        }
    }
}

/// The values a match accepts, trimmed.
fn accepted(values: &OneOrMany, key: &str, c: &mut Checker) -> Vec<String> {
    let values: Vec<String> = values.items().iter().map(|v| v.trim().to_owned()).collect();
    if values.is_empty() {
        c.problem(
            key,
            "must list at least one value (leave the field out to match everything)",
        );
    }
    values
}

#[cfg(test)]
mod tests {
    use super::check_pattern;

    #[test]
    fn from_patterns_must_reach_an_inbound_subject() {
        for ok in [
            "dingtalk.bpms_instance_change.*.finish",
            "wecom.>",
            "dingtalk.*",
            "lark.im.message.receive_v1",
        ] {
            assert_eq!(check_pattern(ok), Ok(()), "{ok}");
        }
        for bad in [
            "notify.ops",
            "*.user_add_org",
            ">",
            "dingtalk",
            "prod.dingtalk.>",
            "dingtalk.>.x",
            "dingtalk..x",
            "dingtalk.a b",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }
}
