//! Building the daemon from validated settings and running it until shutdown.
//!
//! [`App::build`] starts the bus and binds both listeners (port 0 works, and the bound
//! addresses are returned), so tests and `main` share one path. [`App::run`] serves until the
//! shutdown signal, then stops accepting, lets in-flight callbacks finish their publishes within
//! the grace period, and flushes the bus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::bus::{self, Bus};
use crate::config::Settings;
use crate::ingress::stream::apps::StreamApps;
use crate::ingress::{self, State};
use crate::metrics::Metrics;
use crate::notify::notifier::{self, Notifier};
use crate::reload::Reloader;
use crate::server::{self, Listener, Refusals};
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;
use warp::{Filter, Reply};

pub struct App {
    pub ingress_addr: SocketAddr,
    /// The internal listener's address, when `server.internal_listen` is set.
    pub internal_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    bus: Arc<Bus>,
    metrics: Metrics,
    notifier: Arc<Notifier>,
    shutdown: Shutdown,
    admin_stop: Shutdown,
    grace: Duration,
    ingress: BoxFuture<'static, ()>,
    admin: BoxFuture<'static, ()>,
    refusals: Refusals,
    /// The pollers of failed pushes and the API responder on NATS (it stops taking requests
    /// on shutdown).
    streams: Vec<tokio::task::JoinHandle<()>>,
    /// The long connections (stream-mode apps), which a reload restarts app by app: each
    /// returns on shutdown once it has ACKed the frames it held.
    stream_apps: Arc<StreamApps>,
    /// What a reload replaces, and the configuration it replaces.
    state: Arc<State>,
    settings: Settings,
    supervisor: Supervisor,
}

/// A shutdown finishes within `server.shutdown_grace` plus this. The callbacks in progress and
/// the notify workers share the grace; the bus then gets what is left of it, but at least
/// [`BUS_CLOSE_FLOOR`], to commit and flush; the admin listener [`ADMIN_CLOSE`] to go.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);
const BUS_CLOSE_FLOOR: Duration = Duration::from_secs(3);
const ADMIN_CLOSE: Duration = Duration::from_secs(1);

impl App {
    pub async fn build(settings: Settings, shutdown: Shutdown) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        let refusals = Refusals::default();
        let prefix = &settings.bus.subject_prefix;
        let layout = bus_layout(&settings);
        let supervisor = Supervisor::new(metrics.clone());
        let bus = Bus::start(
            &settings.bus,
            &layout,
            metrics.clone(),
            &supervisor,
            shutdown.clone(),
        )
        .await
        .context("starting the bus")?;
        let bus = Arc::new(bus);
        let notifier = Notifier::start(
            &settings.notify,
            settings.catalog(),
            bus.clone(),
            metrics.clone(),
            prefix,
            &supervisor,
            shutdown.clone(),
        )
        .context("starting the notify pipeline")?;
        let state = ingress_state(&settings, &bus, &metrics, &notifier, &refusals, &shutdown)?;
        let limits = server::Limits {
            header_timeout: settings.server.header_timeout,
            max_connections: settings.server.max_connections,
        };
        let streams = ingress::stream::Streams::new(&settings.streams);
        let stream_apps = Arc::new(StreamApps::new(
            &settings.streams,
            &state,
            &streams,
            &supervisor,
            &shutdown,
        ));
        let stream_tasks = spawn_outbound_ingress(
            &settings,
            &state,
            &bus,
            &stream_apps,
            &supervisor,
            &shutdown,
        )?;
        let (ingress_addr, internal_addr, ingress) =
            serve_ingress(&settings, state.clone(), limits, &shutdown)?;

        // The admin listener outlives the ingress drain, so probes and metrics answer (readyz
        // with 503) while in-flight callbacks finish.
        let admin_stop = Shutdown::new();
        let admin_listener =
            Listener::bind("admin", "server.admin_listen", settings.server.admin_listen)?;
        let admin_addr = admin_listener.addr();
        let admin_routes =
            ingress::admin::routes(state.clone(), supervisor.clone(), streams, shutdown.clone())
                .map(Reply::into_response)
                .boxed();
        let admin = admin_listener.serve(
            admin_routes,
            limits,
            metrics.clone(),
            refusals.clone(),
            admin_stop.clone(),
        );

        Ok(App {
            ingress_addr,
            internal_addr,
            admin_addr,
            bus,
            metrics,
            notifier,
            shutdown,
            admin_stop,
            grace: settings.server.shutdown_grace,
            ingress,
            admin: admin.boxed(),
            refusals,
            streams: stream_tasks,
            stream_apps,
            state,
            settings,
            supervisor,
        })
    }

    /// Reloads the configuration from `path` (the one the daemon started from) on demand.
    pub fn reloader(&self, path: Option<std::path::PathBuf>) -> Arc<Reloader> {
        Arc::new(Reloader::new(
            path,
            self.settings.clone(),
            self.state.clone(),
            self.notifier.clone(),
            self.stream_apps.clone(),
            self.metrics.clone(),
        ))
    }

    /// Reloads on SIGHUP and, with `watch`, when the file changes, supervised, until
    /// shutdown. The SIGHUP handler is in place when this returns.
    pub fn serve_reloads(
        &self,
        path: Option<std::path::PathBuf>,
        watch: bool,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        crate::reload::install()?;
        let (reloader, stop) = (self.reloader(path), self.shutdown.clone());
        let task = self
            .supervisor
            .spawn("config_reload".into(), stop.clone(), move || {
                reloader.clone().serve(watch, stop.clone())
            });
        Ok(task)
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until the shutdown signal, then drains and returns.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let internal = self.internal_addr.map(|a| a.to_string());
        tracing::info!(ingress = %self.ingress_addr, internal = internal.as_deref().unwrap_or("off"), admin = %self.admin_addr, bus = self.bus.engine(), "imbridge serving");
        let mut ingress = tokio::spawn(self.ingress);
        let admin = tokio::spawn(self.admin);
        // Ends with the ingress drain; the last counts are logged at the end of the shutdown.
        let summaries = tokio::spawn(self.refusals.clone().report(self.shutdown.clone()));
        // Biased: the ingress future also ends on the shutdown signal, and that is no error.
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {}
            r = &mut ingress => {
                self.admin_stop.trigger();
                r.context("ingress listener task")?;
                anyhow::bail!("ingress listener stopped unexpectedly");
            }
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        tracing::info!(grace = ?self.grace, "shutdown: no longer accepting; finishing in-flight callbacks");
        match tokio::time::timeout_at(deadline, &mut ingress).await {
            Ok(r) => r.context("ingress listener task")?,
            Err(_) => {
                tracing::warn!(in_flight = self.metrics.requests_in_flight.get(), "grace period over; abandoning in-flight callbacks (the platform will retry them)");
                ingress.abort();
            }
        }
        // Long connections stop taking frames at the signal and ACK what they hold; past the
        // grace they are dropped, and DingTalk pushes again what was not ACKed.
        self.streams.extend(self.stream_apps.take_tasks());
        let streams = futures::future::join_all(self.streams.iter_mut());
        if tokio::time::timeout_at(deadline, streams).await.is_err() {
            tracing::warn!("grace period over; closing long connections with frames still in hand (the platform will push them again)");
            for task in &self.streams {
                task.abort();
            }
        }
        // Workers hand back what they hold; a send already in flight finishes and is acked.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.notifier.join(left).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left.max(BUS_CLOSE_FLOOR), self.bus.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "the bus did not close in time; unacknowledged messages will be redelivered"
            );
        }
        self.admin_stop.trigger();
        let _ = tokio::time::timeout(ADMIN_CLOSE, admin).await;
        let _ = summaries.await;
        self.refusals.summarize("since the last summary");
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// What the listeners' handlers share; the API gateway shares the pipeline's token cache and
/// rate limiter.
fn ingress_state(
    settings: &Settings,
    bus: &Arc<Bus>,
    metrics: &Metrics,
    notifier: &Arc<Notifier>,
    refusals: &Refusals,
    shutdown: &Shutdown,
) -> anyhow::Result<Arc<State>> {
    // The gateway shares the pipeline's token cache and rate limiter.
    let gateway = notifier
        .gateway(settings.api_apps.clone(), settings.api.clone())
        .context("starting the API gateway")?;
    let current = ingress::Current {
        dingtalk: settings.dingtalk_apps.clone(),
        wecom: settings.wecom_apps.clone(),
        lark: settings.lark_apps.clone(),
        subjects: settings.subjects.clone(),
        clients: settings.clients.clone(),
        gateway: Arc::new(gateway),
    };
    let state = Arc::new(State {
        current: tokio::sync::watch::Sender::new(Arc::new(current)),
        bus: bus.clone(),
        metrics: metrics.clone(),
        replay_window: settings.server.replay_window,
        replay: settings.server.replay_window.map(|window| {
            ingress::replay::Seen::new(window, settings.server.replay_capacity, metrics.clone())
        }),
        subject_prefix: settings.bus.subject_prefix.clone(),
        notifier: notifier.clone(),
        idempotency: Default::default(),
        refusals: refusals.clone(),
        events: ingress::events::Streams::new(settings.server.max_event_streams),
        shutdown: shutdown.clone(),
    });
    Ok(state)
}

/// Binds the public listener and, when configured, the internal one; both stop accepting on
/// `shutdown` and are drained together.
fn serve_ingress(
    settings: &Settings,
    state: Arc<State>,
    limits: server::Limits,
    shutdown: &Shutdown,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>, BoxFuture<'static, ()>)> {
    let server = &settings.server;
    let body = ingress::BodyLimit {
        max_bytes: server.max_body_bytes,
        timeout: server.body_timeout,
    };
    let serve = |listener: Listener, routes: server::Routes| {
        let (metrics, refusals) = (state.metrics.clone(), state.refusals.clone());
        listener.serve(routes, limits, metrics, refusals, shutdown.clone())
    };
    let public = Listener::bind("public", "server.listen", server.listen)?;
    let ingress_addr = public.addr();
    let routes = ingress::routes(state.clone(), body)
        .map(Reply::into_response)
        .boxed();
    let public = serve(public, routes);
    let Some(internal_listen) = server.internal_listen else {
        return Ok((ingress_addr, None, public.boxed()));
    };
    if state.current().clients.anonymous {
        tracing::warn!("server.allow_anonymous: POST /notify on the internal listener accepts requests without a client token");
    }
    let internal = Listener::bind("internal", "server.internal_listen", internal_listen)?;
    let internal_addr = internal.addr();
    let routes = ingress::internal_routes(state.clone(), body)
        .map(Reply::into_response)
        .boxed();
    let both = futures::future::join(public, serve(internal, routes)).map(drop);
    Ok((ingress_addr, Some(internal_addr), both.boxed()))
}

/// What brings events in without a request to the public listener, each task supervised and
/// ended after the listeners: the long connections of stream-mode apps, the pollers of
/// DingTalk's failed pushes, and the API gateway's request/reply responder on NATS.
fn spawn_outbound_ingress(
    settings: &Settings,
    state: &Arc<State>,
    bus: &Arc<Bus>,
    stream_apps: &StreamApps,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    stream_apps
        .apply(&settings.dingtalk_streams, &settings.lark_streams)
        .context("starting the long connections")?;
    let mut tasks = Vec::new();
    tasks.extend(ingress::recover::spawn(
        &settings.dingtalk_oapi,
        state,
        bus,
        supervisor,
        shutdown,
    ));
    // The API gateway's responder on NATS (request/reply), when api.nats_client is set.
    tasks.extend(ingress::api_nats::spawn(
        state.clone(),
        supervisor,
        shutdown,
    ));
    Ok(tasks)
}

/// What the bus keeps in place: the inbound stream's subjects (every platform's events) and
/// what the notify pipeline needs.
fn bus_layout(settings: &Settings) -> bus::Layout {
    let prefix = &settings.bus.subject_prefix;
    let mut layout = notifier::bus_layout(
        &settings.notify,
        &settings.targets,
        &settings.routes,
        prefix,
    );
    layout.inbound = ingress::inbound_subjects(prefix);
    // Kafka's leases are topics of one partition: in place before anyone joins their group.
    for (app, oapi) in &settings.dingtalk_oapi {
        if oapi.recover_failed.is_some() {
            let topic = bus::lease::topic(&ingress::recover::lease_name(app));
            layout.topics.push(bus::with_prefix(prefix, &topic));
        }
    }
    layout
}
