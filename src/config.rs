//! Configuration: one function loads it (defaults → TOML file → `IMBRIDGE_` environment) and
//! one validates it into [`Settings`], reporting every problem at once.
//!
//! The raw structs mirror the TOML exactly (`deny_unknown_fields`, so a typo is an error, not a
//! silently ignored key). Values that need parsing (addresses, durations, keys) stay strings
//! here so that validation can name every bad key in one pass instead of stopping at the first.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::bus::kafka::KafkaSettings;
use crate::bus::memory::MemorySettings;
use crate::bus::nats::NatsSettings;
use crate::bus::{BusSettings, EngineSettings};
use crate::message::UserBinding;
use crate::notify::compose::Directory;
use crate::notify::notifier::Catalog;
use crate::notify::router::{Route, Rule};
use crate::notify::settings::{LimiterKind, NotifySettings};
use crate::notify::target::{Composition, Target};
use crate::platform::dingtalk::callback::DingTalkApp;
use crate::platform::lark::callback::LarkApp;
use crate::platform::msgcrypt::{self, MsgCrypt};
use crate::platform::outbound::{LarkMarkdown, RenderOptions, TooLong};
use crate::platform::wecom::callback::WeComApp;
use crate::platform::{AppCredentials, Endpoint, Kind, Limit};
use crate::secret::{lenient_opt_string, lenient_string, Secret};

/// Prefix of the environment variables that override the file; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "IMBRIDGE_";

/// The raw configuration, as written in TOML.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP listeners and request limits.
    pub server: ServerConfig,
    /// Logging.
    pub log: LogConfig,
    /// The message bus events are published to.
    pub bus: BusConfig,
    /// Platform apps whose callbacks the ingress accepts.
    pub apps: AppsConfig,
    /// The notify pipeline (consumer of `notify.>`, retries, dead letters, limiter).
    pub notify: NotifyConfig,
    /// Where notifications go: `notify.<name>` and `POST /notify/<name>`.
    pub targets: BTreeMap<String, TargetConfig>,
    /// Rules forwarding `notify.<name>` to targets by the message's fields.
    pub routes: BTreeMap<String, RouteConfig>,
    /// Templates turning payloads into notifications, by name.
    pub templates: BTreeMap<String, crate::notify::template::TemplateConfig>,
    /// Internal accounts and their ids on each platform.
    pub users: BTreeMap<String, UserConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the ingress (callbacks) listener.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(deserialize_with = "lenient_string")]
    pub admin_listen: String,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: u64,
    /// Callbacks whose timestamp is further than this from now are rejected; "0" disables.
    #[serde(deserialize_with = "lenient_string")]
    pub replay_window: String,
    /// How long a shutdown waits for in-flight requests (and their publishes) to finish.
    #[serde(deserialize_with = "lenient_string")]
    pub shutdown_grace: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            max_body_bytes: 64 * 1024,
            replay_window: "1h".into(),
            shutdown_grace: "20s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
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
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// "memory" (in-process, the default), "nats" (JetStream) or "kafka".
    #[serde(deserialize_with = "lenient_string")]
    pub kind: String,
    /// Prepended with a dot to every subject, e.g. "prod" gives "prod.dingtalk.user_add_org".
    #[serde(deserialize_with = "lenient_string")]
    pub subject_prefix: String,
    pub memory: MemoryConfig,
    pub nats: NatsConfig,
    pub kafka: KafkaConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: "memory".into(),
            subject_prefix: String::new(),
            memory: MemoryConfig::default(),
            nats: NatsConfig::default(),
            kafka: KafkaConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Messages buffered per in-process subscriber before a slow one starts missing messages.
    pub capacity: usize,
    /// Messages with the same `ce-id` within this window are stored once, as on JetStream.
    #[serde(deserialize_with = "lenient_string")]
    pub duplicate_window: String,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: 1024,
            duplicate_window: "2m".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// Client name shown in the server's connection list.
    #[serde(deserialize_with = "lenient_string")]
    pub client_name: String,
    /// Path of a `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<String>,
    /// User/password authentication.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// Stream created or updated on start to hold the inbound subjects.
    #[serde(deserialize_with = "lenient_string")]
    pub stream: String,
    /// "file" or "memory".
    #[serde(deserialize_with = "lenient_string")]
    pub storage: String,
    /// Stream replicas (1 for a single server, 3 for a typical cluster).
    pub replicas: usize,
    /// Publishes with the same `Nats-Msg-Id` within this window are stored once.
    #[serde(deserialize_with = "lenient_string")]
    pub duplicate_window: String,
    /// How long events are kept; "0" keeps them until limits are reached.
    #[serde(deserialize_with = "lenient_string")]
    pub max_age: String,
    /// How long a publish waits for the PubAck before the callback is refused (503).
    #[serde(deserialize_with = "lenient_string")]
    pub publish_timeout: String,
    /// Timeout of one connection attempt.
    #[serde(deserialize_with = "lenient_string")]
    pub connect_timeout: String,
    /// Upper bound of the reconnect backoff.
    #[serde(deserialize_with = "lenient_string")]
    pub reconnect_max_delay: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            client_name: "imbridge".into(),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            stream: "IMBRIDGE_EVENTS".into(),
            storage: "file".into(),
            replicas: 1,
            duplicate_window: "10m".into(),
            max_age: "7d".into(),
            publish_timeout: "1s".into(),
            connect_timeout: "2s".into(),
            reconnect_max_delay: "5s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port`.
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    /// Consumer group of the notify consumer, shared by all replicas.
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// Client id shown in the brokers' logs and quotas.
    #[serde(deserialize_with = "lenient_string")]
    pub client_id: String,
    /// Passed through to librdkafka (SASL, TLS, timeouts); `_` in a key stands for `.`, so
    /// `IMBRIDGE_BUS__KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`.
    pub properties: BTreeMap<String, Secret>,
    /// Whether the daemon creates the topics it needs (inbound topics on first use, notify and
    /// dead-letter topics of configured targets at start).
    pub create_topics: bool,
    /// Partitions of the inbound topics it creates.
    pub partitions: i32,
    /// Replication factor of every topic it creates; -1 is the broker's default.
    pub replication_factor: i32,
    /// How long a publish waits for the delivery report before the callback is refused (503).
    #[serde(deserialize_with = "lenient_string")]
    pub publish_timeout: String,
    /// A publish with a ce-id this replica stored within this window is not stored again
    /// (Kafka itself does not deduplicate); "0" disables.
    #[serde(deserialize_with = "lenient_string")]
    pub duplicate_window: String,
    /// Record keys: subject pattern (without prefix, NATS wildcards) → JSON pointer into the
    /// event body, e.g. `"dingtalk.bpms_instance_change" = "/processInstanceId"`. Patterns
    /// without wildcards are tried first, then those with `*`, then those with `>`; without a
    /// match (or a value at the pointer) the key is ce-id.
    pub keys: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "imbridge".into(),
            client_id: "imbridge".into(),
            properties: BTreeMap::new(),
            create_topics: true,
            partitions: 3,
            replication_factor: -1,
            publish_timeout: "2s".into(),
            duplicate_window: "2m".into(),
            keys: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
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
    /// Key-value bucket of the nats_kv limiter, or topic of the kafka_log limiter.
    #[serde(deserialize_with = "lenient_string")]
    pub limiter_bucket: String,
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
        }
    }
}

/// One or several values (`rate_limit = "20/min"` or `rate_limit = ["5/s", "100/min"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Group bots: "dingtalk_robot", "wecom_robot", "lark_robot". App messages to bound users:
    /// "dingtalk_work" (work notification), "wecom_app", "lark_app".
    #[serde(deserialize_with = "lenient_string")]
    pub kind: String,
    /// Group bots: the full webhook URL, token or key included (a secret).
    #[serde(default)]
    pub url: Option<Secret>,
    /// Group bots: signing secret (DingTalk "SEC…", Lark custom-bot secret).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// App messages: DingTalk AppKey or Lark App ID.
    #[serde(default, alias = "app_key")]
    pub app_id: Option<String>,
    /// App messages: DingTalk AppSecret, WeCom app Secret or Lark App Secret.
    #[serde(default, alias = "corp_secret")]
    pub app_secret: Option<Secret>,
    /// WeCom app messages: the corp id.
    #[serde(default)]
    pub corp_id: Option<String>,
    /// DingTalk work notifications and WeCom app messages: the app's AgentId.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub agent_id: Option<String>,
    /// App messages: the platform's API base URL, for private deployments and tests. Defaults:
    /// https://oapi.dingtalk.com, https://qyapi.weixin.qq.com, https://open.feishu.cn.
    #[serde(default)]
    pub base_url: Option<String>,
    /// App messages: accounts (keys of `[users]`) that receive a message naming no recipient.
    #[serde(default)]
    pub users: Vec<String>,
    /// Never more than N requests in any window: "20/min", "5/s", "100/60s", or a list.
    /// Defaults: DingTalk and WeCom robots 20/min, Lark bots and apps ["5/s", "100/min"],
    /// DingTalk work notifications 20/s, WeCom apps none (their limit is per member).
    #[serde(default)]
    pub rate_limit: Option<OneOrMany>,
    /// App messages: limits per recipient, shared by every target of the same app. Default
    /// for WeCom apps ["30/min", "1000/h"] (the platform silently drops the excess).
    #[serde(default)]
    pub member_rate_limit: Option<OneOrMany>,
    /// How long to stop sending after the platform says "too fast". Defaults: DingTalk robots
    /// 10m (it bans the robot that long), others 1m.
    #[serde(default)]
    pub pause_on_rate_limit: Option<String>,
    /// "split" (several messages) or "truncate" a text over the platform's size limit.
    #[serde(default)]
    pub too_long: TooLong,
    /// Byte limit of the text; default is the platform's limit for the message type.
    #[serde(default)]
    pub max_bytes: Option<usize>,
    /// Text of the link rendered for a notification's url.
    #[serde(default)]
    pub link_text: Option<String>,
    /// Lark bots and apps: render markdown as an interactive "card" or a rich-text "post".
    #[serde(default)]
    pub lark_markdown: LarkMarkdown,
    /// How messages published straight to `notify.<name>` are turned into a notification
    /// (a route's own shaping applies to what it forwards).
    #[serde(flatten)]
    pub composition: CompositionConfig,
}

/// How a message body becomes the notification that is sent: a template, and which payload
/// fields name recipients and people to @mention (ZenTao's assignee and `mailto`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct CompositionConfig {
    /// Name of a `[templates.<name>]` rendering the payload into title, text, url, mentions.
    #[serde(default)]
    pub template: Option<String>,
    /// Payload fields holding accounts (keys of `[users]`) that receive app messages, e.g.
    /// ["assignedTo", "mailto"]; comma-separated or comma-wrapped lists are split.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Payload fields holding accounts to @mention in group-bot messages, e.g. ["assignedTo"].
    #[serde(default)]
    pub mention: Vec<String>,
    /// Leave the payload's `actor` out of recipients and mentions, as ZenTao does: people are
    /// not notified of their own actions. Default true; a rule without it takes the target's.
    #[serde(default)]
    pub exclude_actor: Option<bool>,
}

/// `[routes.<name>]`: a message on `notify.<name>` is matched on its fields and forwarded to
/// the targets of every rule that matches (each target at most once).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shorthand for one rule: these targets...
    #[serde(default)]
    pub targets: Vec<String>,
    /// ...when every field listed matches (empty: everything).
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, OneOrMany>,
    #[serde(flatten)]
    pub composition: CompositionConfig,
    /// More rules, each with its own match, targets and shaping.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub targets: Vec<String>,
    /// Field → accepted values. A payload value that is a comma-separated or comma-wrapped
    /// list (ZenTao's `product` is ",1,2,") matches when any item is accepted. A missing
    /// field matches nothing.
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, OneOrMany>,
    #[serde(flatten)]
    pub composition: CompositionConfig,
}

/// `[users.<account>]`: one person's ids on each platform, for `to.users`, `mentions.users`,
/// templates and routes.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Display name used by templates' `mention()`.
    pub name: Option<String>,
    /// DingTalk userId.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub dingtalk: Option<String>,
    /// WeCom userid.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub wecom: Option<String>,
    /// Lark open_id ("ou_…"), union_id ("on_…") or user_id.
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub lark: Option<String>,
    /// Mobile number (DingTalk and WeCom robots mention by mobile).
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub mobile: Option<String>,
    /// Email (Lark app messages can be addressed by email).
    pub email: Option<String>,
}

impl UserConfig {
    fn binding(&self) -> UserBinding {
        UserBinding {
            name: self.name.clone(),
            dingtalk: self.dingtalk.clone(),
            wecom: self.wecom.clone(),
            lark: self.lark.clone(),
            mobile: self.mobile.clone(),
            email: self.email.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppsConfig {
    /// DingTalk apps by name: `POST /callbacks/dingtalk/<name>`.
    pub dingtalk: BTreeMap<String, DingTalkAppConfig>,
    /// WeCom apps by name: `GET|POST /callbacks/wecom/<name>`.
    pub wecom: BTreeMap<String, WeComAppConfig>,
    /// Lark / Feishu apps by name: `POST /callbacks/lark/<name>`.
    pub lark: BTreeMap<String, LarkAppConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WeComAppConfig {
    /// The callback Token chosen in the admin console ("接收消息" settings).
    pub token: Secret,
    /// The 43-character EncodingAESKey chosen there.
    pub aes_key: Secret,
    /// The corpId (企业ID) the callbacks are encrypted for.
    #[serde(deserialize_with = "lenient_string")]
    pub corp_id: String,
    /// Also carry the decrypted XML, byte for byte, in the event body under `"#xml"`.
    #[serde(default)]
    pub keep_raw_xml: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LarkAppConfig {
    /// The Verification Token of the app's event subscription; checked when set.
    #[serde(default)]
    pub verification_token: Option<Secret>,
    /// The Encrypt Key; when set, events must be encrypted and signed with it.
    #[serde(default)]
    pub encrypt_key: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DingTalkAppConfig {
    /// The callback token chosen when registering the URL.
    pub token: Secret,
    /// The 43-character EncodingAESKey ("aes_key") chosen when registering the URL.
    pub aes_key: Secret,
    /// corpId (API-registered callback), appKey (in-house app event subscription) or suiteKey.
    #[serde(deserialize_with = "lenient_string")]
    pub receiver_id: String,
}

/// One configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

/// Validated, typed configuration: everything the daemon needs, already parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogConfig,
    pub bus: BusSettings,
    pub dingtalk_apps: BTreeMap<String, DingTalkApp>,
    pub wecom_apps: BTreeMap<String, WeComApp>,
    pub lark_apps: BTreeMap<String, LarkApp>,
    pub notify: NotifySettings,
    pub targets: BTreeMap<String, Target>,
    pub routes: BTreeMap<String, Route>,
    pub templates: crate::notify::template::Templates,
    pub users: BTreeMap<String, UserBinding>,
}

/// Parses "20/min", "5/s", "100/60s", "20/1m", "1000/h".
pub fn parse_limit(s: &str) -> Result<Limit, String> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not N/WINDOW (e.g. \"20/min\")"))?;
    let max: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{n:?} is not a positive count"))?;
    let per = per.trim();
    let window = match per {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other)?,
    };
    if max == 0 || window.is_zero() {
        return Err(format!("{s:?}: count and window must be greater than 0"));
    }
    Ok(Limit { max, window })
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: u64,
    /// `None` when the replay check is disabled.
    pub replay_window: Option<Duration>,
    pub shutdown_grace: Duration,
}

impl Settings {
    /// What the notify pipeline sends to and how.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            targets: self.targets.clone(),
            routes: self.routes.clone(),
            templates: self.templates.clone(),
            users: Directory::new(self.users.clone()),
        }
    }
}

/// Builds the layered figment: defaults → TOML file → `IMBRIDGE_` environment.
pub fn figment(path: Option<&Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed(ENV_PREFIX).split("__"))
}

/// Loads and validates the configuration from `path` (if any) and the environment.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    from_figment(figment(path))
}

/// Extracts and validates a configuration from an already-built figment (used by tests).
pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
    let raw: Config = figment.extract().map_err(figment_error)?;
    raw.validate()
}

fn figment_error(err: figment::Error) -> ConfigError {
    ConfigError {
        problems: err
            .into_iter()
            .map(|e| {
                let key = if e.path.is_empty() {
                    "<config>".to_owned()
                } else {
                    e.path.join(".")
                };
                let mut message = e.kind.to_string();
                if let Some(source) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    message.push_str(&format!(" (from {source})"));
                }
                Problem { key, message }
            })
            .collect(),
    }
}

/// Parses a duration such as "90s", "10m", "1h", "7d"; a bare "0" means zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected e.g. \"30s\", \"10m\", \"1h\")"))
}

/// Collects problems while validating, so every one of them is reported.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        // Longer than this is a typo, and would overflow time arithmetic.
        const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
        match parse_duration(value) {
            Ok(d) if d > MAX => {
                self.problem(key, format!("duration {value:?} is longer than 10 years"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(key, format!("invalid duration {value:?}: {e}"));
                Duration::ZERO
            }
        }
    }

    /// Parsed limits; `None` when not configured (the kind's default applies).
    fn limits(&mut self, key: &str, value: Option<&OneOrMany>) -> Option<Vec<Limit>> {
        let value = value?;
        if value.items().is_empty() {
            self.problem(
                key,
                "must not be empty (omit it for the platform's default)",
            );
            return Some(Vec::new());
        }
        Some(
            value
                .items()
                .into_iter()
                .filter_map(|item| parse_limit(item).map_err(|e| self.problem(key, e)).ok())
                .collect(),
        )
    }

    fn addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|e| {
            self.problem(
                key,
                format!("invalid listen address {value:?}: {e} (expected e.g. \"0.0.0.0:8080\")"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }
}

impl Config {
    /// Checks everything and converts to [`Settings`], or returns every problem found.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut c = Checker::default();

        let server = ServerSettings {
            listen: c.addr("server.listen", &self.server.listen),
            admin_listen: c.addr("server.admin_listen", &self.server.admin_listen),
            max_body_bytes: self.server.max_body_bytes,
            replay_window: Some(c.duration("server.replay_window", &self.server.replay_window))
                .filter(|d| !d.is_zero()),
            shutdown_grace: c.duration("server.shutdown_grace", &self.server.shutdown_grace),
        };
        if server.max_body_bytes == 0 {
            c.problem("server.max_body_bytes", "must be greater than 0");
        }
        if server.listen.port() != 0 && server.listen == server.admin_listen {
            c.problem(
                "server.admin_listen",
                "must differ from server.listen (the admin port is separate)",
            );
        }

        match self.log.format.as_str() {
            "text" | "json" => {}
            other => c.problem(
                "log.format",
                format!("unknown log format {other:?}; expected \"text\" or \"json\""),
            ),
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            c.problem(
                "log.level",
                format!("invalid filter {:?}: {e}", self.log.level),
            );
        }

        let prefix = self.bus.subject_prefix.trim_matches('.');
        if !prefix.is_empty() && !prefix.split('.').all(crate::bus::is_valid_token) {
            c.problem(
                "bus.subject_prefix",
                "must be dot-separated tokens of [A-Za-z0-9_-]",
            );
        }
        let engine = match self.bus.kind.as_str() {
            "memory" => EngineSettings::Memory(MemorySettings {
                capacity: self.bus.memory.capacity.max(1),
                duplicate_window: c.duration(
                    "bus.memory.duplicate_window",
                    &self.bus.memory.duplicate_window,
                ),
            }),
            "nats" => EngineSettings::Nats(Box::new(self.bus.nats.validate(&mut c))),
            "kafka" => EngineSettings::Kafka(Box::new(self.bus.kafka.validate(&mut c))),
            other => {
                c.problem(
                    "bus.kind",
                    format!(
                        "unknown bus kind {other:?}; expected \"memory\", \"nats\" or \"kafka\""
                    ),
                );
                EngineSettings::Memory(MemorySettings {
                    capacity: 1,
                    duplicate_window: Duration::ZERO,
                })
            }
        };

        let mut dingtalk_apps = BTreeMap::new();
        for (name, app) in &self.apps.dingtalk {
            let key = format!("apps.dingtalk.{name}");
            if !crate::bus::is_valid_token(name) {
                c.problem(&key, "app names must be of [A-Za-z0-9_-]");
            }
            if let Some(crypt) = app.validate(&key, &mut c) {
                dingtalk_apps.insert(name.clone(), DingTalkApp { crypt });
            }
        }

        let mut wecom_apps = BTreeMap::new();
        for (name, app) in &self.apps.wecom {
            let key = format!("apps.wecom.{name}");
            if !crate::bus::is_valid_token(name) {
                c.problem(&key, "app names must be of [A-Za-z0-9_-]");
            }
            let shared = DingTalkAppConfig {
                token: app.token.clone(),
                aes_key: app.aes_key.clone(),
                receiver_id: app.corp_id.clone(),
            };
            // The same scheme as DingTalk; only the receiver id is named corp_id here.
            let before = c.problems.len();
            let crypt = shared.validate(&key, &mut c);
            for p in &mut c.problems[before..] {
                p.key = p.key.replace(".receiver_id", ".corp_id");
                p.message = p
                    .message
                    .replace("corpId, appKey or suiteKey", "the corpId");
            }
            if let Some(crypt) = crypt {
                wecom_apps.insert(
                    name.clone(),
                    WeComApp {
                        crypt,
                        keep_raw_xml: app.keep_raw_xml,
                    },
                );
            }
        }

        let mut lark_apps = BTreeMap::new();
        for (name, app) in &self.apps.lark {
            let key = format!("apps.lark.{name}");
            if !crate::bus::is_valid_token(name) {
                c.problem(&key, "app names must be of [A-Za-z0-9_-]");
            }
            let set = |s: &Option<Secret>| {
                s.as_ref()
                    .map(|s| s.expose().to_owned())
                    .filter(|s| !s.is_empty())
            };
            let (verification_token, encrypt_key) =
                (set(&app.verification_token), set(&app.encrypt_key));
            if verification_token.is_none() && encrypt_key.is_none() {
                c.problem(
                    &key,
                    "set verification_token or encrypt_key (or both): otherwise anyone who knows the URL can publish events",
                );
            }
            lark_apps.insert(
                name.clone(),
                LarkApp {
                    verification_token,
                    encrypt_key,
                },
            );
        }

        let notify = self.notify.validate(&mut c, &engine);
        let templates = match crate::notify::template::Templates::compile(&self.templates) {
            Ok(t) => t,
            Err(errors) => {
                for (key, message) in errors {
                    c.problem(key, message);
                }
                crate::notify::template::Templates::default()
            }
        };
        let mut targets = BTreeMap::new();
        for (name, t) in &self.targets {
            let key = format!("targets.{name}");
            if !crate::bus::is_valid_token(name) {
                c.problem(&key, "target names must be of [A-Za-z0-9_-]");
            }
            t.composition.check(&key, &templates, &mut c);
            for u in &t.users {
                if !self.users.contains_key(u) {
                    c.problem(
                        format!("{key}.users"),
                        format!("no [users.{u}] is configured"),
                    );
                }
            }
            if let Some(t) = t.validate(name, &key, &mut c) {
                targets.insert(name.clone(), t);
            }
        }
        // Targets of one app share its limits on the platform, and so in the limiter: they must
        // say the same, or each would prune the shared logs by its own.
        let mut by_app: BTreeMap<(Kind, String, u64), &Target> = BTreeMap::new();
        for t in targets.values() {
            if let Endpoint::App(a) = &t.endpoint {
                let key = (t.kind, a.app_id.clone(), a.agent_id);
                match by_app.get(&key) {
                    Some(first)
                        if first.limits != t.limits || first.member_limits != t.member_limits =>
                    {
                        c.problem(
                            format!("targets.{}", t.name),
                            format!(
                                "shares its app with targets.{} but not its rate_limit and \
                                 member_rate_limit: one app has one set of limits",
                                first.name
                            ),
                        );
                    }
                    Some(_) => {}
                    None => {
                        by_app.insert(key, t);
                    }
                }
            }
        }
        let mut routes = BTreeMap::new();
        for (name, r) in &self.routes {
            let key = format!("routes.{name}");
            if !crate::bus::is_valid_token(name) {
                c.problem(&key, "route names must be of [A-Za-z0-9_-]");
            }
            if self.targets.contains_key(name) {
                c.problem(
                    &key,
                    "a target has this name too: notify.<name> must mean one thing",
                );
            }
            routes.insert(
                name.clone(),
                r.validate(name, &key, &self.targets, &templates, &mut c),
            );
        }
        for (account, u) in &self.users {
            if [&u.dingtalk, &u.wecom, &u.lark, &u.mobile, &u.email]
                .iter()
                .all(|v| v.as_deref().is_none_or(|v| v.trim().is_empty()))
            {
                c.problem(
                    format!("users.{account}"),
                    "binds no id: set dingtalk, wecom, lark, mobile or email",
                );
            }
        }

        if !c.problems.is_empty() {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        Ok(Settings {
            server,
            log: self.log.clone(),
            bus: BusSettings {
                subject_prefix: prefix.to_owned(),
                engine,
            },
            dingtalk_apps,
            wecom_apps,
            lark_apps,
            notify,
            targets,
            routes,
            templates,
            users: self
                .users
                .iter()
                .map(|(k, u)| (k.clone(), u.binding()))
                .collect(),
        })
    }
}

impl NatsConfig {
    fn validate(&self, c: &mut Checker) -> NatsSettings {
        if self.url.trim().is_empty() {
            c.problem("bus.nats.url", "must not be empty");
        }
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            c.problem(
                "bus.nats.stream",
                "must be a non-empty name of [A-Za-z0-9_-]",
            );
        }
        let memory_storage = match self.storage.as_str() {
            "file" => false,
            "memory" => true,
            other => {
                c.problem(
                    "bus.nats.storage",
                    format!("unknown storage {other:?}; expected \"file\" or \"memory\""),
                );
                false
            }
        };
        if self.replicas == 0 || self.replicas > 5 {
            c.problem("bus.nats.replicas", "must be between 1 and 5");
        }
        let user_password = match (&self.user, &self.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                c.problem("bus.nats.user", "user and password must be set together");
                None
            }
        };
        let duplicate_window = c.duration("bus.nats.duplicate_window", &self.duplicate_window);
        let max_age = c.duration("bus.nats.max_age", &self.max_age);
        if !max_age.is_zero() && duplicate_window > max_age {
            c.problem(
                "bus.nats.duplicate_window",
                "must not be longer than bus.nats.max_age",
            );
        }
        let publish_timeout = c.duration("bus.nats.publish_timeout", &self.publish_timeout);
        if publish_timeout.is_zero() {
            c.problem("bus.nats.publish_timeout", "must be greater than 0");
        }
        NatsSettings {
            url: self.url.clone(),
            client_name: self.client_name.clone(),
            credentials_file: self.credentials_file.clone(),
            user_password,
            token: self.token.clone(),
            stream: self.stream.clone(),
            memory_storage,
            replicas: self.replicas,
            duplicate_window,
            max_age,
            publish_timeout,
            connect_timeout: c.duration("bus.nats.connect_timeout", &self.connect_timeout),
            reconnect_max_delay: c
                .duration("bus.nats.reconnect_max_delay", &self.reconnect_max_delay),
        }
    }
}

/// Properties the engine sets itself: overriding them would break the bus contract (acks and
/// idempotence make "stored" mean stored; offsets are stored only after delivery) or duplicate
/// a dedicated key.
const KAFKA_FIXED_PROPERTIES: [(&str, &str); 7] = [
    ("bootstrap.servers", "use bus.kafka.brokers"),
    ("group.id", "use bus.kafka.group_id"),
    ("client.id", "use bus.kafka.client_id"),
    ("message.timeout.ms", "use bus.kafka.publish_timeout"),
    (
        "enable.auto.offset.store",
        "offsets are stored only after delivery",
    ),
    (
        "enable.auto.commit",
        "offsets are committed only after delivery",
    ),
    ("enable.partition.eof", "the engine sets it"),
];

impl KafkaConfig {
    fn validate(&self, c: &mut Checker) -> KafkaSettings {
        if self.brokers.trim().is_empty() {
            c.problem("bus.kafka.brokers", "must not be empty");
        }
        if self.group_id.trim().is_empty() {
            c.problem("bus.kafka.group_id", "must not be empty");
        }
        if self.partitions < 1 {
            c.problem("bus.kafka.partitions", "must be at least 1");
        }
        if self.replication_factor == 0 || self.replication_factor < -1 {
            c.problem(
                "bus.kafka.replication_factor",
                "must be at least 1, or -1 for the broker's default",
            );
        }
        let mut properties = Vec::new();
        for (key, value) in &self.properties {
            let name = key.replace('_', ".").to_ascii_lowercase();
            let at = format!("bus.kafka.properties.{key:?}");
            if let Some((_, why)) = KAFKA_FIXED_PROPERTIES.iter().find(|(k, _)| *k == name) {
                c.problem(at, format!("cannot be set here: {why}"));
                continue;
            }
            let v = value.expose().trim().to_ascii_lowercase();
            if (name == "acks" || name == "request.required.acks")
                && !matches!(v.as_str(), "all" | "-1")
            {
                c.problem(at, "must be \"all\": an event is acknowledged only once every in-sync replica has it");
                continue;
            }
            if name == "enable.idempotence" && v != "true" {
                c.problem(
                    at,
                    "must stay true: a retried produce must not store an event twice",
                );
                continue;
            }
            properties.push((name, value.clone()));
        }
        let mut keys = Vec::new();
        for (pattern, pointer) in &self.keys {
            let at = format!("bus.kafka.keys.{pattern:?}");
            if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
                c.problem(at, "the subject pattern must be dot-separated tokens");
            } else if !(pointer.is_empty() || pointer.starts_with('/')) {
                c.problem(at, "must be a JSON pointer such as \"/processInstanceId\"");
            } else {
                keys.push((pattern.clone(), pointer.clone()));
            }
        }
        // Stable: patterns of equal specificity stay in (sorted) key order.
        keys.sort_by_key(|(pattern, _): &(String, String)| {
            (pattern.contains('>'), pattern.contains('*'))
        });
        let publish_timeout = c.duration("bus.kafka.publish_timeout", &self.publish_timeout);
        if publish_timeout < Duration::from_millis(100) {
            c.problem("bus.kafka.publish_timeout", "must be at least 100ms");
        }
        KafkaSettings {
            brokers: self.brokers.trim().to_owned(),
            group_id: self.group_id.trim().to_owned(),
            client_id: self.client_id.clone(),
            properties,
            create_topics: self.create_topics,
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            publish_timeout,
            duplicate_window: c.duration("bus.kafka.duplicate_window", &self.duplicate_window),
            keys,
        }
    }
}

impl NotifyConfig {
    fn validate(&self, c: &mut Checker, engine: &EngineSettings) -> NotifySettings {
        let limiter = match (self.limiter.as_str(), engine) {
            ("local", _) | ("auto", EngineSettings::Memory(_)) => LimiterKind::Local,
            ("nats_kv", EngineSettings::Nats(_)) | ("auto", EngineSettings::Nats(_)) => {
                LimiterKind::NatsKv
            }
            ("nats_kv", _) => {
                c.problem("notify.limiter", "nats_kv needs bus.kind = \"nats\"");
                LimiterKind::Local
            }
            ("kafka_log", EngineSettings::Kafka(_)) | ("auto", EngineSettings::Kafka(_)) => {
                LimiterKind::KafkaLog
            }
            ("kafka_log", _) => {
                c.problem("notify.limiter", "kafka_log needs bus.kind = \"kafka\"");
                LimiterKind::Local
            }
            (other, _) => {
                c.problem(
                    "notify.limiter",
                    format!(
                        "unknown limiter {other:?}; expected \"auto\", \"local\", \"nats_kv\" or \"kafka_log\""
                    ),
                );
                LimiterKind::Local
            }
        };
        for (key, value) in [
            ("notify.stream", &self.stream),
            ("notify.dlq_stream", &self.dlq_stream),
            ("notify.consumer", &self.consumer),
            ("notify.limiter_bucket", &self.limiter_bucket),
        ] {
            if !crate::bus::is_valid_token(value) {
                c.problem(key, "must be a non-empty name of [A-Za-z0-9_-]");
            }
        }
        if self.max_attempts == 0 {
            c.problem("notify.max_attempts", "must be at least 1");
        }
        if self.queue_capacity == 0 {
            c.problem("notify.queue_capacity", "must be at least 1");
        }
        if self.max_ack_pending < 1 {
            c.problem("notify.max_ack_pending", "must be at least 1");
        }
        for (key, value) in [
            ("notify.request_timeout", &self.request_timeout),
            ("notify.wait_timeout", &self.wait_timeout),
            ("notify.max_wait", &self.max_wait),
        ] {
            if parse_duration(value).is_ok_and(|d| d.is_zero()) {
                c.problem(key, "must be greater than 0");
            }
        }
        let ack_wait = c.duration("notify.ack_wait", &self.ack_wait);
        if ack_wait < Duration::from_secs(1) {
            c.problem("notify.ack_wait", "must be at least 1s");
        }
        NotifySettings {
            enabled: self.enabled,
            stream: self.stream.clone(),
            dlq_stream: self.dlq_stream.clone(),
            consumer: self.consumer.clone(),
            ack_wait,
            max_ack_pending: self.max_ack_pending,
            max_attempts: self.max_attempts,
            retry_initial: c.duration("notify.retry_initial", &self.retry_initial),
            retry_max: c.duration("notify.retry_max", &self.retry_max),
            max_wait: c.duration("notify.max_wait", &self.max_wait),
            queue_capacity: self.queue_capacity,
            requeue_delay: c.duration("notify.requeue_delay", &self.requeue_delay),
            request_timeout: c.duration("notify.request_timeout", &self.request_timeout),
            wait_timeout: c.duration("notify.wait_timeout", &self.wait_timeout),
            rate_limit_margin: c.duration("notify.rate_limit_margin", &self.rate_limit_margin),
            limiter,
            limiter_bucket: self.limiter_bucket.clone(),
        }
    }
}

impl TargetConfig {
    fn validate(&self, name: &str, key: &str, c: &mut Checker) -> Option<Target> {
        let before = c.problems.len();
        let kind = Kind::parse(&self.kind);
        if kind.is_none() {
            let kinds: Vec<&str> = Kind::ALL.iter().map(Kind::as_str).collect();
            c.problem(
                format!("{key}.kind"),
                format!(
                    "unknown target kind {:?}; expected one of {}",
                    self.kind,
                    kinds.join(", ")
                ),
            );
        }
        let endpoint = match kind {
            Some(k) if k.is_app() => self.app_endpoint(k, key, c),
            Some(k) => self.robot_endpoint(k, key, c),
            None => None,
        };
        let limits = c.limits(&format!("{key}.rate_limit"), self.rate_limit.as_ref());
        let limits = limits.unwrap_or_else(|| kind.map(|k| k.default_limits()).unwrap_or_default());
        let member_key = format!("{key}.member_rate_limit");
        if self.member_rate_limit.is_some() && !kind.is_some_and(|k| k.is_app()) {
            c.problem(&member_key, "only app targets have per-member limits");
        }
        let member_limits = c
            .limits(&member_key, self.member_rate_limit.as_ref())
            .unwrap_or_else(|| kind.map(|k| k.default_member_limits()).unwrap_or_default());
        let pause = match &self.pause_on_rate_limit {
            Some(p) => c.duration(&format!("{key}.pause_on_rate_limit"), p),
            None => kind.map(|k| k.default_pause()).unwrap_or_default(),
        };
        if self.max_bytes.is_some_and(|m| m < 64) {
            c.problem(format!("{key}.max_bytes"), "must be at least 64");
        }
        let is_app = kind.is_some_and(|k| k.is_app());
        if kind.is_some() && !is_app && !self.composition.recipients.is_empty() {
            c.problem(
                format!("{key}.recipients"),
                "group bots post to their group; use mention to @ people",
            );
        }
        if is_app && !self.composition.mention.is_empty() {
            c.problem(
                format!("{key}.mention"),
                "app messages cannot @mention; use recipients to send to people",
            );
        }
        if !self.users.is_empty() && !kind.is_some_and(|k| k.is_app()) {
            c.problem(
                format!("{key}.users"),
                "only app targets have recipients (group bots post to their group)",
            );
        }
        if c.problems.len() > before {
            return None;
        }
        let defaults = RenderOptions::default();
        Some(Target {
            name: name.to_owned(),
            kind: kind?,
            endpoint: endpoint?,
            limits,
            member_limits,
            pause_on_rate_limit: pause,
            render: RenderOptions {
                max_bytes: self.max_bytes,
                too_long: self.too_long,
                link_text: self.link_text.clone().unwrap_or(defaults.link_text),
                lark_markdown: self.lark_markdown,
            },
            users: self.users.clone(),
            composition: self.composition.typed(),
        })
    }

    fn robot_endpoint(&self, kind: Kind, key: &str, c: &mut Checker) -> Option<Endpoint> {
        for (field, set) in [
            ("app_id", self.app_id.is_some()),
            ("app_secret", self.app_secret.is_some()),
            ("corp_id", self.corp_id.is_some()),
            ("agent_id", self.agent_id.is_some()),
            ("base_url", self.base_url.is_some()),
        ] {
            if set {
                c.problem(
                    format!("{key}.{field}"),
                    "only app targets (dingtalk_work, wecom_app, lark_app) take app credentials",
                );
            }
        }
        let Some(url) = &self.url else {
            c.problem(format!("{key}.url"), "group bots need their webhook URL");
            return None;
        };
        if !(url.expose().starts_with("http://") || url.expose().starts_with("https://")) {
            // The URL holds the robot's token: name the problem, never echo the value.
            c.problem(format!("{key}.url"), "must be an http(s) webhook URL");
        }
        if kind == Kind::WeComRobot && self.secret.is_some() {
            c.problem(
                format!("{key}.secret"),
                "WeCom robots are not signed (the key in the URL is the credential)",
            );
        }
        Some(Endpoint::Robot {
            url: url.clone(),
            secret: self.secret.clone(),
        })
    }

    fn app_endpoint(&self, kind: Kind, key: &str, c: &mut Checker) -> Option<Endpoint> {
        let before = c.problems.len();
        for (field, set) in [
            ("url", self.url.is_some()),
            ("secret", self.secret.is_some()),
        ] {
            if set {
                c.problem(
                    format!("{key}.{field}"),
                    "app targets take app_id/app_secret (and corp_id, agent_id), not a webhook",
                );
            }
        }
        let (id_field, id) = match kind {
            Kind::WeComApp => ("corp_id", &self.corp_id),
            _ => ("app_id", &self.app_id),
        };
        if kind == Kind::WeComApp && self.app_id.is_some() {
            c.problem(
                format!("{key}.app_id"),
                "WeCom apps are named by corp_id and agent_id",
            );
        }
        if id.as_deref().is_none_or(|v| v.trim().is_empty()) {
            c.problem(format!("{key}.{id_field}"), "must be set for this kind");
        }
        if self
            .app_secret
            .as_ref()
            .is_none_or(|s| s.expose().is_empty())
        {
            c.problem(format!("{key}.app_secret"), "must be set for this kind");
        }
        let agent_id = match (kind, &self.agent_id) {
            (Kind::LarkApp, None) => 0,
            (Kind::LarkApp, Some(_)) => {
                c.problem(format!("{key}.agent_id"), "Lark apps have no agent id");
                0
            }
            (_, None) => {
                c.problem(format!("{key}.agent_id"), "must be set for this kind");
                0
            }
            (_, Some(a)) => a.trim().parse().unwrap_or_else(|_| {
                c.problem(format!("{key}.agent_id"), format!("{a:?} is not a number"));
                0
            }),
        };
        let base_url = self
            .base_url
            .as_deref()
            .unwrap_or(kind.default_base_url())
            .trim_end_matches('/')
            .to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            c.problem(format!("{key}.base_url"), "must be an http(s) URL");
        }
        if c.problems.len() > before {
            return None;
        }
        Some(Endpoint::App(AppCredentials {
            base_url,
            app_id: id.clone().unwrap_or_default().trim().to_owned(),
            secret: self.app_secret.clone().unwrap_or_default(),
            agent_id,
        }))
    }
}

impl CompositionConfig {
    fn typed(&self) -> Composition {
        Composition {
            template: self.template.clone(),
            recipients: self.recipients.clone(),
            mention: self.mention.clone(),
            exclude_actor: self.exclude_actor,
        }
    }

    fn check(&self, key: &str, templates: &crate::notify::template::Templates, c: &mut Checker) {
        if let Some(t) = &self.template {
            if !templates.contains(t) {
                c.problem(
                    format!("{key}.template"),
                    format!("no [templates.{t}] is configured"),
                );
            }
        }
        for (field, names) in [("recipients", &self.recipients), ("mention", &self.mention)] {
            if names.iter().any(|n| n.trim().is_empty()) {
                c.problem(format!("{key}.{field}"), "field names must not be empty");
            }
        }
    }
}

impl RouteConfig {
    fn validate(
        &self,
        name: &str,
        key: &str,
        targets: &BTreeMap<String, TargetConfig>,
        templates: &crate::notify::template::Templates,
        c: &mut Checker,
    ) -> Route {
        let mut rules = Vec::new();
        let shorthand = !self.targets.is_empty() || !self.matches.is_empty();
        if shorthand {
            rules.push((
                key.to_owned(),
                RuleConfig {
                    targets: self.targets.clone(),
                    matches: self.matches.clone(),
                    composition: self.composition.clone(),
                },
            ));
        } else if self.composition.template.is_some()
            || !self.composition.recipients.is_empty()
            || !self.composition.mention.is_empty()
        {
            c.problem(
                key,
                "template, recipients and mention apply to the route's own targets; set targets \
                 or move them into the rules",
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            rules.push((format!("{key}.rules[{i}]"), r.clone()));
        }
        if rules.is_empty() {
            c.problem(format!("{key}.targets"), "a route needs targets or rules");
        }
        let rules = rules
            .into_iter()
            .map(|(key, r)| {
                if r.targets.is_empty() {
                    c.problem(format!("{key}.targets"), "must name at least one target");
                }
                for t in &r.targets {
                    if !targets.contains_key(t) {
                        c.problem(
                            format!("{key}.targets"),
                            format!("no [targets.{t}] is configured"),
                        );
                    }
                }
                let matches = r
                    .matches
                    .iter()
                    .map(|(field, values)| {
                        let values: Vec<String> =
                            values.items().iter().map(|v| v.trim().to_owned()).collect();
                        if values.is_empty() {
                            c.problem(
                                format!("{key}.match.{field}"),
                                "must list at least one value (leave the field out to match \
                                 everything)",
                            );
                        }
                        (field.clone(), values)
                    })
                    .collect();
                r.composition.check(&key, templates, c);
                Rule {
                    targets: r.targets,
                    matches,
                    composition: r.composition.typed(),
                }
            })
            .collect();
        Route {
            name: name.to_owned(),
            rules,
        }
    }
}

impl DingTalkAppConfig {
    fn validate(&self, key: &str, c: &mut Checker) -> Option<MsgCrypt> {
        let before = c.problems.len();
        if self.token.expose().is_empty() {
            c.problem(format!("{key}.token"), "must not be empty");
        }
        if self.receiver_id.is_empty() {
            c.problem(
                format!("{key}.receiver_id"),
                "must not be empty (corpId, appKey or suiteKey)",
            );
        }
        let crypt = MsgCrypt::new(
            self.token.expose(),
            self.aes_key.expose(),
            &self.receiver_id,
        );
        if let Err(msgcrypt::KeyError) = crypt {
            c.problem(
                format!("{key}.aes_key"),
                "must be exactly 43 characters of [A-Za-z0-9]",
            );
        }
        if c.problems.len() > before {
            return None;
        }
        crypt.ok()
    }
}

/// Loads the configuration for a command, turning a missing file into a problem too.
pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::single(
            "--config",
            format!("file {} does not exist", path.display()),
        ));
    }
    load(Some(path))
}
