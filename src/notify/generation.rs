//! What the pipeline prepares and sends with, as one configuration says it: targets (each
//! with its worker's queue), routes, templates and user bindings. A reload builds a new
//! [`Generation`] and swaps it in whole; a message takes the generation current when it is
//! prepared and keeps it (its target travels with it to the worker), so messages in flight
//! finish under the configuration they started with.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::compose::{Composer, Directory};
use super::router::Route;
use super::target::Target;
use super::template::Templates;
use super::worker::Job;
use crate::shutdown::Shutdown;

/// One configuration of the pipeline.
pub struct Generation {
    pub targets: BTreeMap<String, Arc<Target>>,
    /// Each target's worker queue; a target kept across reloads keeps its queue (and its
    /// worker), so its order and concurrency hold.
    pub queues: HashMap<String, mpsc::Sender<Job>>,
    pub routes: BTreeMap<String, Route>,
    pub templates: Templates,
    pub users: Directory,
}

impl Generation {
    pub fn composer(&self) -> Composer<'_> {
        Composer {
            templates: &self.templates,
            users: &self.users,
        }
    }

    /// Whether `notify.<name>` is some consumer's: a target's, or a route's that reads
    /// notifications (a route on events reads none).
    pub fn reads(&self, name: &str) -> bool {
        self.targets.contains_key(name) || self.routes.get(name).is_some_and(|r| !r.on_events())
    }

    /// The target `name` and its queue.
    pub fn target(&self, name: &str) -> Option<(&Arc<Target>, &mpsc::Sender<Job>)> {
        Some((self.targets.get(name)?, self.queues.get(name)?))
    }
}

/// The current generation, swapped whole by a reload.
pub struct Live(watch::Sender<Arc<Generation>>);

impl Live {
    pub fn new(first: Generation) -> Self {
        Live(watch::Sender::new(Arc::new(first)))
    }

    pub fn current(&self) -> Arc<Generation> {
        self.0.borrow().clone()
    }

    pub fn replace(&self, next: Generation) -> Arc<Generation> {
        self.0.send_replace(Arc::new(next))
    }

    /// The current generation once `has` is true of it: a consumer a reload started before
    /// handing over its generation (so that the bus already holds its subscription) waits
    /// here for it; `None` when `stop` comes first (the reload removed it again).
    pub async fn when(
        &self,
        has: impl Fn(&Generation) -> bool,
        stop: &Shutdown,
    ) -> Option<Arc<Generation>> {
        // Nearly always already so: every message comes here, and a subscription is only
        // needed to wait for a reload's hand-over.
        let current = self.current();
        if has(&current) {
            return Some(current);
        }
        let mut rx = self.0.subscribe();
        tokio::select! {
            g = rx.wait_for(|g| has(g)) => g.ok().map(|g| g.clone()),
            _ = stop.cancelled() => None,
        }
    }
}
