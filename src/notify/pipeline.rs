//! consume → route to the target's queue → render → rate-limit → send → classify → ack or
//! dead-letter.
//!
//! One dispatcher reads `notify.>` and hands each message to its target's worker through a
//! bounded queue; each target has its own worker, so a throttled or paused target never delays
//! another (no head-of-line blocking). When a target's queue is full the message is handed back
//! to the bus (negative ack with a delay) instead of taking every in-flight slot. A message is
//! acknowledged only once the platform accepted it or it was dead-lettered; while it waits it
//! is kept alive on the bus with progress acks, and if this replica dies it is redelivered.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use super::limiter::{Limiter, LimiterError};
use super::message;
use super::shape::{Directory, Prepared, ShapeError, Shaper};
use super::template::Templates;
use super::token::{self, TokenCache};
use crate::bus::{self, Bus, Delivery, Message};
use crate::config::{AppCredentials, Endpoint, NotifySettings, Route, Rule, Target, TargetKind};
use crate::metrics::{Metrics, UNKNOWN_APP};
use crate::platform::outbound::{transport_answer, Answer, Class, IssuedToken, TokenRequest};
use crate::platform::{dingtalk, lark, now_ms, wecom};
use crate::shutdown::Shutdown;

/// Headers a dead letter carries besides the original ones.
pub const DLQ_REASON: &str = "imbridge-dlq-reason";
pub const DLQ_ATTEMPTS: &str = "imbridge-dlq-attempts";
pub const DLQ_ANSWER: &str = "imbridge-dlq-answer";
pub const DLQ_TARGET: &str = "imbridge-dlq-target";

/// Header of a message a route forwarded to a target: which route, so the target applies the
/// matching rule's template and recipients.
pub const ROUTE_HEADER: &str = "imbridge-route";

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every part accepted; the last answer.
    Delivered { parts: usize, answer: Answer },
    /// Not delivered: why, how many sends were tried, and the platform's last answer.
    Failed {
        reason: Reason,
        attempts: u32,
        answer: Option<Answer>,
    },
}

/// Why a notification was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The platform refused it for good (bad signature, invalid token, bad message).
    Permanent,
    /// Transient failures until `notify.max_attempts` ran out.
    AttemptsExhausted,
    /// Not delivered within `notify.max_wait` (throttled, paused or retried too long).
    Expired,
    /// "Too fast" answers `notify.max_attempts` times in a row for this message: the platform
    /// may be using the code for something about the message itself (Lark's 9499).
    RateLimited,
    /// The daemon is stopping; the message goes back to the bus.
    Shutdown,
    /// The bus gave the message to another replica (a Kafka partition moved); it is theirs.
    Moved,
    UnknownTarget,
    InvalidMessage,
    /// The template failed on this payload.
    TemplateError,
    /// An app message none of whose recipients is bound on the platform.
    NoRecipients,
    /// The platform refused the app's credentials when asked for an access token.
    TokenRefused,
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Permanent => "permanent",
            Reason::AttemptsExhausted => "attempts_exhausted",
            Reason::Expired => "expired",
            Reason::RateLimited => "rate_limited",
            Reason::Shutdown => "shutdown",
            Reason::Moved => "moved",
            Reason::UnknownTarget => "unknown_target",
            Reason::InvalidMessage => "invalid_message",
            Reason::TemplateError => "template_error",
            Reason::NoRecipients => "no_recipients",
            Reason::TokenRefused => "token_refused",
        }
    }
}

enum Job {
    /// From the bus: ack or dead-letter when done.
    Bus {
        delivery: Arc<Delivery>,
        prepared: Box<Prepared>,
        /// Dead-letter as expired if not delivered by then (`notify.max_wait` from receipt).
        deadline: SystemTime,
        /// Its entry in the held set.
        held: u64,
    },
    /// `POST /notify/<target>?wait=true`: answer the caller, nothing on the bus.
    Sync {
        prepared: Box<Prepared>,
        reply: oneshot::Sender<Outcome>,
        /// The caller stops waiting then; nothing is sent after it.
        deadline: SystemTime,
    },
}

/// Why a synchronous delivery could not be attempted.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("no such target")]
    UnknownTarget,
    #[error("{0}")]
    Shape(#[from] ShapeError),
    #[error("the target's queue is full")]
    QueueFull,
    #[error("no answer within the wait timeout")]
    Timeout,
    #[error("shutting down")]
    Shutdown,
}

/// What workers share.
struct Ctx {
    settings: NotifySettings,
    bus: Arc<Bus>,
    limiter: Limiter,
    metrics: Metrics,
    http: reqwest::Client,
    prefix: String,
    shutdown: Shutdown,
    held: Held,
    routes: BTreeMap<String, Route>,
    templates: Templates,
    users: Directory,
    tokens: TokenCache,
}

impl Ctx {
    fn shaper(&self) -> Shaper<'_> {
        Shaper {
            templates: &self.templates,
            users: &self.users,
        }
    }

    /// The rule a forwarded message came through: the route's first rule that matches it and
    /// names this target, as when it was forwarded. Matched again rather than trusted by
    /// position, so a configuration change while copies wait cannot give them another rule's
    /// template or recipients.
    fn rule_of(&self, delivery: &Delivery, target: &str) -> Option<(&str, &Rule)> {
        let route = delivery.header(ROUTE_HEADER)?;
        let (name, r) = self.routes.get_key_value(route)?;
        let payload = serde_json::Value::Object(message::payload(&delivery.payload).ok()?);
        let (_, rule) = r
            .forwards(&payload)
            .into_iter()
            .find(|(t, _)| *t == target)?;
        Some((name.as_str(), rule))
    }

    /// Prepares a message for `target`, reporting unbound accounts.
    fn prepare(
        &self,
        target: &Target,
        body: &[u8],
        rule: Option<(&str, &Rule)>,
        seed: String,
    ) -> Result<Prepared, ShapeError> {
        let result = self.shaper().prepare(body, target, rule, seed);
        let unbound = match &result {
            Ok(p) => &p.unbound,
            Err(ShapeError::NoRecipients { unbound }) => unbound,
            Err(_) => return result,
        };
        if !unbound.is_empty() {
            self.metrics
                .notify_unbound_users_total
                .with_label_values(&[&target.name])
                .inc_by(unbound.len() as u64);
            tracing::warn!(target = %target.name, accounts = ?unbound, "accounts not bound on this platform ([users.<account>]); skipped");
        }
        result
    }
}

/// The publisher's message id, or one derived from where and when the bus stored the message
/// and what it holds: the same on every redelivery, so copies made from it (a route's
/// forwards, Lark's idempotency uuid) are recognised as the same.
fn message_id(delivery: &Delivery) -> String {
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

/// The dead-letter reason of a message that cannot be prepared.
pub fn shape_reason(e: &ShapeError) -> Reason {
    match e {
        ShapeError::Invalid(_) => Reason::InvalidMessage,
        ShapeError::Template(_) => Reason::TemplateError,
        ShapeError::NoRecipients { .. } => Reason::NoRecipients,
    }
}

/// Every bus message this replica holds (queued or being delivered). A keeper sends progress
/// acks for all of them, so the bus does not redeliver a message that is only waiting for its
/// target's rate limit to another replica.
#[derive(Default)]
struct Held {
    next: std::sync::atomic::AtomicU64,
    map: Mutex<HashMap<u64, Arc<Delivery>>>,
}

impl Held {
    fn insert(&self, d: Arc<Delivery>) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.map.lock().expect("not poisoned").insert(id, d);
        id
    }

    fn remove(&self, id: u64) {
        self.map.lock().expect("not poisoned").remove(&id);
    }

    fn all(&self) -> Vec<Arc<Delivery>> {
        self.map
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }
}

/// Sends progress acks for every held message every third of `ack_wait`.
async fn keep_alive(ctx: Arc<Ctx>) {
    let every = (ctx.settings.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.shutdown.cancelled() => return,
        }
        for d in ctx.held.all() {
            if let Err(e) = d.progress().await {
                tracing::debug!(error = %e, "progress ack failed");
            }
        }
    }
}

/// What the notify pipeline sends to and how: targets, routes, templates, user bindings.
pub struct Outbound {
    pub targets: BTreeMap<String, Target>,
    pub routes: BTreeMap<String, Route>,
    pub templates: Templates,
    pub users: Directory,
}

pub struct Notifier {
    targets: BTreeMap<String, Arc<Target>>,
    routes: BTreeMap<String, Route>,
    queues: HashMap<String, mpsc::Sender<Job>>,
    ctx: Arc<Ctx>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Notifier {
    /// Starts one worker per target and, when `settings.enabled`, the bus consumer.
    pub fn start(
        settings: &NotifySettings,
        outbound: Outbound,
        bus: Arc<Bus>,
        limiter: Limiter,
        metrics: Metrics,
        prefix: &str,
        shutdown: Shutdown,
    ) -> Arc<Notifier> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .user_agent(concat!("imbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("building the HTTP client");
        let ctx = Arc::new(Ctx {
            settings: settings.clone(),
            bus,
            limiter,
            metrics,
            http,
            prefix: prefix.to_owned(),
            shutdown: shutdown.clone(),
            held: Held::default(),
            routes: outbound.routes.clone(),
            templates: outbound.templates,
            users: outbound.users,
            tokens: TokenCache::default(),
        });
        let mut queues = HashMap::new();
        let mut tasks = Vec::new();
        let mut arcs = BTreeMap::new();
        let targets = &outbound.targets;
        for (name, target) in targets {
            let target = Arc::new(target.clone());
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            queues.insert(name.clone(), tx);
            tasks.push(tokio::spawn(worker(target.clone(), rx, ctx.clone())));
            arcs.insert(name.clone(), target);
        }
        let notifier = Arc::new(Notifier {
            targets: arcs,
            routes: outbound.routes,
            queues,
            ctx: ctx.clone(),
            tasks: Mutex::new(Vec::new()),
        });
        if settings.enabled {
            tasks.push(tokio::spawn(keep_alive(ctx.clone())));
            let names = targets.keys().chain(notifier.routes.keys());
            let (per_name, all) = consumer_specs(settings, names.clone(), prefix);
            for (name, spec) in names.zip(&per_name) {
                let consumer = ctx.bus.consume(spec, settings, shutdown.clone());
                if let Some(route) = notifier.routes.get(name) {
                    tasks.push(tokio::spawn(forward(route.clone(), consumer, ctx.clone())));
                    continue;
                }
                tasks.push(tokio::spawn(feed(
                    notifier.targets[name].clone(),
                    consumer,
                    notifier.queues[name].clone(),
                    ctx.clone(),
                )));
            }
            let consumer = ctx.bus.consume(&all, settings, shutdown);
            tasks.push(tokio::spawn(catch_all(consumer, notifier.clone())));
        }
        *notifier.tasks.lock().expect("not poisoned") = tasks;
        notifier
    }

    /// Whether this replica consumes `notify.>`.
    pub fn is_consuming(&self) -> bool {
        self.ctx.settings.enabled
    }

    pub fn has_target(&self, name: &str) -> bool {
        self.targets.contains_key(name)
    }

    pub fn has_route(&self, name: &str) -> bool {
        self.routes.contains_key(name)
    }

    /// Whether `name` (a target or a route) can make something of `body`: for a target, what
    /// it would send (template, recipients); for a route, that it is an object to match on.
    pub fn check(&self, name: &str, body: &[u8]) -> Result<(), ShapeError> {
        match self.targets.get(name) {
            Some(t) => self
                .ctx
                .shaper()
                .prepare(body, t, None, String::new())
                .map(drop),
            None => message::payload(body).map(drop).map_err(ShapeError::from),
        }
    }

    /// Delivers now, through the target's queue and limiter, and returns the outcome
    /// (`POST /notify/<target>?wait=true`). `seed` identifies the message (its Idempotency-Key).
    pub async fn deliver_now(
        &self,
        target: &str,
        body: &[u8],
        seed: String,
    ) -> Result<Outcome, NotifyError> {
        let queue = self.queues.get(target).ok_or(NotifyError::UnknownTarget)?;
        let prepared = self.ctx.prepare(&self.targets[target], body, None, seed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Job::Sync {
                prepared: Box::new(prepared),
                reply,
                deadline: SystemTime::now() + self.ctx.settings.wait_timeout,
            })
            .map_err(|_| NotifyError::QueueFull)?;
        self.ctx
            .metrics
            .notify_queue_depth
            .with_label_values(&[target])
            .inc();
        match tokio::time::timeout(self.ctx.settings.wait_timeout, answer).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(NotifyError::Shutdown),
            Err(_) => Err(NotifyError::Timeout),
        }
    }

    /// Waits (up to `grace`) for workers to finish what they hold after shutdown was triggered.
    pub async fn join(&self, grace: Duration) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("grace period over; notifications still in progress go back to the bus");
        }
    }
}

/// The durable consumers of the notify pipeline: one per target or route (in the order of
/// `targets`), whose in-flight limit is the queue size, so that a flooded target holds only its
/// own slots on the bus and never starves another; and one for every notification, which
/// dead-letters those for targets nobody configured.
pub fn consumer_specs<'a>(
    settings: &NotifySettings,
    targets: impl Iterator<Item = &'a String>,
    prefix: &str,
) -> (Vec<bus::ConsumerSpec>, bus::ConsumerSpec) {
    let per_target = targets
        .map(|name| bus::ConsumerSpec {
            durable: format!("{}-{name}", settings.consumer),
            filter: bus::with_prefix(prefix, &format!("notify.{name}")),
            max_pending: settings.queue_capacity,
        })
        .collect();
    let all = bus::ConsumerSpec {
        durable: settings.consumer.clone(),
        filter: bus::with_prefix(prefix, "notify.>"),
        max_pending: settings.max_ack_pending as usize,
    };
    (per_target, all)
}

/// All the specs, for the bus to create at start.
pub fn all_consumer_specs(
    settings: &NotifySettings,
    targets: &BTreeMap<String, Target>,
    routes: &BTreeMap<String, Route>,
    prefix: &str,
) -> Vec<bus::ConsumerSpec> {
    if !settings.enabled {
        return Vec::new();
    }
    let names = targets.keys().chain(routes.keys());
    let (mut specs, all) = consumer_specs(settings, names, prefix);
    specs.push(all);
    specs
}

/// Reads one target's consumer and hands each message to the target's worker.
async fn feed(
    target: Arc<Target>,
    mut consumer: bus::Consumer,
    queue: mpsc::Sender<Job>,
    ctx: Arc<Ctx>,
) {
    let name = target.name.as_str();
    let depth = ctx.metrics.notify_queue_depth.with_label_values(&[name]);
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = ctx.shutdown.cancelled() => break,
        };
        let seed = message_id(&delivery);
        let rule = ctx.rule_of(&delivery, &target.name);
        let prepared = match ctx.prepare(&target, &delivery.payload, rule, seed) {
            Ok(p) => p,
            Err(e) => {
                let reason = shape_reason(&e);
                finish_failed(&ctx, &delivery, name, reason, 0, &e.to_string()).await;
                continue;
            }
        };
        let delivery = Arc::new(delivery);
        let held = ctx.held.insert(delivery.clone());
        depth.inc();
        let job = Job::Bus {
            delivery,
            prepared: Box::new(prepared),
            deadline: SystemTime::now() + ctx.settings.max_wait,
            held,
        };
        // The consumer hands out at most queue_capacity messages, so this rarely waits; when it
        // does, only this target waits.
        if let Err(mpsc::error::SendError(job)) = queue.send(job).await {
            depth.dec();
            if let Job::Bus { delivery, held, .. } = job {
                ctx.held.remove(held);
                let _ = delivery.nak(Duration::ZERO).await;
            }
            break;
        }
    }
    consumer.close().await;
}

/// Reads one route's consumer: each message is forwarded to `notify.<target>` for every target
/// of every rule it matches (each target once), then acknowledged. Forwarding through the bus
/// keeps each target's own queue, limits, retries and dead letters; the forwarded copy's id is
/// derived from the original's, so a forward repeated after a crash is recognised as a
/// duplicate by the bus.
async fn forward(route: Route, mut consumer: bus::Consumer, ctx: Arc<Ctx>) {
    let name = route.name.as_str();
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = ctx.shutdown.cancelled() => break,
        };
        let payload = match message::payload(&delivery.payload) {
            Ok(p) => serde_json::Value::Object(p),
            Err(e) => {
                let reason = Reason::InvalidMessage;
                finish_failed(&ctx, &delivery, name, reason, 0, &e.to_string()).await;
                continue;
            }
        };
        let id = message_id(&delivery);
        let chosen = route.forwards(&payload);
        if chosen.is_empty() {
            ctx.metrics
                .notify_routed_total
                .with_label_values(&[name, ""])
                .inc();
            tracing::info!(route = name, id, "no rule matches; nothing to send");
        }
        let mut stopped = false;
        for (target, _) in chosen {
            // A Kafka partition moved to another replica: the message is theirs now, and what
            // was forwarded already carries ids they derive the same way.
            if !delivery.is_current() {
                stopped = true;
                break;
            }
            let msg = forwarded(&ctx, &delivery, &id, name, target);
            if !publish_until_stored(&ctx, &msg, name).await {
                stopped = true;
                break;
            }
            ctx.metrics
                .notify_routed_total
                .with_label_values(&[name, target])
                .inc();
        }
        if stopped {
            // Shutting down or moved: it comes again, and what was forwarded already is
            // recognised as a duplicate (within the bus's duplicate window).
            let _ = delivery.nak(Duration::ZERO).await;
            if ctx.shutdown.is_triggered() {
                break;
            }
            continue;
        }
        if let Err(e) = delivery.ack().await {
            tracing::debug!(route = name, error = %e, "ack failed after forwarding; it comes again");
        }
    }
    consumer.close().await;
}

/// The copy of a routed message for one target.
fn forwarded(ctx: &Ctx, delivery: &Delivery, id: &str, route: &str, target: &str) -> Message {
    let id = format!("{id}.{target}");
    let mut headers = bus_headers(delivery);
    headers.retain(|(k, _)| {
        !(k.eq_ignore_ascii_case("ce-id") || k.eq_ignore_ascii_case(ROUTE_HEADER))
    });
    headers.push(("ce-id".into(), id.clone()));
    headers.push((ROUTE_HEADER.into(), route.into()));
    Message {
        subject: bus::with_prefix(&ctx.prefix, &format!("notify.{target}")),
        id,
        headers,
        payload: Bytes::clone(&delivery.payload),
    }
}

/// A delivery's headers without the bus's own control headers (message id, expected
/// sequences, TTL, rollup): they belonged to the original and would make a new publish fail
/// or misbehave.
fn bus_headers(delivery: &Delivery) -> Vec<(String, String)> {
    delivery
        .headers
        .iter()
        .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("nats-"))
        .cloned()
        .collect()
}

/// Publishes, retrying with backoff while the bus refuses; `false` when shutdown came first.
/// Retried here rather than by handing the message back: a redelivery would repeat what was
/// already done for it (a send to the platform, say).
async fn publish_until_stored(ctx: &Ctx, msg: &Message, name: &str) -> bool {
    let mut attempt = 0;
    loop {
        match ctx.bus.publish(msg).await {
            Ok(_) => return true,
            Err(e) => {
                attempt += 1;
                tracing::error!(name, subject = %msg.subject, error = %e, attempt, "cannot publish yet; retrying");
                let delay =
                    retry_delay(attempt, Duration::from_millis(200), Duration::from_secs(10));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.shutdown.cancelled() => return false,
                }
            }
        }
    }
}

/// Reads every notification: those for configured targets are their own consumers' business
/// (acknowledged here at once), the others are dead-lettered as `unknown_target`.
async fn catch_all(mut consumer: bus::Consumer, notifier: Arc<Notifier>) {
    let ctx = &notifier.ctx;
    let subject_prefix = bus::with_prefix(&ctx.prefix, "notify.");
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = ctx.shutdown.cancelled() => break,
        };
        let target = delivery
            .subject
            .strip_prefix(&subject_prefix)
            .unwrap_or(&delivery.subject)
            .to_owned();
        if notifier.queues.contains_key(&target) || notifier.routes.contains_key(&target) {
            if let Err(e) = delivery.ack().await {
                tracing::debug!(error = %e, "catch-all ack failed; it comes again");
            }
            continue;
        }
        let detail = format!("no target named {target:?} is configured");
        finish_failed(ctx, &delivery, &target, Reason::UnknownTarget, 0, &detail).await;
    }
    consumer.close().await;
}

/// One target's worker: delivers its queue in order.
async fn worker(target: Arc<Target>, mut rx: mpsc::Receiver<Job>, ctx: Arc<Ctx>) {
    let depth = ctx
        .metrics
        .notify_queue_depth
        .with_label_values(&[&target.name]);
    loop {
        let job = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => return },
            _ = ctx.shutdown.cancelled() => break,
        };
        match job {
            Job::Bus {
                delivery,
                prepared,
                deadline,
                held,
            } => {
                let current = || delivery.is_current();
                let outcome = deliver(&ctx, &target, &prepared, deadline, &current).await;
                finish(&ctx, &target, &delivery, outcome).await;
                ctx.held.remove(held);
            }
            Job::Sync {
                prepared,
                reply,
                deadline,
            } => {
                // A caller that gave up must not get a delivery it was told timed out.
                if !reply.is_closed() {
                    let outcome = deliver(&ctx, &target, &prepared, deadline, &|| true).await;
                    let _ = reply.send(outcome);
                }
            }
        }
        depth.dec();
    }
    // Shutting down: what is still queued goes back to the bus at once, for another replica.
    rx.close();
    while let Ok(job) = rx.try_recv() {
        depth.dec();
        if let Job::Bus { delivery, held, .. } = job {
            let _ = delivery.nak(Duration::ZERO).await;
            ctx.held.remove(held);
        }
    }
}

/// Acks a delivered message, dead-letters a failed one, or hands it back on shutdown.
async fn finish(ctx: &Ctx, target: &Target, delivery: &Delivery, outcome: Outcome) {
    let name = target.name.as_str();
    match outcome {
        Outcome::Delivered { .. } => {
            ctx.metrics
                .notify_sent_total
                .with_label_values(&[name])
                .inc();
            let latency = SystemTime::now()
                .duration_since(delivery.published)
                .unwrap_or_default();
            ctx.metrics
                .notify_latency_seconds
                .with_label_values(&[name])
                .observe(latency.as_secs_f64());
            if let Err(e) = delivery.ack().await {
                // Delivered but not acked: it will come again (at least once).
                tracing::warn!(target = name, error = %e, "ack failed after delivery");
            }
        }
        Outcome::Failed {
            reason: Reason::Shutdown | Reason::Moved,
            ..
        } => {
            let _ = delivery.nak(Duration::ZERO).await;
        }
        Outcome::Failed {
            reason,
            attempts,
            answer,
        } => {
            let detail = answer.map(|a| a.detail).unwrap_or_default();
            finish_failed(ctx, delivery, name, reason, attempts, &detail).await;
        }
    }
}

/// Dead-letters, then acks; if the dead letter cannot be stored, the message stays on the bus.
async fn finish_failed(
    ctx: &Ctx,
    delivery: &Delivery,
    target: &str,
    reason: Reason,
    attempts: u32,
    answer: &str,
) {
    let mut headers = bus_headers(delivery);
    headers.push((DLQ_REASON.into(), reason.label().into()));
    headers.push((DLQ_ATTEMPTS.into(), attempts.to_string()));
    headers.push((DLQ_TARGET.into(), target.into()));
    // Header values are one line of printable text.
    let answer: String = answer
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    headers.push((DLQ_ANSWER.into(), answer.clone()));
    let id = match delivery.id() {
        Some(id) => format!("{id}.dlq"),
        None => format!("dlq-{}", hex::encode(rand::random::<[u8; 16]>())),
    };
    let token = if bus::is_valid_token(target) {
        target
    } else {
        "_invalid"
    };
    let msg = Message {
        subject: bus::with_prefix(&ctx.prefix, &format!("dlq.notify.{token}")),
        id,
        headers,
        payload: Bytes::clone(&delivery.payload),
    };
    // Unknown targets share one label so arbitrary subjects cannot create series.
    let label = if reason == Reason::UnknownTarget {
        UNKNOWN_APP
    } else {
        target
    };
    if !publish_until_stored(ctx, &msg, target).await {
        let _ = delivery.nak(Duration::ZERO).await;
        return;
    }
    ctx.metrics
        .notify_dead_letters_total
        .with_label_values(&[label, reason.label()])
        .inc();
    tracing::warn!(target, reason = reason.label(), attempts, answer = %answer, "notification dead-lettered");
    if let Err(e) = delivery.ack().await {
        tracing::warn!(target, error = %e, "ack failed after dead-lettering");
    }
}

/// Renders and sends every request, waiting for the limiter before each send, retrying
/// transient failures with backoff, pausing on "too fast". Stops before any send once `current`
/// says the message has become another replica's.
async fn deliver(
    ctx: &Ctx,
    target: &Target,
    prepared: &Prepared,
    deadline: SystemTime,
    current: &(dyn Fn() -> bool + Sync),
) -> Outcome {
    let requests = render(target, prepared);
    let name = target.name.as_str();
    let mut attempts = 0u32;
    let mut transient = 0u32;
    let mut limited = 0u32;
    let mut last: Option<Answer> = None;
    let mut accepted = 0usize;
    let failed = |reason, attempts, answer| Outcome::Failed {
        reason,
        attempts,
        answer,
    };
    for request in &requests {
        let member_keys: Vec<String> = if target.member_limits.is_empty() {
            Vec::new()
        } else {
            request
                .members
                .iter()
                .map(|m| member_key(target, m))
                .collect()
        };
        let mut keys: Vec<(&str, &[crate::config::Limit])> = member_keys
            .iter()
            .map(|k| (k.as_str(), target.member_limits.as_slice()))
            .collect();
        let limit_key = limit_key(target);
        keys.push((&limit_key, &target.limits));
        let mut refreshed = false;
        loop {
            // The access token first: fetching it after the slots were taken could put a
            // round trip between a slot's record and its send.
            let sent = match app_token(ctx, target).await {
                Err(answer) => {
                    attempts += 1;
                    Sent {
                        answer,
                        token: None,
                        token_failed: true,
                        invalid_users: Vec::new(),
                    }
                }
                Ok(token) => {
                    match ctx
                        .limiter
                        .acquire_all(
                            &keys,
                            ctx.settings.rate_limit_margin,
                            deadline,
                            &ctx.shutdown,
                        )
                        .await
                    {
                        Ok(waited) => ctx
                            .metrics
                            .notify_limiter_wait_seconds
                            .with_label_values(&[name])
                            .observe(waited.as_secs_f64()),
                        Err(LimiterError::Deadline) => {
                            return failed(Reason::Expired, attempts, last)
                        }
                        Err(LimiterError::Shutdown) => {
                            return failed(Reason::Shutdown, attempts, last)
                        }
                    }
                    if !current() {
                        return failed(Reason::Moved, attempts, last);
                    }
                    attempts += 1;
                    send(ctx, target, request, token).await
                }
            };
            let answer = sent.answer;
            let mut class = answer.class;
            let rejected = answer.code.is_some_and(|c| token_rejected(target.kind, c));
            if let (true, Some(token)) = (rejected, &sent.token) {
                invalidate_token(ctx, target, token);
                // An access token the platform no longer takes (expired early, or revoked):
                // send again at once with a new one, once per request.
                if !refreshed {
                    refreshed = true;
                    tracing::info!(target = name, code = ?answer.code, "access token refused; fetching a new one");
                    last = Some(answer);
                    continue;
                }
                // A fresh token refused too: the platform's side; try again later.
                class = Class::Transient;
            }
            if class != Class::Ok {
                ctx.metrics
                    .notify_failed_total
                    .with_label_values(&[name, class.label()])
                    .inc();
                tracing::info!(target = name, class = class.label(), code = ?answer.code, status = answer.status, detail = %answer.detail, stage = if sent.token_failed { "token" } else { "send" }, "send failed");
            }
            let recipient_error = target.kind == TargetKind::LarkApp
                && answer.code.is_some_and(lark::app::is_recipient_error);
            let token_failed = sent.token_failed;
            if !sent.invalid_users.is_empty() {
                report_invalid_users(ctx, target, &sent.invalid_users);
            }
            last = Some(answer);
            match class {
                Class::Ok => {
                    accepted += 1;
                    break;
                }
                // One Lark recipient the bot cannot reach: the others still get theirs.
                Class::Permanent if recipient_error => {
                    let invalid = request.members.join(", ");
                    ctx.metrics
                        .notify_invalid_recipients_total
                        .with_label_values(&[name])
                        .inc();
                    tracing::warn!(target = name, recipients = %invalid, "the platform cannot reach this recipient; skipped");
                    break;
                }
                Class::Permanent if token_failed => {
                    return failed(Reason::TokenRefused, attempts, last)
                }
                Class::Permanent => return failed(Reason::Permanent, attempts, last),
                Class::RateLimited { pause } => {
                    limited += 1;
                    if limited >= ctx.settings.max_attempts {
                        return failed(Reason::RateLimited, attempts, last);
                    }
                    // Not the message's fault: pause the whole target (on every replica) and
                    // try again, without counting it as an attempt of this message.
                    let pause = pause.unwrap_or(target.pause_on_rate_limit);
                    tracing::warn!(target = name, pause = ?pause, "platform says too fast; pausing the target");
                    ctx.limiter
                        .pause(&limit_key, SystemTime::now() + pause)
                        .await;
                }
                Class::Transient => {
                    transient += 1;
                    if transient >= ctx.settings.max_attempts {
                        return failed(Reason::AttemptsExhausted, attempts, last);
                    }
                    ctx.metrics
                        .notify_retries_total
                        .with_label_values(&[name])
                        .inc();
                    let delay = retry_delay(
                        transient,
                        ctx.settings.retry_initial,
                        ctx.settings.retry_max,
                    );
                    if SystemTime::now() + delay > deadline {
                        return failed(Reason::Expired, attempts, last);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = ctx.shutdown.cancelled() => return failed(Reason::Shutdown, attempts, last),
                    }
                }
            }
        }
    }
    if accepted == 0 {
        // Every recipient was refused.
        return failed(Reason::Permanent, attempts, last);
    }
    Outcome::Delivered {
        parts: requests.len(),
        answer: last.expect("at least one request was sent"),
    }
}

/// WeCom accepts a message while naming the recipients outside the app's visible scope.
fn report_invalid_users(ctx: &Ctx, target: &Target, invalid: &[String]) {
    ctx.metrics
        .notify_invalid_recipients_total
        .with_label_values(&[&target.name])
        .inc_by(invalid.len() as u64);
    tracing::warn!(target = %target.name, users = ?invalid, "WeCom did not deliver to these users (invaliduser: outside the app's visible scope?)");
}

/// The limiter key of a target's own limits: a group bot's name, or for app messages the app
/// (the platform counts per app, whichever targets share it; the configuration makes them
/// agree on the limits).
fn limit_key(target: &Target) -> String {
    use sha2::{Digest, Sha256};
    match &target.endpoint {
        Endpoint::Robot { .. } => target.name.clone(),
        Endpoint::App(a) => {
            let app = format!("{}|{}|{}", target.kind.as_str(), a.app_id, a.agent_id);
            format!("app_{}", &hex::encode(Sha256::digest(app))[..24])
        }
    }
}

/// The limiter key of one recipient of an app: shared by every target of the same app, since
/// the platform counts per app and member. Hashed, so it is a valid bus token whatever the id.
fn member_key(target: &Target, member: &str) -> String {
    use sha2::{Digest, Sha256};
    let app = match &target.endpoint {
        Endpoint::App(a) => format!("{}|{}", a.app_id, a.agent_id),
        Endpoint::Robot { .. } => target.name.clone(),
    };
    let digest = Sha256::digest(format!("{}|{app}|{member}", target.kind.as_str()));
    format!("member_{}", &hex::encode(digest)[..24])
}

/// Exponential backoff with full jitter in its upper half: `initial × 2^(n−1)`, capped, then
/// a random point between half and all of it, so replicas retrying together spread out.
fn retry_delay(n: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << (n - 1).min(20)).min(max);
    let half = exp / 2;
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=half.as_nanos().max(1) as u64))
}

/// One request to a platform.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub body: serde_json::Value,
    /// App messages: the recipients it goes to (for their limits and for reports).
    pub members: Vec<String>,
}

/// The requests for a prepared message: one per part, and for app messages per chunk of
/// recipients (Lark: per recipient, its API takes one receive id).
pub fn render(target: &Target, p: &Prepared) -> Vec<Request> {
    let n = &p.notification;
    let opts = &target.render;
    let bot = |bodies: Vec<serde_json::Value>| {
        bodies
            .into_iter()
            .map(|body| Request {
                body,
                members: Vec::new(),
            })
            .collect()
    };
    let agent_id = match &target.endpoint {
        Endpoint::App(a) => a.agent_id,
        Endpoint::Robot { .. } => 0,
    };
    let listed = |bodies: Vec<serde_json::Value>, field: &str, separator: char| {
        bodies
            .into_iter()
            .map(|body| {
                let members = body[field]
                    .as_str()
                    .unwrap_or_default()
                    .split(separator)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                Request { body, members }
            })
            .collect()
    };
    match target.kind {
        TargetKind::DingTalkRobot => bot(dingtalk::robot::render(n, opts)),
        TargetKind::WeComRobot => bot(wecom::robot::render(n, opts)),
        TargetKind::LarkRobot => bot(lark::robot::render(n, opts)),
        TargetKind::DingTalkWork => listed(
            dingtalk::work::render(n, opts, agent_id, &p.recipients),
            "userid_list",
            ',',
        ),
        TargetKind::WeComApp => listed(
            wecom::app::render(n, opts, agent_id, &p.recipients),
            "touser",
            '|',
        ),
        TargetKind::LarkApp => p
            .recipients
            .iter()
            .flat_map(|r| {
                lark::app::render(n, opts, r, &format!("{}/{r}", p.seed))
                    .into_iter()
                    .map(|body| Request {
                        body,
                        members: vec![r.clone()],
                    })
            })
            .collect(),
    }
}

/// What a target or route would send for `body`, request by request, without sending. `id`
/// stands for the message id (Lark's idempotency
/// uuid derives from it; a route's copies get `<id>.<target>`, as on the bus).
pub fn preview(
    settings: &crate::config::Settings,
    name: &str,
    body: &[u8],
    id: &str,
) -> Result<Preview, PreviewError> {
    let users = Directory::new(settings.users.clone());
    let shaper = Shaper {
        templates: &settings.templates,
        users: &users,
    };
    // (target, the rule that forwards to it, message id)
    type Planned<'a> = (&'a Target, Option<(&'a str, &'a Rule)>, String);
    let mut jobs: Vec<Planned> = Vec::new();
    if let Some(t) = settings.targets.get(name) {
        jobs.push((t, None, id.to_owned()));
    } else if let Some(route) = settings.routes.get(name) {
        let payload = serde_json::Value::Object(message::payload(body).map_err(ShapeError::from)?);
        for (t, rule) in route.forwards(&payload) {
            jobs.push((
                &settings.targets[t],
                Some((route.name.as_str(), rule)),
                format!("{id}.{t}"),
            ));
        }
    } else {
        return Err(PreviewError::Unknown(name.to_owned()));
    }
    // A target's own message either renders or not; a route's targets each on their own.
    let single = settings.targets.contains_key(name);
    let (mut requests, mut unbound, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (target, rule, seed) in jobs {
        let prepared = match shaper.prepare(body, target, rule, seed) {
            Ok(p) => p,
            Err(e) if single => return Err(PreviewError::Shape(target.name.clone(), e)),
            // A route still sends to its other targets; this copy would be dead-lettered.
            Err(e) => {
                failed.push((target.name.clone(), shape_reason(&e), e));
                continue;
            }
        };
        if !prepared.unbound.is_empty() {
            unbound.push((target.name.clone(), prepared.unbound.clone()));
        }
        for request in render(target, &prepared) {
            requests.push((target.name.clone(), describe(target, &request), request));
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
    pub failed: Vec<(String, Reason, ShapeError)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("no target or route named {0:?} is configured")]
    Unknown(String),
    #[error("{0}: {1}")]
    Shape(String, ShapeError),
}

impl From<ShapeError> for PreviewError {
    fn from(e: ShapeError) -> Self {
        PreviewError::Shape(String::new(), e)
    }
}

/// Where a request goes, without credentials (`imbridge render` prints it).
pub fn describe(target: &Target, request: &Request) -> String {
    match (&target.endpoint, target.kind) {
        (Endpoint::Robot { .. }, _) => format!("POST <{} webhook>", target.kind.as_str()),
        (Endpoint::App(a), TargetKind::DingTalkWork) => format!(
            "POST {}/topapi/message/corpconversation/asyncsend_v2?access_token=<token>",
            a.base_url
        ),
        (Endpoint::App(a), TargetKind::WeComApp) => format!(
            "POST {}/cgi-bin/message/send?access_token=<token>",
            a.base_url
        ),
        (Endpoint::App(a), _) => {
            let id = request.members.first().map(String::as_str).unwrap_or("");
            lark::app::send_url(&a.base_url, lark::app::receive_id_type(id))
        }
    }
}

/// A send's answer, and the access token it used (app messages).
struct Sent {
    answer: Answer,
    token: Option<String>,
    /// No token could be had: the answer is the token endpoint's.
    token_failed: bool,
    /// WeCom's `invaliduser`, read from the whole answer (the answer's detail is cut short).
    invalid_users: Vec<String>,
}

/// Signs (bots) or authorises (apps) and posts one request; classifies the answer. Never logs
/// a URL: bot URLs hold their token, app URLs the access token.
async fn send(ctx: &Ctx, target: &Target, request: &Request, token: Option<String>) -> Sent {
    let started = Instant::now();
    let (url, body, bearer) = match (&target.endpoint, &token) {
        (Endpoint::Robot { url, secret }, _) => {
            let secret = secret.as_ref().map(|s| s.expose());
            match target.kind {
                TargetKind::DingTalkRobot => (
                    dingtalk::robot::signed_url(url.expose(), secret, now_ms()),
                    request.body.clone(),
                    None,
                ),
                TargetKind::LarkRobot => {
                    let mut body = request.body.clone();
                    lark::robot::apply_signature(&mut body, secret, now_ms() / 1000);
                    (url.expose().to_owned(), body, None)
                }
                _ => (url.expose().to_owned(), request.body.clone(), None),
            }
        }
        (Endpoint::App(app), token) => {
            let token = token.as_deref().unwrap_or_default();
            match target.kind {
                TargetKind::DingTalkWork => (
                    dingtalk::work::send_url(&app.base_url, token),
                    request.body.clone(),
                    None,
                ),
                TargetKind::WeComApp => (
                    wecom::app::send_url(&app.base_url, token),
                    request.body.clone(),
                    None,
                ),
                _ => {
                    let id = request.members.first().map(String::as_str).unwrap_or("");
                    let ty = lark::app::receive_id_type(id);
                    (
                        lark::app::send_url(&app.base_url, ty),
                        request.body.clone(),
                        Some(token),
                    )
                }
            }
        }
    };
    let (answer, invalid_users) = post(ctx, target.kind, url, bearer, &body).await;
    tracing::debug!(target = %target.name, took = ?started.elapsed(), class = answer.class.label(), "sent");
    Sent {
        answer,
        token,
        token_failed: false,
        invalid_users,
    }
}

/// An app target's access token (`None` for group bots), from the cache or fetched.
async fn app_token(ctx: &Ctx, target: &Target) -> Result<Option<String>, Answer> {
    match &target.endpoint {
        Endpoint::Robot { .. } => Ok(None),
        Endpoint::App(app) => {
            let key = token_key(target.kind, app);
            ctx.tokens
                .get(&key, || fetch_token(ctx, target, app))
                .await
                .map(Some)
        }
    }
}

/// Posts a JSON body and classifies the answer the way `kind`'s platform means it.
async fn post(
    ctx: &Ctx,
    kind: TargetKind,
    url: String,
    bearer: Option<&str>,
    body: &serde_json::Value,
) -> (Answer, Vec<String>) {
    let mut request = ctx.http.post(url).json(body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let resp = match request.send().await {
        Err(e) => return (transport_answer(e, 0), Vec::new()),
        Ok(resp) => resp,
    };
    let status = resp.status().as_u16();
    let reset = resp
        .headers()
        .get("x-ogw-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = match resp.bytes().await {
        Err(e) => return (transport_answer(e, status), Vec::new()),
        Ok(b) => b,
    };
    let mut answer = match kind {
        TargetKind::DingTalkRobot => dingtalk::robot::classify(status, &bytes),
        TargetKind::WeComRobot => wecom::robot::classify(status, &bytes),
        TargetKind::LarkRobot => lark::robot::classify(status, &bytes),
        TargetKind::DingTalkWork => dingtalk::work::classify(status, &bytes),
        TargetKind::WeComApp => wecom::app::classify(status, &bytes),
        TargetKind::LarkApp => lark::app::classify(status, &bytes),
    };
    // Lark's gateway says when its quota resets.
    if let (Class::RateLimited { pause: None }, Some(secs)) = (answer.class, reset) {
        answer.class = Class::RateLimited {
            pause: Some(Duration::from_secs(secs.min(3600))),
        };
    }
    let invalid = if kind == TargetKind::WeComApp && answer.class == Class::Ok {
        wecom::app::invalid_users(&bytes)
    } else {
        Vec::new()
    };
    (answer, invalid)
}

/// Tokens are cached per credential: targets of the same app share one.
fn token_key(kind: TargetKind, app: &AppCredentials) -> String {
    use sha2::{Digest, Sha256};
    let secret = hex::encode(Sha256::digest(app.secret.expose()));
    format!(
        "{}|{}|{}|{}",
        kind.as_str(),
        app.base_url,
        app.app_id,
        &secret[..16]
    )
}

fn token_rejected(kind: TargetKind, code: i64) -> bool {
    match kind {
        TargetKind::DingTalkWork => dingtalk::work::is_token_rejected(code),
        TargetKind::WeComApp => wecom::app::is_token_rejected(code),
        TargetKind::LarkApp => lark::app::is_token_rejected(code),
        _ => false,
    }
}

fn invalidate_token(ctx: &Ctx, target: &Target, token: &str) {
    if let Endpoint::App(app) = &target.endpoint {
        ctx.tokens.invalidate(&token_key(target.kind, app), token);
    }
}

/// Asks the platform for an access token (one flight per credential, see [`TokenCache`]).
async fn fetch_token(
    ctx: &Ctx,
    target: &Target,
    app: &AppCredentials,
) -> Result<IssuedToken, Answer> {
    let secret = app.secret.expose();
    let (request, parse): (TokenRequest, token::ParseToken) = match target.kind {
        TargetKind::DingTalkWork => (
            dingtalk::work::token_request(&app.base_url, &app.app_id, secret),
            dingtalk::work::parse_token,
        ),
        TargetKind::WeComApp => (
            wecom::app::token_request(&app.base_url, &app.app_id, secret),
            wecom::app::parse_token,
        ),
        _ => (
            lark::app::token_request(&app.base_url, &app.app_id, secret),
            lark::app::parse_token,
        ),
    };
    let result = token::fetch(&ctx.http, &request, parse).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(a) => a.class.label(),
    };
    ctx.metrics
        .notify_token_fetches_total
        .with_label_values(&[&target.name, outcome])
        .inc();
    match &result {
        Ok(t) => {
            tracing::info!(target = %target.name, expires_in = ?t.expires_in, "access token fetched")
        }
        Err(a) => {
            tracing::warn!(target = %target.name, class = a.class.label(), code = ?a.code, detail = %a.detail, "access token refused")
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_cap() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..100 {
            let d1 = retry_delay(1, i, m);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = retry_delay(3, i, m);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d30 = retry_delay(30, i, m);
            assert!(d30 >= Duration::from_secs(1) && d30 <= m);
        }
    }
}
