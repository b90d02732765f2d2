//! The admin listener: `/` (the status page, [`super::status`]), `/metrics`, `/healthz` (the
//! process is up) and `/readyz` (the bus is
//! connected with its streams in place, no supervised task keeps failing, no stream-mode app
//! is refused by its platform or (if so configured) down past its grace, and no shutdown has
//! begun).

use std::convert::Infallible;
use std::sync::Arc;

use serde_json::json;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use super::probe::Probe;
use super::stream::Streams;
use super::State;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

pub fn routes(
    state: Arc<State>,
    supervisor: Supervisor,
    streams: Streams,
    shutdown: Shutdown,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let probe = Probe {
        bus: state.bus.clone(),
        supervisor,
        streams,
        shutdown,
    };
    let registry = state.metrics.clone();
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            registry.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
    });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})));
    let ready = probe.clone();
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let readiness = ready.check();
        let status = match readiness.reason {
            None => StatusCode::OK,
            Some(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = json!({
            "status": if status == StatusCode::OK { "ready" } else { "not_ready" },
            "bus": ready.bus.engine(),
            "reason": readiness.reason,
            "failing": readiness.failing,
            "streams": readiness.streams,
        });
        warp::reply::with_status(warp::reply::json(&body), status)
    });
    let page = warp::path::end()
        .and(warp::get())
        .map(move || super::status::page(&state, &probe));
    metrics
        .or(healthz)
        .or(readyz)
        .or(page)
        .recover(super::reply::recover)
}
