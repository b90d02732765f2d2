//! `imbridge dlq list|show|replay|purge`: the dead letters of one target, wherever the bus
//! keeps them.
//!
//! Layout:
//! - `mod.rs`: the command (filters, what each action does, exit codes) and the one-off bus.
//! - `nats.rs`: the `IMBRIDGE_DLQ` stream, read with an ordered consumer, letters deleted by
//!   sequence.
//! - `kafka.rs`: the `dlq.notify.<target>` topic, read from the beginning by a consumer that
//!   joins no group and commits nothing; a log cannot delete one record, so what was replayed
//!   or purged is marked in the compacted topic `dlq.handled` and not listed again.
//! - `remote.rs`: the in-process bus, whose letters live in the daemon: `/dlq/<target>` on its
//!   internal listener.
//!
//! A letter leaves the dead letters only after its replay was acknowledged by the bus; the
//! replay's id is derived from the letter ([`crate::notify::dlq`]), so running a replay twice
//! is dropped by the duplicate window.

mod kafka;
mod nats;
mod remote;

use std::time::Duration;

use crate::bus::{self, Bus, BusSettings, EngineSettings, Layout, StreamSpec};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::notify::dlq::{Filter, Letter};
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

/// Exit codes, as the other one-off commands (sysexits.h).
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;

/// How long the one-off bus may take to connect.
const BUS_WAIT: Duration = Duration::from_secs(10);

/// What to do with the selected letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    List,
    Show,
    Replay,
    /// `all`: purge without any filter (refused otherwise, so a typo cannot empty the DLQ).
    Purge {
        all: bool,
    },
}

/// One `imbridge dlq` invocation.
#[derive(Debug, Clone)]
pub struct Request {
    pub action: Action,
    pub target: String,
    pub filter: Filter,
    /// The in-process bus only: the daemon's internal listener, and a client token.
    pub url: Option<String>,
    pub token: Option<String>,
}

/// Why the command failed; each variant is an exit code.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The command line or configuration does not allow it (64).
    #[error("{0}")]
    Usage(String),
    /// The bus (or the daemon's listener) could not be reached or refused (69).
    #[error("{0}")]
    Unavailable(String),
}

impl DlqError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DlqError::Usage(_) => EXIT_USAGE,
            DlqError::Unavailable(_) => EXIT_UNAVAILABLE,
        }
    }
}

/// What was printed, and the error that stopped the command part-way, if one did (letters
/// replayed before it stay replayed).
pub struct Outcome {
    pub lines: Vec<String>,
    pub error: Option<DlqError>,
}

/// Where the letters are.
enum Store {
    Nats(nats::Store),
    Kafka(kafka::Store),
    Remote(remote::Store),
}

/// Runs one command.
pub async fn run(settings: &Settings, req: &Request) -> Result<Outcome, DlqError> {
    check(settings, req)?;
    let store = open(settings, req).await?;
    let letters = match store.list(&req.target, &req.filter).await {
        Ok(letters) => letters,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let mut out = Outcome {
        lines: Vec::new(),
        error: None,
    };
    if req.action == Action::Show && letters.is_empty() {
        out.error = Some(DlqError::Usage("no such dead letter".into()));
    }
    for letter in &letters {
        let done = match req.action {
            Action::List => Ok(letter.summary()),
            Action::Show => Ok(letter.full()),
            Action::Replay => store
                .replay(&settings.bus.subject_prefix, &req.target, letter)
                .await
                .map(|note| format!("replayed\t{}{note}", letter.summary())),
            Action::Purge { .. } => store
                .remove(&req.target, letter)
                .await
                .map(|()| format!("purged\t{}", letter.summary())),
        };
        match done {
            Ok(line) => out.lines.push(line),
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    store.close().await;
    Ok(out)
}

/// Usage problems, before anything connects.
fn check(settings: &Settings, req: &Request) -> Result<(), DlqError> {
    if !bus::is_valid_token(&req.target) {
        return Err(DlqError::Usage(format!(
            "--target {:?}: not a target name",
            req.target
        )));
    }
    let known =
        settings.targets.contains_key(&req.target) || settings.routes.contains_key(&req.target);
    if req.action == Action::Replay && !known {
        return Err(DlqError::Usage(format!(
            "--target {}: no such target or route (a replay would be dead-lettered again)",
            req.target
        )));
    }
    if req.action == (Action::Purge { all: false }) && !req.filter.narrows() {
        return Err(DlqError::Usage(
            "purge needs --reason, --since or --id, or --all to purge every letter".into(),
        ));
    }
    Ok(())
}

async fn open(settings: &Settings, req: &Request) -> Result<Store, DlqError> {
    if matches!(settings.bus.engine, EngineSettings::Memory(_)) {
        return remote::Store::new(settings, req).map(Store::Remote);
    }
    let bus = OneOff::start(settings).await?;
    match &settings.bus.engine {
        EngineSettings::Kafka(_) => kafka::Store::new(bus, &settings.bus.subject_prefix)
            .await
            .map(Store::Kafka),
        _ => nats::Store::new(bus, settings).await.map(Store::Nats),
    }
}

impl Store {
    async fn list(&self, target: &str, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        match self {
            Store::Nats(s) => s.list(target, filter).await,
            Store::Kafka(s) => s.list(target, filter).await,
            Store::Remote(s) => s.list(target, filter).await,
        }
    }

    /// Publishes the letter's replay and, once acknowledged, removes it; a note for the line.
    async fn replay(
        &self,
        prefix: &str,
        target: &str,
        letter: &Letter,
    ) -> Result<String, DlqError> {
        let bus = match self {
            Store::Remote(s) => return s.replay(target, letter).await,
            Store::Nats(s) => &s.bus,
            Store::Kafka(s) => &s.bus,
        };
        let msg = letter.replay(prefix, target);
        let ack = bus.bus.publish(&msg).await.map_err(|e| {
            DlqError::Unavailable(format!("replaying {}: {e}; the letter stays", letter.id))
        })?;
        self.remove(target, letter).await?;
        Ok(if ack.duplicate {
            " (already replayed: dropped as a duplicate)".into()
        } else {
            String::new()
        })
    }

    async fn remove(&self, target: &str, letter: &Letter) -> Result<(), DlqError> {
        match self {
            Store::Nats(s) => s.remove(letter).await,
            Store::Kafka(s) => s.remove(target, letter).await,
            Store::Remote(s) => s.remove(target, letter).await,
        }
    }

    async fn close(&self) {
        match self {
            Store::Nats(s) => s.bus.close().await,
            Store::Kafka(s) => s.bus.close().await,
            Store::Remote(_) => {}
        }
    }
}

/// The bus as a one-off command uses it: a publisher that joins no consumer group and
/// creates no consumer (the daemon's are the daemon's), with the streams and topics replays
/// and markers go to.
pub(crate) struct OneOff {
    pub bus: Bus,
    shutdown: Shutdown,
}

impl OneOff {
    async fn start(settings: &Settings) -> Result<OneOff, DlqError> {
        let metrics = Metrics::new();
        let shutdown = Shutdown::new();
        let supervisor = Supervisor::new(metrics.clone());
        let layout = layout(&settings.bus, settings);
        let bus = Bus::start(
            &settings.bus,
            &layout,
            metrics,
            &supervisor,
            shutdown.clone(),
        )
        .await
        .map_err(|e| DlqError::Unavailable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + BUS_WAIT;
        while !bus.is_ready() {
            if tokio::time::Instant::now() > deadline {
                shutdown.trigger();
                return Err(DlqError::Unavailable(format!(
                    "the bus was not ready within {BUS_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(OneOff { bus, shutdown })
    }

    async fn close(&self) {
        self.shutdown.trigger();
        self.bus.close().await;
    }
}

/// The daemon's streams as it declares them (so creating them again changes nothing), the
/// markers' topic, and no consumer.
fn layout(bus_settings: &BusSettings, settings: &Settings) -> Layout {
    let prefix = &bus_settings.subject_prefix;
    let inbound = crate::platform::Platform::ALL
        .iter()
        .map(|p| bus::with_prefix(prefix, &format!("{}.>", p.as_str())))
        .collect();
    let handled = bus::with_prefix(prefix, kafka::HANDLED_TOPIC);
    Layout {
        inbound,
        streams: vec![
            StreamSpec {
                name: settings.notify.stream.clone(),
                subjects: vec![bus::with_prefix(prefix, "notify.>")],
                interest: true,
            },
            StreamSpec {
                name: settings.notify.dlq_stream.clone(),
                subjects: vec![bus::with_prefix(prefix, "dlq.notify.>")],
                interest: false,
            },
        ],
        topics: vec![handled.clone()],
        compacted: vec![(handled, kafka::HANDLED_RETENTION)],
        keyed_by_name: vec!["notify.".into(), "dlq.notify.".into()],
        ..Layout::default()
    }
}
