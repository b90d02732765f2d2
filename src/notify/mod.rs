//! The outbound direction (DESIGN.md §3): consume `notify.<target>`, route, compose, render,
//! rate-limit, send, retry, dead-letter.
//!
//! - [`notifier`]: the pipeline as the daemon sees it: start, synchronous sends, join.
//! - [`consumer`]: the bus consumers: per target, per route, and the catch-all.
//! - [`generation`]: what a message is prepared and sent with, swapped whole by a reload.
//! - [`router`]: routes and their rules; the copies a route forwards.
//! - [`compose`]: from a body to what one target sends (template, recipients, bindings),
//!   through [`guard`]: recipients only through `to` and `mentions`, broadcasts only where
//!   allowed, at most `notify.max_recipients` people.
//! - [`worker`]: one worker per target, the retry loop.
//! - [`sender`]: the only HTTP to the platforms, with managed access tokens ([`token`]),
//!   through one client that follows no redirects and caps answers ([`http`]).
//! - [`dead_letter`]: ack, nak or dead letter; [`verdict`]: how a delivery ended.
//! - [`limiter`]: the sliding-window rate limits, kept locally, in NATS or in Kafka.
//! - [`preview`]: `imbridge render`; [`recent`]: each target's last result, for the status page.
//! - [`gateway`]: the platform API gateway's calls, through the same token cache, limiter
//!   and HTTP client rules as the sends.
//!
//! Nothing here knows one platform from another: every per-kind decision is a method of
//! [`crate::platform::Kind`].

pub mod compose;
pub mod consumer;
pub mod dead_letter;
pub mod dlq;
pub mod gateway;
pub mod generation;
pub mod guard;
pub mod http;
pub mod in_flight;
pub mod limiter;
pub mod notifier;
pub mod preview;
pub mod recent;
pub mod router;
pub mod sender;
pub mod settings;
pub mod target;
pub mod template;
pub mod token;
pub mod verdict;
pub mod worker;
