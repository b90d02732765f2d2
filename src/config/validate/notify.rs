//! `[notify]`: the pipeline's streams, retries, timeouts and limiter.

use std::time::Duration;

use super::checker::Checker;
use crate::bus::EngineSettings;
use crate::config::parse::parse_duration;
use crate::config::raw::NotifyConfig;
use crate::notify::settings::{LimiterStore, NotifySettings};

pub(super) fn notify(
    raw: &NotifyConfig,
    engine: &EngineSettings,
    c: &mut Checker,
) -> NotifySettings {
    let limiter = limiter(&raw.limiter, engine, c);
    for (key, value) in [
        ("notify.stream", &raw.stream),
        ("notify.dlq_stream", &raw.dlq_stream),
        ("notify.consumer", &raw.consumer),
        ("notify.limiter_bucket", &raw.limiter_bucket),
    ] {
        if !crate::bus::is_valid_token(value) {
            c.problem(key, "must be a non-empty name of [A-Za-z0-9_-]");
        }
    }
    if raw.max_attempts == 0 {
        c.problem("notify.max_attempts", "must be at least 1");
    }
    if raw.queue_capacity == 0 {
        c.problem("notify.queue_capacity", "must be at least 1");
    }
    if raw.max_recipients == 0 {
        c.problem("notify.max_recipients", "must be at least 1");
    }
    if raw.max_ack_pending < 1 {
        c.problem("notify.max_ack_pending", "must be at least 1");
    }
    for (key, value) in [
        ("notify.request_timeout", &raw.request_timeout),
        ("notify.wait_timeout", &raw.wait_timeout),
        ("notify.max_wait", &raw.max_wait),
    ] {
        if parse_duration(value).is_ok_and(|d| d.is_zero()) {
            c.problem(key, "must be greater than 0");
        }
    }
    let ack_wait = c.duration("notify.ack_wait", &raw.ack_wait);
    if ack_wait < Duration::from_secs(1) {
        c.problem("notify.ack_wait", "must be at least 1s");
    }
    NotifySettings {
        enabled: raw.enabled,
        stream: raw.stream.clone(),
        inbound_stream: match engine {
            EngineSettings::Nats(n) => n.stream.clone(),
            _ => String::new(),
        },
        dlq_stream: raw.dlq_stream.clone(),
        consumer: raw.consumer.clone(),
        ack_wait,
        max_ack_pending: raw.max_ack_pending,
        max_attempts: raw.max_attempts,
        retry_initial: c.duration("notify.retry_initial", &raw.retry_initial),
        retry_max: c.duration("notify.retry_max", &raw.retry_max),
        max_wait: c.duration("notify.max_wait", &raw.max_wait),
        queue_capacity: raw.queue_capacity,
        requeue_delay: c.duration("notify.requeue_delay", &raw.requeue_delay),
        request_timeout: c.duration("notify.request_timeout", &raw.request_timeout),
        wait_timeout: c.duration("notify.wait_timeout", &raw.wait_timeout),
        rate_limit_margin: c.duration("notify.rate_limit_margin", &raw.rate_limit_margin),
        limiter,
        limiter_bucket: raw.limiter_bucket.clone(),
    }
}

/// `[notify] timezone`: the templates' default zone, if set and known.
pub(super) fn timezone(raw: &NotifyConfig, c: &mut Checker) -> Option<jiff::tz::TimeZone> {
    let name = raw.timezone.as_deref()?.trim();
    crate::notify::template::time_zone(name)
        .map_err(|message| c.problem("notify.timezone", message))
        .ok()
}

/// The limiter `[notify] limiter` names; "auto" follows the bus.
fn limiter(raw: &str, engine: &EngineSettings, c: &mut Checker) -> LimiterStore {
    match (raw, engine) {
        ("local", _) | ("auto", EngineSettings::Memory(_)) => LimiterStore::Local,
        ("nats_kv", EngineSettings::Nats(_)) | ("auto", EngineSettings::Nats(_)) => {
            LimiterStore::NatsKv
        }
        ("nats_kv", _) => {
            c.problem("notify.limiter", "nats_kv needs bus.kind = \"nats\"");
            LimiterStore::Local
        }
        ("kafka_log", EngineSettings::Kafka(_)) | ("auto", EngineSettings::Kafka(_)) => {
            LimiterStore::KafkaLog
        }
        ("kafka_log", _) => {
            c.problem("notify.limiter", "kafka_log needs bus.kind = \"kafka\"");
            LimiterStore::Local
        }
        _ => {
            c.problem(
                "notify.limiter",
                "unknown limiter; expected \"auto\", \"local\", \"nats_kv\" or \"kafka_log\"",
            );
            LimiterStore::Local
        }
    }
}
