//! `[bus]`: the subject prefix and the engine, with `[bus.memory]`, `[bus.nats]` or
//! `[bus.kafka]`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::checker::Checker;
use crate::bus::kafka::KafkaSettings;
use crate::bus::memory::MemorySettings;
use crate::bus::nats::NatsSettings;
use crate::bus::{BusSettings, EngineSettings};
use crate::config::raw::{BusConfig, KafkaConfig, NatsConfig};
use crate::secret::Secret;

pub(super) fn bus(raw: &BusConfig, c: &mut Checker) -> BusSettings {
    let prefix = raw.subject_prefix.trim_matches('.');
    if !prefix.is_empty() && !prefix.split('.').all(crate::bus::is_valid_token) {
        c.problem(
            "bus.subject_prefix",
            "must be dot-separated tokens of [A-Za-z0-9_-]",
        );
    }
    let engine = match raw.kind.as_str() {
        "memory" => EngineSettings::Memory(MemorySettings {
            capacity: raw.memory.capacity.max(1),
            duplicate_window: c
                .duration("bus.memory.duplicate_window", &raw.memory.duplicate_window),
        }),
        "nats" => EngineSettings::Nats(Box::new(nats(&raw.nats, c))),
        "kafka" => EngineSettings::Kafka(Box::new(kafka(&raw.kafka, c))),
        _ => {
            c.problem(
                "bus.kind",
                "unknown bus kind; expected \"memory\", \"nats\" or \"kafka\"",
            );
            EngineSettings::Memory(MemorySettings {
                capacity: 1,
                duplicate_window: Duration::ZERO,
            })
        }
    };
    BusSettings {
        subject_prefix: prefix.to_owned(),
        engine,
    }
}

fn nats(raw: &NatsConfig, c: &mut Checker) -> NatsSettings {
    if raw.url.trim().is_empty() {
        c.problem("bus.nats.url", "must not be empty");
    } else if let Err(e) = crate::bus::nats::server_addrs(&raw.url) {
        c.problem("bus.nats.url", e);
    }
    if !crate::bus::is_valid_token(&raw.stream) {
        c.problem(
            "bus.nats.stream",
            "must be a non-empty name of [A-Za-z0-9_-]",
        );
    }
    let memory_storage = match raw.storage.as_str() {
        "file" => false,
        "memory" => true,
        _ => {
            c.problem(
                "bus.nats.storage",
                "unknown storage; expected \"file\" or \"memory\"",
            );
            false
        }
    };
    if raw.replicas == 0 || raw.replicas > 5 {
        c.problem("bus.nats.replicas", "must be between 1 and 5");
    }
    let user_password = match (&raw.user, &raw.password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => {
            c.problem("bus.nats.user", "user and password must be set together");
            None
        }
    };
    let duplicate_window = c.duration("bus.nats.duplicate_window", &raw.duplicate_window);
    let max_age = c.duration("bus.nats.max_age", &raw.max_age);
    if !max_age.is_zero() && duplicate_window > max_age {
        c.problem(
            "bus.nats.duplicate_window",
            "must not be longer than bus.nats.max_age",
        );
    }
    let publish_timeout = c.duration("bus.nats.publish_timeout", &raw.publish_timeout);
    if publish_timeout.is_zero() {
        c.problem("bus.nats.publish_timeout", "must be greater than 0");
    }
    NatsSettings {
        url: raw.url.clone(),
        client_name: raw.client_name.clone(),
        credentials_file: raw.credentials_file.clone(),
        user_password,
        token: raw.token.clone(),
        stream: raw.stream.clone(),
        memory_storage,
        replicas: raw.replicas,
        duplicate_window,
        max_age,
        publish_timeout,
        connect_timeout: c.duration("bus.nats.connect_timeout", &raw.connect_timeout),
        reconnect_max_delay: c.duration("bus.nats.reconnect_max_delay", &raw.reconnect_max_delay),
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

fn kafka(raw: &KafkaConfig, c: &mut Checker) -> KafkaSettings {
    if raw.brokers.trim().is_empty() {
        c.problem("bus.kafka.brokers", "must not be empty");
    }
    if raw.group_id.trim().is_empty() {
        c.problem("bus.kafka.group_id", "must not be empty");
    }
    if raw.partitions < 1 {
        c.problem("bus.kafka.partitions", "must be at least 1");
    }
    if raw.replication_factor == 0 || raw.replication_factor < -1 {
        c.problem(
            "bus.kafka.replication_factor",
            "must be at least 1, or -1 for the broker's default",
        );
    }
    let properties = kafka_properties(&raw.properties, c);
    let keys = kafka_keys(&raw.keys, c);
    let publish_timeout = c.duration("bus.kafka.publish_timeout", &raw.publish_timeout);
    if publish_timeout < Duration::from_millis(100) {
        c.problem("bus.kafka.publish_timeout", "must be at least 100ms");
    }
    KafkaSettings {
        brokers: raw.brokers.trim().to_owned(),
        group_id: raw.group_id.trim().to_owned(),
        client_id: raw.client_id.clone(),
        properties,
        create_topics: raw.create_topics,
        partitions: raw.partitions,
        replication_factor: raw.replication_factor,
        publish_timeout,
        duplicate_window: c.duration("bus.kafka.duplicate_window", &raw.duplicate_window),
        keys,
    }
}

/// The librdkafka properties, with `_` read as `.`; those the engine decides are refused.
fn kafka_properties(
    properties: &BTreeMap<String, Secret>,
    c: &mut Checker,
) -> Vec<(String, Secret)> {
    let mut out = Vec::new();
    for (key, value) in properties {
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
            c.problem(
                at,
                "must be \"all\": an event is acknowledged only once every in-sync replica has it",
            );
            continue;
        }
        if name == "enable.idempotence" && v != "true" {
            c.problem(
                at,
                "must stay true: a retried produce must not store an event twice",
            );
            continue;
        }
        out.push((name, value.clone()));
    }
    out
}

/// Record-key patterns, the most specific first.
fn kafka_keys(keys: &BTreeMap<String, String>, c: &mut Checker) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (pattern, pointer) in keys {
        let at = format!("bus.kafka.keys.{pattern:?}");
        if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
            c.problem(at, "the subject pattern must be dot-separated tokens");
        } else if !(pointer.is_empty() || pointer.starts_with('/')) {
            c.problem(at, "must be a JSON pointer such as \"/processInstanceId\"");
        } else {
            out.push((pattern.clone(), pointer.clone()));
        }
    }
    // Stable: patterns of equal specificity stay in (sorted) key order.
    out.sort_by_key(|(pattern, _): &(String, String)| {
        (pattern.contains('>'), pattern.contains('*'))
    });
    out
}
