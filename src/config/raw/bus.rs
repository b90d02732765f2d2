//! `[bus]` and its engines' tables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::secret::{lenient_string, Secret};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
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
#[serde(default)]
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
#[serde(default)]
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
#[serde(default)]
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
