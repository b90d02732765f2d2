//! `imbridge render`: what a target or route would send for a payload, request by request,
//! computed by the same code the daemon runs, without sending anything.

use super::compose::{ComposeError, Composer};
use super::notifier::Catalog;
use super::router::Rule;
use super::target::Target;
use super::verdict::Reason;
use super::worker::render;
use crate::message;
use crate::platform::outbound::Request;

/// What a target or route would send for `body`, request by request, without sending. `id`
/// stands for the message id (Lark's idempotency
/// uuid derives from it; a route's copies get `<id>.<target>`, or `<id>.<route>.<target>` for
/// a route on events, as on the bus).
pub fn preview(
    catalog: &Catalog,
    name: &str,
    body: &[u8],
    id: &str,
) -> Result<Preview, PreviewError> {
    let composer = Composer {
        templates: &catalog.templates,
        users: &catalog.users,
    };
    // (target, the rule that forwards to it, message id)
    type Planned<'a> = (&'a Target, Option<(&'a str, &'a Rule)>, String);
    let mut jobs: Vec<Planned> = Vec::new();
    if let Some(t) = catalog.targets.get(name) {
        jobs.push((t, None, id.to_owned()));
    } else if let Some(route) = catalog.routes.get(name) {
        let payload =
            serde_json::Value::Object(message::payload(body).map_err(ComposeError::from)?);
        for (t, rule) in route.forwards(&payload) {
            jobs.push((
                &catalog.targets[t],
                Some((route.name.as_str(), rule)),
                format!("{}.{t}", route.forward_id(id)),
            ));
        }
    } else {
        return Err(PreviewError::Unknown(name.to_owned()));
    }
    // A target's own message either renders or not; a route's targets each on their own.
    let single = catalog.targets.contains_key(name);
    let (mut requests, mut unbound, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (target, rule, seed) in jobs {
        let prepared = match composer.prepare(body, target, rule, seed) {
            Ok(p) => p,
            Err(e) if single => return Err(PreviewError::Compose(target.name.clone(), e)),
            // A route still sends to its other targets; this copy would be dead-lettered.
            Err(e) => {
                failed.push((target.name.clone(), Reason::from(&e), e));
                continue;
            }
        };
        if !prepared.unbound.is_empty() {
            unbound.push((target.name.clone(), prepared.unbound.clone()));
        }
        for request in render(target, &prepared) {
            let place = target.kind.describe(&target.endpoint, &request);
            requests.push((target.name.clone(), place, request));
        }
    }
    Ok(Preview {
        requests,
        unbound,
        failed,
    })
}

/// What `imbridge render` shows.
#[derive(Debug)]
pub struct Preview {
    /// `(target, where it goes, request)`, in sending order.
    pub requests: Vec<(String, String, Request)>,
    /// `(target, accounts)` named but not bound on the target's platform: skipped.
    pub unbound: Vec<(String, Vec<String>)>,
    /// A route's targets that could not use the payload: their copy would be dead-lettered
    /// with that reason, while the other targets still get theirs.
    pub failed: Vec<(String, Reason, ComposeError)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("no target or route named {0:?} is configured")]
    Unknown(String),
    #[error("{0}: {1}")]
    Compose(String, ComposeError),
}

impl From<ComposeError> for PreviewError {
    fn from(e: ComposeError) -> Self {
        PreviewError::Compose(String::new(), e)
    }
}
