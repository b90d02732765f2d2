//! The validated configuration handed to the daemon: everything already parsed, each domain's
//! part in the domain's own types.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::error::Problem;
use super::raw::LogConfig;
use crate::bus::BusSettings;
use crate::ingress::clients::Clients;
use crate::ingress::stream::{DingTalkStreamApp, LarkStreamApp, StreamSettings};
use crate::ingress::subject::Subjects;
use crate::message::UserBinding;
use crate::notify::compose::Directory;
use crate::notify::gateway::ApiSettings;
use crate::notify::notifier::Catalog;
use crate::notify::router::Route;
use crate::notify::settings::NotifySettings;
use crate::notify::target::Target;
use crate::notify::template::Templates;
use crate::platform::api::ApiApp;
use crate::platform::dingtalk::callback::DingTalkApp;
use crate::platform::dingtalk::oapi::DingTalkOapi;
use crate::platform::lark::callback::LarkApp;
use crate::platform::wecom::callback::WeComApp;

/// Validated, typed configuration: everything the daemon needs, already parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The listeners' addresses, body limit, replay window and shutdown grace.
    pub server: ServerSettings,
    pub log: LogConfig,
    pub bus: BusSettings,
    /// DingTalk apps in http mode, served at `/callbacks/dingtalk/<name>`.
    pub dingtalk_apps: BTreeMap<String, DingTalkApp>,
    /// DingTalk apps in stream mode: no route, a long connection each.
    pub dingtalk_streams: BTreeMap<String, DingTalkStreamApp>,
    /// DingTalk apps with server-API credentials (either mode): callback registration,
    /// failed-push recovery, the API gateway.
    pub dingtalk_oapi: BTreeMap<String, DingTalkOapi>,
    /// `[streams]`: how those connections are kept.
    pub streams: StreamSettings,
    pub wecom_apps: BTreeMap<String, WeComApp>,
    /// Lark apps in http mode, served at `/callbacks/lark/<name>`.
    pub lark_apps: BTreeMap<String, LarkApp>,
    /// Lark apps in websocket mode: no route, a long connection each.
    pub lark_streams: BTreeMap<String, LarkStreamApp>,
    /// The apps' business tokens for inbound subjects.
    pub subjects: Subjects,
    pub notify: NotifySettings,
    pub targets: BTreeMap<String, Target>,
    pub routes: BTreeMap<String, Route>,
    pub templates: Templates,
    pub users: BTreeMap<String, UserBinding>,
    /// The internal systems allowed on the internal listener.
    pub clients: Clients,
    /// `[api]`: the platform API gateway's limits.
    pub api: ApiSettings,
    /// The apps the gateway calls for (those with API credentials), by `<platform>/<name>`.
    pub api_apps: BTreeMap<String, ApiApp>,
    /// What is allowed but probably unwise, each naming its key: `check-config` prints them
    /// and the daemon logs them at start.
    pub warnings: Vec<Problem>,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The internal listener (`POST /notify`), off when `None`.
    pub internal_listen: Option<SocketAddr>,
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// `None` when the replay check is disabled.
    pub replay_window: Option<Duration>,
    /// How many published callbacks are remembered to recognise their replays.
    pub replay_capacity: usize,
    /// `GET /events` streams per client.
    pub max_event_streams: usize,
    pub shutdown_grace: Duration,
}

impl Settings {
    /// What the notify pipeline sends to and how.
    pub fn catalog(&self) -> Catalog {
        Catalog {
            targets: self.targets.clone(),
            routes: self.routes.clone(),
            templates: self.templates.clone(),
            users: Directory::new(self.users.clone()),
        }
    }
}
