//! `imbridge send --target T [--text …] [--wait] [--direct]`: a test notification.
//!
//! Through the running daemon by default: `POST /notify/<target>` on its internal listener
//! (as the client whose token is given, see [`crate::remote`]), so what is tested is what
//! other systems use: the client's rights, the bus, the daemon's queue, limiter and
//! credentials. With `--wait` (`?wait=true`) the daemon delivers it at once and answers with
//! the platform's verdict; without, it answers with the id of the accepted message.
//!
//! `--direct` needs no daemon: the command starts the notify pipeline itself, on an in-process
//! bus with a local limiter and no consumers, and delivers through
//! [`Notifier::deliver_now`], the code path of `?wait=true`. It does not share the daemon's
//! rate limit nor its dead letters (a failure is printed, not kept), and it says so.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::bus::memory::MemorySettings;
use crate::bus::{Bus, BusSettings, EngineSettings, Layout};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::notify::notifier::{Notifier, NotifyError};
use crate::notify::settings::LimiterStore;
use crate::notify::verdict::Verdict;
use crate::platform::outbound::Answer;
use crate::remote::{self, Daemon, RemoteError};
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// Exit codes (sysexits.h).
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_DATA: u8 = 65;
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How long the daemon may take to answer: its own `notify.wait_timeout` bounds a `--wait`.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One `imbridge send`.
#[derive(Debug, Clone)]
pub struct Request {
    pub target: String,
    /// The text; by default one naming this host and the time.
    pub text: Option<String>,
    pub wait: bool,
    pub direct: bool,
    /// The daemon's internal listener, and a client token (not with `direct`).
    pub url: Option<String>,
    pub token: Option<String>,
}

/// Why nothing was delivered (or accepted); each variant is an exit code.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The command line or configuration does not allow it, or the daemon refused the request
    /// itself (token, target) (64).
    #[error("{0}")]
    Usage(String),
    /// The target or the platform refused the message (65).
    #[error("{0}")]
    Refused(String),
    /// The daemon could not be reached, or failed (69).
    #[error("{0}")]
    Unavailable(String),
}

impl SendError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SendError::Usage(_) => EXIT_USAGE,
            SendError::Refused(_) => EXIT_DATA,
            SendError::Unavailable(_) => EXIT_UNAVAILABLE,
        }
    }
}

impl From<RemoteError> for SendError {
    fn from(e: RemoteError) -> SendError {
        match e {
            RemoteError::Usage(m) => SendError::Usage(m),
            RemoteError::Unavailable(m) => SendError::Unavailable(m),
        }
    }
}

/// Sends, and returns what to print.
pub async fn run(settings: &Settings, req: &Request) -> Result<Vec<String>, SendError> {
    let text = req.text.clone().unwrap_or_else(default_text);
    let body = serde_json::to_vec(&json!({ "text": text })).expect("JSON serialises");
    if req.direct {
        direct(settings, &req.target, &body).await
    } else {
        through_daemon(settings, req, body).await
    }
}

/// "imbridge test message from <hostname> at <time>".
fn default_text() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let time = humantime::format_rfc3339_seconds(SystemTime::now());
    format!("imbridge test message from {host} at {time}")
}

async fn through_daemon(
    settings: &Settings,
    req: &Request,
    body: Vec<u8>,
) -> Result<Vec<String>, SendError> {
    let daemon = Daemon::new(
        req.url.as_deref(),
        settings.server.internal_listen,
        req.token.clone(),
        TIMEOUT,
    )?;
    let path = format!(
        "/notify/{}{}",
        req.target,
        if req.wait { "?wait=true" } else { "" }
    );
    let response = daemon
        .request(reqwest::Method::POST, &path)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(remote::unreachable)?;
    let status = response.status();
    if !status.is_success() && status != reqwest::StatusCode::BAD_GATEWAY {
        // 422: the target cannot send this message (a template failing on it, say).
        return Err(match status {
            reqwest::StatusCode::UNPROCESSABLE_ENTITY => {
                let body = response.text().await.unwrap_or_default();
                SendError::Refused(format!("the target refused the message: {}", body.trim()))
            }
            _ => remote::refusal(status, response).await.into(),
        });
    }
    let answer: serde_json::Value = response
        .json()
        .await
        .map_err(|e| SendError::Unavailable(format!("reading the daemon's answer: {e}")))?;
    let target = &req.target;
    match status.as_u16() {
        202 => Ok(vec![format!(
            "accepted: id {} on {} (the daemon delivers it; --wait to see the platform's answer)",
            answer["id"].as_str().unwrap_or("?"),
            answer["subject"].as_str().unwrap_or("?")
        )]),
        502 => Err(SendError::Refused(format!(
            "not delivered to {target}: {} after {} attempt(s){}",
            answer["code"].as_str().unwrap_or("failed"),
            answer["attempts"],
            describe(&answer["answer"])
        ))),
        _ => Ok(vec![format!(
            "delivered to {target} in {} part(s){}",
            answer["parts"],
            describe(&answer["answer"])
        )]),
    }
}

/// "; platform answered HTTP 200, code 0 (ok)", from the daemon's `answer` object.
fn describe(answer: &serde_json::Value) -> String {
    if answer.is_null() {
        return "; no answer from the platform".into();
    }
    let code = match &answer["code"] {
        serde_json::Value::Null => "none".to_owned(),
        c => c.to_string(),
    };
    format!(
        "; platform answered HTTP {}, code {code} ({})",
        answer["status"],
        answer["class"].as_str().unwrap_or("?")
    )
}

/// The daemon's `answer` object for a verdict's answer (the same fields `?wait=true` shows).
fn answer_json(a: &Answer) -> serde_json::Value {
    json!({ "class": a.class.label(), "status": a.status, "code": a.code })
}

/// `--direct`: the notify pipeline in this process, one `deliver_now`.
async fn direct(settings: &Settings, target: &str, body: &[u8]) -> Result<Vec<String>, SendError> {
    if !settings.targets.contains_key(target) {
        return Err(SendError::Usage(
            match settings.routes.contains_key(target) {
                true => format!("{target} is a route; send to one of its targets"),
                false => format!("targets.{target}: no such target"),
            },
        ));
    }
    let notifier = Pipeline::start(settings).await?;
    let seed = hex::encode(rand::random::<[u8; 16]>());
    let verdict = notifier.notifier.deliver_now(target, body, seed).await;
    notifier.stop().await;
    let note = "sent directly by this command, not through a daemon";
    match verdict {
        Ok(Verdict::Delivered { parts, answer }) => Ok(vec![format!(
            "delivered to {target} in {parts} part(s){} ({note})",
            describe(&answer_json(&answer))
        )]),
        Ok(Verdict::Failed {
            reason,
            attempts,
            answer,
        }) => Err(SendError::Refused(format!(
            "not delivered to {target}: {} after {attempts} attempt(s){} ({note}; nothing is \
             dead-lettered)",
            reason.label(),
            describe(&answer.as_ref().map(answer_json).unwrap_or_default())
        ))),
        Err(NotifyError::Compose(e)) => Err(SendError::Refused(format!(
            "the target refused the message: {}",
            crate::secret::redact(&e.to_string())
        ))),
        Err(e) => Err(SendError::Unavailable(format!("{e} ({note})"))),
    }
}

/// The notify pipeline of `--direct`: no consumers, an in-process bus (for the dead letters
/// the worker would write, which nobody reads) and a local limiter, so nothing outside this
/// process is needed but the platform.
struct Pipeline {
    notifier: std::sync::Arc<Notifier>,
    shutdown: Shutdown,
}

impl Pipeline {
    async fn start(settings: &Settings) -> Result<Pipeline, SendError> {
        let mut notify = settings.notify.clone();
        notify.enabled = false;
        notify.limiter = LimiterStore::Local;
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let supervisor = Supervisor::new(metrics.clone());
        let bus = BusSettings {
            subject_prefix: settings.bus.subject_prefix.clone(),
            engine: EngineSettings::Memory(MemorySettings {
                capacity: 16,
                duplicate_window: Duration::ZERO,
            }),
        };
        let layout = Layout::default();
        let bus = Bus::start(
            &bus,
            &layout,
            metrics.clone(),
            &supervisor,
            shutdown.clone(),
        )
        .await
        .map_err(|e| SendError::Unavailable(e.to_string()))?;
        let notifier = Notifier::start(
            &notify,
            settings.catalog(),
            std::sync::Arc::new(bus),
            metrics,
            &settings.bus.subject_prefix,
            &supervisor,
            shutdown.clone(),
        )
        .map_err(|e| SendError::Unavailable(format!("starting the notify pipeline: {e}")))?;
        Ok(Pipeline { notifier, shutdown })
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.notifier.join(Duration::from_secs(1)).await;
    }
}
