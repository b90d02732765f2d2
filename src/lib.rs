//! imbridge bridges the chat platforms Chinese companies work in (DingTalk, WeCom, Lark/Feishu)
//! with the message bus their internal systems use (NATS JetStream, Kafka).
//!
//! Inbound, one HTTP ingress receives every platform's encrypted event callbacks, verifies and
//! decrypts them, answers the platform's handshake, and publishes each event to a subject such
//! as `dingtalk.bpms_instance_change`, answering the platform only once the bus has it. Apps
//! in stream mode (DingTalk Stream) need no public URL: imbridge dials out to the platform and
//! the same events arrive over a WebSocket, with the same subjects and guarantees.
//!
//! # Layout
//!
//! Dependencies point down this list; no module imports one above it, and no two files import
//! each other (a test in `tests/it/layout.rs` keeps it so).
//!
//! - [`app`]: builds the daemon from settings (binds listeners, starts the bus, the limiter
//!   and the notify pipeline) and runs it until shutdown.
//! - [`config`]: figment load (defaults → TOML → `IMBRIDGE_` env) and validation into
//!   [`config::Settings`], every problem reported at once. It builds each domain's own
//!   settings types; no domain imports `config`.
//! - [`ingress`]: warp routes and handlers for callbacks, `POST /notify` and the platform API
//!   gateway's `/api` ([`ingress::api`], and on NATS [`ingress::api_nats`]), the admin
//!   listener, error replies; the long connections of stream-mode apps ([`ingress::stream`]).
//! - [`server`]: serves those routes on hyper 1 connections with the limits a public listener
//!   needs (header timeout, connection cap, HTTP/1 only) and sums up refusals in the log.
//! - [`notify`]: the outbound pipeline in named parts: consumer, router, compose, worker,
//!   sender (the HTTP to platforms and webhooks), the API gateway's calls ([`notify::gateway`],
//!   sharing the sender's token cache and the limiter), dead letters, limiter, preview.
//! - [`bus`]: the bus contract and one engine per file ([`bus::memory`], [`bus::nats`],
//!   [`bus::kafka`]); it keeps in place what the app describes in a neutral [`bus::Layout`]
//!   and knows nothing of notify.
//! - [`platform`]: pure protocol code, one folder per platform (callback, stream, robot, app),
//!   the API gateway's rules ([`platform::api`]: token placement, refusals, path normalising), and
//!   [`platform::Kind`], the one enum whose methods hold every per-kind decision; the AES
//!   scheme DingTalk and WeCom share is [`platform::msgcrypt`]; generic HTTP receivers (the
//!   `webhook` kind: CloudEvents, signed) are [`platform::webhook`].
//! - [`message`]: the notification model shared by `platform` and `notify`, user bindings and
//!   HTML-to-text.
//! - [`dlq`]: `imbridge dlq list|show|replay|purge`, per engine (NATS stream, Kafka topic
//!   and its compacted `dlq.handled` markers, the in-process ring over the internal listener).
//! - [`send`]: `imbridge send`, a test notification through the daemon's `POST /notify` or,
//!   with `--direct`, through a notify pipeline of its own.
//! - [`remote`]: the daemon's internal listener as one-off commands (`dlq`, `send`) reach it.
//! - [`egress`]: whether outbound platform calls go through a proxy (`[http] proxy`, per
//!   target and per app); the one client builder, `notify::http::client`, applies it.
//! - [`secret`], [`backoff`], [`metrics`], [`shutdown`], [`telemetry`]: masked secrets, retry
//!   delays, Prometheus metrics (one method per event), the shutdown signal, logs.
//!
//! Adding a target kind: a file under `platform/<platform>/` and one arm in each method of
//! [`platform::Kind`]. Adding a platform: a folder under `platform/`, a [`platform::Platform`]
//! variant, and its callback handler in `ingress/`. Adding a bus engine: one file under `bus/`
//! and one arm per method of [`bus::Bus`] (and in [`bus::tail`], the live tail of `GET /events`).

pub mod app;
pub mod backoff;
pub mod bus;
pub mod config;
pub mod dlq;
pub mod egress;
pub mod ingress;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod platform;
pub mod reload;
pub mod remote;
pub mod secret;
pub mod send;
pub mod server;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
