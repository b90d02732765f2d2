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
use serde::{Deserialize, Deserializer, Serialize};

use crate::platform::msgcrypt::{self, MsgCrypt};

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
    /// "memory" (in-process, the default) or "nats" (JetStream).
    #[serde(deserialize_with = "lenient_string")]
    pub kind: String,
    /// Prepended with a dot to every subject, e.g. "prod" gives "prod.dingtalk.user_add_org".
    #[serde(deserialize_with = "lenient_string")]
    pub subject_prefix: String,
    pub memory: MemoryConfig,
    pub nats: NatsConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: "memory".into(),
            subject_prefix: String::new(),
            memory: MemoryConfig::default(),
            nats: NatsConfig::default(),
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppsConfig {
    /// DingTalk apps by name: `POST /callbacks/dingtalk/<name>`.
    pub dingtalk: BTreeMap<String, DingTalkAppConfig>,
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

/// A configured secret. It prints as `***` so it cannot leak through `Debug` into logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Secret)
    }
}

/// Environment values are parsed as TOML-like values, so a numeric token such as `123456`
/// arrives as an integer; secrets and ids are strings whatever they look like.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Visitor)
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

#[derive(Debug, Clone)]
pub struct BusSettings {
    pub subject_prefix: String,
    pub engine: EngineSettings,
}

#[derive(Debug, Clone)]
pub enum EngineSettings {
    Memory(MemorySettings),
    Nats(Box<NatsSettings>),
}

#[derive(Debug, Clone)]
pub struct MemorySettings {
    pub capacity: usize,
    pub duplicate_window: Duration,
}

#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub client_name: String,
    pub credentials_file: Option<String>,
    pub user_password: Option<(String, Secret)>,
    pub token: Option<Secret>,
    pub stream: String,
    pub memory_storage: bool,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
    pub publish_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect_max_delay: Duration,
}

/// A DingTalk app ready to verify and decrypt callbacks.
#[derive(Debug, Clone)]
pub struct DingTalkApp {
    pub crypt: MsgCrypt,
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
        parse_duration(value).unwrap_or_else(|e| {
            self.problem(key, format!("invalid duration {value:?}: {e}"));
            Duration::ZERO
        })
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
            other => {
                c.problem(
                    "bus.kind",
                    format!("unknown bus kind {other:?}; expected \"memory\" or \"nats\""),
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
