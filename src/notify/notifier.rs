//! The notify pipeline as the rest of the daemon sees it: started from what is configured, it
//! runs one worker per target and the bus consumers that feed them, and delivers synchronous
//! `POST /notify/<target>?wait=true` sends through the same queues and limiters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::compose::{ComposeError, Directory};
use super::consumer::{self, Intake};
use super::dead_letter::DeadLetters;
use super::gateway::{ApiSettings, Gateway};
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
    targets: BTreeMap<String, Arc<Target>>,
    queues: HashMap<String, mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    intake: Arc<Intake>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

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
        let member_windows = catalog
            .targets
            .values()
            .flat_map(|t| &t.member_limits)
            .map(|l| l.window)
            .max()
            .unwrap_or_default();
        let limiter = Limiter::start(settings, member_windows, &bus, prefix, shutdown.clone())?;
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
            metrics,
            shutdown: shutdown.clone(),
        });
        let intake = Arc::new(Intake {
            bus,
            prefix: prefix.to_owned(),
            routes: catalog.routes,
            templates: catalog.templates,
            users: catalog.users,
        });
        let mut notifier = Notifier {
            settings: settings.clone(),
            targets: BTreeMap::new(),
            queues: HashMap::new(),
            shared,
            intake,
            tasks: Mutex::new(Vec::new()),
        };
        let mut tasks = Vec::new();
        for (name, target) in catalog.targets {
            let target = Arc::new(target);
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            let queue: worker::Queue = Arc::new(tokio::sync::Mutex::new(rx));
            let (t, shared) = (target.clone(), notifier.shared.clone());
            let task = format!("notify_worker:{name}");
            tasks.push(supervisor.spawn(task, shutdown.clone(), move || {
                worker::run(t.clone(), queue.clone(), shared.clone())
            }));
            notifier.queues.insert(name.clone(), tx);
            notifier.targets.insert(name, target);
        }
        if settings.enabled {
            tasks.extend(notifier.consume(supervisor, shutdown));
        }
        *notifier
            .tasks
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = tasks;
        Ok(Arc::new(notifier))
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

    /// Starts the bus consumers, supervised: one per target and route, the catch-all, and the
    /// keeper of in-flight messages.
    fn consume(&self, supervisor: &Supervisor, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        let (shared, intake) = (&self.shared, &self.intake);
        let mut tasks = Vec::new();
        let ack_wait = self.settings.ack_wait;
        let keeper = shared.clone();
        let stop = shutdown.clone();
        tasks.push(
            supervisor.spawn("notify_keeper".into(), shutdown.clone(), move || {
                let (keeper, stop) = (keeper.clone(), stop.clone());
                async move { keeper.in_flight.keep_alive(ack_wait, stop).await }
            }),
        );
        let (per_name, all) = consumer::specs(
            &self.settings,
            self.targets.keys(),
            &intake.routes,
            &intake.prefix,
        );
        for (name, spec) in &per_name {
            let source = self.source(spec, &shutdown);
            let (shared, intake) = (shared.clone(), intake.clone());
            let task = match intake.routes.get(name) {
                Some(route) => {
                    let task = match route.on_events() {
                        true => format!("notify_route:{name}:{}", spec.filter),
                        false => format!("notify_route:{name}"),
                    };
                    let route = route.clone();
                    supervisor.spawn(task, shutdown.clone(), move || {
                        let (r, s) = (route.clone(), source.clone());
                        consumer::forward(r, s, shared.clone(), intake.clone())
                    })
                }
                None => {
                    let (target, queue) = (self.targets[name].clone(), self.queues[name].clone());
                    supervisor.spawn(format!("notify_feed:{name}"), shutdown.clone(), move || {
                        let (t, s, q) = (target.clone(), source.clone(), queue.clone());
                        consumer::feed(t, s, q, shared.clone(), intake.clone())
                    })
                }
            };
            tasks.push(task);
        }
        // A route on events reads no `notify.<route>`: what is published there is for nobody.
        let notify_routes = intake.routes.values().filter(|r| !r.on_events());
        let known: Arc<HashSet<String>> = Arc::new(
            self.targets
                .keys()
                .chain(notify_routes.map(|r| &r.name))
                .cloned()
                .collect(),
        );
        let source = self.source(&all, &shutdown);
        let (shared, prefix) = (shared.clone(), intake.prefix.clone());
        tasks.push(
            supervisor.spawn("notify_catch_all".into(), shutdown, move || {
                let (s, k) = (source.clone(), known.clone());
                consumer::catch_all(s, k, shared.clone(), prefix.clone())
            }),
        );
        tasks
    }

    /// The bus consumer of `spec`, kept across the restarts of the task reading it.
    fn source(&self, spec: &bus::ConsumerSpec, shutdown: &Shutdown) -> consumer::Source {
        let consumer = self.intake.bus.consume(spec, shutdown.clone());
        Arc::new(tokio::sync::Mutex::new(consumer))
    }

    /// Whether this replica consumes `notify.>`.
    pub fn is_consuming(&self) -> bool {
        self.settings.enabled
    }

    pub fn has_target(&self, name: &str) -> bool {
        self.targets.contains_key(name)
    }

    /// Whether `name` is a route reading `notify.<name>` (a route on events reads no
    /// notifications).
    pub fn has_route(&self, name: &str) -> bool {
        self.intake.routes.get(name).is_some_and(|r| !r.on_events())
    }

    /// Whether `name` (a target or a route) can make something of `body`: for a target, what
    /// it would send (template, recipients); for a route, that it is an object to match on.
    pub fn check(&self, name: &str, body: &[u8]) -> Result<(), ComposeError> {
        match self.targets.get(name) {
            Some(t) => self
                .intake
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
        let (Some(queue), Some(t)) = (self.queues.get(target), self.targets.get(target)) else {
            return Err(NotifyError::UnknownTarget);
        };
        let prepared = self.intake.prepare(&self.shared, t, body, None, seed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Job::Sync {
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
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("grace period over; notifications still in progress go back to the bus");
        }
    }
}
