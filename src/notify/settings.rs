//! `[notify]` as the pipeline uses it, validated by `config`.

use std::time::Duration;

/// `[notify]`, validated.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    pub enabled: bool,
    pub stream: String,
    /// The stream of inbound events (NATS), which routes with `from` read.
    pub inbound_stream: String,
    pub dlq_stream: String,
    pub consumer: String,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub requeue_delay: Duration,
    pub request_timeout: Duration,
    pub wait_timeout: Duration,
    pub rate_limit_margin: Duration,
    pub limiter: LimiterStore,
    pub limiter_bucket: String,
}

/// Where the rate limits' sliding-window logs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterStore {
    Local,
    NatsKv,
    KafkaLog,
}
