//! Recovering what DingTalk failed to push (`[apps.dingtalk.<app>] recover_failed`): DingTalk
//! keeps the events it could not deliver for 7 days and hands them out through
//! `call_back/get_call_back_failed_result`, a page at a time, each entry once. One replica at
//! a time (a [`Lease`] on the bus) polls it, publishes every entry of a page on the usual
//! subject (`dingtalk.<tag>`, `imbridge-recovered: true`) and only then asks for the next.
//!
//! `ce-id` is derived as for a pushed callback (platform, app and the event's bytes): when the
//! entry's data is the JSON DingTalk would have pushed, byte for byte, a later real push of
//! the same change (or a recovery of one that was pushed meanwhile) falls within the bus's
//! duplicate window as the same id. When DingTalk reformats it, both are stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Event, Inbound};
use crate::bus::lease::Lease;
use crate::bus::Bus;
use crate::ingress::oapi::OapiClient;
use crate::metrics::Metrics;
use crate::notify::gateway::Gateway;
use crate::platform::dingtalk::oapi::{DingTalkOapi, FailedEntry, OapiError};
use crate::platform::Platform;
use crate::secret::Secret;
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

const PLATFORM: &str = Platform::DingTalk.as_str();

/// How long a call to DingTalk may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The lease of an app's recovery, for the bus layout (Kafka) and the poller.
pub fn lease_name(app: &str) -> String {
    format!("recover.dingtalk.{app}")
}

/// Its time to live: a few polls, and at least long enough for a pass of several pages.
pub fn lease_ttl(every: Duration) -> Duration {
    (every * 3).clamp(Duration::from_secs(30), Duration::from_secs(300))
}

/// One entry published by a pass.
#[derive(Debug, Clone)]
pub struct Published {
    pub tag: String,
    pub event_time: Option<u64>,
    pub subject_id: String,
    pub duplicate: bool,
}

/// What a pass did.
#[derive(Debug, Default, Clone)]
pub struct Pass {
    pub pages: u64,
    pub published: Vec<Published>,
    /// Entries whose data could not be read: counted and logged, not published.
    pub unreadable: u64,
    /// The pass ended early: the lease was lost or shutdown came.
    pub interrupted: bool,
}

/// Why a pass stopped before the list was empty.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Oapi(#[from] OapiError),
}

/// Where a pass gets its access token.
pub enum Tokens<'a> {
    /// Its own `gettoken` (a one-off pass, without the daemon's cache).
    Own,
    /// The daemon's cache, shared with the app's targets and API calls.
    Shared(&'a Gateway),
}

/// What a pass needs.
pub struct Recovery<'a> {
    pub app: &'a str,
    pub client: &'a OapiClient,
    pub tokens: Tokens<'a>,
    pub inbound: Inbound<'a>,
    pub metrics: &'a Metrics,
    pub shutdown: &'a Shutdown,
}

impl Recovery<'_> {
    /// Fetches pages until DingTalk has no more (or `lease`, when given, is lost), publishing
    /// each page's entries before asking for the next. A rejected access token is fetched
    /// again once per page.
    pub async fn pass(&self, mut lease: Option<&mut Lease>) -> Result<Pass, PassError> {
        let mut pass = Pass::default();
        let mut token = self.token().await?;
        loop {
            if let Some(lease) = lease.as_deref_mut() {
                if !lease.hold().await {
                    pass.interrupted = true;
                    return Ok(pass);
                }
            }
            let page = match self.client.failed(&token).await {
                Err(e) if e.is_token_rejected() => {
                    if let Tokens::Shared(gateway) = self.tokens {
                        gateway.forget_token(PLATFORM, self.app, token.expose());
                    }
                    token = self.token().await?;
                    self.client.failed(&token).await?
                }
                other => other?,
            };
            pass.pages += 1;
            let has_more = page.has_more;
            for entry in page.entries {
                match self.publish(entry).await {
                    Some(Ok(p)) => pass.published.push(p),
                    Some(Err(())) => pass.unreadable += 1,
                    None => {
                        pass.interrupted = true;
                        return Ok(pass);
                    }
                }
            }
            if !has_more {
                return Ok(pass);
            }
        }
    }

    async fn token(&self) -> Result<Secret, OapiError> {
        if let Tokens::Shared(gateway) = self.tokens {
            match gateway.token(PLATFORM, self.app).await {
                Ok(Some(token)) => return Ok(Secret::new(token)),
                // Not known to the gateway: fetched here, as a one-off pass does.
                Ok(None) => {}
                Err(answer) => return Err(token_error(answer)),
            }
        }
        let issued = self.client.gettoken().await?;
        Ok(Secret::new(issued.token))
    }

    /// Publishes one entry, retrying while the bus cannot take it (DingTalk has handed it
    /// out: it will not come again). `Some(Err(()))` for an unreadable entry; `None` when
    /// shutdown came first.
    async fn publish(&self, entry: FailedEntry) -> Option<Result<Published, ()>> {
        let app = self.app;
        let FailedEntry {
            tag,
            event_time,
            corp_id,
            data,
            ..
        } = entry;
        let data = match data {
            Ok(data) => data,
            Err(why) => {
                self.metrics.recover_error(app, "unreadable_entry");
                tracing::warn!(platform = PLATFORM, app, tag = %crate::bus::header_value(&tag), event_time, why = %why, "a failed push DingTalk listed cannot be read; not published");
                return Some(Err(()));
            }
        };
        let id = super::dingtalk::event_id(app, data.as_bytes());
        let mut attempt = 0;
        loop {
            let event = Event {
                platform: PLATFORM,
                app: app.to_owned(),
                event_type: tag.clone(),
                id: id.clone(),
                tenant: corp_id.clone(),
                payload: Bytes::from(data.clone()),
                recovered: true,
            };
            match self.inbound.publish(event).await {
                Ok(outcome) => {
                    self.metrics.recovered(app);
                    return Some(Ok(Published {
                        tag,
                        event_time,
                        subject_id: id,
                        duplicate: outcome.label() == "duplicate",
                    }));
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(platform = PLATFORM, app, tag = %crate::bus::header_value(&tag), attempt, message = %e.message, "a recovered event cannot be stored yet; retrying");
                    if !crate::backoff::republish_wait(attempt, self.shutdown).await {
                        // DingTalk handed it out already: say what is lost, exactly.
                        tracing::error!(platform = PLATFORM, app, tag = %crate::bus::header_value(&tag), event_time, id, "shutdown before a recovered event was stored; it is not recovered");
                        return None;
                    }
                }
            }
        }
    }
}

/// Why `imbridge dingtalk callback failed` could not do its pass.
#[derive(Debug, thiserror::Error)]
pub enum OnceError {
    #[error(
        "apps.dingtalk.{0}.app_key: must be set (with app_secret) to read DingTalk's failed pushes"
    )]
    NoCredentials(String),
    #[error("the bus is not ready after {0:?} (is it running and reachable?)")]
    BusNotReady(Duration),
    #[error("starting the bus: {0}")]
    Bus(String),
    #[error("cannot build an HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Pass(#[from] PassError),
}

/// How long a one-off pass waits for the bus.
const BUS_WAIT: Duration = Duration::from_secs(15);

/// One pass by hand, without a daemon and without a lease (`imbridge dingtalk callback failed`):
/// connects to the configured bus as a publisher only (no consumer is joined) and publishes
/// what DingTalk lists for `app`, as the daemon's poller would.
pub async fn once(
    app: &str,
    oapi: Option<&DingTalkOapi>,
    bus_settings: &crate::bus::BusSettings,
    subjects: &super::subject::Subjects,
) -> Result<Pass, OnceError> {
    let oapi = oapi.ok_or_else(|| OnceError::NoCredentials(app.to_owned()))?;
    let client = OapiClient::new(oapi.clone(), CALL_TIMEOUT)
        .map_err(|e| OnceError::Client(e.to_string()))?;
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    let supervisor = Supervisor::new(metrics.clone());
    let prefix = &bus_settings.subject_prefix;
    // The inbound subjects only: the notify pipeline's consumers are the daemon's, and a
    // one-off command joining their groups would take work from it.
    let layout = crate::bus::Layout {
        inbound: super::inbound_subjects(prefix),
        ..Default::default()
    };
    let bus = Bus::start(
        bus_settings,
        &layout,
        metrics.clone(),
        &supervisor,
        shutdown.clone(),
    )
    .await
    .map_err(|e| OnceError::Bus(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + BUS_WAIT;
    while !bus.is_ready() {
        if tokio::time::Instant::now() > deadline {
            shutdown.trigger();
            return Err(OnceError::BusNotReady(BUS_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = Recovery {
        app,
        client: &client,
        tokens: Tokens::Own,
        inbound: Inbound {
            bus: &bus,
            subject_prefix: prefix,
            subjects,
        },
        metrics: &metrics,
        shutdown: &shutdown,
    };
    let pass = recovery.pass(None).await;
    shutdown.trigger();
    bus.close().await;
    Ok(pass?)
}

/// Starts, for each app with `recover_failed`, its poller with its lease, supervised: a poller
/// restarted after a panic takes the lease it left behind.
pub fn spawn(
    apps: &std::collections::BTreeMap<String, DingTalkOapi>,
    state: &Arc<super::State>,
    bus: &Bus,
    supervisor: &Supervisor,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (app, oapi) in apps {
        let Some(every) = oapi.recover_failed else {
            continue;
        };
        let lease = Lease::new(
            bus,
            &lease_name(app),
            lease_ttl(every),
            supervisor,
            shutdown,
        );
        let lease = Arc::new(tokio::sync::Mutex::new(lease));
        let (app, oapi, state, stop) = (app.clone(), oapi.clone(), state.clone(), shutdown.clone());
        tasks.push(supervisor.spawn(
            format!("dingtalk_recover:{app}"),
            shutdown.clone(),
            move || {
                let (app, oapi, state, stop, lease) = (
                    app.clone(),
                    oapi.clone(),
                    state.clone(),
                    stop.clone(),
                    lease.clone(),
                );
                async move {
                    let mut lease = lease.lock().await;
                    run(app, oapi, state, &mut lease, stop).await;
                }
            },
        ));
    }
    tasks
}

/// The app's poller: every `every`, while this replica holds the lease, one pass.
pub async fn run(
    app: String,
    oapi: DingTalkOapi,
    state: Arc<super::State>,
    lease: &mut Lease,
    shutdown: Shutdown,
) {
    let Some(every) = oapi.recover_failed else {
        return;
    };
    let client = match OapiClient::new(oapi, CALL_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(platform = PLATFORM, app, error = %e, "cannot build the DingTalk API client; failed pushes are not recovered");
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        if !lease.hold().await {
            state.metrics.recover_poll(&app, "not_holder");
            continue;
        }
        // Taken again for every pass: the app's credentials (through the gateway's tokens)
        // and business subjects follow a reload. Its API bases and proxy are the start's.
        let current = state.current();
        let recovery = Recovery {
            app: &app,
            client: &client,
            tokens: Tokens::Shared(&current.gateway),
            inbound: Inbound {
                bus: &state.bus,
                subject_prefix: &state.subject_prefix,
                subjects: &current.subjects,
            },
            metrics: &state.metrics,
            shutdown: &shutdown,
        };
        match recovery.pass(Some(lease)).await {
            Ok(pass) => {
                state.metrics.recover_poll(&app, "ok");
                if !pass.published.is_empty() || pass.unreadable > 0 {
                    tracing::info!(
                        platform = PLATFORM,
                        app,
                        pages = pass.pages,
                        published = pass.published.len(),
                        unreadable = pass.unreadable,
                        "recovered failed pushes"
                    );
                }
            }
            Err(PassError::Oapi(e)) => {
                state.metrics.recover_poll(&app, "error");
                state.metrics.recover_error(&app, error_label(&e));
                tracing::warn!(platform = PLATFORM, app, error = %e, "polling DingTalk's failed pushes failed; trying again next time");
            }
        }
    }
    lease.release().await;
}

/// A token fetch the shared cache failed, as the one-off client would have reported it.
fn token_error(answer: crate::platform::outbound::Answer) -> OapiError {
    let call = crate::platform::dingtalk::oapi::call::GETTOKEN;
    match (answer.code, answer.status) {
        (Some(errcode), _) => OapiError::Refused {
            call,
            errcode,
            errmsg: answer.detail,
        },
        (None, 0) => OapiError::Transport {
            call,
            detail: answer.detail,
        },
        (None, status) => OapiError::Status {
            call,
            status,
            detail: answer.detail,
        },
    }
}

fn error_label(e: &OapiError) -> &'static str {
    match e {
        OapiError::Refused { .. } if e.is_token_rejected() => "token_rejected",
        OapiError::Refused { .. } => "refused",
        OapiError::Transport { .. } => "transport",
        OapiError::Status { .. } => "status",
        OapiError::Unexpected { .. } => "unexpected",
    }
}
