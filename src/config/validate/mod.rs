//! Validation: one function per section, each turning its raw table into the domain's settings
//! and writing every problem it finds to one [`Checker`], so they are all reported at once.
//!
//! The sections import the checker and each other as siblings; this file only runs them.

mod api;
mod apps;
mod bus;
mod catalog;
mod checker;
mod http;
mod notify;
mod routes;
mod server;
mod targets;

use std::collections::BTreeMap;

use checker::Checker;

use super::error::ConfigError;
use super::raw::{Config, TargetConfig};
use super::settings::Settings;

/// Checks everything and converts it to [`Settings`], or returns every problem found.
/// `targets` are the target tables of `config` that could be read for their kind.
pub(super) fn validate(
    config: &Config,
    raw_targets: &BTreeMap<String, TargetConfig>,
) -> Result<Settings, ConfigError> {
    let mut c = Checker::default();
    let server = server::server(&config.server, &mut c);
    let egress = http::global(&config.http, &mut c);
    server::log(&config.log, &mut c);
    let bus = bus::bus(&config.bus, &mut c);
    let mut dingtalk = apps::dingtalk(&config.apps.dingtalk, &mut c);
    let streams = apps::streams(&config.streams, &mut c);
    let wecom_apps = apps::wecom(&config.apps.wecom, &mut c);
    let (lark_apps, mut lark_streams) = apps::lark(&config.apps.lark, &mut c);
    let subjects = apps::subjects(&config.apps, &mut c);
    server::replay(&server, &bus, &mut c);
    let notify = notify::notify(&config.notify, &bus.engine, &mut c);
    let zone = notify::timezone(&config.notify, &mut c);
    let templates = catalog::templates(&config.templates, zone, &mut c);
    let mut targets = targets::targets(config, raw_targets, &templates, &mut c);
    let routes = routes::routes(config, &templates, &mut c);
    routes::warn_untemplated_events(&routes, &targets, &mut c);
    let users = catalog::users(&config.users, &mut c);
    let names = targets
        .keys()
        .chain(routes.keys())
        .map(String::as_str)
        .collect();
    let api = api::settings(config, &bus.engine, &mut c);
    let mut api_apps = api::apps(&config.apps, &dingtalk.oapi, &mut c);
    let clients = server::clients(config, &names, &api_apps, &mut c);
    let clients_egress = http::Clients {
        targets: &mut targets,
        dingtalk_oapi: &mut dingtalk.oapi,
        dingtalk_streams: &mut dingtalk.streams,
        lark_streams: &mut lark_streams,
        api_apps: &mut api_apps,
    };
    http::apply(config, raw_targets, &egress, clients_egress, &mut c);
    let warnings = c.finish()?;
    Ok(Settings {
        server,
        log: config.log.clone(),
        bus,
        dingtalk_apps: dingtalk.http,
        dingtalk_streams: dingtalk.streams,
        dingtalk_oapi: dingtalk.oapi,
        streams,
        wecom_apps,
        lark_apps,
        lark_streams,
        subjects,
        notify,
        targets,
        routes,
        templates,
        users,
        clients,
        api,
        api_apps,
        warnings,
    })
}
