//! `[server]`, `[clients]` and `[log]`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::checker::Checker;
use crate::bus::{BusSettings, EngineSettings};
use crate::config::raw::{Config, LogConfig, ServerConfig};
use crate::config::settings::ServerSettings;
use crate::ingress::clients::{Client, Clients};
use crate::ingress::replay;
use crate::platform::api::ApiApp;
use crate::platform::Platform;
use crate::secret::Secret;

/// The placeholder `imbridge.example.toml` ships, refused once the listener is on.
const EXAMPLE_TOKEN: &str = "replace-with-a-random-secret";

/// Shortest client token accepted: guessing one must be hopeless.
const MIN_TOKEN_CHARS: usize = 16;

pub(super) fn server(raw: &ServerConfig, c: &mut Checker) -> ServerSettings {
    let replay_window =
        Some(c.duration("server.replay_window", &raw.replay_window)).filter(|d| !d.is_zero());
    let server = ServerSettings {
        listen: c.addr("server.listen", &raw.listen),
        admin_listen: c.addr("server.admin_listen", &raw.admin_listen),
        internal_listen: raw
            .internal_listen
            .as_deref()
            .map(|a| c.addr("server.internal_listen", a)),
        max_body_bytes: raw.max_body_bytes,
        header_timeout: c.duration("server.header_timeout", &raw.header_timeout),
        body_timeout: c.duration("server.body_timeout", &raw.body_timeout),
        max_connections: raw.max_connections,
        replay_window,
        replay_capacity: replay_capacity(raw.max_callback_rate, replay_window, c),
        max_event_streams: raw.max_event_streams,
        shutdown_grace: c.duration("server.shutdown_grace", &raw.shutdown_grace),
    };
    if server.max_body_bytes == 0 {
        c.problem("server.max_body_bytes", "must be greater than 0");
    }
    // Zero would close every connection before its first request could arrive.
    for (key, value) in [
        ("server.header_timeout", &raw.header_timeout),
        ("server.body_timeout", &raw.body_timeout),
    ] {
        if humantime::parse_duration(value).is_ok_and(|d| d.is_zero()) {
            c.problem(key, "must be greater than 0");
        }
    }
    if server.max_event_streams == 0 {
        c.problem("server.max_event_streams", "must be greater than 0");
    }
    if server.max_connections == 0 {
        c.problem("server.max_connections", "must be greater than 0");
    }
    if server.listen.port() != 0 && server.listen == server.admin_listen {
        c.problem(
            "server.admin_listen",
            "must differ from server.listen (the admin port is separate)",
        );
    }
    if let Some(internal) = server.internal_listen {
        let shared = [server.listen, server.admin_listen];
        if internal.port() != 0 && shared.contains(&internal) {
            c.problem(
                "server.internal_listen",
                "must differ from server.listen and server.admin_listen (the public listener \
                 takes platform callbacks only)",
            );
        }
    }
    server
}

/// How many published callbacks to remember: `max_callback_rate` × the window, refused above
/// the ceiling rather than silently cut (an operator who asks for more should know).
fn replay_capacity(rate: u32, window: Option<Duration>, c: &mut Checker) -> usize {
    if rate == 0 {
        c.problem("server.max_callback_rate", "must be at least 1");
    }
    let Some(window) = window else {
        return 0;
    };
    let entries = replay::capacity(rate, window);
    if entries > replay::MAX_ENTRIES {
        c.problem(
            "server.max_callback_rate",
            format!(
                "× server.replay_window is {entries} callbacks to remember, over the ceiling of \
                 {}: lower one of them",
                replay::MAX_ENTRIES
            ),
        );
        return 0;
    }
    usize::try_from(entries).unwrap_or(0)
}

/// Warns when the replay window outlasts the bus's duplicate window: a replay the replica's own
/// memory does not catch (another replica, a restart, an eviction) and that arrives between the
/// two windows is stored twice.
pub(super) fn replay(server: &ServerSettings, bus: &BusSettings, c: &mut Checker) {
    let (key, duplicate_window) = match &bus.engine {
        EngineSettings::Memory(m) => ("bus.memory.duplicate_window", m.duplicate_window),
        EngineSettings::Nats(n) => ("bus.nats.duplicate_window", n.duplicate_window),
        EngineSettings::Kafka(k) => ("bus.kafka.duplicate_window", k.duplicate_window),
    };
    match server.replay_window {
        None => c.warning(
            "server.replay_window",
            "is 0: callbacks are accepted whatever their timestamp, and a captured one can be \
             replayed at any time",
        ),
        Some(window) if window > duplicate_window => c.warning(
            "server.replay_window",
            format!(
                "is longer than {key} ({duplicate_window:?}): a replay arriving between the two \
                 windows at another replica, or after a restart, can be stored twice"
            ),
        ),
        Some(_) => {}
    }
}

/// `[clients]`: tokens long and distinct, and every plain name a client may use configured.
/// `names` are the configured targets and routes.
pub(super) fn clients(
    raw: &Config,
    names: &BTreeSet<&str>,
    api_apps: &BTreeMap<String, ApiApp>,
    c: &mut Checker,
) -> Clients {
    if raw.server.internal_listen.is_some() && raw.clients.is_empty() && !raw.server.allow_anonymous
    {
        c.problem(
            "server.internal_listen",
            "POST /notify would be open to anyone who reaches it: configure at least one \
             [clients.<name>] with a token, or set server.allow_anonymous = true",
        );
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut clients = Vec::new();
    for (name, client) in &raw.clients {
        let key = format!("clients.{name}");
        let token = client
            .token
            .as_ref()
            .map(Secret::expose)
            .unwrap_or_default();
        if token == EXAMPLE_TOKEN && raw.server.internal_listen.is_some() {
            c.problem(
                format!("{key}.token"),
                "is the example's placeholder: set a random secret",
            );
        } else if token.chars().count() < MIN_TOKEN_CHARS {
            c.problem(
                format!("{key}.token"),
                format!("must be at least {MIN_TOKEN_CHARS} characters (a random secret)"),
            );
        } else if let Some(other) = seen.insert(token, name) {
            c.problem(
                format!("{key}.token"),
                format!("the same as clients.{other}.token: each client needs its own"),
            );
        }
        if client.targets.is_empty() && client.api.is_empty() {
            c.problem(
                format!("{key}.targets"),
                "names no target (globs allowed, e.g. \"ops-*\") and api no path: the client \
                 could do nothing",
            );
        }
        api_globs(&key, &client.api, api_apps, c);
        for glob in &client.targets {
            let plain = !glob.contains(['*', '?']);
            if glob.is_empty() || plain && !names.contains(glob.as_str()) {
                c.problem(
                    format!("{key}.targets"),
                    format!("{glob:?} is no configured target or route"),
                );
            }
        }
        clients.push(Client {
            name: name.clone(),
            token: Secret::new(token),
            targets: client.targets.clone(),
            allow_recipients: client.allow_recipients,
            allow_raw: client.allow_raw,
            api: client.api.clone(),
        });
    }
    Clients {
        clients,
        anonymous: raw.server.allow_anonymous,
    }
}

/// Each `api` glob is `<platform>/<app>/<path>`: a platform by name (or a glob), and a plain
/// app name one with API credentials, so that a typo is not a silent 403.
fn api_globs(key: &str, globs: &[String], api_apps: &BTreeMap<String, ApiApp>, c: &mut Checker) {
    let key = format!("{key}.api");
    for glob in globs {
        let mut parts = glob.splitn(3, '/');
        let (platform, app) = (parts.next().unwrap_or_default(), parts.next());
        let plain = |s: &str| !s.contains(['*', '?']);
        let platform_ok = !plain(platform) || Platform::ALL.iter().any(|p| p.as_str() == platform);
        if glob.is_empty() || !platform_ok || (plain(platform) && app.is_none()) {
            c.problem(
                &key,
                format!("{glob:?} is not <platform>/<app>/<path> (e.g. \"dingtalk/main/topapi/v2/user/*\")"),
            );
            continue;
        }
        if let Some(app) = app.filter(|a| plain(platform) && plain(a)) {
            if !api_apps.contains_key(&format!("{platform}/{app}")) {
                c.problem(
                    &key,
                    format!("{glob:?}: apps.{platform}.{app} has no API credentials"),
                );
            }
        }
    }
}

pub(super) fn log(raw: &LogConfig, c: &mut Checker) {
    match raw.format.as_str() {
        "text" | "json" => {}
        other => c.problem(
            "log.format",
            format!("unknown log format {other:?}; expected \"text\" or \"json\""),
        ),
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.level) {
        c.problem("log.level", format!("invalid filter {:?}: {e}", raw.level));
    }
}
