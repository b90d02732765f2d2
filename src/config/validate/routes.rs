//! `[routes.<name>]`: rules forwarding `notify.<name>` to targets by the message's fields.

use std::collections::BTreeMap;

use super::catalog::Shaping;
use super::checker::Checker;
use crate::config::raw::{Config, OneOrMany, RouteConfig, RuleConfig};
use crate::notify::router::{Route, Rule};
use crate::notify::template::Templates;

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
        let route = Route {
            name: name.clone(),
            rules,
        };
        routes.insert(name.clone(), route);
    }
    routes
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
