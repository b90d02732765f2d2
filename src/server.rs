//! Serving the HTTP listeners: warp filters on hyper 1 connections, with the limits a listener
//! facing the internet needs and warp's own server does not set.
//!
//! - HTTP/1 only: the platforms call back over HTTP/1.1, and one protocol is one parser to
//!   harden.
//! - A request's headers must arrive within `server.header_timeout`, counted from when the
//!   connection opens or its previous response was sent; so a slowloris client trickling a
//!   header and an idle keep-alive connection are both closed when it passes.
//! - At most [`HEADER_COUNT`] headers in at most [`HEADER_BYTES`] bytes (431 beyond).
//! - At most `server.max_connections` open connections per listener; one more is closed at once
//!   and counted, so slow clients cannot exhaust file descriptors or memory.
//! - On shutdown the listener stops accepting, idle connections close, requests in progress
//!   finish; whatever outlives the caller's grace period is dropped with this future.
//!
//! The body's own deadline is the filters' part (`ingress::body`), where it becomes a 408
//! counted under the platform and app.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Most headers a request may carry: the platforms send about fifteen, an ingress proxy adds
/// a few more.
pub const HEADER_COUNT: usize = 64;

/// Most bytes of request line and headers together (hyper's read buffer, whose floor is 8 KiB).
pub const HEADER_BYTES: usize = 16 * 1024;

/// Connections the kernel queues before they are accepted.
const BACKLOG: u32 = 4096;

/// How often the refusals of the last period are summed up in one info line.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What a listener serves: a warp filter that answers every request (rejections already
/// recovered), boxed so one serving loop runs every listener.
pub type Routes = BoxedFilter<(Response,)>;

/// Connection limits shared by every listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// Whether a listener's requests run to their end when the client hangs up meanwhile (hyper
/// then does not watch the socket while a request is handled). Only the public listener's:
/// - there a request is a platform's callback, bounded by the publish timeout, and a callback
///   whose client went away is better stored than cancelled (the retry is deduplicated);
/// - watching costs a `recv` per callback, and an 8 KiB read buffer for each callback waiting
///   on its publish: hyper reads to notice the hang-up, and its first buffer is still shared
///   with the request's headers (bench/ANALYSIS.md, "Memory").
///
/// On the internal listener a hang-up must end what the client asked for: a `GET /events`
/// stream holding a bus tail, a `?wait=true` notification, a gateway call.
fn requests_outlive_hang_ups(listener: &str) -> bool {
    listener == "public"
}

/// A bound listener and the name its metrics and logs use (`public`, `internal`, `admin`).
pub struct Listener {
    name: &'static str,
    tcp: TcpListener,
}

impl Listener {
    /// Binds `addr` (port 0 picks a free port; [`Listener::addr`] tells which).
    pub fn bind(name: &'static str, key: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let bind = || {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // A restarted daemon binds at once even while its old connections linger.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            // Room for a burst of connections (a platform's retries after an outage, a
            // flood) beyond tokio's default of 1024; the kernel caps it at somaxconn.
            socket.listen(BACKLOG)
        };
        let tcp = bind().with_context(|| format!("binding {key} {addr}"))?;
        Ok(Listener { name, tcp })
    }

    pub fn addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until `stop`, then closes idle connections and lets requests in progress finish.
    /// Dropping the returned future drops every connection still open.
    pub async fn serve(
        self,
        routes: Routes,
        limits: Limits,
        metrics: Metrics,
        refusals: Refusals,
        stop: Shutdown,
    ) {
        let name = self.name;
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_headers(HEADER_COUNT)
            .max_buf_size(HEADER_BYTES)
            .half_close(requests_outlive_hang_ups(name));
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        let open = metrics.connections_open.with_label_values(&[name]);
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                // Finished connections are reaped as they end, so the set holds open ones only.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors or a connection reset before accept: nothing
                        // to answer; a short pause keeps a persistent error from spinning.
                        tracing::debug!(listener = name, error = %e, "accept failed");
                        refusals.record(name, "accept_failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.connection_refused(name);
                refusals.record(name, "max_connections");
                drop(stream);
                continue;
            };
            // Replies are small and written whole: sending them at once saves a delay.
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(warp::service(routes.clone()));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            let open = open.clone();
            let metrics = metrics.clone();
            let refusals = refusals.clone();
            open.inc();
            connections.spawn(async move {
                if let Err(e) = conn.await {
                    closed_with_error(name, &e, &metrics, &refusals);
                }
                open.dec();
                drop(slot);
            });
        }
        // Not accepting from here on; the kernel refuses new connections once this is closed.
        drop(self.tcp);
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    }
}

/// A connection that ended in an error: a client that timed out or broke the protocol is
/// counted (and summed up in the log); the error itself is only worth a debug line.
fn closed_with_error(name: &'static str, e: &hyper::Error, metrics: &Metrics, r: &Refusals) {
    let reason = if e.is_timeout() {
        "header_timeout"
    } else if e.is_parse_too_large() {
        "headers_too_large"
    } else if e.is_parse() {
        "malformed_request"
    } else {
        "connection_error"
    };
    tracing::debug!(listener = name, reason, error = %e, "connection closed");
    metrics.connection_closed(name, reason);
    r.record(name, reason);
}

/// Refused requests and connections, counted by listener and code so that a flood of bad
/// input costs one info line per [`SUMMARY_EVERY`], never one per request. Both keys are
/// static strings from this crate, so the map stays small whatever arrives.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>);

impl Refusals {
    pub fn record(&self, listener: &'static str, code: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((listener, code)).or_default() += 1;
    }

    /// Takes the counts so far, one line per listener: `("public", "invalid_signature=3 …")`.
    pub fn take(&self) -> Vec<(&'static str, u64, String)> {
        let counts = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lines: Vec<(&'static str, u64, String)> = Vec::new();
        for ((listener, code), n) in counts {
            match lines.last_mut() {
                Some((l, total, text)) if *l == listener => {
                    *total += n;
                    text.push_str(&format!(" {code}={n}"));
                }
                _ => lines.push((listener, n, format!("{code}={n}"))),
            }
        }
        lines
    }

    /// Logs what was refused since the last call, at info, one line per listener.
    pub fn summarize(&self, period: &str) {
        for (listener, total, codes) in self.take() {
            tracing::info!(listener, refused = total, codes = %codes, "refused {period}");
        }
    }

    /// Sums up every [`SUMMARY_EVERY`] until `stop`; what is refused after that is summed up
    /// by whoever shuts down, once the listeners are drained.
    pub async fn report(self, stop: Shutdown) {
        let mut every = tokio::time::interval(SUMMARY_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => self.summarize("in the last minute"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_summed_per_listener_and_taken_once() {
        let r = Refusals::default();
        for _ in 0..3 {
            r.record("public", "invalid_signature");
        }
        r.record("public", "header_timeout");
        r.record("internal", "token_invalid");
        let lines = r.take();
        assert_eq!(
            lines,
            vec![
                ("internal", 1, "token_invalid=1".to_string()),
                (
                    "public",
                    4,
                    "header_timeout=1 invalid_signature=3".to_string()
                ),
            ]
        );
        assert!(r.take().is_empty());
    }
}
