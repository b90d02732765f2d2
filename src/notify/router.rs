//! Routes: rules that match a message's fields and name the targets it goes to.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::Value;

use super::target::Composition;
use crate::bus::{self, Delivery, Message};
use crate::message;
use crate::platform::outbound::Origin;

/// Header of a message a route forwarded to a target: which route, so the target applies the
/// matching rule's template and recipients.
pub const ROUTE_HEADER: &str = "imbridge-route";

/// A validated route: its rules in order, and what it reads.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub rules: Vec<Rule>,
    /// Inbound subject patterns (NATS wildcards, without the bus prefix) the route reads
    /// instead of `notify.<name>`; empty for a notify route.
    pub from: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub targets: Vec<String>,
    /// Field → accepted values; every field must match.
    pub matches: Vec<(String, Vec<String>)>,
    pub composition: Composition,
}

impl Route {
    /// Whether the route reads inbound events rather than `notify.<name>`.
    pub fn on_events(&self) -> bool {
        !self.from.is_empty()
    }

    /// The id its copies of a message derive from: a route on events adds its name, since
    /// several routes may read the same event and forward it to the same target, and each
    /// copy must stay apart from the others in the bus's duplicate window.
    pub fn forward_id(&self, message_id: &str) -> String {
        if self.on_events() {
            format!("{message_id}.{}", self.name)
        } else {
            message_id.to_owned()
        }
    }

    /// The targets `payload` goes to, each with the first rule that matches and names it, in
    /// the order of the rules: what the route forwards, and which rule's shaping each target
    /// applies.
    pub fn forwards(&self, payload: &Value) -> Vec<(&str, &Rule)> {
        let mut out: Vec<(&str, &Rule)> = Vec::new();
        for rule in self.rules.iter().filter(|r| r.matches(payload)) {
            for t in &rule.targets {
                if !out.iter().any(|(seen, _)| seen == t) {
                    out.push((t, rule));
                }
            }
        }
        out
    }
}

impl Rule {
    /// Every field listed matches: the payload's value, or any item of a comma-separated or
    /// comma-wrapped list (ZenTao's `product` is ",1,2,"), is one of the accepted values. A
    /// field the payload lacks matches nothing, as in ZenTao, where a webhook scoped to
    /// products ignores actions without one.
    pub fn matches(&self, payload: &Value) -> bool {
        self.matches.iter().all(|(field, accepted)| {
            items(payload.get(field))
                .iter()
                .any(|v| accepted.iter().any(|a| a == v))
        })
    }
}

/// The values of a field: a string split on commas, numbers and booleans as text, arrays item
/// by item; empty items dropped.
pub(crate) fn items(v: Option<&Value>) -> Vec<String> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(Value::Array(a)) => a.iter().flat_map(|v| items(Some(v))).collect(),
        Some(Value::Object(_)) => Vec::new(),
        Some(other) => vec![other.to_string()],
    }
}

/// The copy of a routed message for one target: `notify.<target>` with id `<id>.<target>`,
/// so a forward repeated after a crash is recognised as a duplicate by the bus.
pub fn forwarded(
    delivery: &Delivery,
    id: &str,
    route: &str,
    target: &str,
    prefix: &str,
) -> Message {
    let id = format!("{id}.{target}");
    let mut headers = delivery.copied_headers();
    headers.retain(|(k, _)| {
        !(k.eq_ignore_ascii_case("ce-id") || k.eq_ignore_ascii_case(ROUTE_HEADER))
    });
    headers.push(("ce-id".into(), id.clone()));
    headers.push((ROUTE_HEADER.into(), route.into()));
    Message {
        subject: bus::with_prefix(prefix, &format!("notify.{target}")),
        id,
        headers,
        payload: Bytes::clone(&delivery.payload),
    }
}

/// The inbound event's CloudEvents type and source, for a message a route on events
/// forwarded (its copy keeps the event's headers).
pub fn origin(routes: &BTreeMap<String, Route>, delivery: &Delivery) -> Option<Origin> {
    let route = routes.get(delivery.header(ROUTE_HEADER)?)?;
    if !route.on_events() {
        return None;
    }
    Some(Origin {
        ty: delivery.header("ce-type")?.to_owned(),
        source: delivery.header("ce-source")?.to_owned(),
    })
}

/// The rule a forwarded message came through: the route's first rule that matches it and
/// names this target, as when it was forwarded. Matched again rather than trusted by
/// position, so a configuration change while copies wait cannot give them another rule's
/// template or recipients.
pub fn rule_of<'a>(
    routes: &'a BTreeMap<String, Route>,
    delivery: &Delivery,
    target: &str,
) -> Option<(&'a str, &'a Rule)> {
    let route = delivery.header(ROUTE_HEADER)?;
    let (name, r) = routes.get_key_value(route)?;
    let payload = Value::Object(message::payload(&delivery.payload).ok()?);
    let (_, rule) = r
        .forwards(&payload)
        .into_iter()
        .find(|(t, _)| *t == target)?;
    Some((name.as_str(), rule))
}
