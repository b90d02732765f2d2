//! The integration tests, in one binary so the crate is linked once: a module per area, the
//! shared harness (real `nats-server` and tansu brokers, fake platforms, the daemon on port 0)
//! in [`common`]. `./test` at the repository root installs what they need and runs them.

mod common;

mod api_gateway;
mod app_messages;
mod apps_selftest;
mod bounded_state;
mod bus_engines;
mod cli;
mod config;
mod dingtalk_callback_cli;
mod dingtalk_ingress;
mod dingtalk_nats;
mod dingtalk_recover;
mod dingtalk_stream;
mod dlq_cli;
mod edge;
mod event_routes;
mod fakes_selftest;
mod helm_chart;
mod kafka_harness;
mod lark_stream;
mod layout;
mod nats_cluster;
mod notify;
mod notify_clients;
mod observability;
mod outbound_safety;
mod proxy;
mod recipients_guard;
mod reload;
mod replay;
mod secrets;
mod send_events;
mod status_page;
// Needs the fault-injection points: `./test` builds with `--features failpoints`.
#[cfg(feature = "failpoints")]
mod supervision;
mod webhook;
mod wecom_lark;
