//! The admin listener: `/metrics`, `/healthz` (the process is up) and `/readyz` (the bus is
//! connected with its streams in place, no supervised task keeps failing, no stream-mode app
//! is refused by its platform or (if so configured) down past its grace, and no shutdown has
//! begun).

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::stream::Streams;
use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

pub fn routes(
    bus: Arc<Bus>,
    metrics: Metrics,
    supervisor: Supervisor,
    streams: Streams,
    shutdown: Shutdown,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
    });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})));
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let failing = supervisor.failing();
        let streams = streams.report();
        let (status, reason) = if shutdown.is_triggered() {
            (StatusCode::SERVICE_UNAVAILABLE, Some("shutting down"))
        } else if !bus.is_ready() {
            (StatusCode::SERVICE_UNAVAILABLE, Some("bus not ready"))
        } else if !failing.is_empty() {
            (StatusCode::SERVICE_UNAVAILABLE, Some("tasks keep failing"))
        } else if !streams.refused.is_empty() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("platform refuses app credentials"),
            )
        } else if streams.fails_readiness {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("long connections down"),
            )
        } else {
            (StatusCode::OK, None)
        };
        let body = json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "bus": bus.engine(),
            "reason": reason,
            "failing": failing,
            "streams": streams,
        });
        warp::reply::with_status(warp::reply::json(&body), status)
    });
    metrics
        .or(healthz)
        .or(readyz)
        .recover(super::reply::recover)
}
