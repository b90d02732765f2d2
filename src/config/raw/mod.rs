//! The raw configuration: serde structs mirroring the TOML, with the documented defaults.
//!
//! Values that need parsing (addresses, durations, keys) stay strings here so that
//! validation can name every bad key in one pass instead of stopping at the first. For the
//! same reason nothing here denies unknown fields: they are collected while extracting
//! (`config::ignored`) and each is reported; and nothing uses `flatten` or untagged or
//! internally tagged enums around a table, which would hide them.

mod apps;
mod bus;
mod routes;
pub mod targets;

use std::collections::BTreeMap;

use figment::value::Dict;
use serde::{Deserialize, Serialize};

use crate::secret::{lenient_string, Secret};

pub use apps::{AppsConfig, DingTalkAppConfig, LarkAppConfig, WeComAppConfig};
pub use bus::{BusConfig, KafkaConfig, MemoryConfig, NatsConfig};
pub use routes::{RouteConfig, RuleConfig, TemplateConfig, UserConfig};
pub use targets::{AppKeys, KindKeys, OneOrMany, TargetConfig, WebhookKeys};

/// The raw configuration, as written in TOML.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// HTTP listeners and request limits.
    pub server: ServerConfig,
    /// How outbound platform calls leave: the proxy, if any.
    pub http: HttpConfig,
    /// Logging.
    pub log: LogConfig,
    /// The message bus events are published to.
    pub bus: BusConfig,
    /// Platform apps whose callbacks the ingress accepts.
    pub apps: AppsConfig,
    /// Long connections of the apps in stream mode (DingTalk Stream): keepalive, reconnects,
    /// limits and readiness.
    pub streams: StreamsConfig,
    /// The notify pipeline (consumer of `notify.>`, retries, dead letters, limiter).
    pub notify: NotifyConfig,
    /// Where notifications go: `notify.<name>` and `POST /notify/<name>`.
    /// Each table is read for its `kind` by [`targets::read`], after extraction.
    pub targets: BTreeMap<String, Dict>,
    /// Rules forwarding `notify.<name>` to targets by the message's fields.
    pub routes: BTreeMap<String, RouteConfig>,
    /// Templates turning payloads into notifications, by name.
    pub templates: BTreeMap<String, TemplateConfig>,
    /// Internal accounts and their ids on each platform.
    pub users: BTreeMap<String, UserConfig>,
    /// Internal systems allowed on the internal listener, each with its token.
    pub clients: BTreeMap<String, ClientConfig>,
    /// The platform API gateway (`/api/<platform>/<app>/…` on the internal listener, NATS
    /// request/reply on `api.<platform>.<app>`).
    pub api: ApiConfig,
}

/// `[api]`: the platform API gateway's limits, and who calls through NATS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Largest request body forwarded; larger ones are answered 413.
    pub max_request_bytes: u64,
    /// Largest platform answer passed back; a larger one is answered 502.
    pub max_response_bytes: u64,
    /// How long a call waits for its app's rate limit (`api_rate_limit`) before it is
    /// answered 429 with `Retry-After`.
    #[serde(deserialize_with = "lenient_string")]
    pub max_wait: String,
    /// Timeout of one request to a platform, its answer included.
    #[serde(deserialize_with = "lenient_string")]
    pub timeout: String,
    /// The `[clients.<name>]` NATS request/reply on `api.<platform>.<app>` acts as: its `api`
    /// globs apply. The bus is trusted: whoever may publish there calls as this client.
    /// Unset: no request/reply.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub nats_client: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 4 * 1024 * 1024,
            max_wait: "5s".into(),
            timeout: "30s".into(),
            nats_client: None,
        }
    }
}

/// `[http]`: the proxy every outbound platform call goes through (group bots, app messages
/// and their tokens, webhooks, stream registrations, the API gateway, DingTalk's server API),
/// unless a target or app says otherwise. The environment's `HTTP_PROXY`, `HTTPS_PROXY`,
/// `ALL_PROXY` and `NO_PROXY` are never read.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct HttpConfig {
    /// `http://host:port` or `https://host:port`, credentials allowed
    /// (`http://user:pass@proxy:3128`; a secret, never printed). Unset or "": direct.
    pub proxy: Option<Secret>,
    /// Hosts reached directly even with a proxy: names (`internal.example.com` also covers
    /// its subdomains, `.corp` only subdomains), IP addresses, CIDR blocks (`10.0.0.0/8`) or
    /// `*`. Applies to the per-target and per-app proxies too.
    pub no_proxy: Vec<String>,
}

/// `[clients.<name>]`: one internal system allowed to `POST /notify` on the internal listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Its secret token (at least 16 characters), sent as `Authorization: Bearer <token>` or,
    /// for webhook senders that cannot set a header, as `?token=<token>`.
    pub token: Option<Secret>,
    /// Targets and routes it may send to: names or globs (`*`, `?`), e.g. ["ops-*"].
    pub targets: Vec<String>,
    /// Whether its bodies may name recipients themselves (`to`, `mentions.user_ids`,
    /// `mentions.mobiles`). Default false: the target's and routes' own rules decide.
    pub allow_recipients: bool,
    /// Whether it may send platform-native `raw` bodies. Default false.
    pub allow_raw: bool,
    /// Platform APIs it may call through `/api`: globs over `<platform>/<app>/<path>`, the
    /// path normalised first (`*` any run of characters, `/` included; `?` one), e.g.
    /// `["dingtalk/main/topapi/v2/user/*", "lark/main/open-apis/contact/v3/users/*"]`.
    pub api: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address of the ingress (callbacks) listener.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(deserialize_with = "lenient_string")]
    pub admin_listen: String,
    /// Address of the internal listener (`POST /notify` for `[clients]`); off when unset.
    /// Never expose it publicly.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub internal_listen: Option<String>,
    /// Let requests without a client token use the internal listener, as any client allowed
    /// everything. Only for a listener nothing untrusted can reach; logged at start.
    pub allow_anonymous: bool,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: u64,
    /// Time a client has to send a request's headers, counted from when the connection opens
    /// or its previous response was sent: also how long an idle keep-alive connection stays.
    #[serde(deserialize_with = "lenient_string")]
    pub header_timeout: String,
    /// Time a client has to send a request's whole body once its headers arrived; 408 after.
    #[serde(deserialize_with = "lenient_string")]
    pub body_timeout: String,
    /// Open connections per listener; one more is closed at once (and counted).
    pub max_connections: usize,
    /// Callbacks whose signed timestamp is further than this from now are refused, and an
    /// exact repeat of a callback published within it is answered but not published again.
    /// Keep it no longer than the bus's duplicate window (check-config warns otherwise).
    /// "0" disables both checks.
    #[serde(deserialize_with = "lenient_string")]
    pub replay_window: String,
    /// The most callbacks a second this replica is expected to take, all apps together. With
    /// replay_window it sizes the memory of published callbacks (rate × window entries, at
    /// most 500,000 of about 250 bytes); past it the oldest are forgotten early and counted
    /// in imbridge_replay_evictions_total.
    pub max_callback_rate: u32,
    /// `GET /events` streams each client may have open at once on the internal listener; one
    /// more is answered 429.
    pub max_event_streams: usize,
    /// How long a shutdown waits for in-flight requests (and their publishes) to finish.
    #[serde(deserialize_with = "lenient_string")]
    pub shutdown_grace: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            internal_listen: None,
            allow_anonymous: false,
            max_body_bytes: 64 * 1024,
            header_timeout: "10s".into(),
            body_timeout: "10s".into(),
            max_connections: 4096,
            replay_window: "2m".into(),
            max_callback_rate: 100,
            max_event_streams: 4,
            shutdown_grace: "20s".into(),
        }
    }
}

/// `[streams]`: how the apps in stream mode keep their connection to the platform.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct StreamsConfig {
    /// A WebSocket ping is sent this often; a connection that receives nothing (no frame, no
    /// pong) for twice this long is declared dead and replaced.
    #[serde(deserialize_with = "lenient_string")]
    pub ping_interval: String,
    /// First wait before reconnecting after a failure; it doubles (with jitter) up to
    /// reconnect_max. A `disconnect` from the platform reconnects at once.
    #[serde(deserialize_with = "lenient_string")]
    pub reconnect_initial: String,
    #[serde(deserialize_with = "lenient_string")]
    pub reconnect_max: String,
    /// Wait between attempts while the platform refuses the app's credentials (401/403): they
    /// will not start working by themselves, and the platform should not be hammered.
    #[serde(deserialize_with = "lenient_string")]
    pub auth_retry: String,
    /// Timeout of the registration call and of the WebSocket handshake.
    #[serde(deserialize_with = "lenient_string")]
    pub connect_timeout: String,
    /// An app whose connection has been down longer than this is named in /readyz.
    #[serde(deserialize_with = "lenient_string")]
    pub down_grace: String,
    /// Whether such an app makes /readyz answer 503. Set false when the replica must stay in
    /// its Service meanwhile (it also serves /notify, say); refused credentials always do.
    pub down_fails_readiness: bool,
    /// Largest frame read; a larger one is counted and skipped (DingTalk's Java SDK caps
    /// frames at 256 KiB, so the platform is not expected to send more).
    pub max_frame_bytes: usize,
    /// Frames of one connection being published at once; past it, reading pauses.
    pub max_in_flight: usize,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            ping_interval: "60s".into(),
            reconnect_initial: "1s".into(),
            reconnect_max: "60s".into(),
            auth_retry: "60s".into(),
            connect_timeout: "10s".into(),
            down_grace: "60s".into(),
            down_fails_readiness: true,
            max_frame_bytes: 1024 * 1024,
            max_in_flight: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    /// "text" or "json".
    #[serde(deserialize_with = "lenient_string")]
    pub format: String,
    /// A tracing filter such as "info" or "imbridge=debug,warn"; `RUST_LOG` overrides it.
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct NotifyConfig {
    /// Consume `notify.>` and deliver. Off, the daemon only serves callbacks.
    pub enabled: bool,
    /// JetStream stream holding `notify.>` (work-queue retention: a message leaves once delivered
    /// or dead-lettered).
    #[serde(deserialize_with = "lenient_string")]
    pub stream: String,
    /// JetStream stream holding `dlq.notify.>`.
    #[serde(deserialize_with = "lenient_string")]
    pub dlq_stream: String,
    /// Durable consumer shared by all replicas.
    #[serde(deserialize_with = "lenient_string")]
    pub consumer: String,
    /// How long the bus waits for an ack before redelivering; held messages are kept alive with
    /// progress acks, so this only matters when a replica dies.
    #[serde(deserialize_with = "lenient_string")]
    pub ack_wait: String,
    /// Messages handed out but not yet acknowledged, across all targets of one replica.
    pub max_ack_pending: i64,
    /// Attempts on transient failures (network, timeouts, 5xx) before a message is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; it doubles (with jitter) up to retry_max.
    #[serde(deserialize_with = "lenient_string")]
    pub retry_initial: String,
    #[serde(deserialize_with = "lenient_string")]
    pub retry_max: String,
    /// A message not delivered within this time after it reached the daemon (throttled, paused,
    /// retried) is dead-lettered with reason "expired".
    #[serde(deserialize_with = "lenient_string")]
    pub max_wait: String,
    /// Messages queued in memory per target; beyond it they stay on the bus and come back
    /// after requeue_delay, so a flooded target cannot hold every in-flight slot.
    pub queue_capacity: usize,
    #[serde(deserialize_with = "lenient_string")]
    pub requeue_delay: String,
    /// Timeout of one request to a platform.
    #[serde(deserialize_with = "lenient_string")]
    pub request_timeout: String,
    /// How long `POST /notify/<target>?wait=true` waits for the platform's answer.
    #[serde(deserialize_with = "lenient_string")]
    pub wait_timeout: String,
    /// Added to every rate-limit window, to absorb network jitter between the limiter and the
    /// platform and clock differences between replicas.
    #[serde(deserialize_with = "lenient_string")]
    pub rate_limit_margin: String,
    /// "local" (this process only), "nats_kv" (shared by all replicas through a JetStream
    /// key-value bucket), "kafka_log" (shared through a Kafka topic) or "auto" (nats_kv on
    /// the nats bus, kafka_log on kafka, local otherwise).
    #[serde(deserialize_with = "lenient_string")]
    pub limiter: String,
    /// Key-value bucket of the nats_kv limiter (its per-recipient entries in a second stream,
    /// `<limiter_bucket>_members`), or topic of the kafka_log limiter.
    #[serde(deserialize_with = "lenient_string")]
    pub limiter_bucket: String,
    /// The most people one message may reach: its recipients and mentions, counted once the
    /// user bindings are resolved. A message naming more is refused (422, or a dead letter
    /// with reason "too_many_recipients").
    pub max_recipients: usize,
    /// The zone templates' `date` filter shows times in when the template names none: an IANA
    /// name such as "Asia/Shanghai" (the tz database is built in). Unset: unix times in UTC
    /// and RFC 3339 times in the offset they were written with, as before it existed.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub timezone: Option<String>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            enabled: true,
            stream: "IMBRIDGE_NOTIFY".into(),
            dlq_stream: "IMBRIDGE_DLQ".into(),
            consumer: "imbridge-notify".into(),
            ack_wait: "30s".into(),
            max_ack_pending: 1000,
            max_attempts: 5,
            retry_initial: "1s".into(),
            retry_max: "1m".into(),
            max_wait: "30m".into(),
            queue_capacity: 100,
            requeue_delay: "5s".into(),
            request_timeout: "10s".into(),
            wait_timeout: "30s".into(),
            rate_limit_margin: "250ms".into(),
            limiter: "auto".into(),
            limiter_bucket: "imbridge_rate_limits".into(),
            max_recipients: crate::notify::guard::DEFAULT_MAX_RECIPIENTS,
            timezone: None,
        }
    }
}
