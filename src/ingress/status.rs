//! The status page at `/` on the admin listener: server-rendered HTML (a minijinja template
//! with HTML escaping, no script), refreshed by the browser every 10 seconds. It shows what
//! `/metrics` already exposes, in one place for a person: each app and when it last delivered
//! an event (and its long connection), each target with its queue, last delivery result,
//! pause and dead letters. No URL, token or message body is shown: a bot's URL holds its
//! token, so targets are shown by name and kind only.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use warp::http::StatusCode;
use warp::Reply;

use super::probe::Probe;
use super::State;

const TEMPLATE: &str = include_str!("status.html");

#[derive(Serialize)]
struct Page {
    version: &'static str,
    engine: &'static str,
    reason: Option<&'static str>,
    failing: Vec<String>,
    now: String,
    apps: Vec<AppRow>,
    targets: Vec<TargetRow>,
}

#[derive(Serialize)]
struct AppRow {
    platform: String,
    name: String,
    /// `callback`, or the long connection's kind.
    mode: &'static str,
    last_event: Option<String>,
    last_event_ago: Option<String>,
    /// Long connections only: `connected`, `refused`, `down for Ns`.
    connection: Option<String>,
}

#[derive(Serialize)]
struct TargetRow {
    name: String,
    kind: &'static str,
    queued: i64,
    last: Option<LastRow>,
    paused_until: Option<String>,
    dead_letters: u64,
}

#[derive(Serialize)]
struct LastRow {
    outcome: &'static str,
    delivered: bool,
    code: Option<i64>,
    /// HTTP status of the last answer (shown when the platform gave no code).
    status: u16,
    at: String,
    ago: String,
}

/// The page, or a 500 saying the template failed (it is fixed at build time, so a test
/// catches that first).
pub fn page(state: &Arc<State>, probe: &Probe) -> warp::reply::Response {
    let readiness = probe.check();
    let now = SystemTime::now();
    let page = Page {
        version: env!("CARGO_PKG_VERSION"),
        engine: state.bus.engine(),
        reason: readiness.reason,
        failing: readiness.failing,
        now: time(now),
        apps: apps(state, probe, now),
        targets: targets(state, now),
    };
    let mut env = minijinja::Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    let html = env
        .template_from_str(TEMPLATE)
        .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&page))));
    match html {
        Ok(html) => warp::reply::html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "the status page could not be rendered");
            let body = "the status page could not be rendered; see the log";
            warp::reply::with_status(body, StatusCode::INTERNAL_SERVER_ERROR).into_response()
        }
    }
}

fn apps(state: &State, probe: &Probe, now: SystemTime) -> Vec<AppRow> {
    let current = state.current();
    let metrics = &state.metrics;
    let callbacks = [
        ("dingtalk", current.dingtalk.keys().collect::<Vec<_>>()),
        ("wecom", current.wecom.keys().collect()),
        ("lark", current.lark.keys().collect()),
    ];
    let row = |platform: &str, name: &str, mode, connection| {
        let last = metrics.last_event(platform, name).map(from_unix);
        AppRow {
            platform: platform.to_owned(),
            name: name.to_owned(),
            mode,
            last_event: last.map(time),
            last_event_ago: last.map(|t| ago(now, t)),
            connection,
        }
    };
    let mut rows: Vec<AppRow> = callbacks
        .iter()
        .flat_map(|(p, names)| names.iter().map(move |n| (*p, n.as_str())))
        .map(|(p, n)| row(p, n, "callback", None))
        .collect();
    for (key, connection) in probe.streams.connections() {
        let (platform, name) = key.split_once('/').unwrap_or(("", key.as_str()));
        let mode = match platform {
            "dingtalk" => "stream",
            _ => "websocket",
        };
        rows.push(row(platform, name, mode, Some(connection)));
    }
    rows.sort_by(|a, b| (&a.platform, &a.name).cmp(&(&b.platform, &b.name)));
    rows
}

fn targets(state: &State, now: SystemTime) -> Vec<TargetRow> {
    let notifier = &state.notifier;
    let metrics = &state.metrics;
    let generation = notifier.generation();
    let row = |name: &String, kind| TargetRow {
        name: name.clone(),
        kind,
        queued: metrics.notify_queue_depth(name).get(),
        last: notifier.last_send(name).map(|l| LastRow {
            outcome: l.outcome,
            delivered: l.delivered(),
            code: l.code,
            status: l.status,
            at: time(l.at),
            ago: ago(now, l.at),
        }),
        // A pause that ended says nothing any more.
        paused_until: metrics
            .paused_until(name)
            .map(from_unix)
            .filter(|until| *until > now)
            .map(time),
        dead_letters: metrics.dead_letters_of(name),
    };
    let targets = generation.targets.iter();
    targets
        .map(|(name, t)| row(name, t.kind.as_str()))
        .collect()
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// UTC, to the second.
fn time(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Err(_) => "?".into(),
    }
}

/// "42s", "5m", "3h", "2d".
fn ago(now: SystemTime, then: SystemTime) -> String {
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let before = |s| now - Duration::from_secs(s);
        assert_eq!(ago(now, before(5)), "5s");
        assert_eq!(ago(now, before(125)), "2m");
        assert_eq!(ago(now, before(7200)), "2h");
        assert_eq!(ago(now, before(3 * 86400)), "3d");
        // A clock that went back says "0s" rather than failing.
        assert_eq!(ago(now, now + Duration::from_secs(9)), "0s");
        assert_eq!(time(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }
}
