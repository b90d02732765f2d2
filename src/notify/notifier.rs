//! The notify pipeline as the rest of the daemon sees it: started from what is configured, it
//! runs one worker per target and the bus consumers that feed them, and delivers synchronous
//! `POST /notify/<target>?wait=true` sends through the same queues and limiters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::compose::{ComposeError, Directory};
use super::consumer::{self, Intake};
use super::dead_letter::DeadLetters;
use super::gateway::{ApiSettings, Gateway};
use super::generation::{Generation, Live};
use super::in_flight::InFlight;
use super::limiter::{Limiter, StoreError};
use super::router::Route;
use super::sender::Sender;
use super::settings::{LimiterStore, NotifySettings};
use super::target::Target;
use super::template::Templates;
use super::verdict::Verdict;
use super::worker::{self, Job, Shared};
use crate::bus::{self, Bus};
use crate::message;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// What the notify pipeline sends to and how: targets, routes, templates, user bindings.
pub struct Catalog {
    pub targets: BTreeMap<String, Target>,
    pub routes: BTreeMap<String, Route>,
    pub templates: Templates,
    pub users: Directory,
}

/// Why a synchronous delivery could not be attempted.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("no such target")]
    UnknownTarget,
    #[error("{0}")]
    Compose(#[from] ComposeError),
    #[error("the target's queue is full")]
    QueueFull,
    #[error("no answer within the wait timeout")]
    Timeout,
    #[error("shutting down")]
    Shutdown,
}

/// Why the pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("starting the rate limiter: {0}")]
    Limiter(#[from] StoreError),
}

/// What the pipeline needs the bus to keep in place: the notify and dead-letter streams (NATS)
/// or each target's topics (Kafka), every consumer it reads, and the limiter's log (Kafka).
pub fn bus_layout(
    settings: &NotifySettings,
    targets: &BTreeMap<String, Target>,
    routes: &BTreeMap<String, Route>,
    prefix: &str,
) -> bus::Layout {
    let mut layout = bus::Layout {
        keyed_by_name: vec!["notify.".into(), "dlq.notify.".into()],
        ..Default::default()
    };
    if settings.enabled {
        // Interest retention: a notification leaves the stream once every consumer that
        // sees it (its target's, and the catch-all for unknown targets) acknowledged it.
        layout.streams.push(bus::StreamSpec {
            name: settings.stream.clone(),
            subjects: vec![bus::with_prefix(prefix, "notify.>")],
            interest: true,
        });
        layout.streams.push(bus::StreamSpec {
            name: settings.dlq_stream.clone(),
            subjects: vec![bus::with_prefix(prefix, "dlq.notify.>")],
            interest: false,
        });
        let (specs, all) = consumer::specs(settings, targets.keys(), routes, prefix);
        // Routes on events keep these too: harmless, and a route may be switched back.
        for name in targets.keys().chain(routes.keys()) {
            layout
                .topics
                .push(bus::with_prefix(prefix, &format!("notify.{name}")));
            layout
                .topics
                .push(bus::with_prefix(prefix, &format!("dlq.notify.{name}")));
        }
        layout.consumers = specs.into_iter().map(|(_, s)| s).collect();
        layout.consumers.push(all);
    }
    // Also without the consumers: `POST /notify/<target>?wait=true` sends through the
    // limiter, which waits until it has read its topic.
    if settings.limiter == LimiterStore::KafkaLog {
        let log = bus::with_prefix(prefix, &settings.limiter_bucket);
        layout.topics.push(log.clone());
        layout.compacted.push((log, super::limiter::LOG_RETENTION));
    }
    layout
}

pub struct Notifier {
    settings: NotifySettings,
    shared: Arc<Shared>,
    intake: Arc<Intake>,
    /// The longest per-member window the limiter was started for.
    member_window: Duration,
    supervisor: Supervisor,
    shutdown: Shutdown,
    /// The running workers (`worker:<target>`) and bus consumers (by durable), each with its
    /// own stop, so that a reload ends exactly the ones it removes.
    units: Mutex<BTreeMap<String, Unit>>,
    /// Stopped units' tasks, joined at shutdown (they may still be handing back messages).
    retired: Mutex<Vec<JoinHandle<()>>>,
}

/// A supervised task a reload may stop.
struct Unit {
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// What a reload changed in the pipeline, for the log.
#[derive(Debug, Default)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Why the pipeline refused a new configuration; the old one stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("a target's per-member window grew past {0:?}, the longest the limiter was started with; restart to apply it")]
    MemberWindow(Duration),
    #[error("a route's `from` patterns changed ({0}); on the Kafka bus each is a consumer group made at start: restart to apply it")]
    KafkaReaders(String),
    #[error("the bus did not place the new consumers ({0}) within {1:?}")]
    NotPlaced(String, Duration),
}

/// The units' names, as their tasks are named in logs, metrics and `/readyz`.
const KEEPER: &str = "notify_keeper";
const WORKER: &str = "notify_worker:";

fn worker_name(target: &str) -> String {
    format!("{WORKER}{target}")
}

/// A consumer's unit (and task) name: what it does, for which name, and for a route on
/// events which pattern.
fn task_name(name: &str, spec: &bus::ConsumerSpec, generation: &Generation) -> String {
    match generation.routes.get(name) {
        _ if name.is_empty() => "notify_catch_all".into(),
        Some(route) if route.on_events() => format!("notify_route:{name}:{}", spec.filter),
        Some(_) => format!("notify_route:{name}"),
        None => format!("notify_feed:{name}"),
    }
}

/// How long a reload waits for the bus to hold a new target's consumer.
const PLACE_WITHIN: Duration = Duration::from_secs(30);

impl Notifier {
    /// Starts one worker per target and, when `settings.enabled`, the bus consumers.
    pub fn start(
        settings: &NotifySettings,
        catalog: Catalog,
        bus: Arc<Bus>,
        metrics: Metrics,
        prefix: &str,
        supervisor: &Supervisor,
        shutdown: Shutdown,
    ) -> Result<Arc<Notifier>, StartError> {
        let member_window = longest_member_window(&catalog);
        let limiter = Limiter::start(settings, member_window, &bus, prefix, shutdown.clone())?;
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            limiter,
            sender: Sender::new(settings.request_timeout, metrics.clone())?,
            dead_letters: DeadLetters {
                bus: bus.clone(),
                prefix: prefix.to_owned(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            },
            in_flight: Arc::new(InFlight::default()),
            recent: Default::default(),
            metrics,
            shutdown: shutdown.clone(),
        });
        let notifier = Notifier {
            settings: settings.clone(),
            intake: Arc::new(Intake {
                bus,
                prefix: prefix.to_owned(),
                live: Live::new(empty_generation()),
            }),
            shared,
            member_window,
            supervisor: supervisor.clone(),
            shutdown,
            units: Mutex::new(BTreeMap::new()),
            retired: Mutex::new(Vec::new()),
        };
        let generation = notifier.build(catalog, &notifier.intake.live.current());
        notifier.intake.live.replace(generation);
        if settings.enabled {
            notifier.start_keeper();
            // Placed in the background: the bus reports ready only once they are.
            drop(notifier.start_consumers());
        }
        Ok(Arc::new(notifier))
    }

    /// Applies a new catalog: new targets get a worker and a consumer, placed on the bus
    /// before the new generation is handed over (so the catch-all never takes their messages
    /// for nobody's); then the generation is swapped whole; then what was removed stops. A
    /// message already prepared finishes under the generation it was prepared with.
    pub async fn reload(&self, catalog: Catalog) -> Result<Changes, ReloadError> {
        let window = longest_member_window(&catalog);
        if window > self.member_window {
            return Err(ReloadError::MemberWindow(self.member_window));
        }
        let old = self.intake.live.current();
        let (before, _) = self.specs(old.targets.keys(), &old.routes);
        let (after, _) = self.specs(catalog.targets.keys(), &catalog.routes);
        if self.intake.bus.kafka().is_some() {
            let readers = |specs: &[(String, bus::ConsumerSpec)]| -> HashSet<String> {
                let inbound = specs.iter().filter(|(_, s)| s.new_only);
                inbound.map(|(_, s)| s.durable.clone()).collect()
            };
            let (was, is) = (readers(&before), readers(&after));
            if was != is {
                let diff: Vec<_> = was.symmetric_difference(&is).cloned().collect();
                return Err(ReloadError::KafkaReaders(diff.join(", ")));
            }
        }
        let next = self.build(catalog, &old);
        let mut changes = Changes::default();
        if self.settings.enabled {
            let started = self.start_consumers_of(&next);
            let placed = futures::future::join_all(started.iter().map(|(_, p)| p.clone()));
            let done = tokio::time::timeout(PLACE_WITHIN, placed).await;
            let names: Vec<String> = started.into_iter().map(|(n, _)| n).collect();
            if !done.is_ok_and(|all| all.into_iter().all(|p| p)) {
                self.stop_units(&names);
                return Err(ReloadError::NotPlaced(names.join(", "), PLACE_WITHIN));
            }
            changes.added = names;
        }
        let keep: HashSet<String> = self.unit_names(&next);
        let targets: HashSet<String> = next.targets.keys().cloned().collect();
        self.intake.live.replace(next);
        self.shared.recent.retain(|t| targets.contains(t));
        // A removed target's worker is not stopped: it ends by itself once its queue's
        // senders are gone (the feed stopped here, the generations holding it dropped), after
        // delivering what was queued.
        let gone: Vec<String> = self
            .lock_units()
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        self.stop_units(&gone);
        changes.removed = gone;
        Ok(changes)
    }

    /// The generation `catalog` describes; a target `old` has keeps its queue and worker,
    /// a new one gets both (the worker ends once its queue's senders are all gone).
    fn build(&self, catalog: Catalog, old: &Generation) -> Generation {
        let mut queues = HashMap::new();
        let mut targets = BTreeMap::new();
        for (name, target) in catalog.targets {
            let queue = match old.queues.get(&name) {
                Some(q) => q.clone(),
                None => self.start_worker(&name),
            };
            queues.insert(name.clone(), queue);
            targets.insert(name, Arc::new(target));
        }
        Generation {
            targets,
            queues,
            routes: catalog.routes,
            templates: catalog.templates,
            users: catalog.users,
        }
    }

    fn start_worker(&self, name: &str) -> mpsc::Sender<Job> {
        let (tx, rx) = mpsc::channel(self.settings.queue_capacity);
        let queue: worker::Queue = Arc::new(tokio::sync::Mutex::new(rx));
        let (shared, worker) = (self.shared.clone(), name.to_owned());
        let key = worker_name(name);
        let stop = self.shutdown.child();
        let task = self.supervisor.spawn(key.clone(), stop.clone(), move || {
            worker::run(worker.clone(), queue.clone(), shared.clone())
        });
        self.lock_units().insert(key, Unit { stop, task });
        tx
    }

    /// The keeper of in-flight messages.
    fn start_keeper(&self) {
        let ack_wait = self.settings.ack_wait;
        let (keeper, stop) = (self.shared.clone(), self.shutdown.clone());
        let task = self.supervisor.spawn(KEEPER.into(), stop.clone(), move || {
            let (keeper, stop) = (keeper.clone(), stop.clone());
            async move { keeper.in_flight.keep_alive(ack_wait, stop).await }
        });
        let unit = Unit {
            stop: self.shutdown.clone(),
            task,
        };
        self.lock_units().insert(KEEPER.into(), unit);
    }

    /// Starts the consumers of the current generation not yet running.
    fn start_consumers(&self) -> Vec<(String, futures::future::Shared<BoxFuture<'static, bool>>)> {
        let current = self.intake.live.current();
        self.start_consumers_of(&current)
    }

    /// Starts, supervised, each consumer `generation` needs and no unit runs yet: one per
    /// target and route, and the catch-all; returns each one's name and when it is placed.
    fn start_consumers_of(
        &self,
        generation: &Generation,
    ) -> Vec<(String, futures::future::Shared<BoxFuture<'static, bool>>)> {
        let (per_name, all) = self.specs(generation.targets.keys(), &generation.routes);
        let running: HashSet<String> = self.lock_units().keys().cloned().collect();
        let mut started = Vec::new();
        let all = (String::new(), all);
        for (name, spec) in per_name.iter().chain(std::iter::once(&all)) {
            // Named by what it does and reads: a name that changes from a target to a route
            // (or a route's pattern that changes) is another unit.
            let key = task_name(name, spec, generation);
            if running.contains(&key) {
                continue;
            }
            let stop = self.shutdown.child();
            let consumer = self.intake.bus.consume(spec, stop.clone());
            let placed = consumer.placed().boxed().shared();
            let source: consumer::Source = Arc::new(tokio::sync::Mutex::new(consumer));
            let (shared, intake, name) = (self.shared.clone(), self.intake.clone(), name.clone());
            // From the generation it is started for, which a reload has not handed over yet.
            let route = generation.routes.contains_key(&name);
            let s = stop.clone();
            let task = self.supervisor.spawn(key.clone(), stop.clone(), move || {
                let (src, sh, i, st) = (source.clone(), shared.clone(), intake.clone(), s.clone());
                match (name.as_str(), route) {
                    ("", _) => consumer::catch_all(src, sh, i, st).boxed(),
                    (_, true) => consumer::forward(name.clone(), src, sh, i, st).boxed(),
                    (_, false) => consumer::feed(name.clone(), src, sh, i, st).boxed(),
                }
            });
            self.lock_units().insert(key.clone(), Unit { stop, task });
            started.push((key, placed));
        }
        started
    }

    fn specs<'a>(
        &self,
        targets: impl Iterator<Item = &'a String>,
        routes: &BTreeMap<String, Route>,
    ) -> (Vec<(String, bus::ConsumerSpec)>, bus::ConsumerSpec) {
        consumer::specs(&self.settings, targets, routes, &self.intake.prefix)
    }

    /// The units `generation` keeps: its consumers' durables (the catch-all's among them).
    fn unit_names(&self, generation: &Generation) -> HashSet<String> {
        let (per_name, all) = self.specs(generation.targets.keys(), &generation.routes);
        let per_name = per_name.iter().map(|(n, s)| task_name(n, s, generation));
        let mut names: HashSet<String> = per_name.collect();
        names.insert(task_name("", &all, generation));
        names.insert(KEEPER.into());
        names.extend(generation.targets.keys().map(|t| worker_name(t)));
        names
    }

    /// Stops these units (a worker is left to end by itself); each hands back what it holds.
    /// Their tasks are still joined at shutdown.
    fn stop_units(&self, names: &[String]) {
        let mut units = self.lock_units();
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|t| !t.is_finished());
        for name in names {
            if let Some(unit) = units.remove(name) {
                if !name.starts_with(WORKER) {
                    unit.stop.trigger();
                }
                retired.push(unit.task);
            }
        }
    }

    fn lock_units(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Unit>> {
        self.units.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this replica consumes `notify.>`.
    pub fn is_consuming(&self) -> bool {
        self.settings.enabled
    }

    pub fn has_target(&self, name: &str) -> bool {
        self.intake.live.current().targets.contains_key(name)
    }

    /// Whether `name` is a route reading `notify.<name>` (a route on events reads no
    /// notifications).
    pub fn has_route(&self, name: &str) -> bool {
        let current = self.intake.live.current();
        current.routes.get(name).is_some_and(|r| !r.on_events())
    }

    /// How `target`'s latest delivery ended, if it had one.
    pub fn last_send(&self, target: &str) -> Option<super::recent::LastSend> {
        self.shared.recent.last(target)
    }

    /// The current targets, routes and bindings.
    pub fn generation(&self) -> Arc<Generation> {
        self.intake.live.current()
    }

    /// The platform API gateway for `apps` (by `<platform>/<name>`): it shares this pipeline's
    /// token cache (a target and an API call of one app use one token) and rate limiter.
    pub fn gateway(
        &self,
        apps: BTreeMap<String, crate::platform::api::ApiApp>,
        settings: ApiSettings,
    ) -> Result<Gateway, reqwest::Error> {
        Gateway::new(apps, settings, self.shared.clone())
    }

    /// Whether `name` (a target or a route) can make something of `body`: for a target, what
    /// it would send (template, recipients); for a route, that it is an object to match on.
    pub fn check(&self, name: &str, body: &[u8]) -> Result<(), ComposeError> {
        let current = self.intake.live.current();
        match current.targets.get(name) {
            Some(t) => current
                .composer()
                .prepare(body, t, None, String::new())
                .map(drop),
            None => message::payload(body).map(drop).map_err(ComposeError::from),
        }
    }

    /// Delivers now, through the target's queue and limiter, and returns the verdict
    /// (`POST /notify/<target>?wait=true`). `seed` identifies the message (its Idempotency-Key).
    pub async fn deliver_now(
        &self,
        target: &str,
        body: &[u8],
        seed: String,
    ) -> Result<Verdict, NotifyError> {
        let current = self.intake.live.current();
        let Some((t, queue)) = current.target(target) else {
            return Err(NotifyError::UnknownTarget);
        };
        let prepared = self
            .intake
            .prepare(&self.shared, &current, t, body, None, seed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Job::Sync {
                target: t.clone(),
                prepared: Box::new(prepared),
                reply,
                deadline: SystemTime::now() + self.settings.wait_timeout,
            })
            .map_err(|_| NotifyError::QueueFull)?;
        self.shared.metrics.notify_queue_depth(target).inc();
        match tokio::time::timeout(self.settings.wait_timeout, answer).await {
            Ok(Ok(verdict)) => Ok(verdict),
            Ok(Err(_)) => Err(NotifyError::Shutdown),
            Err(_) => Err(NotifyError::Timeout),
        }
    }

    /// Waits (up to `grace`) for workers to finish what they hold after shutdown was triggered.
    pub async fn join(&self, grace: Duration) {
        let units = std::mem::take(&mut *self.lock_units());
        let retired =
            std::mem::take(&mut *self.retired.lock().unwrap_or_else(PoisonError::into_inner));
        let tasks = units.into_values().map(|u| u.task).chain(retired);
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("grace period over; notifications still in progress go back to the bus");
        }
    }
}

/// The longest per-member window of any target: how long the limiter keeps members' sends.
fn longest_member_window(catalog: &Catalog) -> Duration {
    let limits = catalog.targets.values().flat_map(|t| &t.member_limits);
    limits.map(|l| l.window).max().unwrap_or_default()
}

/// What the pipeline holds before its first generation is built.
fn empty_generation() -> Generation {
    Generation {
        targets: BTreeMap::new(),
        queues: HashMap::new(),
        routes: BTreeMap::new(),
        templates: Templates::default(),
        users: Directory::new(BTreeMap::new()),
    }
}
