//! One worker per target delivers its queue in order (or, for a webhook allowing it, several
//! messages at a time): render the requests, then for each one
//! take the access token, wait for the rate limiter, send, and decide from the answer whether
//! it is done, retried with backoff, paused ("too fast") or given up. A throttled target never
//! delays another (no head-of-line blocking).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::compose::Prepared;
use super::dead_letter::DeadLetters;
use super::in_flight::{Held, InFlight};
use super::limiter::{Key, Limiter, LimiterError, Scope};
use super::sender::{Sender, Sent};
use super::settings::NotifySettings;
use super::target::Target;
use super::verdict::{Reason, Verdict};
use crate::metrics::Metrics;
use crate::platform::kind::Addressing;
use crate::platform::outbound::{Answer, Class, Request};
use crate::platform::Endpoint;
use crate::shutdown::Shutdown;

/// What every target's worker shares.
pub struct Shared {
    pub settings: NotifySettings,
    pub limiter: Limiter,
    pub sender: Sender,
    pub dead_letters: DeadLetters,
    pub in_flight: Arc<InFlight>,
    /// Each target's last delivery result (the status page).
    pub recent: super::recent::Recent,
    pub metrics: Metrics,
    pub shutdown: Shutdown,
}

/// A message for a target's worker, with the target as configured when the message was
/// prepared: a reload changes what later messages get, never one already on its way.
pub enum Job {
    /// From the bus: ack or dead-letter when done.
    Bus {
        target: Arc<Target>,
        held: Held,
        prepared: Box<Prepared>,
        /// Dead-letter as expired if not delivered by then (`notify.max_wait` from receipt).
        deadline: SystemTime,
    },
    /// `POST /notify/<target>?wait=true`: answer the caller, nothing on the bus.
    Sync {
        target: Arc<Target>,
        prepared: Box<Prepared>,
        reply: oneshot::Sender<Verdict>,
        /// The caller stops waiting then; nothing is sent after it.
        deadline: SystemTime,
    },
}

/// A target's queue. Shared with the worker's restarts: a worker that panicked leaves it
/// behind (the lock is released as the panic unwinds) for the next one.
pub type Queue = Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>;

/// One target's worker: delivers its queue until shutdown, `concurrency` messages at a time
/// (one, the default, keeps the queue's order; the latest job's target says how many, so a
/// reload changes it for what comes next), then lets what is under way finish (it stops at its
/// next wait, seeing the shutdown) and hands what is still queued back to the bus at once, for
/// another replica. It also ends once every sender of its queue is gone (the target was
/// removed by a reload), after delivering what was queued.
pub async fn run(name: String, queue: Queue, shared: Arc<Shared>) {
    let depth = shared.metrics.notify_queue_depth(&name);
    let mut rx = queue.lock().await;
    let mut running = FuturesUnordered::new();
    let mut concurrency = 1;
    loop {
        tokio::select! {
            j = rx.recv(), if running.len() < concurrency => match j {
                Some(job) => {
                    concurrency = job.target().concurrency.max(1);
                    running.push(handle(&shared, &depth, job));
                }
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
            _ = shared.shutdown.cancelled() => break,
        }
    }
    while running.next().await.is_some() {}
    rx.close();
    while let Ok(job) = rx.try_recv() {
        depth.dec();
        if let Job::Bus { held, .. } = job {
            let _ = held.delivery().nak(Duration::ZERO).await;
            held.settled();
        }
    }
}

impl Job {
    fn target(&self) -> &Arc<Target> {
        match self {
            Job::Bus { target, .. } | Job::Sync { target, .. } => target,
        }
    }
}

/// Delivers one job: settles a bus message, or answers a waiting caller.
async fn handle(shared: &Shared, depth: &prometheus::IntGauge, job: Job) {
    // Counted out when done, or when a panic unwinds past it.
    let _queued = Queued(depth);
    match job {
        Job::Bus {
            target,
            held,
            prepared,
            deadline,
        } => {
            crate::supervise::failpoint("notify-worker", &target.name);
            let delivery = held.delivery().clone();
            let current = || delivery.is_current();
            let verdict = deliver(shared, &target, &prepared, deadline, &current).await;
            shared.recent.record(&target.name, &verdict);
            shared
                .dead_letters
                .settle(&target.name, &delivery, verdict)
                .await;
            held.settled();
        }
        Job::Sync {
            target,
            prepared,
            reply,
            deadline,
        } => {
            // A caller that gave up must not get a delivery it was told timed out.
            if !reply.is_closed() {
                let verdict = deliver(shared, &target, &prepared, deadline, &|| true).await;
                shared.recent.record(&target.name, &verdict);
                let _ = reply.send(verdict);
            }
        }
    }
}

/// Takes one job off the queue-depth gauge when dropped.
struct Queued<'a>(&'a prometheus::IntGauge);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The requests for a prepared message.
pub fn render(target: &Target, p: &Prepared) -> Vec<Request> {
    let to = Addressing {
        recipients: &p.recipients,
        seed: &p.seed,
        origin: p.origin.as_ref(),
    };
    target
        .kind
        .render(&p.notification, &target.render, &target.endpoint, &to)
}

/// What one message's delivery has seen so far, across its requests.
#[derive(Default)]
struct Tally {
    /// Sends tried (including token fetches that failed).
    attempts: u32,
    /// Transient failures so far.
    transient: u32,
    /// "Too fast" answers so far.
    limited: u32,
    last: Option<Answer>,
}

impl Tally {
    fn failed(&mut self, reason: Reason) -> Verdict {
        Verdict::Failed {
            reason,
            attempts: self.attempts,
            answer: self.last.take(),
        }
    }
}

/// How one request ended, when it did not end the message.
enum RequestEnd {
    Accepted,
    /// Its recipient cannot be reached; the others still get theirs.
    Skipped,
}

/// Renders and sends every request, waiting for the limiter before each send, retrying
/// transient failures with backoff, pausing on "too fast". Stops before any send once `current`
/// says the message has become another replica's.
async fn deliver(
    shared: &Shared,
    target: &Target,
    prepared: &Prepared,
    deadline: SystemTime,
    current: &(dyn Fn() -> bool + Sync),
) -> Verdict {
    let requests = render(target, prepared);
    let mut tally = Tally::default();
    let mut accepted = 0usize;
    for request in &requests {
        let one = Delivering {
            shared,
            target,
            request,
            deadline,
            current,
        };
        match one.run(&mut tally).await {
            Ok(RequestEnd::Accepted) => accepted += 1,
            Ok(RequestEnd::Skipped) => {}
            Err(verdict) => return verdict,
        }
    }
    match tally.last.take() {
        Some(answer) if accepted > 0 => Verdict::Delivered {
            parts: requests.len(),
            answer,
        },
        // Every recipient was refused.
        last => {
            tally.last = last;
            tally.failed(Reason::Permanent)
        }
    }
}

/// One request of a message on its way.
struct Delivering<'a> {
    shared: &'a Shared,
    target: &'a Target,
    request: &'a Request,
    deadline: SystemTime,
    current: &'a (dyn Fn() -> bool + Sync),
}

impl Delivering<'_> {
    /// Sends until the platform accepts, refuses for good, or the message must stop.
    async fn run(&self, tally: &mut Tally) -> Result<RequestEnd, Verdict> {
        let name = self.target.name.as_str();
        let member_keys = self.member_keys();
        let limit_key = limit_key(self.target);
        let mut keys: Vec<Key<'_>> = member_keys
            .iter()
            .map(|k| Key {
                name: k,
                scope: Scope::Member,
                limits: &self.target.member_limits,
            })
            .collect();
        keys.push(Key {
            name: &limit_key,
            scope: Scope::Target,
            limits: &self.target.limits,
        });
        let mut refreshed = false;
        loop {
            let sent = self.attempt(&keys, tally).await?;
            let answer = sent.answer;
            let mut class = answer.class;
            let rejected = answer
                .code
                .is_some_and(|c| self.target.kind.is_token_rejected(c));
            if let (true, Some(token)) = (rejected, &sent.token) {
                self.shared.sender.invalidate(self.target, token);
                // An access token the platform no longer takes (expired early, or revoked):
                // send again at once with a new one, once per request.
                if !refreshed {
                    refreshed = true;
                    tracing::info!(target = name, code = ?answer.code, "access token refused; fetching a new one");
                    tally.last = Some(answer);
                    continue;
                }
                // A fresh token refused too: the platform's side; try again later.
                class = Class::Transient;
            }
            if class != Class::Ok {
                self.shared.metrics.notify_failed(name, class.label());
                tracing::info!(target = name, class = class.label(), code = ?answer.code, status = answer.status, detail = %answer.detail, stage = if sent.token_failed { "token" } else { "send" }, "send failed");
            }
            let recipient_error = answer
                .code
                .is_some_and(|c| self.target.kind.is_recipient_error(c));
            if !sent.invalid_users.is_empty() {
                self.report_invalid_users(&sent.invalid_users);
            }
            tally.last = Some(answer);
            match class {
                Class::Ok => return Ok(RequestEnd::Accepted),
                Class::Permanent if recipient_error => {
                    self.skip_recipient();
                    return Ok(RequestEnd::Skipped);
                }
                Class::Permanent if sent.token_failed => {
                    return Err(tally.failed(Reason::TokenRefused))
                }
                Class::Permanent => return Err(tally.failed(Reason::Permanent)),
                Class::RateLimited { pause } => self.pause(pause, &limit_key, tally).await?,
                Class::Transient => self.back_off(tally).await?,
            }
        }
    }

    /// The access token first (fetching it after the slots were taken could put a round trip
    /// between a slot's record and its send), then the rate limiter's slots, then the send.
    async fn attempt(&self, keys: &[Key<'_>], tally: &mut Tally) -> Result<Sent, Verdict> {
        let token = match self.shared.sender.token(self.target).await {
            Ok(token) => token,
            Err(answer) => {
                tally.attempts += 1;
                return Ok(Sent::no_token(answer));
            }
        };
        let shared = self.shared;
        let margin = shared.settings.rate_limit_margin;
        match shared
            .limiter
            .acquire_all(keys, margin, self.deadline, &shared.shutdown)
            .await
        {
            Ok(waited) => shared
                .metrics
                .notify_limiter_waited(&self.target.name, waited),
            Err(LimiterError::Deadline) => return Err(tally.failed(Reason::Expired)),
            Err(LimiterError::Shutdown) => return Err(tally.failed(Reason::Shutdown)),
        }
        if !(self.current)() {
            return Err(tally.failed(Reason::Moved));
        }
        tally.attempts += 1;
        Ok(shared.sender.send(self.target, self.request, token).await)
    }

    /// "Too fast" is not the message's fault: pause the whole target (on every replica) and
    /// try again, without counting it as an attempt of this message.
    async fn pause(
        &self,
        pause: Option<Duration>,
        limit_key: &str,
        tally: &mut Tally,
    ) -> Result<(), Verdict> {
        tally.limited += 1;
        if tally.limited >= self.shared.settings.max_attempts {
            return Err(tally.failed(Reason::RateLimited));
        }
        let pause = pause.unwrap_or(self.target.pause_on_rate_limit);
        tracing::warn!(target = %self.target.name, pause = ?pause, "platform says too fast; pausing the target");
        let until = SystemTime::now() + pause;
        self.shared.metrics.notify_paused(&self.target.name, until);
        self.shared.limiter.pause(limit_key, until).await;
        Ok(())
    }

    /// Waits before trying a transient failure again, unless attempts or time ran out.
    async fn back_off(&self, tally: &mut Tally) -> Result<(), Verdict> {
        let settings = &self.shared.settings;
        tally.transient += 1;
        if tally.transient >= settings.max_attempts {
            return Err(tally.failed(Reason::AttemptsExhausted));
        }
        self.shared.metrics.notify_retry(&self.target.name);
        let delay =
            crate::backoff::delay(tally.transient, settings.retry_initial, settings.retry_max);
        if SystemTime::now() + delay > self.deadline {
            return Err(tally.failed(Reason::Expired));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.shared.shutdown.cancelled() => Err(tally.failed(Reason::Shutdown)),
        }
    }

    /// One recipient the platform cannot reach (Lark): skipped, the others still get theirs.
    fn skip_recipient(&self) {
        let invalid = self.request.members.join(", ");
        self.shared
            .metrics
            .notify_invalid_recipients(&self.target.name, 1);
        tracing::warn!(target = %self.target.name, recipients = %invalid, "the platform cannot reach this recipient; skipped");
    }

    /// WeCom accepts a message while naming the recipients outside the app's visible scope.
    fn report_invalid_users(&self, invalid: &[String]) {
        self.shared
            .metrics
            .notify_invalid_recipients(&self.target.name, invalid.len());
        tracing::warn!(target = %self.target.name, users = ?invalid, "WeCom did not deliver to these users (invaliduser: outside the app's visible scope?)");
    }

    /// The limiter keys of this request's recipients, when the target limits per recipient.
    fn member_keys(&self) -> Vec<String> {
        if self.target.member_limits.is_empty() {
            return Vec::new();
        }
        self.request
            .members
            .iter()
            .map(|m| member_key(self.target, m))
            .collect()
    }
}

/// The limiter key of a target's own limits: a group bot's name, or for app messages the app
/// (the platform counts per app, whichever targets share it; the configuration makes them
/// agree on the limits).
fn limit_key(target: &Target) -> String {
    use sha2::{Digest, Sha256};
    match &target.endpoint {
        Endpoint::Robot { .. } | Endpoint::Webhook(_) => target.name.clone(),
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
        Endpoint::Robot { .. } | Endpoint::Webhook(_) => target.name.clone(),
    };
    let digest = Sha256::digest(format!("{}|{app}|{member}", target.kind.as_str()));
    format!("member_{}", &hex::encode(digest)[..24])
}
