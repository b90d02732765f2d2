//! `[server]` and `[log]`.

use super::checker::Checker;
use crate::config::raw::{LogConfig, ServerConfig};
use crate::config::settings::ServerSettings;

pub(super) fn server(raw: &ServerConfig, c: &mut Checker) -> ServerSettings {
    let server = ServerSettings {
        listen: c.addr("server.listen", &raw.listen),
        admin_listen: c.addr("server.admin_listen", &raw.admin_listen),
        max_body_bytes: raw.max_body_bytes,
        replay_window: Some(c.duration("server.replay_window", &raw.replay_window))
            .filter(|d| !d.is_zero()),
        shutdown_grace: c.duration("server.shutdown_grace", &raw.shutdown_grace),
    };
    if server.max_body_bytes == 0 {
        c.problem("server.max_body_bytes", "must be greater than 0");
    }
    if server.listen.port() != 0 && server.listen == server.admin_listen {
        c.problem(
            "server.admin_listen",
            "must differ from server.listen (the admin port is separate)",
        );
    }
    server
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
