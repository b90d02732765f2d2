//! Reading the bus: one durable consumer per target (feeding its worker's queue) and per route
//! (forwarding to the targets its rules name), and a catch-all that dead-letters notifications
//! for targets nobody configured. A message is acknowledged only once the platform accepted it
//! or it was dead-lettered; while it waits it is kept alive on the bus (see [`InFlight`]).
//!
//! [`InFlight`]: super::in_flight::InFlight

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::compose::{ComposeError, Prepared};
use super::generation::{Generation, Live};
use super::router::{self, Route, Rule};
use super::settings::NotifySettings;
use super::target::Target;
use super::verdict::Reason;
use super::worker::{Job, Shared};
use crate::bus::{self, Bus, Delivery};
use crate::message;
use crate::shutdown::Shutdown;

/// What reading the bus needs besides what the workers share.
pub struct Intake {
    pub bus: Arc<Bus>,
    pub prefix: String,
    /// Targets, routes, templates and bindings, as the latest (re)load said them.
    pub live: Live,
}

impl Intake {
    /// Prepares a message for `target` under `generation`, reporting accounts not bound on
    /// its platform.
    pub fn prepare(
        &self,
        shared: &Shared,
        generation: &Generation,
        target: &Target,
        body: &[u8],
        rule: Option<(&str, &Rule)>,
        seed: String,
    ) -> Result<Prepared, ComposeError> {
        let result = generation.composer().prepare(body, target, rule, seed);
        let unbound = match &result {
            Ok(p) => &p.unbound,
            Err(ComposeError::NoRecipients { unbound }) => unbound,
            Err(_) => return result,
        };
        if !unbound.is_empty() {
            shared
                .metrics
                .notify_unbound_users(&target.name, unbound.len());
            tracing::warn!(target = %target.name, accounts = ?unbound, "accounts not bound on this platform ([users.<account>]); skipped");
        }
        result
    }
}

/// The durable consumers of the notify pipeline: one per target or notify route, and one per
/// `from` pattern of a route on inbound events (NATS 2.9 takes one filter per consumer), each
/// with the name it feeds and an in-flight limit of the queue size, so that a flooded target
/// holds only its own slots on the bus and never starves another; and one for every
/// notification, which dead-letters those for targets nobody configured.
pub fn specs<'a>(
    settings: &NotifySettings,
    targets: impl Iterator<Item = &'a String>,
    routes: &BTreeMap<String, Route>,
    prefix: &str,
) -> (Vec<(String, bus::ConsumerSpec)>, bus::ConsumerSpec) {
    let spec = |durable: String, filter: &str, max_pending: usize| bus::ConsumerSpec {
        durable,
        filter: bus::with_prefix(prefix, filter),
        max_pending,
        stream: settings.stream.clone(),
        ack_wait: settings.ack_wait,
        new_only: false,
    };
    let own = |name: &String| {
        let durable = format!("{}-{name}", settings.consumer);
        let filter = format!("notify.{name}");
        (
            name.clone(),
            spec(durable, &filter, settings.queue_capacity),
        )
    };
    let mut per_name: Vec<_> = targets.map(own).collect();
    for (name, route) in routes {
        if !route.on_events() {
            per_name.push(own(name));
            continue;
        }
        for pattern in &route.from {
            // Named after the pattern: a durable keeps the filter it was made with, so an
            // edited pattern must get a consumer of its own rather than reuse the old one.
            let durable = format!("{}-{name}-{}", settings.consumer, pattern_id(pattern));
            let mut s = spec(durable, pattern, settings.queue_capacity);
            s.stream = settings.inbound_stream.clone();
            s.new_only = true;
            per_name.push((name.clone(), s));
        }
    }
    let all = spec(
        settings.consumer.clone(),
        "notify.>",
        settings.max_ack_pending as usize,
    );
    (per_name, all)
}

/// A short, stable name for a subject pattern, usable in a durable's name (which takes no
/// dots or wildcards).
fn pattern_id(pattern: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(pattern.as_bytes())[..6])
}

/// The publisher's message id, or one derived from where and when the bus stored the message
/// and what it holds: the same on every redelivery, so copies made from it (a route's
/// forwards, Lark's idempotency uuid) are recognised as the same.
pub fn message_id(delivery: &Delivery) -> String {
    use sha2::{Digest, Sha256};
    if let Some(id) = delivery.id() {
        return id.to_owned();
    }
    let stored = delivery
        .published
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut h = Sha256::new();
    h.update(delivery.subject.as_bytes());
    h.update(stored.to_be_bytes());
    h.update(&delivery.payload);
    hex::encode(&h.finalize()[..16])
}

/// A bus consumer shared with the restarts of the task reading it: a task that panicked
/// leaves it behind (the lock is released as the panic unwinds) for the next one.
pub type Source = Arc<tokio::sync::Mutex<bus::Consumer>>;

/// Reads one target's consumer and hands each message to the target's worker, prepared under
/// the generation current when it arrives. Ends on `stop` (shutdown, or a reload removing the
/// target), handing back what it holds.
pub async fn feed(
    name: String,
    source: Source,
    shared: Arc<Shared>,
    intake: Arc<Intake>,
    stop: Shutdown,
) {
    let depth = shared.metrics.notify_queue_depth(&name);
    let mut consumer = source.lock().await;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = stop.cancelled() => break,
        };
        // Held from here: should this task die before the message is settled, it goes back.
        let held = shared.in_flight.hold(Arc::new(delivery));
        // A target a reload just added has its consumer before its generation is current;
        // one a reload removed stops here.
        let Some(generation) = intake.live.when(|g| g.target(&name).is_some(), &stop).await else {
            let _ = held.delivery().nak(Duration::ZERO).await;
            held.settled();
            break;
        };
        let (target, queue) = generation.target(&name).expect("checked by when()");
        let delivery = held.delivery();
        let seed = message_id(delivery);
        let rule = router::rule_of(&generation.routes, delivery, &name);
        let prepared = intake.prepare(&shared, &generation, target, &delivery.payload, rule, seed);
        let prepared = match prepared {
            Ok(p) => Prepared {
                origin: router::origin(&generation.routes, delivery),
                ..p
            },
            Err(e) => {
                let letters = &shared.dead_letters;
                let detail = e.to_string();
                letters
                    .store(delivery, &name, Reason::from(&e), 0, &detail)
                    .await;
                held.settled();
                continue;
            }
        };
        depth.inc();
        let job = Job::Bus {
            target: target.clone(),
            held,
            prepared: Box::new(prepared),
            deadline: SystemTime::now() + shared.settings.max_wait,
        };
        // The consumer hands out at most queue_capacity messages, so this rarely waits; when it
        // does, only this target waits. A queue that is gone hands the message back (the
        // guard's drop).
        if queue.send(job).await.is_err() {
            depth.dec();
            break;
        }
    }
    consumer.close().await;
}

/// Reads one route's consumer (`notify.<route>`, or one of its `from` patterns; an inbound
/// event is matched and later rendered as it is): each message is forwarded to `notify.<target>` for every target
/// of every rule it matches (each target once), then acknowledged. Forwarding through the bus
/// keeps each target's own queue, limits, retries and dead letters. The route's rules are the
/// current generation's; ends on `stop` (shutdown, or a reload removing the route).
pub async fn forward(
    name: String,
    source: Source,
    shared: Arc<Shared>,
    intake: Arc<Intake>,
    stop: Shutdown,
) {
    let name = name.as_str();
    let mut consumer = source.lock().await;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = stop.cancelled() => break,
        };
        let Some(generation) = intake
            .live
            .when(|g| g.routes.contains_key(name), &stop)
            .await
        else {
            let _ = delivery.nak(Duration::ZERO).await;
            break;
        };
        let route = &generation.routes[name];
        let payload = match message::payload(&delivery.payload) {
            Ok(p) => serde_json::Value::Object(p),
            Err(e) => {
                let (reason, detail) = (Reason::InvalidMessage, e.to_string());
                let letters = &shared.dead_letters;
                letters.store(&delivery, name, reason, 0, &detail).await;
                continue;
            }
        };
        if !forward_one(route, &delivery, &payload, &shared, &intake).await {
            // Shutting down or moved: it comes again, and what was forwarded already is
            // recognised as a duplicate (within the bus's duplicate window).
            let _ = delivery.nak(Duration::ZERO).await;
            if stop.is_triggered() {
                break;
            }
            continue;
        }
        // Forwarded and not yet acknowledged: a task dying here leaves the message to come
        // again, and its copies must then be recognised as duplicates.
        crate::supervise::failpoint("notify-route", name);
        if let Err(e) = delivery.ack().await {
            tracing::debug!(route = name, error = %e, "ack failed after forwarding; it comes again");
        }
    }
    consumer.close().await;
}

/// Publishes a message's copies for the targets its rules name; `false` when it stopped
/// before all were stored (shutdown, or the message moved to another replica).
async fn forward_one(
    route: &Route,
    delivery: &Delivery,
    payload: &serde_json::Value,
    shared: &Shared,
    intake: &Intake,
) -> bool {
    let name = route.name.as_str();
    let id = route.forward_id(&message_id(delivery));
    let chosen = route.forwards(payload);
    if chosen.is_empty() {
        shared.metrics.notify_routed(name, "");
        tracing::info!(route = name, id, "no rule matches; nothing to send");
    }
    for (target, _) in chosen {
        // A Kafka partition moved to another replica: the message is theirs now, and what
        // was forwarded already carries ids they derive the same way.
        if !delivery.is_current() {
            return false;
        }
        let msg = router::forwarded(delivery, &id, name, target, &intake.prefix);
        if !intake
            .bus
            .publish_until_stored(&msg, &shared.shutdown)
            .await
        {
            return false;
        }
        shared.metrics.notify_routed(name, target);
    }
    true
}

/// Reads every notification: those for configured targets and routes are their own
/// consumers' business (acknowledged here at once), the others are dead-lettered as
/// `unknown_target`.
pub async fn catch_all(source: Source, shared: Arc<Shared>, intake: Arc<Intake>, stop: Shutdown) {
    let subject_prefix = bus::with_prefix(&intake.prefix, "notify.");
    let mut consumer = source.lock().await;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = stop.cancelled() => break,
        };
        let target = delivery
            .subject
            .strip_prefix(&subject_prefix)
            .unwrap_or(&delivery.subject)
            .to_owned();
        if intake.live.current().reads(&target) {
            if let Err(e) = delivery.ack().await {
                tracing::debug!(error = %e, "catch-all ack failed; it comes again");
            }
            continue;
        }
        let detail = format!("no target named {target:?} is configured");
        let letters = &shared.dead_letters;
        letters
            .store(&delivery, &target, Reason::UnknownTarget, 0, &detail)
            .await;
    }
    consumer.close().await;
}
