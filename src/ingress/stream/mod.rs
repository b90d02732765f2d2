//! Long connections: apps in stream mode dial out to their platform instead of being called
//! back, so no public URL is needed (DingTalk Stream mode, [`dingtalk`]; Lark's long connection,
//! [`lark`]). What every connection does is [`connection`]'s. Their events reach
//! the same subjects with the same bodies, headers and guarantees as the HTTP callbacks: the
//! platform is acknowledged only after the bus has the event.
//!
//! One connection per app per replica, in a supervised task; [`Streams`] is what `/readyz`
//! learns of them.

pub mod apps;
mod connection;
pub mod dingtalk;
pub mod lark;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::secret::Secret;

/// `[streams]`, validated.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub ping_interval: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub auth_retry: Duration,
    pub connect_timeout: Duration,
    pub down_grace: Duration,
    pub down_fails_readiness: bool,
    pub max_frame_bytes: usize,
    pub max_in_flight: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            ping_interval: Duration::from_secs(60),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            auth_retry: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            down_grace: Duration::from_secs(60),
            down_fails_readiness: true,
            max_frame_bytes: 1024 * 1024,
            max_in_flight: 64,
        }
    }
}

/// What every app's connections share, from the daemon.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    pub settings: &'a StreamSettings,
    pub state: &'a Arc<crate::ingress::State>,
    pub streams: &'a Streams,
    pub supervisor: &'a crate::supervise::Supervisor,
    pub shutdown: &'a crate::shutdown::Shutdown,
}

/// A DingTalk app in stream mode, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DingTalkStreamApp {
    pub client_id: String,
    pub client_secret: Secret,
    /// Without a trailing slash.
    pub api_base: String,
    /// `http://` api_base and `ws://` endpoints allowed.
    pub allow_insecure: bool,
    /// How the registration call leaves: the app's `proxy`, else `[http] proxy`. The
    /// WebSocket itself is dialed directly (see `connection::dial`).
    pub egress: crate::egress::Egress,
}

/// A Lark app in websocket mode, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LarkStreamApp {
    pub app_id: String,
    pub app_secret: Secret,
    /// Without a trailing slash.
    pub domain: String,
    /// `http://` domain and `ws://` URLs allowed.
    pub allow_insecure: bool,
    /// How the endpoint call leaves: the app's `proxy`, else `[http] proxy`. The WebSocket
    /// itself is dialed directly (see `connection::dial`).
    pub egress: crate::egress::Egress,
}

/// The health of every configured long connection, for `/readyz`. Keyed by configured apps
/// only (registered at start), so it cannot grow.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Mutex<BTreeMap<String, Health>>>,
    down_grace: Duration,
    down_fails_readiness: bool,
}

struct Health {
    /// Since when the app has had no connection; `None` while it has one.
    down_since: Option<Instant>,
    /// The platform refuses the app's credentials.
    refused: bool,
}

/// What `/readyz` says of the long connections.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Apps (`<platform>/<app>`) whose credentials the platform refuses.
    pub refused: Vec<String>,
    /// Apps without a connection for longer than the grace.
    pub down: Vec<String>,
    /// Whether either makes the replica not ready.
    #[serde(skip)]
    pub fails_readiness: bool,
}

impl Streams {
    pub fn new(settings: &StreamSettings) -> Self {
        Streams {
            inner: Arc::default(),
            down_grace: settings.down_grace,
            down_fails_readiness: settings.down_fails_readiness,
        }
    }

    /// Adds an app, down until its first connection.
    pub fn register(&self, platform: &str, app: &str) {
        self.lock().insert(
            key(platform, app),
            Health {
                down_since: Some(Instant::now()),
                refused: false,
            },
        );
    }

    /// The app has a connection (so its credentials work).
    pub fn up(&self, platform: &str, app: &str) {
        if let Some(h) = self.lock().get_mut(&key(platform, app)) {
            h.down_since = None;
            h.refused = false;
        }
    }

    /// The app lost its connection; down from now unless it already was.
    pub fn down(&self, platform: &str, app: &str) {
        if let Some(h) = self.lock().get_mut(&key(platform, app)) {
            h.down_since.get_or_insert_with(Instant::now);
        }
    }

    /// The platform refused the app's credentials (or, `false`, no longer does).
    pub fn refused(&self, platform: &str, app: &str, refused: bool) {
        if let Some(h) = self.lock().get_mut(&key(platform, app)) {
            h.refused = refused;
        }
    }

    pub fn report(&self) -> StreamReport {
        let now = Instant::now();
        let mut report = StreamReport::default();
        for (name, h) in self.lock().iter() {
            if h.refused {
                report.refused.push(name.clone());
            } else if h
                .down_since
                .is_some_and(|since| now.duration_since(since) > self.down_grace)
            {
                report.down.push(name.clone());
            }
        }
        report.fails_readiness =
            !report.refused.is_empty() || (self.down_fails_readiness && !report.down.is_empty());
        report
    }

    /// A reload removed the app: it is no longer reported.
    pub fn forget(&self, platform: &str, app: &str) {
        self.lock().remove(&key(platform, app));
    }

    /// Every long-connection app (`<platform>/<app>`) and its state: `connected`, `refused`
    /// (the platform refuses its credentials) or `down` (with how long).
    pub fn connections(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let list = self.lock();
        let state = |h: &Health| match (h.refused, h.down_since) {
            (true, _) => "refused".to_owned(),
            (false, None) => "connected".to_owned(),
            (false, Some(since)) => format!("down for {}s", now.duration_since(since).as_secs()),
        };
        list.iter()
            .map(|(name, h)| (name.clone(), state(h)))
            .collect()
    }

    /// A map of configured names stays consistent whatever panicked while holding it.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Health>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn key(platform: &str, app: &str) -> String {
    format!("{platform}/{app}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_and_long_outages_are_reported() {
        let settings = StreamSettings {
            down_grace: Duration::ZERO,
            ..Default::default()
        };
        let s = Streams::new(&settings);
        s.register("dingtalk", "a");
        s.register("dingtalk", "b");
        std::thread::sleep(Duration::from_millis(2));
        let r = s.report();
        assert_eq!(r.down, ["dingtalk/a", "dingtalk/b"]);
        assert!(r.fails_readiness);
        s.up("dingtalk", "a");
        s.refused("dingtalk", "b", true);
        let r = s.report();
        assert_eq!(
            (r.refused.as_slice(), r.down.len()),
            (&["dingtalk/b".to_owned()][..], 0)
        );
        s.refused("dingtalk", "b", false);
        s.up("dingtalk", "b");
        assert!(!s.report().fails_readiness);
        // Not in the table: nothing is added.
        s.down("dingtalk", "unknown");
        assert!(s.report().down.is_empty());
    }

    #[test]
    fn down_apps_may_be_reported_without_failing_readiness() {
        let settings = StreamSettings {
            down_grace: Duration::ZERO,
            down_fails_readiness: false,
            ..Default::default()
        };
        let s = Streams::new(&settings);
        s.register("dingtalk", "a");
        std::thread::sleep(Duration::from_millis(2));
        let r = s.report();
        assert_eq!(r.down, ["dingtalk/a"]);
        assert!(!r.fails_readiness);
    }
}
