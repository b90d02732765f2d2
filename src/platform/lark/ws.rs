//! Lark / Feishu long connection, the wire alone (STREAMS.md §B): the endpoint call's request
//! and answer, the handshake's refusal headers, the `pbbp2.Frame` protobuf, pings and the
//! answer to a data frame, live `ClientConfig` updates, and the reassembly of fragmented
//! payloads, bounded in count, size and time. No I/O: the connection lives in the ingress.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message as _;
use serde::Deserialize;

/// `pbbp2.Frame` (proto2), the schema every Lark SDK compiles:
///
/// ```proto
/// message Header { required string key = 1; required string value = 2; }
/// message Frame {
///   required uint64 SeqID = 1;   required uint64 LogID = 2;
///   required int32 service = 3;  required int32 method = 4;
///   repeated Header headers = 5;
///   optional string payload_encoding = 6;  optional string payload_type = 7;
///   optional bytes payload = 8;            optional string LogIDNew = 9;
/// }
/// ```
///
/// `required` matters: the four numbers are written even when zero (a ping's SeqID and
/// LogID are), as proto2 does and the server expects.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(uint64, required, tag = "1")]
    pub seq_id: u64,
    #[prost(uint64, required, tag = "2")]
    pub log_id: u64,
    #[prost(int32, required, tag = "3")]
    pub service: i32,
    #[prost(int32, required, tag = "4")]
    pub method: i32,
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<Header>,
    #[prost(string, optional, tag = "6")]
    pub payload_encoding: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub payload_type: Option<String>,
    #[prost(bytes = "vec", optional, tag = "8")]
    pub payload: Option<Vec<u8>>,
    #[prost(string, optional, tag = "9")]
    pub log_id_new: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, required, tag = "2")]
    pub value: String,
}

/// `method`: control frames (ping, pong) and data frames (event, card).
pub const METHOD_CONTROL: i32 = 0;
pub const METHOD_DATA: i32 = 1;

/// The largest frame read: events are small JSON documents, split into fragments when large.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// What a frame is, by its method and `type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Ping,
    Pong,
    Event,
    /// Card actions: the SDKs neither handle nor answer them (STREAMS.md §B.4).
    Card,
    Other,
}

impl FrameKind {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            FrameKind::Ping => "ping",
            FrameKind::Pong => "pong",
            FrameKind::Event => "event",
            FrameKind::Card => "card",
            FrameKind::Other => "other",
        }
    }
}

impl Frame {
    pub fn decode_bytes(bytes: &[u8]) -> Result<Frame, prost::DecodeError> {
        Frame::decode(bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_str())
    }

    pub fn kind(&self) -> FrameKind {
        match (self.method, self.header("type")) {
            (METHOD_CONTROL, Some("ping")) => FrameKind::Ping,
            (METHOD_CONTROL, Some("pong")) => FrameKind::Pong,
            (METHOD_DATA, Some("event")) => FrameKind::Event,
            (METHOD_DATA, Some("card")) => FrameKind::Card,
            _ => FrameKind::Other,
        }
    }

    /// The client's ping: SeqID and LogID 0, the connection's `service_id`, one header.
    pub fn ping(service_id: i32) -> Frame {
        Frame {
            seq_id: 0,
            log_id: 0,
            service: service_id,
            method: METHOD_CONTROL,
            headers: vec![Header {
                key: "type".to_owned(),
                value: "ping".to_owned(),
            }],
            ..Frame::default()
        }
    }

    /// The answer to a data frame: the frame itself (for a fragmented message, the fragment
    /// that completed it), its headers plus `biz_rt`, and `{"code":200}` once the bus has
    /// the event, `{"code":500}` so Lark pushes it again when it has not.
    pub fn answer(&self, stored: bool, took: Duration) -> Frame {
        let mut headers: Vec<Header> = self
            .headers
            .iter()
            .filter(|h| h.key != "biz_rt")
            .cloned()
            .collect();
        headers.push(Header {
            key: "biz_rt".to_owned(),
            value: took.as_millis().to_string(),
        });
        let payload: &[u8] = if stored {
            br#"{"code":200}"#
        } else {
            br#"{"code":500}"#
        };
        Frame {
            headers,
            payload: Some(payload.to_vec()),
            ..self.clone()
        }
    }
}

/// The body of `POST {domain}/callback/ws/endpoint`, capitalised as the gateway wants it.
pub fn endpoint_request(app_id: &str, app_secret: &str) -> serde_json::Value {
    serde_json::json!({ "AppID": app_id, "AppSecret": app_secret })
}

/// The connection's parameters, in seconds as Lark sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// −1: forever.
    pub reconnect_count: i64,
    pub reconnect_interval: u64,
    pub reconnect_nonce: u64,
    pub ping_interval: u64,
}

impl Default for ClientConfig {
    /// The SDKs' defaults, used when the endpoint sends none.
    fn default() -> Self {
        ClientConfig {
            reconnect_count: -1,
            reconnect_interval: 120,
            reconnect_nonce: 30,
            ping_interval: 120,
        }
    }
}

/// A `ClientConfig` as sent: any key may be missing.
#[derive(Debug, Default, Deserialize)]
struct PartialConfig {
    #[serde(rename = "ReconnectCount")]
    reconnect_count: Option<i64>,
    #[serde(rename = "ReconnectInterval")]
    reconnect_interval: Option<u64>,
    #[serde(rename = "ReconnectNonce")]
    reconnect_nonce: Option<u64>,
    #[serde(rename = "PingInterval")]
    ping_interval: Option<u64>,
}

/// Ping periods and reconnect waits are kept within these, whatever a gateway sends: a 0
/// would spin, a day would never notice a dead connection.
const MIN_SECONDS: u64 = 1;
const MAX_SECONDS: u64 = 3600;

impl ClientConfig {
    /// Applies the keys `json` holds and only those (the SDKs overwrite all four, and a pong
    /// holding one key leaves them without reconnect settings); `false` when it is no
    /// config object.
    pub fn apply(&mut self, json: &[u8]) -> bool {
        let Ok(p) = serde_json::from_slice::<PartialConfig>(json) else {
            return false;
        };
        let clamp = |s: u64| s.clamp(MIN_SECONDS, MAX_SECONDS);
        if let Some(n) = p.reconnect_count {
            self.reconnect_count = n;
        }
        if let Some(s) = p.reconnect_interval {
            self.reconnect_interval = clamp(s);
        }
        if let Some(s) = p.reconnect_nonce {
            // A nonce of 0 is meaningful: reconnect at once.
            self.reconnect_nonce = s.min(MAX_SECONDS);
        }
        if let Some(s) = p.ping_interval {
            self.ping_interval = clamp(s);
        }
        true
    }

    pub fn ping_every(&self) -> Duration {
        Duration::from_secs(self.ping_interval)
    }
}

/// The endpoint call's answer, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Connect {
        url: String,
        config: ClientConfig,
    },
    /// Lark is busy or failed: try again later.
    Retry(String),
    /// The app's credentials or settings are wrong: retrying will not help (the SDKs stop;
    /// the daemon keeps trying, slowly, and says so on `/readyz`).
    Refused(String),
}

#[derive(Deserialize)]
struct EndpointAnswer {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    data: Option<EndpointData>,
}

#[derive(Deserialize)]
struct EndpointData {
    #[serde(rename = "URL", default)]
    url: Option<String>,
    #[serde(rename = "ClientConfig", default)]
    client_config: Option<serde_json::Value>,
}

/// Codes Lark calls its own failures (STREAMS.md §B.1): retried. Any other non-zero code is
/// the client's.
const SERVER_CODES: [i64; 2] = [1, 1_000_040_343];

/// Reads the endpoint call's answer: HTTP status and body.
pub fn endpoint(status: u16, body: &[u8]) -> Endpoint {
    let answer = serde_json::from_slice::<EndpointAnswer>(body).ok();
    let msg = answer
        .as_ref()
        .and_then(|a| a.msg.clone())
        .unwrap_or_default();
    if status != 200 {
        return Endpoint::Retry(format!("HTTP {status} {msg}").trim().to_owned());
    }
    let Some(answer) = answer else {
        return Endpoint::Retry("the answer is not JSON".to_owned());
    };
    match answer.code {
        Some(0) => {}
        Some(code) if SERVER_CODES.contains(&code) => {
            return Endpoint::Retry(format!("code {code}: {msg}"))
        }
        Some(code) => return Endpoint::Refused(format!("code {code}: {msg}")),
        None => return Endpoint::Retry("the answer has no code".to_owned()),
    }
    let data = answer.data;
    let url = data
        .as_ref()
        .and_then(|d| d.url.clone())
        .unwrap_or_default();
    if url.is_empty() {
        return Endpoint::Retry("the answer has no URL".to_owned());
    }
    let mut config = ClientConfig::default();
    if let Some(c) = data.and_then(|d| d.client_config) {
        config.apply(c.to_string().as_bytes());
    }
    Endpoint::Connect { url, config }
}

/// A refused WebSocket handshake, by its `handshake-*` headers (STREAMS.md §B.2): `true` when
/// it is the client's fault (auth failed with too many connections, or the app is banned).
pub fn handshake_refused_by_client(status: Option<&str>, auth_code: Option<&str>) -> bool {
    match status.map(str::trim) {
        Some("514") => auth_code.map(str::trim) == Some("1000040350"),
        Some("403") => true,
        _ => false,
    }
}

/// The connection's `service_id` (put into every ping) and `device_id` (for logs) from its
/// URL's query.
pub fn connection_ids(url: &str) -> (i32, Option<String>) {
    let Some((_, query)) = url.split_once('?') else {
        return (0, None);
    };
    let mut service = 0;
    let mut device = None;
    for (k, v) in url_pairs(query) {
        match k.as_str() {
            "service_id" => service = v.parse().unwrap_or(0),
            "device_id" => device = Some(v),
            _ => {}
        }
    }
    (service, device)
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    let query = query.split('#').next().unwrap_or_default();
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

/// Why a fragment was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentError {
    /// `sum`, `seq` or `message_id` missing or out of range.
    Malformed,
    /// The message would exceed [`Fragments`]' size bound.
    TooLarge,
}

/// Fragmented payloads waiting for their other parts, keyed by `message_id`: each set is
/// dropped when its latest part is older than the deadline, the oldest set is dropped when
/// too many are open, and a message may not grow past a size bound. A gateway (or anyone on
/// the path) sending parts that never complete costs a bounded, short-lived amount.
pub struct Fragments {
    sets: HashMap<String, Set>,
    deadline: Duration,
    max_sets: usize,
    max_bytes: usize,
    /// Sets dropped (expired or evicted) since the last [`Fragments::take_dropped`].
    dropped: u64,
}

struct Set {
    parts: Vec<Option<Vec<u8>>>,
    bytes: usize,
    latest: Instant,
}

/// Most fragments one message may have.
const MAX_PARTS: usize = 64;

impl Fragments {
    pub fn new(deadline: Duration, max_sets: usize, max_bytes: usize) -> Fragments {
        Fragments {
            sets: HashMap::new(),
            deadline,
            max_sets: max_sets.max(1),
            max_bytes,
            dropped: 0,
        }
    }

    /// Takes one data frame's payload: the whole payload when the frame completes its
    /// message (at once when unsplit), `None` while parts are missing.
    pub fn add(&mut self, frame: &Frame, now: Instant) -> Result<Option<Vec<u8>>, FragmentError> {
        self.expire(now);
        let payload = frame.payload.as_deref().unwrap_or_default();
        let sum: usize = match frame.header("sum") {
            None => 1,
            Some(s) => s.trim().parse().map_err(|_| FragmentError::Malformed)?,
        };
        if sum == 0 || sum > MAX_PARTS {
            return Err(FragmentError::Malformed);
        }
        if payload.len() > self.max_bytes {
            return Err(FragmentError::TooLarge);
        }
        if sum == 1 {
            return Ok(Some(payload.to_vec()));
        }
        let seq: usize = frame
            .header("seq")
            .and_then(|s| s.trim().parse().ok())
            .ok_or(FragmentError::Malformed)?;
        let id = frame
            .header("message_id")
            .filter(|id| !id.is_empty())
            .ok_or(FragmentError::Malformed)?;
        if seq >= sum {
            return Err(FragmentError::Malformed);
        }
        if !self.sets.contains_key(id) && self.sets.len() >= self.max_sets {
            self.evict_oldest();
        }
        let set = self.sets.entry(id.to_owned()).or_insert_with(|| Set {
            parts: vec![None; sum],
            bytes: 0,
            latest: now,
        });
        if set.parts.len() != sum {
            // The parts disagree on how many there are: the set cannot be trusted.
            self.sets.remove(id);
            self.dropped += 1;
            return Err(FragmentError::Malformed);
        }
        let before = set.parts[seq].as_ref().map_or(0, Vec::len);
        if set.bytes - before + payload.len() > self.max_bytes {
            self.sets.remove(id);
            self.dropped += 1;
            return Err(FragmentError::TooLarge);
        }
        set.bytes = set.bytes - before + payload.len();
        set.parts[seq] = Some(payload.to_vec());
        set.latest = now;
        if set.parts.iter().any(Option::is_none) {
            return Ok(None);
        }
        let set = self.sets.remove(id).expect("present");
        Ok(Some(set.parts.into_iter().flatten().flatten().collect()))
    }

    /// Drops the sets whose latest part is older than the deadline.
    pub fn expire(&mut self, now: Instant) {
        let deadline = self.deadline;
        let before = self.sets.len();
        self.sets
            .retain(|_, s| now.saturating_duration_since(s.latest) < deadline);
        self.dropped += (before - self.sets.len()) as u64;
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .sets
            .iter()
            .min_by_key(|(_, s)| s.latest)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.sets.remove(&id);
            self.dropped += 1;
        }
    }

    /// Open sets.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Sets dropped since the last call, for a metric.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn data(id: &str, sum: usize, seq: usize, payload: &[u8]) -> Frame {
        let h = |k: &str, v: &str| Header {
            key: k.to_owned(),
            value: v.to_owned(),
        };
        Frame {
            seq_id: seq as u64,
            log_id: 8,
            service: 1234,
            method: METHOD_DATA,
            headers: vec![
                h("type", "event"),
                h("message_id", id),
                h("sum", &sum.to_string()),
                h("seq", &seq.to_string()),
            ],
            payload: Some(payload.to_vec()),
            ..Frame::default()
        }
    }

    #[test]
    fn frames_match_the_verified_vectors() {
        // shared/vectors/platform-vectors.json, lark.L6_ws_frames.
        let ping = "0800100018d20920002a0c0a0474797065120470696e67";
        assert_eq!(hex(&Frame::ping(1234).to_bytes()), ping);
        let example = "0807100818d20920012a0d0a047479706512056576656e742a100a0a6d6573736167655f696412026d312a080a0373756d1201312a080a037365711201302a0e0a0874726163655f696412027431420c7b22636f6465223a3230307d";
        let f = Frame::decode_bytes(&unhex(example)).unwrap();
        assert_eq!((f.seq_id, f.log_id, f.service, f.method), (7, 8, 1234, 1));
        assert_eq!(f.kind(), FrameKind::Event);
        assert_eq!(f.header("message_id"), Some("m1"));
        assert_eq!(f.header("trace_id"), Some("t1"));
        assert_eq!(f.payload.as_deref(), Some(&br#"{"code":200}"#[..]));
        assert_eq!(hex(&f.to_bytes()), example);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&b"\xff\xff\xff"[..], b"\x08", b"hello world"] {
            assert!(Frame::decode_bytes(bad).is_err(), "{bad:?}");
        }
        // prost does not enforce proto2's `required` when decoding: an empty message is a
        // frame of zeros, which is of no kind and is skipped as such.
        let empty = Frame::decode_bytes(b"").unwrap();
        assert_eq!(empty.kind(), FrameKind::Other);
    }

    #[test]
    fn answers_repeat_the_frame_with_biz_rt_and_the_code() {
        let f = data("m1", 1, 0, b"{}");
        let a = f.answer(true, Duration::from_millis(12));
        assert_eq!((a.seq_id, a.log_id, a.service, a.method), (0, 8, 1234, 1));
        assert_eq!(a.header("message_id"), Some("m1"));
        assert_eq!(a.header("biz_rt"), Some("12"));
        assert_eq!(a.payload.as_deref(), Some(&br#"{"code":200}"#[..]));
        let failed = f.answer(false, Duration::ZERO);
        assert_eq!(failed.payload.as_deref(), Some(&br#"{"code":500}"#[..]));
    }

    #[test]
    fn a_pong_applies_only_the_keys_it_holds() {
        let mut c = ClientConfig::default();
        assert!(c.apply(br#"{"PingInterval":5}"#));
        assert_eq!(c.ping_interval, 5);
        assert_eq!(c.reconnect_interval, 120);
        assert_eq!(c.reconnect_count, -1);
        assert!(c.apply(br#"{"ReconnectCount":3,"ReconnectInterval":0,"ReconnectNonce":0}"#));
        assert_eq!(
            (c.reconnect_count, c.reconnect_interval, c.reconnect_nonce),
            (3, 1, 0)
        );
        assert!(!c.apply(b"not json"));
        assert_eq!(c.ping_interval, 5);
    }

    #[test]
    fn endpoint_answers_are_classified() {
        let ok = br#"{"code":0,"msg":"ok","data":{"URL":"wss://x/ws?device_id=d1&service_id=77","ClientConfig":{"PingInterval":30}}}"#;
        let Endpoint::Connect { url, config } = endpoint(200, ok) else {
            panic!("not a connect");
        };
        assert_eq!(config.ping_interval, 30);
        assert_eq!(config.reconnect_nonce, 30);
        assert_eq!(connection_ids(&url), (77, Some("d1".to_owned())));
        assert!(matches!(
            endpoint(200, br#"{"code":1,"msg":"busy"}"#),
            Endpoint::Retry(_)
        ));
        assert!(matches!(
            endpoint(200, br#"{"code":1000040343}"#),
            Endpoint::Retry(_)
        ));
        assert_eq!(
            endpoint(200, br#"{"code":1000040344,"msg":"missing credentials"}"#),
            Endpoint::Refused("code 1000040344: missing credentials".to_owned())
        );
        assert!(matches!(endpoint(502, b"<html>"), Endpoint::Retry(_)));
        assert!(matches!(
            endpoint(200, br#"{"code":0,"data":{"URL":""}}"#),
            Endpoint::Retry(_)
        ));
        assert!(matches!(endpoint(200, b"[]"), Endpoint::Retry(_)));
    }

    #[test]
    fn handshake_refusals() {
        assert!(handshake_refused_by_client(Some("514"), Some("1000040350")));
        assert!(!handshake_refused_by_client(Some("514"), Some("1")));
        assert!(handshake_refused_by_client(Some("403"), None));
        assert!(!handshake_refused_by_client(Some("500"), None));
        assert!(!handshake_refused_by_client(None, None));
    }

    #[test]
    fn fragments_reassemble_in_seq_order_as_bytes() {
        let mut f = Fragments::new(Duration::from_secs(5), 8, 1024);
        let now = Instant::now();
        // "事件" split inside a UTF-8 character, parts out of order.
        let whole = "{\"e\":\"事件\"}".as_bytes();
        let (a, rest) = whole.split_at(7);
        let (b, c) = rest.split_at(3);
        assert_eq!(f.add(&data("m", 3, 2, c), now), Ok(None));
        assert_eq!(f.add(&data("m", 3, 0, a), now), Ok(None));
        assert_eq!(f.add(&data("m", 3, 1, b), now), Ok(Some(whole.to_vec())));
        assert!(f.is_empty());
        assert_eq!(
            f.add(&data("one", 1, 0, b"{}"), now),
            Ok(Some(b"{}".to_vec()))
        );
    }

    #[test]
    fn incomplete_sets_expire_and_stay_bounded() {
        let mut f = Fragments::new(Duration::from_secs(5), 4, 100);
        let t0 = Instant::now();
        for i in 0..10 {
            f.add(&data(&format!("m{i}"), 2, 0, b"x"), t0).unwrap();
        }
        assert_eq!(f.len(), 4, "the oldest are evicted");
        assert_eq!(f.take_dropped(), 6);
        f.expire(t0 + Duration::from_secs(6));
        assert!(f.is_empty());
        assert_eq!(f.take_dropped(), 4);
        // The deadline counts from the latest part.
        f.add(&data("slow", 3, 0, b"a"), t0).unwrap();
        f.add(&data("slow", 3, 1, b"b"), t0 + Duration::from_secs(4))
            .unwrap();
        let done = f.add(&data("slow", 3, 2, b"c"), t0 + Duration::from_secs(8));
        assert_eq!(done, Ok(Some(b"abc".to_vec())));
    }

    #[test]
    fn malformed_and_oversized_fragments_are_refused() {
        let mut f = Fragments::new(Duration::from_secs(5), 4, 10);
        let now = Instant::now();
        assert_eq!(
            f.add(&data("m", 2, 2, b"x"), now),
            Err(FragmentError::Malformed)
        );
        assert_eq!(
            f.add(&data("m", 0, 0, b"x"), now),
            Err(FragmentError::Malformed)
        );
        assert_eq!(
            f.add(&data("m", 65, 0, b"x"), now),
            Err(FragmentError::Malformed)
        );
        assert_eq!(
            f.add(&data("", 2, 0, b"x"), now),
            Err(FragmentError::Malformed)
        );
        assert_eq!(
            f.add(&data("m", 1, 0, &[0; 11]), now),
            Err(FragmentError::TooLarge)
        );
        f.add(&data("big", 2, 0, &[0; 6]), now).unwrap();
        assert_eq!(
            f.add(&data("big", 2, 1, &[0; 6]), now),
            Err(FragmentError::TooLarge)
        );
        assert!(f.is_empty(), "the set that grew too large is gone");
        f.add(&data("mixed", 2, 0, b"a"), now).unwrap();
        assert_eq!(
            f.add(&data("mixed", 3, 1, b"b"), now),
            Err(FragmentError::Malformed)
        );
        assert!(f.is_empty());
    }
}
