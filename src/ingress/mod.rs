//! The HTTP side: warp filters (routes), handlers, and one place where every error becomes a
//! short JSON `{code, message}`. Three listeners: the public one takes platform callbacks and
//! nothing else; the internal one serves internal systems, each a `[clients.<name>]` with a
//! token ([`clients`]); the admin one (separate, so it can stay private) metrics and probes.

pub mod admin;
pub mod api;
pub mod api_nats;
pub mod clients;
pub mod dingtalk;
pub mod dlq;
pub mod events;
pub mod idempotency;
pub mod lark;
pub mod notify;
pub mod oapi;
pub mod probe;
pub mod recover;
pub mod registration;
pub mod replay;
pub mod reply;
pub mod status;
pub mod stream;
pub mod subject;
pub mod wecom;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use warp::{Buf, Filter, Rejection, Reply};

use crate::bus::{self, Bus, CloudEvent, Message};
use crate::metrics::{Metrics, UNKNOWN_APP};
use crate::notify::gateway::Gateway;
use crate::notify::notifier::Notifier;
use crate::platform::dingtalk::callback::DingTalkApp;
use crate::platform::lark::callback::LarkApp;
use crate::platform::wecom::callback::WeComApp;
use crate::server::Refusals;
use clients::Clients;
use reply::ApiError;

/// What the handlers share.
pub struct State {
    /// Apps, clients, business subjects and the API gateway, as the latest (re)load configured
    /// them; a request takes them once and keeps them to its end.
    pub current: tokio::sync::watch::Sender<Arc<Current>>,
    pub bus: Arc<Bus>,
    pub metrics: Metrics,
    pub replay_window: Option<Duration>,
    /// The requests published within the replay window; `None` when the window is off.
    pub replay: Option<replay::Seen>,
    pub subject_prefix: String,
    pub notifier: Arc<Notifier>,
    /// `Idempotency-Key`s of `POST /notify`, with their bodies' digests.
    pub idempotency: idempotency::IdempotencyKeys,
    /// Refused requests, summed up in the log.
    pub refusals: Refusals,
    /// The open `GET /events` streams, per client.
    pub events: events::Streams,
    /// Ends the `GET /events` streams, which would otherwise hold the drain up.
    pub shutdown: crate::shutdown::Shutdown,
}

/// What a reload replaces on the ingress side.
pub struct Current {
    pub dingtalk: BTreeMap<String, DingTalkApp>,
    pub wecom: BTreeMap<String, WeComApp>,
    pub lark: BTreeMap<String, LarkApp>,
    /// Business tokens appended to inbound subjects, per app.
    pub subjects: subject::Subjects,
    /// Who may use the internal listener.
    pub clients: Clients,
    /// The platform API gateway (`/api/<platform>/<app>/…`, NATS `api.<platform>.<app>`).
    pub gateway: Arc<Gateway>,
}

impl State {
    pub fn current(&self) -> Arc<Current> {
        self.current.borrow().clone()
    }
}

/// How much of a request body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub max_bytes: u64,
    /// From the headers' arrival to the body's last byte.
    pub timeout: Duration,
}

/// The public listener: platform callbacks only, with the rejection handler applied.
pub fn routes(
    state: Arc<State>,
    limit: BodyLimit,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let dingtalk = warp::path!("callbacks" / "dingtalk" / String)
        .and(warp::post())
        .and(query())
        .and(body(limit))
        .and(with(state.clone()))
        .then(dingtalk::callback);
    let wecom_verify = warp::path!("callbacks" / "wecom" / String)
        .and(warp::get())
        .and(query())
        .and(with(state.clone()))
        .then(wecom::verify);
    let wecom = warp::path!("callbacks" / "wecom" / String)
        .and(warp::post())
        .and(query())
        .and(body(limit))
        .and(with(state.clone()))
        .then(wecom::callback);
    let lark = warp::path!("callbacks" / "lark" / String)
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(body(limit))
        .and(with(state.clone()))
        .then(lark::callback);
    dingtalk
        .or(wecom_verify)
        .or(wecom)
        .or(lark)
        .recover(reply::recover)
}

/// The internal listener: `POST /notify/<target>`, `/api/<platform>/<app>/…` and
/// `GET /events` for the configured clients. API bodies have their own cap (`api.max_request_bytes`), under the
/// same timeout.
pub fn internal_routes(
    state: Arc<State>,
    limit: BodyLimit,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let api_limit = BodyLimit {
        max_bytes: state.current().gateway.settings().max_request_bytes,
        ..limit
    };
    let notify = warp::path!("notify" / String)
        .and(warp::post())
        .and(query())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(pending_body(limit))
        .and(with(state.clone()))
        .then(notify::post);
    let api = warp::path("api")
        .and(warp::method())
        .and(warp::path::full())
        .and(query())
        .and(warp::header::headers_cloned())
        .and(pending_body(api_limit))
        .and(with(state.clone()))
        .then(api::call);
    let events = warp::path!("events")
        .and(warp::get())
        .and(query())
        .and(warp::header::optional::<String>("authorization"))
        .and(with(state.clone()))
        .then(events::get);
    notify
        .or(api)
        .or(events)
        .or(dlq_routes(state))
        .recover(reply::recover)
}

/// `/dlq/<target>…`: the in-process bus's dead letters (see [`dlq`]).
fn dlq_routes(
    state: Arc<State>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let auth = || warp::header::optional::<String>("authorization");
    let list = warp::path!("dlq" / String)
        .and(warp::get())
        .and(query())
        .and(auth())
        .and(with(state.clone()))
        .then(dlq::list);
    let replay = warp::path!("dlq" / String / String / "replay")
        .and(warp::post())
        .and(auth())
        .and(with(state.clone()))
        .then(dlq::replay);
    let delete = warp::path!("dlq" / String / String)
        .and(warp::delete())
        .and(auth())
        .and(with(state))
        .then(dlq::delete);
    list.or(replay).unify().or(delete).unify()
}

fn with<T: Clone + Send>(value: T) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || value.clone())
}

/// The raw query string ("" when there is none); the handler parses it, so that a malformed
/// one is refused and counted like any other bad input.
fn query() -> impl Filter<Extract = (String,), Error = Infallible> + Copy {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Parses a query string into a map; the first value of a repeated key wins.
pub fn parse_query(raw: &str) -> Result<HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_query", "query string could not be parsed"))?;
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        map.entry(k).or_insert(v);
    }
    Ok(map)
}

/// The request body, or a 413 refusal past the limit's bytes whether or not the client
/// announced its length (chunked bodies are counted as they arrive), or a 408 refusal when it
/// has not all arrived within the limit's timeout (a client trickling its body would otherwise
/// hold a connection and a handler for as long as it likes). A refusal is a value, not a
/// rejection, so the handler counts it under its platform and app.
fn body(
    limit: BodyLimit,
) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = Rejection> + Clone {
    pending_body(limit).then(PendingBody::read)
}

/// The request body, not read yet: the internal listener reads it only once the client's token
/// checked out, so a stranger cannot make it wait for and buffer a body.
fn pending_body(
    limit: BodyLimit,
) -> impl Filter<Extract = (PendingBody,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .map(move |length: Option<u64>, stream| {
            let stream = futures::StreamExt::boxed(TryStreamExt::map_ok(stream, into_bytes));
            PendingBody {
                length,
                stream,
                limit,
            }
        })
}

/// A chunk as `Bytes`: a no-copy move when it already is one, as hyper's are.
fn into_bytes(mut chunk: impl Buf) -> Bytes {
    chunk.copy_to_bytes(chunk.remaining())
}

/// Most bytes reserved for a body before it arrives: callbacks are a few KiB.
const INITIAL_BODY_BUFFER: usize = 16 * 1024;

/// A request body still on the wire, with the limits it is read under.
pub struct PendingBody {
    length: Option<u64>,
    stream: futures::stream::BoxStream<'static, Result<Bytes, warp::Error>>,
    limit: BodyLimit,
}

impl PendingBody {
    /// Reads it whole under the limit: 413 past its bytes, 408 past its timeout.
    pub async fn read(self) -> Result<Bytes, ApiError> {
        let timeout = self.limit.timeout;
        tokio::time::timeout(timeout, self.read_whole())
            .await
            .unwrap_or_else(|_| Err(ApiError::body_timeout(timeout)))
    }

    async fn read_whole(mut self) -> Result<Bytes, ApiError> {
        let max = self.limit.max_bytes;
        if self.length.is_some_and(|l| l > max) {
            return Err(ApiError::too_large(max));
        }
        // Copied out of hyper's chunks, never kept as one: a chunk is a slice of the
        // connection's 8 KiB read buffer, and a body kept for long (a notification queued on
        // the in-process bus) would hold all of it. Sized by the announced length so the copy
        // is made once, but only up to what a callback needs: a stranger announcing the limit
        // and sending nothing must not get that much reserved for the body timeout.
        let reserve = self.length.unwrap_or(0).min(INITIAL_BODY_BUFFER as u64) as usize;
        let mut buf = BytesMut::with_capacity(reserve);
        while let Some(chunk) =
            self.stream.try_next().await.map_err(|_| {
                ApiError::bad_request("body_read", "could not read the request body")
            })?
        {
            if (buf.len() + chunk.len()) as u64 > max {
                return Err(ApiError::too_large(max));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// What a callback that was answered with success amounted to: the metric outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Published,
    Duplicate,
    /// An exact repeat of a request already published within the replay window: answered as
    /// a success again, not published.
    Replay,
    /// A platform handshake (DingTalk check_url, WeCom URL verification, Lark challenge):
    /// answered, never published.
    Handshake(&'static str),
}

impl Outcome {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Duplicate => "duplicate",
            Outcome::Replay => "replay",
            Outcome::Handshake(label) => label,
        }
    }
}

/// Runs one platform callback's handler and does what every callback shares: the in-flight
/// gauge, the outcome counter (unconfigured app names share one label, so arbitrary paths
/// cannot create series), the duration histogram and the log line of a refusal.
///
/// The handler comes boxed. An async fn keeps its arguments for the whole call, beside the
/// future it awaits, so an inline handler would be held twice by every callback waiting for
/// its publish, and the listener's boxed filter future, as large as its largest state over
/// every route, with it: 6.6 KiB per callback before, 3.5 KiB now (heaptrack,
/// bench/ANALYSIS.md, "Memory").
pub async fn serve_callback(
    state: &State,
    platform: &'static str,
    app: &str,
    known: bool,
    handler: futures::future::BoxFuture<'_, Result<(Outcome, warp::reply::Response), ApiError>>,
) -> warp::reply::Response {
    let started = std::time::Instant::now();
    let result = {
        let _in_flight = InFlight::start(&state.metrics.requests_in_flight);
        handler.await
    };
    let app_label = if known { app } else { UNKNOWN_APP };
    let response = match result {
        Ok((outcome, response)) => {
            state.metrics.callback(platform, app_label, outcome.label());
            response
        }
        Err(err) => {
            state.metrics.callback(platform, app_label, err.code);
            if err.status.is_server_error() {
                tracing::warn!(platform, app = app_label, code = err.code, message = %err.message, "callback not accepted; the platform will retry");
            } else {
                // Anyone can send bad callbacks: one debug line each, summed up at info.
                tracing::debug!(platform, app = app_label, code = err.code, message = %err.message, "callback refused");
                state.refusals.record("public", err.code);
            }
            err.into_response()
        }
    };
    state.metrics.callback_took(platform, started.elapsed());
    response
}

/// The 404 of a callback for an app nobody configured.
pub fn unknown_app(platform: &str) -> ApiError {
    ApiError::new(
        warp::http::StatusCode::NOT_FOUND,
        "unknown_app",
        format!("no {platform} app of that name is configured"),
    )
}

/// The subjects of every platform's events (`dingtalk.>`, …), prefixed: what the inbound
/// stream holds.
pub fn inbound_subjects(prefix: &str) -> Vec<String> {
    crate::platform::Platform::ALL
        .iter()
        .map(|p| bus::with_prefix(prefix, &format!("{}.>", p.as_str())))
        .collect()
}

/// One verified event, ready for the bus.
pub struct Event {
    pub platform: &'static str,
    pub app: String,
    /// The platform's event type, before sanitising.
    pub event_type: String,
    /// The CloudEvents id: stable across the platform's retries.
    pub id: String,
    pub tenant: Option<String>,
    pub payload: Bytes,
    /// Fetched from the platform's list of what it failed to push, not pushed: carried as
    /// `imbridge-recovered: true`.
    pub recovered: bool,
}

/// Publishes to `<platform>.<event_type>` (then the app's business tokens, if it has any) with
/// the CloudEvents headers and waits for the bus; a bus that cannot take it means 503, so the
/// platform retries. `ce-type` stays `<platform>.<event_type>` whatever the tokens.
pub async fn publish(state: &State, event: Event) -> Result<Outcome, ApiError> {
    let current = state.current();
    let inbound = Inbound {
        bus: &state.bus,
        subject_prefix: &state.subject_prefix,
        subjects: &current.subjects,
    };
    inbound.publish(event).await
}

/// What publishing an inbound event needs: the bus, the subject prefix and the apps'
/// business tokens (the daemon's [`State`] has them; a one-off command builds its own).
pub struct Inbound<'a> {
    pub bus: &'a Bus,
    pub subject_prefix: &'a str,
    pub subjects: &'a subject::Subjects,
}

impl Inbound<'_> {
    /// [`publish`].
    pub async fn publish(&self, event: Event) -> Result<Outcome, ApiError> {
        let ty = format!(
            "{}.{}",
            event.platform,
            bus::sanitize_event_type(&event.event_type)
        );
        let tokens = self.subjects.tokens(
            event.platform,
            &event.app,
            &event.event_type,
            &event.payload,
        );
        let subject = std::iter::once(ty.as_str())
            .chain(tokens.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(".");
        let cloud_event = CloudEvent {
            id: event.id,
            source: format!("{}/{}", event.platform, event.app),
            ty,
            time: std::time::SystemTime::now(),
            content_type: "application/json",
            app: event.app,
            tenant: event.tenant,
        };
        let (msg, ack) = store_on(
            self.bus,
            self.subject_prefix,
            &subject,
            &cloud_event,
            event.payload,
            event.recovered,
            "event",
        )
        .await?;
        tracing::debug!(platform = event.platform, app = %cloud_event.app, subject = %msg.subject, id = %msg.id, duplicate = ack.duplicate, "published");
        Ok(if ack.duplicate {
            Outcome::Duplicate
        } else {
            Outcome::Published
        })
    }
}

/// Publishes `event` (its type is the subject, prefixed) and waits for the bus to have it; 503
/// when it cannot, so the sender tries again. `what` names it in the refusal.
pub async fn store(
    state: &State,
    event: &CloudEvent,
    payload: Bytes,
    what: &str,
) -> Result<(Message, bus::Ack), ApiError> {
    let (bus, prefix) = (&state.bus, state.subject_prefix.as_str());
    store_on(bus, prefix, &event.ty, event, payload, false, what).await
}

/// [`store`] on `subject` (prefixed here) rather than the event's type.
async fn store_on(
    bus: &Bus,
    subject_prefix: &str,
    subject: &str,
    event: &CloudEvent,
    payload: Bytes,
    recovered: bool,
    what: &str,
) -> Result<(Message, bus::Ack), ApiError> {
    let subject = bus::with_prefix(subject_prefix, subject);
    let mut msg = Message::event(subject, event, payload);
    if recovered {
        msg.headers
            .push((bus::HEADER_RECOVERED.to_owned(), "true".to_owned()));
    }
    match bus.publish(&msg).await {
        Ok(ack) => Ok((msg, ack)),
        // The bus client's own words stay in the log: the sender learns the class only.
        Err(e) => {
            tracing::debug!(subject = %msg.subject, error = %e, "publish failed");
            Err(ApiError::new(
                warp::http::StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                format!("{what} not stored ({}), retry later", e.label()),
            ))
        }
    }
}

/// Counts a request in flight until dropped, even when the client goes away mid-request.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn start(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
