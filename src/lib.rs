//! imbridge bridges the chat platforms Chinese companies work in (DingTalk, WeCom, Lark/Feishu)
//! with the message bus their internal systems use (NATS JetStream, Kafka).
//!
//! Inbound, one HTTP ingress receives every platform's encrypted event callbacks, verifies and
//! decrypts them, answers the platform's handshake, and publishes each event to a subject such
//! as `dingtalk.bpms_instance_change`, answering the platform only once the bus has it.
//!
//! # Layout
//!
//! - [`config`]: figment load (defaults → TOML → `IMBRIDGE_` env) and validation into
//!   [`config::Settings`], every problem reported at once.
//! - [`app`]: builds the daemon from settings (binds listeners, starts the bus) and runs it
//!   until shutdown.
//! - [`bus`]: the bus contract and one engine per file: [`bus::memory`], [`bus::nats`],
//!   [`bus::kafka`].
//! - [`platform`]: pure protocol code, one module per platform; the AES scheme DingTalk and
//!   WeCom share is [`platform::msgcrypt`].
//! - [`ingress`]: warp routes and handlers for callbacks, the admin listener, error replies.
//! - [`metrics`], [`shutdown`], [`telemetry`]: Prometheus metrics, the shutdown signal, logs.

pub mod app;
pub mod bus;
pub mod config;
pub mod ingress;
pub mod metrics;
pub mod notify;
pub mod platform;
pub mod shutdown;
pub mod telemetry;
