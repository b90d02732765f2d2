//! DingTalk Stream mode (STREAMS.md §A): the app registers with `connections/open`, dials the
//! WebSocket it is given, and every push arrives there as a JSON text frame that must be
//! answered with an ACK frame. Pure protocol code: building the registration, reading its
//! answer, reading a frame into what it means, and writing the ACKs. No I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The registration call, under the app's `api_base`.
pub const OPEN_PATH: &str = "/v1.0/gateway/connections/open";

/// The callback topic of messages sent to the app's robot.
pub const TOPIC_ROBOT: &str = "/v1.0/im/bot/messages/get";
/// The callback topic of interactive-card actions.
pub const TOPIC_CARD: &str = "/v1.0/card/instances/callback";

/// The event type (and so the subject, `dingtalk.bot.message`) robot messages publish as.
pub const ROBOT_EVENT_TYPE: &str = "bot.message";
/// The event type card actions publish as: `dingtalk.card.callback`.
pub const CARD_EVENT_TYPE: &str = "card.callback";

/// The client tag sent with the registration, in the documented `name-sdk-lang/version` form.
pub const USER_AGENT: &str = concat!("imbridge-rust/", env!("CARGO_PKG_VERSION"));

/// One `{type, topic}` subscription of the registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub topic: &'static str,
}

/// What imbridge subscribes to: every event the console enables (`EVENT` takes only `*`),
/// robot messages and card actions. SYSTEM frames arrive without a subscription (A.1).
pub const SUBSCRIPTIONS: [Subscription; 3] = [
    Subscription {
        kind: "EVENT",
        topic: "*",
    },
    Subscription {
        kind: "CALLBACK",
        topic: TOPIC_ROBOT,
    },
    Subscription {
        kind: "CALLBACK",
        topic: TOPIC_CARD,
    },
];

/// The body of `POST …/connections/open`. Holds the client secret: never log it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenRequest<'a> {
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub subscriptions: &'a [Subscription],
    pub ua: &'a str,
    pub local_ip: &'a str,
}

impl std::fmt::Debug for OpenRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRequest")
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .finish_non_exhaustive()
    }
}

/// Where to connect: the gateway's answer. The ticket opens exactly one connection within
/// 90 s (A.1), so it is used at once and never kept.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub endpoint: String,
    pub ticket: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ticket is a one-time credential: it stays out of logs.
        f.debug_struct("Endpoint")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The WebSocket URL: the endpoint with `ticket` appended, URL-encoded (as dt-py does; the
    /// other SDKs insert it raw, which is the same for the tickets seen so far).
    pub fn url(&self) -> String {
        let ticket = serde_urlencoded::to_string([("ticket", self.ticket.as_str())])
            .unwrap_or_else(|_| format!("ticket={}", self.ticket));
        let sep = if self.endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}{ticket}", self.endpoint)
    }
}

/// Why a registration answer is no good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// 401/403: the client id or secret is wrong, or the app lacks Stream mode.
    #[error("credentials refused (HTTP {0})")]
    Refused(u16),
    /// Any other status: retried later (A.1: every SDK does).
    #[error("registration failed with HTTP {0}")]
    Status(u16),
    /// 200, but not a JSON object with a non-empty `endpoint` and `ticket` (dt-go `Valid`).
    #[error("registration answer has no endpoint and ticket")]
    Answer,
}

impl OpenError {
    /// Metric label (the reconnect reason).
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::Refused(_) => "auth_refused",
            OpenError::Status(_) => "open_failed",
            OpenError::Answer => "open_invalid",
        }
    }
}

/// Reads the gateway's answer to `connections/open`.
pub fn open_answer(status: u16, body: &[u8]) -> Result<Endpoint, OpenError> {
    match status {
        200 => {}
        401 | 403 => return Err(OpenError::Refused(status)),
        s => return Err(OpenError::Status(s)),
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        endpoint: String,
        #[serde(default)]
        ticket: String,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|_| OpenError::Answer)?;
    if a.endpoint.is_empty() || a.ticket.is_empty() {
        return Err(OpenError::Answer);
    }
    Ok(Endpoint {
        endpoint: a.endpoint,
        ticket: a.ticket,
    })
}

/// What one downstream frame means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// SYSTEM `ping`: answered by echoing its data.
    Ping { message_id: String, data: String },
    /// SYSTEM `disconnect`: the gateway is about to close this connection.
    Disconnect {
        message_id: String,
        reason: Option<String>,
    },
    /// Any other SYSTEM topic (dt-node knows `CONNECTED`, `REGISTERED`, `KEEPALIVE`; they are
    /// documented nowhere [U]): accepted, answered, ignored.
    OtherSystem { message_id: String, topic: String },
    /// An EVENT push, or a CALLBACK imbridge subscribed to: published.
    Publish(Push),
    /// A CALLBACK topic imbridge did not subscribe to: answered 404 (A.4).
    UnknownTopic { message_id: String, topic: String },
}

impl Frame {
    /// Metric label: the frame's type.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Ping { .. } | Frame::Disconnect { .. } | Frame::OtherSystem { .. } => "system",
            Frame::Publish(p) if p.kind == PushKind::Event => "event",
            Frame::Publish(_) | Frame::UnknownTopic { .. } => "callback",
        }
    }
}

/// Which kind of push a published frame is: it decides the ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    Event,
    Robot,
    Card,
}

/// A push to publish: everything the bus message needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub kind: PushKind,
    /// This delivery's id, returned in the ACK. Per delivery, not per event (A.5 [U]).
    pub message_id: String,
    /// The platform's event type as it names it (`user_add_org`), or `bot.message` /
    /// `card.callback`.
    pub event_type: String,
    /// The event's own identity when it has one (`eventId`, a robot message's `msgId`); a
    /// card action has none (A.3), so the caller derives one from the payload.
    pub id: Option<String>,
    /// The organisation (`eventCorpId`, `chatbotCorpId`/`senderCorpId`, `corpId`).
    pub tenant: Option<String>,
    /// `data`, byte for byte as the frame carried it.
    pub data: String,
}

/// Why a frame was skipped. Each is a metric label; none closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame over the size limit")]
    Oversize,
    #[error("binary frame (the protocol is JSON text)")]
    NotText,
    #[error("frame is not a JSON object")]
    NotJson,
    #[error("frame has no messageId header")]
    NoMessageId,
    #[error("frame data is not a JSON string")]
    DataNotString,
    #[error("frame data is not a JSON object")]
    DataNotJson,
    #[error("frame type is not SYSTEM, EVENT or CALLBACK")]
    UnknownType,
}

impl FrameError {
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::Oversize => "oversize",
            FrameError::NotText => "not_text",
            FrameError::NotJson => "not_json",
            FrameError::NoMessageId => "no_message_id",
            FrameError::DataNotString => "data_not_string",
            FrameError::DataNotJson => "data_not_json",
            FrameError::UnknownType => "unknown_type",
        }
    }
}

/// A frame as the wire has it. `headers` values are strings in the docs; anything else is
/// kept as its JSON text rather than refusing the frame (unknown headers are preserved and
/// ignored, A.3).
#[derive(Deserialize)]
struct RawFrame {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, Value>,
    #[serde(default)]
    data: Value,
}

/// Reads one text frame of at most `max_bytes`.
pub fn parse(text: &str, max_bytes: usize) -> Result<Frame, FrameError> {
    if text.len() > max_bytes {
        return Err(FrameError::Oversize);
    }
    let raw: RawFrame = serde_json::from_str(text).map_err(|_| FrameError::NotJson)?;
    let header = |name: &str| -> Option<String> {
        match raw.headers.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let message_id = header("messageId")
        .filter(|m| !m.is_empty())
        .ok_or(FrameError::NoMessageId)?;
    let Value::String(data) = raw.data else {
        return Err(FrameError::DataNotString);
    };
    let topic = header("topic").unwrap_or_default();
    match raw.kind.as_deref() {
        Some("SYSTEM") => Ok(match topic.as_str() {
            "ping" => Frame::Ping { message_id, data },
            "disconnect" => Frame::Disconnect {
                message_id,
                reason: serde_json::from_str::<Value>(&data)
                    .ok()
                    .and_then(|v| v.get("reason")?.as_str().map(str::to_owned)),
            },
            _ => Frame::OtherSystem { message_id, topic },
        }),
        Some("EVENT") => {
            json_object(&data)?;
            Ok(Frame::Publish(Push {
                kind: PushKind::Event,
                message_id,
                event_type: header("eventType").unwrap_or_default(),
                id: header("eventId").filter(|s| !s.is_empty()),
                tenant: header("eventCorpId").filter(|s| !s.is_empty()),
                data,
            }))
        }
        Some("CALLBACK") => {
            let (kind, event_type) = match topic.as_str() {
                TOPIC_ROBOT => (PushKind::Robot, ROBOT_EVENT_TYPE),
                TOPIC_CARD => (PushKind::Card, CARD_EVENT_TYPE),
                _ => return Ok(Frame::UnknownTopic { message_id, topic }),
            };
            let body = json_object(&data)?;
            let field = |name: &str| {
                body.get(name)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            };
            let (id, tenant) = match kind {
                PushKind::Robot => (
                    field("msgId"),
                    field("chatbotCorpId").or_else(|| field("senderCorpId")),
                ),
                _ => (None, field("corpId")),
            };
            Ok(Frame::Publish(Push {
                kind,
                message_id,
                event_type: event_type.to_owned(),
                id,
                tenant,
                data,
            }))
        }
        _ => Err(FrameError::UnknownType),
    }
}

/// `data` parsed as the JSON object every payload is (the bus body's content type says JSON).
fn json_object(data: &str) -> Result<serde_json::Map<String, Value>, FrameError> {
    match serde_json::from_str(data) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(FrameError::DataNotJson),
    }
}

/// The messageId of a frame that could not be read in full, when it has one: a frame of an
/// unknown type is still answered 404 (A.4).
pub fn message_id_of(text: &str) -> Option<String> {
    let raw: RawFrame = serde_json::from_str(text).ok()?;
    raw.headers
        .get("messageId")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Event data once the bus has it: consumed.
pub const SUCCESS: &str = r#"{"status":"SUCCESS","message":"success"}"#;

/// The ACK frame: `code`, the push's `messageId`, `contentType`, `message`, and `data` as a
/// JSON string (A.4).
pub fn ack(message_id: &str, code: u16, message: &str, data: &str) -> String {
    json!({
        "code": code,
        "headers": {"contentType": "application/json", "messageId": message_id},
        "message": message,
        "data": data,
    })
    .to_string()
}

/// An event the bus acknowledged.
pub fn ack_success(message_id: &str) -> String {
    ack(message_id, 200, "OK", SUCCESS)
}

/// An event the bus could not take: code 200 with status `LATER`, as documented (dt-go's
/// code 500 variant is [U]; dt-py's echo is not imitated), so DingTalk pushes it again.
pub fn ack_later(message_id: &str, reason: &str) -> String {
    let data = json!({"status": "LATER", "message": reason}).to_string();
    ack(message_id, 200, "OK", &data)
}

/// A robot message or card action the bus has: imbridge only forwards, so no response.
pub fn ack_callback(message_id: &str) -> String {
    ack(message_id, 200, "OK", r#"{"response":null}"#)
}

/// A callback the bus could not take: code 500, "internal client error" (A.4). Whether the
/// gateway pushes a callback again after it is [U]; a robot message may not be (A.5).
pub fn ack_callback_failed(message_id: &str, reason: &str) -> String {
    ack(message_id, 500, reason, r#"{"response":null}"#)
}

/// A ping: the same data back (the same `opaque`).
pub fn ack_ping(message_id: &str, data: &str) -> String {
    ack(message_id, 200, "OK", data)
}

/// A topic or type imbridge does not handle: 404, for the gateway's diagnostics.
pub fn ack_unknown(message_id: &str) -> String {
    ack(message_id, 404, "unknown topic", "{}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 256 * 1024;

    fn event_frame() -> String {
        json!({
            "specVersion": "1.0", "type": "EVENT",
            "headers": {"topic": "*", "messageId": "m-1", "contentType": "application/json",
                        "time": "1693221579964", "eventType": "user_add_org", "eventId": "e-1",
                        "eventCorpId": "dingcorp", "eventBornTime": "1683533823336",
                        "eventUnifiedAppId": "u-1", "connectionId": "c"},
            "data": "{\"timeStamp\":\"1685501863357\",\"userId\":[\"015xxxx227\"]}"
        })
        .to_string()
    }

    #[test]
    fn reads_an_event_keeping_data_byte_for_byte() {
        let Frame::Publish(p) = parse(&event_frame(), MAX).unwrap() else {
            panic!("an event");
        };
        assert_eq!(p.kind, PushKind::Event);
        assert_eq!(p.message_id, "m-1");
        assert_eq!(p.event_type, "user_add_org");
        assert_eq!(p.id.as_deref(), Some("e-1"));
        assert_eq!(p.tenant.as_deref(), Some("dingcorp"));
        assert_eq!(
            p.data,
            r#"{"timeStamp":"1685501863357","userId":["015xxxx227"]}"#
        );
    }

    #[test]
    fn reads_robot_messages_and_card_actions() {
        let robot = json!({"type": "CALLBACK", "headers": {"topic": TOPIC_ROBOT, "messageId": "m-2"},
            "data": r#"{"msgId":"msg-9","msgtype":"text","text":{"content":"hi"},"chatbotCorpId":"dc"}"#})
        .to_string();
        let Frame::Publish(p) = parse(&robot, MAX).unwrap() else {
            panic!("a robot message");
        };
        assert_eq!(
            (
                p.kind,
                p.event_type.as_str(),
                p.id.as_deref(),
                p.tenant.as_deref()
            ),
            (PushKind::Robot, "bot.message", Some("msg-9"), Some("dc"))
        );
        let card = json!({"type": "CALLBACK", "headers": {"topic": TOPIC_CARD, "messageId": "m-3"},
            "data": r#"{"corpId":"dc","outTrackId":"t","content":"{}"}"#})
        .to_string();
        let Frame::Publish(p) = parse(&card, MAX).unwrap() else {
            panic!("a card action");
        };
        assert_eq!(
            (p.kind, p.event_type.as_str(), p.id, p.tenant.as_deref()),
            (PushKind::Card, "card.callback", None, Some("dc"))
        );
        let other = json!({"type": "CALLBACK", "headers": {"topic": "/v1.0/graph/api/invoke", "messageId": "m-4"}, "data": "{}"}).to_string();
        assert!(matches!(parse(&other, MAX), Ok(Frame::UnknownTopic { .. })));
    }

    #[test]
    fn reads_system_frames() {
        let ping = json!({"type": "SYSTEM", "headers": {"topic": "ping", "messageId": "p"}, "data": "{\"opaque\":\"x\"}"}).to_string();
        assert_eq!(
            parse(&ping, MAX),
            Ok(Frame::Ping {
                message_id: "p".into(),
                data: "{\"opaque\":\"x\"}".into()
            })
        );
        let bye = json!({"type": "SYSTEM", "headers": {"topic": "disconnect", "messageId": "d"}, "data": "{\"reason\":\"connection is expired\"}"}).to_string();
        assert_eq!(
            parse(&bye, MAX),
            Ok(Frame::Disconnect {
                message_id: "d".into(),
                reason: Some("connection is expired".into())
            })
        );
        let other = json!({"type": "SYSTEM", "headers": {"topic": "KEEPALIVE", "messageId": "k"}, "data": ""}).to_string();
        assert!(matches!(parse(&other, MAX), Ok(Frame::OtherSystem { .. })));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let cases = [
            ("not json", FrameError::NotJson),
            ("[1,2]", FrameError::NotJson),
            (
                r#"{"type":"EVENT","headers":{"messageId":"m"},"data":{"a":1}}"#,
                FrameError::DataNotString,
            ),
            (
                r#"{"type":"EVENT","headers":{"messageId":"m"},"data":"not json"}"#,
                FrameError::DataNotJson,
            ),
            (
                r#"{"type":"WHAT","headers":{"messageId":"m"},"data":"{}"}"#,
                FrameError::UnknownType,
            ),
            (
                r#"{"type":"EVENT","headers":{},"data":"{}"}"#,
                FrameError::NoMessageId,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text, MAX), Err(want), "{text}");
        }
        assert_eq!(parse(&event_frame(), 10), Err(FrameError::Oversize));
        assert_eq!(
            message_id_of(r#"{"type":"WHAT","headers":{"messageId":"m"}}"#).as_deref(),
            Some("m")
        );
    }

    #[test]
    fn acks_have_the_documented_shape() {
        let a: Value = serde_json::from_str(&ack_success("m-1")).unwrap();
        assert_eq!(a["code"], 200);
        assert_eq!(a["headers"]["messageId"], "m-1");
        assert_eq!(a["headers"]["contentType"], "application/json");
        assert_eq!(a["message"], "OK");
        let data: Value = serde_json::from_str(a["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, json!({"status": "SUCCESS", "message": "success"}));
        let later: Value = serde_json::from_str(&ack_later("m", "bus timeout")).unwrap();
        let data: Value = serde_json::from_str(later["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["status"], "LATER");
        let ping: Value = serde_json::from_str(&ack_ping("p", "{\"opaque\":\"x\"}")).unwrap();
        assert_eq!(ping["data"], "{\"opaque\":\"x\"}");
    }

    /// The frames of the shared vectors (`dingtalk_stream_frames`, captured from dt-py), and
    /// what imbridge answers instead of dt-py's echo.
    #[test]
    fn vector_frames() {
        let v: Value =
            serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json"))
                .unwrap();
        let inbound = &v["dingtalk_stream_frames"]["inbound"];
        let frame = |name: &str| parse(&inbound[name].to_string(), MAX).unwrap();

        let Frame::Ping { message_id, data } = frame("ping") else {
            panic!("a ping");
        };
        let ack: Value = serde_json::from_str(&ack_ping(&message_id, &data)).unwrap();
        assert_eq!(ack["headers"]["messageId"], "msg-ping-1");
        // The same opaque back (dt-py re-serialises it; the text itself is echoed here).
        assert_eq!(ack["data"], inbound["ping"]["data"]);

        let Frame::Publish(event) = frame("event") else {
            panic!("an event");
        };
        assert_eq!(
            (
                event.id.as_deref(),
                event.tenant.as_deref(),
                event.event_type.as_str()
            ),
            (Some("ev-123"), Some("dingcorp"), "user_add_org")
        );
        assert_eq!(event.data, inbound["event"]["data"].as_str().unwrap());
        // Not dt-py's echo of the event: the documented status.
        let ack: Value = serde_json::from_str(&ack_success(&event.message_id)).unwrap();
        assert_eq!(ack["data"], SUCCESS);

        let Frame::Publish(robot) = frame("callback") else {
            panic!("a robot message");
        };
        // This one has no msgId: the caller derives the id from the payload.
        assert_eq!((robot.kind, robot.id), (PushKind::Robot, None));

        assert_eq!(
            frame("disconnect"),
            Frame::Disconnect {
                message_id: "msg-dc-1".into(),
                reason: Some("server upgrade".into())
            }
        );
    }

    #[test]
    fn registration_answers() {
        let ok = open_answer(200, br#"{"endpoint":"wss://h/connect","ticket":"a b+c"}"#).unwrap();
        assert_eq!(ok.url(), "wss://h/connect?ticket=a+b%2Bc");
        assert_eq!(open_answer(401, b""), Err(OpenError::Refused(401)));
        assert_eq!(open_answer(403, b""), Err(OpenError::Refused(403)));
        assert_eq!(open_answer(500, b""), Err(OpenError::Status(500)));
        assert_eq!(
            open_answer(200, br#"{"endpoint":"","ticket":"t"}"#),
            Err(OpenError::Answer)
        );
        assert_eq!(open_answer(200, b"<xml/>"), Err(OpenError::Answer));
        let body = serde_json::to_value(OpenRequest {
            client_id: "id",
            client_secret: "s",
            subscriptions: &SUBSCRIPTIONS,
            ua: USER_AGENT,
            local_ip: "10.0.0.1",
        })
        .unwrap();
        assert_eq!(body["clientId"], "id");
        assert_eq!(body["localIp"], "10.0.0.1");
        assert_eq!(body["subscriptions"][1]["type"], "CALLBACK");
        assert_eq!(body["subscriptions"][0]["topic"], "*");
    }
}
