//! Prometheus metrics, in a registry of their own (not the global one) so that several daemons
//! can live in one test process. Names follow the Prometheus conventions: `imbridge_` prefix,
//! unit suffix, `_total` for counters, low-cardinality labels only.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Label used for the app of a request naming no configured app, so that arbitrary URLs cannot
/// create new series.
pub const UNKNOWN_APP: &str = "_unknown";

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

pub struct Inner {
    registry: Registry,
    /// The name of every registered family, listed at registration: the exposition leaves out
    /// a family with no series yet, and dashboards and alerts may name one.
    families: Vec<String>,
    /// Callbacks by platform, app and outcome (`published`, `duplicate`, `replay`, `check_url`,
    /// or the error code of a refusal).
    pub callbacks_total: IntCounterVec,
    /// Published requests forgotten before their replay window ended because the set of them
    /// was full: repeats of those are caught only by the bus's duplicate window.
    pub replay_evictions_total: IntCounter,
    /// Dead letters the in-process bus dropped to stay within its ring per target.
    pub dead_letter_evictions_total: IntCounter,
    /// Time from request to reply, by platform.
    pub callback_duration_seconds: HistogramVec,
    /// Time from publish to acknowledgement, by engine and outcome.
    pub bus_publish_duration_seconds: HistogramVec,
    /// 1 while connected to the bus, by engine.
    pub bus_connected: IntGaugeVec,
    /// Requests being handled right now.
    pub requests_in_flight: IntGauge,
    /// `GET /events` streams open right now.
    pub event_streams: IntGauge,
    /// `GET /events` streams closed because their client fell too far behind.
    pub event_stream_overflows_total: IntCounter,
    /// Configuration reloads applied (SIGHUP or a watched file's change).
    pub config_reloads_total: IntCounter,
    /// Unix time of the latest event published for each app (callback or long connection).
    pub last_event_seconds: IntGaugeVec,
    /// Configuration reloads refused (invalid, or not applicable without a restart): the
    /// daemon goes on with the configuration it had.
    pub config_reload_failures_total: IntCounter,
    /// Open client connections, by listener (`public`, `internal`, `admin`).
    pub connections_open: IntGaugeVec,
    /// Connections closed at once because the listener had `server.max_connections` open.
    pub connections_refused_total: IntCounterVec,
    /// Connections that ended in an error, by listener and reason (`header_timeout`,
    /// `headers_too_large`, `malformed_request`, `connection_error`).
    pub connections_closed_total: IntCounterVec,
    /// `POST /notify/<target>` requests by target and outcome.
    pub notify_requests_total: IntCounterVec,
    /// Notifications delivered, by target.
    pub notify_sent_total: IntCounterVec,
    /// Failed sends by target and class (rate_limited, transient, permanent).
    pub notify_failed_total: IntCounterVec,
    /// Retries after transient failures, by target.
    pub notify_retries_total: IntCounterVec,
    /// Dead-lettered notifications by target and reason.
    pub notify_dead_letters_total: IntCounterVec,
    /// Time spent waiting for the rate limiter before a send, by target.
    pub notify_limiter_wait_seconds: HistogramVec,
    /// Notifications queued in this replica, by target.
    pub notify_queue_depth: IntGaugeVec,
    /// Unix time until which this replica paused a target after "too fast"; in the past
    /// once the pause is over (a timestamp needs no timer to clear it).
    pub notify_paused_until_seconds: IntGaugeVec,
    /// From publish on the bus to the platform's answer, by target.
    pub notify_latency_seconds: HistogramVec,
    /// Accounts named in a notification but not bound on the target's platform, by target.
    pub notify_unbound_users_total: IntCounterVec,
    /// Recipients the platform refused (WeCom `invaliduser`, Lark unreachable users), by target.
    pub notify_invalid_recipients_total: IntCounterVec,
    /// Access-token requests by target and outcome (ok, transient, permanent).
    pub notify_token_fetches_total: IntCounterVec,
    /// Messages a route forwarded, by route and target (target "" when no rule matched).
    pub notify_routed_total: IntCounterVec,
    /// API gateway calls by platform, app and the class of the status the caller got
    /// (`2xx`, `4xx`, `5xx`, …).
    pub api_requests_total: IntCounterVec,
    /// API gateway calls from request to answer, by platform and app.
    pub api_duration_seconds: HistogramVec,
    /// The API gateway's access-token requests by platform, app and outcome.
    pub api_token_fetches_total: IntCounterVec,
    /// Restarts of supervised tasks after a panic, by task (`<kind>:<configured name>`).
    pub task_restarts_total: IntCounterVec,
    /// 1 while a stream-mode app has its long connection, by platform and app.
    pub stream_connected: IntGaugeVec,
    /// Long connections replaced or attempts failed, by platform, app and reason.
    pub stream_reconnects_total: IntCounterVec,
    /// Frames received on long connections, by platform, app and type (`system`, `event`,
    /// `callback`, `invalid`).
    pub stream_frames_total: IntCounterVec,
    /// Frames skipped as unreadable, by platform, app and reason.
    pub stream_invalid_frames_total: IntCounterVec,
    /// ACKs sent, by platform, app and status (`success`, `later`, `callback`,
    /// `callback_failed`, `ping`, `system`, `unknown`).
    pub stream_acks_total: IntCounterVec,
    /// Time from a frame's arrival to its ACK, by platform.
    pub stream_ack_seconds: HistogramVec,
    /// Events published from a platform's list of failed pushes, by platform and app.
    pub recovered_events_total: IntCounterVec,
    /// Polls of that list, by platform, app and outcome (`ok`, `error`, `not_holder`).
    pub recover_polls_total: IntCounterVec,
    /// Errors of recovery, by platform, app and reason.
    pub recover_errors_total: IntCounterVec,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let mut inner = Inner {
            callbacks_total: IntCounterVec::new(
                Opts::new("imbridge_callbacks_total", "Platform callbacks by outcome"),
                &["platform", "app", "outcome"],
            )
            .unwrap(),
            replay_evictions_total: IntCounter::new(
                "imbridge_replay_evictions_total",
                "Published callbacks forgotten early because the replay set was full",
            )
            .unwrap(),
            dead_letter_evictions_total: IntCounter::new(
                "imbridge_dead_letter_evictions_total",
                "Dead letters the in-process bus dropped because its ring for the target was full",
            )
            .unwrap(),
            callback_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_callback_duration_seconds",
                    "Time from callback request to reply",
                )
                .buckets(latency_buckets.clone()),
                &["platform"],
            )
            .unwrap(),
            bus_publish_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_bus_publish_duration_seconds",
                    "Time from publish to bus acknowledgement",
                )
                .buckets(latency_buckets),
                &["engine", "outcome"],
            )
            .unwrap(),
            bus_connected: IntGaugeVec::new(
                Opts::new("imbridge_bus_connected", "1 while connected to the bus"),
                &["engine"],
            )
            .unwrap(),
            requests_in_flight: IntGauge::new(
                "imbridge_requests_in_flight",
                "Ingress requests being handled",
            )
            .unwrap(),
            event_streams: IntGauge::new(
                "imbridge_event_streams",
                "GET /events streams open on the internal listener",
            )
            .unwrap(),
            event_stream_overflows_total: IntCounter::new(
                "imbridge_event_stream_overflows_total",
                "GET /events streams closed because their client fell too far behind",
            )
            .unwrap(),
            last_event_seconds: IntGaugeVec::new(
                Opts::new(
                    "imbridge_last_event_timestamp_seconds",
                    "Unix time of the latest event an app delivered (published or a duplicate)",
                ),
                &["platform", "app"],
            )
            .unwrap(),
            config_reloads_total: IntCounter::new(
                "imbridge_config_reloads_total",
                "Configuration reloads applied",
            )
            .unwrap(),
            config_reload_failures_total: IntCounter::new(
                "imbridge_config_reload_failures_total",
                "Configuration reloads refused; the previous configuration stays in force",
            )
            .unwrap(),
            notify_requests_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_requests_total",
                    "POST /notify requests by outcome",
                ),
                &["target", "outcome"],
            )
            .unwrap(),
            notify_sent_total: IntCounterVec::new(
                Opts::new("imbridge_notify_sent_total", "Notifications delivered"),
                &["target"],
            )
            .unwrap(),
            notify_failed_total: IntCounterVec::new(
                Opts::new("imbridge_notify_failed_total", "Failed sends by class"),
                &["target", "class"],
            )
            .unwrap(),
            notify_retries_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_retries_total",
                    "Retries after transient failures",
                ),
                &["target"],
            )
            .unwrap(),
            notify_unbound_users_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_unbound_users_total",
                    "Accounts without a binding on the target's platform, skipped",
                ),
                &["target"],
            )
            .unwrap(),
            notify_invalid_recipients_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_invalid_recipients_total",
                    "Recipients the platform refused",
                ),
                &["target"],
            )
            .unwrap(),
            notify_token_fetches_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_token_fetches_total",
                    "Access-token requests by outcome",
                ),
                &["target", "outcome"],
            )
            .unwrap(),
            api_requests_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_api_requests_total",
                    "API gateway calls by status class",
                ),
                &["platform", "app", "class"],
            )
            .unwrap(),
            api_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_api_duration_seconds",
                    "API gateway calls from request to answer",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["platform", "app"],
            )
            .unwrap(),
            api_token_fetches_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_api_token_fetches_total",
                    "API gateway access-token requests by outcome",
                ),
                &["platform", "app", "outcome"],
            )
            .unwrap(),
            notify_routed_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_routed_total",
                    "Messages forwarded by routes (target empty: no rule matched)",
                ),
                &["route", "target"],
            )
            .unwrap(),
            connections_open: IntGaugeVec::new(
                Opts::new("imbridge_connections_open", "Open client connections"),
                &["listener"],
            )
            .unwrap(),
            connections_refused_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_connections_refused_total",
                    "Connections closed at once: server.max_connections were open",
                ),
                &["listener"],
            )
            .unwrap(),
            connections_closed_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_connections_closed_total",
                    "Connections that ended in an error (timeouts, malformed requests)",
                ),
                &["listener", "reason"],
            )
            .unwrap(),
            task_restarts_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_task_restarts_total",
                    "Supervised tasks restarted after a panic",
                ),
                &["task"],
            )
            .unwrap(),
            stream_connected: IntGaugeVec::new(
                Opts::new(
                    "imbridge_stream_connected",
                    "1 while a stream-mode app has its long connection",
                ),
                &["platform", "app"],
            )
            .unwrap(),
            recovered_events_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_recovered_events_total",
                    "Events published from the platform's list of pushes it failed to deliver",
                ),
                &["platform", "app"],
            )
            .unwrap(),
            recover_polls_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_recover_polls_total",
                    "Polls of the platform's failed pushes, by outcome (not_holder: another \
                     replica holds the lease)",
                ),
                &["platform", "app", "outcome"],
            )
            .unwrap(),
            recover_errors_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_recover_errors_total",
                    "Errors while recovering failed pushes, by reason (unreadable_entry: \
                     an entry whose data could not be read, logged with its tag and time)",
                ),
                &["platform", "app", "reason"],
            )
            .unwrap(),
            stream_reconnects_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_stream_reconnects_total",
                    "Long connections replaced or connection attempts failed, by reason",
                ),
                &["platform", "app", "reason"],
            )
            .unwrap(),
            stream_frames_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_stream_frames_total",
                    "Frames received on long connections, by type",
                ),
                &["platform", "app", "type"],
            )
            .unwrap(),
            stream_invalid_frames_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_stream_invalid_frames_total",
                    "Frames skipped as unreadable, by reason",
                ),
                &["platform", "app", "reason"],
            )
            .unwrap(),
            stream_acks_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_stream_acks_total",
                    "ACKs sent on long connections, by status",
                ),
                &["platform", "app", "status"],
            )
            .unwrap(),
            stream_ack_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_stream_ack_seconds",
                    "Time from a frame's arrival to its ACK",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["platform"],
            )
            .unwrap(),
            notify_dead_letters_total: IntCounterVec::new(
                Opts::new(
                    "imbridge_notify_dead_letters_total",
                    "Notifications dead-lettered",
                ),
                &["target", "reason"],
            )
            .unwrap(),
            notify_limiter_wait_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_notify_limiter_wait_seconds",
                    "Time waiting for the rate limiter before a send",
                )
                .buckets(vec![
                    0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
                &["target"],
            )
            .unwrap(),
            notify_queue_depth: IntGaugeVec::new(
                Opts::new(
                    "imbridge_notify_queue_depth",
                    "Notifications queued in this replica",
                ),
                &["target"],
            )
            .unwrap(),
            notify_paused_until_seconds: IntGaugeVec::new(
                Opts::new(
                    "imbridge_notify_paused_until_seconds",
                    "Unix time until which the target is paused after the platform said too fast",
                ),
                &["target"],
            )
            .unwrap(),
            notify_latency_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "imbridge_notify_latency_seconds",
                    "From publish to the platform's answer",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                ]),
                &["target"],
            )
            .unwrap(),
            registry,
            families: Vec::new(),
        };
        let build_info = IntGaugeVec::new(
            Opts::new("imbridge_build_info", "Always 1; labels give the version"),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let r = &inner.registry;
        let mut families = Vec::new();
        let mut register = |c: Box<dyn prometheus::core::Collector>| {
            families.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            r.register(c).unwrap();
        };
        register(Box::new(inner.callbacks_total.clone()));
        register(Box::new(inner.replay_evictions_total.clone()));
        register(Box::new(inner.dead_letter_evictions_total.clone()));
        register(Box::new(inner.callback_duration_seconds.clone()));
        register(Box::new(inner.bus_publish_duration_seconds.clone()));
        register(Box::new(inner.bus_connected.clone()));
        register(Box::new(inner.requests_in_flight.clone()));
        register(Box::new(inner.event_streams.clone()));
        register(Box::new(inner.event_stream_overflows_total.clone()));
        register(Box::new(inner.config_reloads_total.clone()));
        register(Box::new(inner.last_event_seconds.clone()));
        register(Box::new(inner.config_reload_failures_total.clone()));
        register(Box::new(build_info));
        for c in [
            &inner.notify_requests_total,
            &inner.notify_sent_total,
            &inner.notify_failed_total,
            &inner.notify_retries_total,
            &inner.notify_dead_letters_total,
            &inner.notify_unbound_users_total,
            &inner.notify_invalid_recipients_total,
            &inner.notify_token_fetches_total,
            &inner.notify_routed_total,
            &inner.api_requests_total,
            &inner.api_token_fetches_total,
            &inner.task_restarts_total,
            &inner.connections_refused_total,
            &inner.connections_closed_total,
            &inner.stream_reconnects_total,
            &inner.stream_frames_total,
            &inner.stream_invalid_frames_total,
            &inner.stream_acks_total,
            &inner.recovered_events_total,
            &inner.recover_polls_total,
            &inner.recover_errors_total,
        ] {
            register(Box::new(c.clone()));
        }
        register(Box::new(inner.notify_limiter_wait_seconds.clone()));
        register(Box::new(inner.notify_queue_depth.clone()));
        register(Box::new(inner.notify_paused_until_seconds.clone()));
        register(Box::new(inner.connections_open.clone()));
        register(Box::new(inner.notify_latency_seconds.clone()));
        register(Box::new(inner.api_duration_seconds.clone()));
        register(Box::new(inner.stream_connected.clone()));
        register(Box::new(inner.stream_ack_seconds.clone()));
        inner.families = families;
        Metrics(Arc::new(inner))
    }

    /// The name of every metric family, whether it has a series yet or not.
    pub fn family_names(&self) -> &[String] {
        &self.families
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of valid metrics cannot fail");
        String::from_utf8(buf).expect("text exposition is UTF-8")
    }

    // One method per event: the only place that decides label names and values.

    /// Counts one callback outcome.
    /// An event published from DingTalk's list of failed pushes.
    pub fn recovered(&self, app: &str) {
        self.recovered_events_total
            .with_label_values(&["dingtalk", app])
            .inc();
    }

    /// A poll of DingTalk's list of failed pushes, and how it went.
    pub fn recover_poll(&self, app: &str, outcome: &str) {
        self.recover_polls_total
            .with_label_values(&["dingtalk", app, outcome])
            .inc();
    }

    /// A recovery error, and why.
    pub fn recover_error(&self, app: &str, reason: &str) {
        self.recover_errors_total
            .with_label_values(&["dingtalk", app, reason])
            .inc();
    }

    pub fn callback(&self, platform: &str, app: &str, outcome: &str) {
        self.callbacks_total
            .with_label_values(&[platform, app, outcome])
            .inc();
        if matches!(outcome, "published" | "duplicate") {
            self.last_event_seconds
                .with_label_values(&[platform, app])
                .set(unix_now());
        }
    }

    /// When `app` last delivered an event, as Unix seconds.
    pub fn last_event(&self, platform: &str, app: &str) -> Option<i64> {
        let gauge = self
            .last_event_seconds
            .get_metric_with_label_values(&[platform, app]);
        gauge.ok().map(|g| g.get()).filter(|t| *t > 0)
    }

    /// Until when `target` is paused, as Unix seconds, if it ever was.
    pub fn paused_until(&self, target: &str) -> Option<i64> {
        let gauge = self
            .notify_paused_until_seconds
            .get_metric_with_label_values(&[target]);
        gauge.ok().map(|g| g.get()).filter(|t| *t > 0)
    }

    /// The notifications `target` dead-lettered since start, whatever the reason.
    pub fn dead_letters_of(&self, target: &str) -> u64 {
        use prometheus::core::Collector;
        let families = self.notify_dead_letters_total.collect();
        let metrics = families.iter().flat_map(|f| f.get_metric());
        let of_target = metrics.filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "target" && l.value() == target)
        });
        of_target.map(|m| m.get_counter().get_value() as u64).sum()
    }

    /// Whether a long-connection app is connected now.
    pub fn stream_is_connected(&self, platform: &str, app: &str) -> bool {
        let gauge = self
            .stream_connected
            .get_metric_with_label_values(&[platform, app]);
        gauge.is_ok_and(|g| g.get() == 1)
    }

    /// A published callback forgotten before its replay window ended, to make room.
    pub fn replay_evicted(&self) {
        self.replay_evictions_total.inc();
    }

    /// A dead letter the in-process bus dropped, oldest first, to make room.
    pub fn dead_letter_evicted(&self) {
        self.dead_letter_evictions_total.inc();
    }

    /// Times one callback, from request to reply.
    pub fn callback_took(&self, platform: &str, took: Duration) {
        self.callback_duration_seconds
            .with_label_values(&[platform])
            .observe(took.as_secs_f64());
    }

    /// Counts a connection closed at once because `listener` was full.
    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused_total
            .with_label_values(&[listener])
            .inc();
    }

    /// Counts a connection of `listener` that ended in an error.
    pub fn connection_closed(&self, listener: &str, reason: &str) {
        self.connections_closed_total
            .with_label_values(&[listener, reason])
            .inc();
    }

    /// Whether the bus `engine` is connected.
    pub fn bus_connected(&self, engine: &str, connected: bool) {
        self.bus_connected
            .with_label_values(&[engine])
            .set(i64::from(connected));
    }

    /// Times one publish to the bus, by how it ended.
    pub fn bus_published(&self, engine: &str, outcome: &str, took: Duration) {
        self.bus_publish_duration_seconds
            .with_label_values(&[engine, outcome])
            .observe(took.as_secs_f64());
    }

    /// Counts one `POST /notify/<target>` request by outcome.
    pub fn notify_request(&self, target: &str, outcome: &str) {
        self.notify_requests_total
            .with_label_values(&[target, outcome])
            .inc();
    }

    /// A delivered notification, and its latency from publish to the platform's answer.
    pub fn notify_sent(&self, target: &str, latency: Duration) {
        self.notify_sent_total.with_label_values(&[target]).inc();
        self.notify_latency_seconds
            .with_label_values(&[target])
            .observe(latency.as_secs_f64());
    }

    /// A send the platform did not accept, by the class of its answer.
    pub fn notify_failed(&self, target: &str, class: &str) {
        self.notify_failed_total
            .with_label_values(&[target, class])
            .inc();
    }

    /// A retry after a transient failure.
    pub fn notify_retry(&self, target: &str) {
        self.notify_retries_total.with_label_values(&[target]).inc();
    }

    /// A dead-lettered notification, by reason.
    pub fn notify_dead_letter(&self, target: &str, reason: &str) {
        self.notify_dead_letters_total
            .with_label_values(&[target, reason])
            .inc();
    }

    /// Time a send waited for the rate limiter.
    pub fn notify_limiter_waited(&self, target: &str, waited: Duration) {
        self.notify_limiter_wait_seconds
            .with_label_values(&[target])
            .observe(waited.as_secs_f64());
    }

    /// `target` paused until `until` (the platform said too fast).
    pub fn notify_paused(&self, target: &str, until: std::time::SystemTime) {
        let secs = until
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.notify_paused_until_seconds
            .with_label_values(&[target])
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// The gauge of notifications queued for `target` in this replica.
    pub fn notify_queue_depth(&self, target: &str) -> IntGauge {
        self.notify_queue_depth.with_label_values(&[target])
    }

    /// Accounts named but not bound on the target's platform.
    pub fn notify_unbound_users(&self, target: &str, count: usize) {
        self.notify_unbound_users_total
            .with_label_values(&[target])
            .inc_by(count as u64);
    }

    /// Recipients the platform refused or could not reach.
    pub fn notify_invalid_recipients(&self, target: &str, count: usize) {
        self.notify_invalid_recipients_total
            .with_label_values(&[target])
            .inc_by(count as u64);
    }

    /// One access-token request, by outcome (`ok` or the class of the refusal).
    pub fn notify_token_fetch(&self, target: &str, outcome: &str) {
        self.notify_token_fetches_total
            .with_label_values(&[target, outcome])
            .inc();
    }

    /// One API gateway call's answer to its caller: the status's class and how long it took.
    pub fn api_request(&self, platform: &str, app: &str, status: u16, took: Duration) {
        let class = format!("{}xx", status / 100);
        self.api_requests_total
            .with_label_values(&[platform, app, &class])
            .inc();
        self.api_duration_seconds
            .with_label_values(&[platform, app])
            .observe(took.as_secs_f64());
    }

    /// One access-token request of the API gateway, by outcome.
    pub fn api_token_fetch(&self, platform: &str, app: &str, outcome: &str) {
        self.api_token_fetches_total
            .with_label_values(&[platform, app, outcome])
            .inc();
    }

    /// A supervised task restarted after a panic.
    pub fn task_restart(&self, task: &str) {
        self.task_restarts_total.with_label_values(&[task]).inc();
    }

    /// Whether a stream-mode app has its long connection.
    pub fn stream_connected(&self, platform: &str, app: &str, connected: bool) {
        self.stream_connected
            .with_label_values(&[platform, app])
            .set(i64::from(connected));
    }

    /// A long connection replaced, or an attempt at one failed, and why.
    pub fn stream_reconnect(&self, platform: &str, app: &str, reason: &str) {
        self.stream_reconnects_total
            .with_label_values(&[platform, app, reason])
            .inc();
    }

    /// A frame received, by type (`invalid` when it could not be read).
    pub fn stream_frame(&self, platform: &str, app: &str, kind: &str) {
        self.stream_frames_total
            .with_label_values(&[platform, app, kind])
            .inc();
    }

    /// A frame skipped as unreadable, and why.
    pub fn stream_invalid_frame(&self, platform: &str, app: &str, reason: &str) {
        self.stream_frame(platform, app, "invalid");
        self.stream_invalid_frames_total
            .with_label_values(&[platform, app, reason])
            .inc();
    }

    /// An ACK sent, by status, and the time since its frame arrived.
    pub fn stream_ack(&self, platform: &str, app: &str, status: &str, took: Duration) {
        self.stream_acks_total
            .with_label_values(&[platform, app, status])
            .inc();
        self.stream_ack_seconds
            .with_label_values(&[platform])
            .observe(took.as_secs_f64());
    }

    /// A message a route forwarded to `target` ("" when no rule matched).
    pub fn notify_routed(&self, route: &str, target: &str) {
        self.notify_routed_total
            .with_label_values(&[route, target])
            .inc();
    }
}

fn unix_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
