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
use super::message::{self, Notification, Parsed};
use crate::bus::{self, Bus, Delivery, Message};
use crate::config::{NotifySettings, Target, TargetKind};
use crate::metrics::{Metrics, UNKNOWN_APP};
use crate::platform::outbound::{Answer, Class};
use crate::platform::{dingtalk, lark, now_ms, wecom};
use crate::shutdown::Shutdown;

/// Headers a dead letter carries besides the original ones.
pub const DLQ_REASON: &str = "imbridge-dlq-reason";
pub const DLQ_ATTEMPTS: &str = "imbridge-dlq-attempts";
pub const DLQ_ANSWER: &str = "imbridge-dlq-answer";
pub const DLQ_TARGET: &str = "imbridge-dlq-target";

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
        }
    }
}

enum Job {
    /// From the bus: ack or dead-letter when done.
    Bus {
        delivery: Arc<Delivery>,
        notification: Box<Notification>,
        /// Dead-letter as expired if not delivered by then (`notify.max_wait` from receipt).
        deadline: SystemTime,
        /// Its entry in the held set.
        held: u64,
    },
    /// `POST /notify/<target>?wait=true`: answer the caller, nothing on the bus.
    Sync {
        notification: Box<Notification>,
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

pub struct Notifier {
    targets: BTreeMap<String, Arc<Target>>,
    queues: HashMap<String, mpsc::Sender<Job>>,
    ctx: Arc<Ctx>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Notifier {
    /// Starts one worker per target and, when `settings.enabled`, the bus consumer.
    pub fn start(
        settings: &NotifySettings,
        targets: &BTreeMap<String, Target>,
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
        });
        let mut queues = HashMap::new();
        let mut tasks = Vec::new();
        let mut arcs = BTreeMap::new();
        for (name, target) in targets {
            let target = Arc::new(target.clone());
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            queues.insert(name.clone(), tx);
            tasks.push(tokio::spawn(worker(target.clone(), rx, ctx.clone())));
            arcs.insert(name.clone(), target);
        }
        let notifier = Arc::new(Notifier {
            targets: arcs,
            queues,
            ctx: ctx.clone(),
            tasks: Mutex::new(Vec::new()),
        });
        if settings.enabled {
            tasks.push(tokio::spawn(keep_alive(ctx.clone())));
            let (per_target, all) = consumer_specs(settings, targets.keys(), prefix);
            for (name, spec) in targets.keys().zip(&per_target) {
                let consumer = ctx.bus.consume(spec, settings, shutdown.clone());
                tasks.push(tokio::spawn(feed(
                    name.clone(),
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

    /// Delivers now, through the target's queue and limiter, and returns the outcome
    /// (`POST /notify/<target>?wait=true`).
    pub async fn deliver_now(
        &self,
        target: &str,
        notification: Notification,
    ) -> Result<Outcome, NotifyError> {
        let queue = self.queues.get(target).ok_or(NotifyError::UnknownTarget)?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Job::Sync {
                notification: Box::new(notification),
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

/// The durable consumers of the notify pipeline: one per target (in the order of `targets`),
/// whose in-flight limit is the target's queue size, so that a flooded target holds only its
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
    prefix: &str,
) -> Vec<bus::ConsumerSpec> {
    if !settings.enabled {
        return Vec::new();
    }
    let (mut specs, all) = consumer_specs(settings, targets.keys(), prefix);
    specs.push(all);
    specs
}

/// Reads one target's consumer and hands each message to the target's worker.
async fn feed(
    target: String,
    mut consumer: bus::Consumer,
    queue: mpsc::Sender<Job>,
    ctx: Arc<Ctx>,
) {
    let depth = ctx.metrics.notify_queue_depth.with_label_values(&[&target]);
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d { Some(d) => d, None => break },
            _ = ctx.shutdown.cancelled() => break,
        };
        let notification = match message::parse(&delivery.payload) {
            Ok(Parsed { notification, .. }) => notification,
            Err(e) => {
                let reason = Reason::InvalidMessage;
                finish_failed(&ctx, &delivery, &target, reason, 0, &e.to_string()).await;
                continue;
            }
        };
        let delivery = Arc::new(delivery);
        let held = ctx.held.insert(delivery.clone());
        depth.inc();
        let job = Job::Bus {
            delivery,
            notification: Box::new(notification),
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
        if notifier.queues.contains_key(&target) {
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
                notification,
                deadline,
                held,
            } => {
                let current = || delivery.is_current();
                let outcome = deliver(&ctx, &target, &notification, deadline, &current).await;
                finish(&ctx, &target, &delivery, outcome).await;
                ctx.held.remove(held);
            }
            Job::Sync {
                notification,
                reply,
                deadline,
            } => {
                // A caller that gave up must not get a delivery it was told timed out.
                if !reply.is_closed() {
                    let outcome = deliver(&ctx, &target, &notification, deadline, &|| true).await;
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
    let mut headers: Vec<(String, String)> = delivery
        .headers
        .iter()
        // The bus's own control headers (message id, expected sequences, TTL, rollup) would
        // make the dead letter's publish fail or misbehave: they belonged to the original.
        .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("nats-"))
        .cloned()
        .collect();
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
    // Retried here rather than by handing the message back: a redelivery would send it to the
    // platform again.
    let mut attempt = 0;
    loop {
        match ctx.bus.publish(&msg).await {
            Ok(_) => break,
            Err(e) => {
                attempt += 1;
                tracing::error!(target, error = %e, attempt, "cannot dead-letter yet; retrying");
                let delay =
                    retry_delay(attempt, Duration::from_millis(200), Duration::from_secs(10));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.shutdown.cancelled() => {
                        let _ = delivery.nak(Duration::ZERO).await;
                        return;
                    }
                }
            }
        }
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

/// Renders and sends every part, waiting for the limiter before each send, retrying transient
/// failures with backoff, pausing on "too fast". Stops before any send once `current` says
/// the message has become another replica's.
async fn deliver(
    ctx: &Ctx,
    target: &Target,
    n: &Notification,
    deadline: SystemTime,
    current: &(dyn Fn() -> bool + Sync),
) -> Outcome {
    let bodies = render(target, n);
    let name = target.name.as_str();
    let mut attempts = 0u32;
    let mut transient = 0u32;
    let mut limited = 0u32;
    let mut last: Option<Answer> = None;
    let failed = |reason, attempts, answer| Outcome::Failed {
        reason,
        attempts,
        answer,
    };
    for body in &bodies {
        loop {
            match ctx
                .limiter
                .acquire(
                    name,
                    &target.limits,
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
                Err(LimiterError::Deadline) => return failed(Reason::Expired, attempts, last),
                Err(LimiterError::Shutdown) => return failed(Reason::Shutdown, attempts, last),
            }
            if !current() {
                return failed(Reason::Moved, attempts, last);
            }
            attempts += 1;
            let answer = send(ctx, target, body).await;
            let class = answer.class;
            if class != Class::Ok {
                ctx.metrics
                    .notify_failed_total
                    .with_label_values(&[name, class.label()])
                    .inc();
                tracing::info!(target = name, class = class.label(), code = ?answer.code, status = answer.status, detail = %answer.detail, "send failed");
            }
            last = Some(answer);
            match class {
                Class::Ok => break,
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
                    ctx.limiter.pause(name, SystemTime::now() + pause).await;
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
    Outcome::Delivered {
        parts: bodies.len(),
        answer: last.expect("at least one part was sent"),
    }
}

/// Exponential backoff with full jitter in its upper half: `initial × 2^(n−1)`, capped, then
/// a random point between half and all of it, so replicas retrying together spread out.
fn retry_delay(n: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << (n - 1).min(20)).min(max);
    let half = exp / 2;
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=half.as_nanos().max(1) as u64))
}

/// The request bodies for a notification, one per part.
pub fn render(target: &Target, n: &Notification) -> Vec<serde_json::Value> {
    match target.kind {
        TargetKind::DingTalkRobot => dingtalk::robot::render(n, &target.render),
        TargetKind::WeComRobot => wecom::robot::render(n, &target.render),
        TargetKind::LarkRobot => lark::robot::render(n, &target.render),
    }
}

/// Signs and posts one body; classifies the answer. Never logs the URL (it holds the token).
async fn send(ctx: &Ctx, target: &Target, body: &serde_json::Value) -> Answer {
    let secret = target.secret.as_ref().map(|s| s.expose());
    let (url, body) = match target.kind {
        TargetKind::DingTalkRobot => (
            dingtalk::robot::signed_url(target.url.expose(), secret, now_ms()),
            body.clone(),
        ),
        TargetKind::WeComRobot => (target.url.expose().to_owned(), body.clone()),
        TargetKind::LarkRobot => {
            let mut body = body.clone();
            lark::robot::apply_signature(&mut body, secret, now_ms() / 1000);
            (target.url.expose().to_owned(), body)
        }
    };
    let started = Instant::now();
    let response = ctx.http.post(url).json(&body).send().await;
    let answer = match response {
        Err(e) => Answer {
            class: Class::Transient,
            code: None,
            status: 0,
            detail: transport_error(e),
        },
        Ok(resp) => {
            let status = resp.status().as_u16();
            let reset = resp
                .headers()
                .get("x-ogw-ratelimit-reset")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            match resp.bytes().await {
                Err(e) => Answer {
                    class: Class::Transient,
                    code: None,
                    status,
                    detail: transport_error(e),
                },
                Ok(bytes) => {
                    let mut answer = match target.kind {
                        TargetKind::DingTalkRobot => dingtalk::robot::classify(status, &bytes),
                        TargetKind::WeComRobot => wecom::robot::classify(status, &bytes),
                        TargetKind::LarkRobot => lark::robot::classify(status, &bytes),
                    };
                    // Lark's gateway says when its quota resets.
                    if let (Class::RateLimited { pause: None }, Some(secs)) = (answer.class, reset)
                    {
                        answer.class = Class::RateLimited {
                            pause: Some(Duration::from_secs(secs.min(3600))),
                        };
                    }
                    answer
                }
            }
        }
    };
    tracing::debug!(target = %target.name, took = ?started.elapsed(), class = answer.class.label(), "sent");
    answer
}

/// A transport error with its causes, without the URL (it holds the robot's token).
fn transport_error(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "transport error"
    };
    let e = e.without_url();
    let mut out = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !text.contains("://") {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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
