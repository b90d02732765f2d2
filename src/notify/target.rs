//! A notification target as configured: its kind, where its requests go, its limits and how
//! a body becomes what it sends.

use std::time::Duration;

use super::guard::Policy;
use crate::platform::outbound::RenderOptions;
use crate::platform::{Endpoint, Kind, Limit};

/// A configured notification target, validated.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
    pub endpoint: Endpoint,
    pub limits: Vec<Limit>,
    /// Per recipient (app messages).
    pub member_limits: Vec<Limit>,
    pub pause_on_rate_limit: Duration,
    pub render: RenderOptions,
    /// Accounts receiving app messages that name no recipient.
    pub users: Vec<String>,
    pub composition: Composition,
    /// What one message may ask of it: broadcasts, how many people.
    pub policy: Policy,
    /// Messages delivered at once: 1 keeps the queue's order (chat platforms show messages in
    /// the order they came); a webhook may allow more.
    pub concurrency: usize,
    /// How its requests (and its token fetches) leave: `proxy`, else `[http] proxy`.
    pub egress: crate::egress::Egress,
}

/// How a body becomes the notification sent (`template`, `recipients`, `mention`, `exclude_actor` of a target or a route rule).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Composition {
    pub template: Option<String>,
    pub recipients: Vec<String>,
    pub mention: Vec<String>,
    /// `None`: not said (true, unless a route rule's target says otherwise).
    pub exclude_actor: Option<bool>,
}

impl Composition {
    /// This (a route rule's) shaping, with the target's where this one says nothing.
    pub fn over(&self, base: &Composition) -> Composition {
        Composition {
            template: self.template.clone().or_else(|| base.template.clone()),
            recipients: if self.recipients.is_empty() {
                base.recipients.clone()
            } else {
                self.recipients.clone()
            },
            mention: if self.mention.is_empty() {
                base.mention.clone()
            } else {
                self.mention.clone()
            },
            exclude_actor: self.exclude_actor.or(base.exclude_actor),
        }
    }
}
