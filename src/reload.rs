//! Reloading the configuration without a restart: on SIGHUP, and with `serve --watch` when the
//! file's content changes (polled, so that a Kubernetes ConfigMap, which is swapped through
//! a symlink rather than written, is seen too).
//!
//! The new file is loaded and validated whole first; if anything is wrong, nothing changes,
//! the problems are logged and `imbridge_config_reload_failures_total` counts it. Otherwise
//! targets, routes, templates, user bindings, clients, the HTTP-callback apps' credentials and
//! business subjects, and the API gateway's apps are replaced together: the notify pipeline
//! first (its new consumers placed on the bus before it hands them messages), then the
//! listeners' view, then the long connections of the apps that changed. A message already
//! prepared, and a request already being handled, finish under the configuration they
//! started with.
//!
//! What is bound at start (listeners, the bus, the notify pipeline's own settings, the
//! failed-push pollers' schedule) needs a restart: a reload that changes it says so, key by
//! key, and applies the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Settings};
use crate::ingress::stream::apps::StreamApps;
use crate::ingress::{Current, State};
use crate::metrics::Metrics;
use crate::notify::notifier::Notifier;
use crate::shutdown::Shutdown;

/// How often `--watch` reads the file.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Applies new configurations to a running daemon, one at a time.
pub struct Reloader {
    path: Option<PathBuf>,
    state: Arc<State>,
    notifier: Arc<Notifier>,
    stream_apps: Arc<StreamApps>,
    metrics: Metrics,
    /// The configuration in force: what a reload compares with, and keeps on failure.
    running: tokio::sync::Mutex<Settings>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new configuration is invalid:\n{0}")]
    Invalid(#[from] config::ConfigError),
    #[error("{0}")]
    Pipeline(#[from] crate::notify::notifier::ReloadError),
    #[error("building the API gateway: {0}")]
    Gateway(#[from] reqwest::Error),
}

/// What a reload did, for the log and the tests.
#[derive(Debug, Default)]
pub struct Applied {
    /// Bus consumers started and stopped (by durable name).
    pub consumers_added: Vec<String>,
    pub consumers_removed: Vec<String>,
    /// Long connections started (new or changed apps) and stopped (changed or removed), as
    /// `<platform>/<app>`.
    pub connections_started: Vec<String>,
    pub connections_stopped: Vec<String>,
    /// Keys that changed but take effect only after a restart.
    pub need_restart: Vec<&'static str>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        settings: Settings,
        state: Arc<State>,
        notifier: Arc<Notifier>,
        stream_apps: Arc<StreamApps>,
        metrics: Metrics,
    ) -> Self {
        Reloader {
            path,
            state,
            notifier,
            stream_apps,
            metrics,
            running: tokio::sync::Mutex::new(settings),
        }
    }

    /// Loads, validates and applies the file; on any error the running configuration stays
    /// and the failure is counted.
    pub async fn reload(&self) -> Result<Applied, ReloadError> {
        let mut running = self.running.lock().await;
        let result = self.apply(&running, self.load()).await;
        match &result {
            Ok((applied, _)) => {
                self.metrics.config_reloads_total.inc();
                tracing::info!(
                    consumers_added = ?applied.consumers_added,
                    consumers_removed = ?applied.consumers_removed,
                    connections_started = ?applied.connections_started,
                    connections_stopped = ?applied.connections_stopped,
                    "configuration reloaded"
                );
                for key in &applied.need_restart {
                    tracing::warn!(key, "changed, but takes effect only after a restart");
                }
            }
            Err(e) => {
                self.metrics.config_reload_failures_total.inc();
                tracing::error!(error = %e, "configuration reload refused; the previous configuration stays in force");
            }
        }
        let (applied, next) = result?;
        *running = next;
        Ok(applied)
    }

    fn load(&self) -> Result<Settings, config::ConfigError> {
        match &self.path {
            Some(path) => config::load_file(path),
            None => config::load(None),
        }
    }

    async fn apply(
        &self,
        running: &Settings,
        next: Result<Settings, config::ConfigError>,
    ) -> Result<(Applied, Settings), ReloadError> {
        let next = next?;
        for w in &next.warnings {
            tracing::warn!(key = %w.key, "{}", w.message);
        }
        let mut applied = Applied {
            need_restart: need_restart(running, &next),
            ..Applied::default()
        };
        // Built before anything changes: if it fails, nothing has.
        let gateway = self
            .notifier
            .gateway(next.api_apps.clone(), running.api.clone())?;
        let changes = self.notifier.reload(next.catalog()).await?;
        applied.consumers_added = changes.added;
        applied.consumers_removed = changes.removed;
        self.state.current.send_replace(Arc::new(Current {
            dingtalk: next.dingtalk_apps.clone(),
            wecom: next.wecom_apps.clone(),
            lark: next.lark_apps.clone(),
            subjects: next.subjects.clone(),
            clients: next.clients.clone(),
            gateway: Arc::new(gateway),
        }));
        // Last: a connection that cannot be started keeps its old one and is only logged,
        // since the rest has been applied by then.
        match self
            .stream_apps
            .apply(&next.dingtalk_streams, &next.lark_streams)
        {
            Ok(changed) => {
                applied.connections_started = changed.started;
                applied.connections_stopped = changed.stopped;
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "long connections not all restarted"
            ),
        }
        Ok((applied, next))
    }

    /// Reloads on SIGHUP and, with `watch`, when the file's content changes; until shutdown.
    pub async fn serve(self: Arc<Self>, watch: bool, shutdown: Shutdown) {
        let Ok(mut hangup) = hangups() else {
            // `install` succeeded at start, so this does not happen; without it only the
            // watch reloads.
            tracing::error!("cannot listen for SIGHUP");
            return;
        };
        let mut seen = self.path.as_deref().and_then(digest);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => tracing::info!("SIGHUP: reloading the configuration"),
                _ = tick.tick(), if watch => {
                    let Some(path) = self.path.as_deref() else { continue };
                    let now = digest(path);
                    // Unreadable for a moment (a ConfigMap's symlinks being swapped): wait.
                    if now.is_none() || now == seen {
                        continue;
                    }
                    tracing::info!(file = %path.display(), "the configuration file changed: reloading it");
                }
            }
            seen = self.path.as_deref().and_then(digest);
            let _ = self.reload().await;
        }
    }
}

/// Replaces SIGHUP's default action (ending the process) for good, before the daemon
/// announces itself: a signal sent right after start-up reloads instead.
pub fn install() -> std::io::Result<()> {
    hangups().map(drop)
}

/// The file's content digest; `None` while it cannot be read.
fn digest(path: &Path) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    std::fs::read(path).ok().map(|b| Sha256::digest(b).into())
}

#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;

#[cfg(not(unix))]
type Hangups = NoHangups;

#[cfg(unix)]
fn hangups() -> std::io::Result<Hangups> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Without SIGHUP, only `--watch` reloads.
#[cfg(not(unix))]
fn hangups() -> std::io::Result<NoHangups> {
    Ok(NoHangups)
}

#[cfg(not(unix))]
struct NoHangups;

#[cfg(not(unix))]
impl NoHangups {
    async fn recv(&mut self) -> Option<()> {
        std::future::pending().await
    }
}

/// The sections bound at start that differ. Compared by their debug form, in which secrets
/// are masked: a changed password alone in these sections is not noticed (it needs the
/// restart all the same).
fn need_restart(running: &Settings, next: &Settings) -> Vec<&'static str> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let sections: [(&'static str, bool); 7] = [
        ("server", differs(&running.server, &next.server)),
        ("bus", differs(&running.bus, &next.bus)),
        ("notify", differs(&running.notify, &next.notify)),
        ("log", differs(&running.log, &next.log)),
        ("api", differs(&running.api, &next.api)),
        ("streams", differs(&running.streams, &next.streams)),
        // The pollers' API bases and proxy (their credentials follow the reload).
        (
            "apps (recover_failed, oapi_base, api_base, proxy of an app with recovery)",
            differs(&running.dingtalk_oapi, &next.dingtalk_oapi),
        ),
    ];
    sections
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
}
