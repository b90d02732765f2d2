//! Opening a DingTalk HTTP callback and building its reply.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::platform::msgcrypt::{self, DecryptError, MsgCrypt};

/// The event type of the URL-verification handshake; answered, never published.
pub const CHECK_URL: &str = "check_url";

/// A DingTalk app ready to verify and decrypt callbacks.
#[derive(Debug, Clone)]
pub struct DingTalkApp {
    pub crypt: MsgCrypt,
}

/// Why a callback was refused. Each variant is a distinct reply code and metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("missing query parameter {0}")]
    MissingParameter(&'static str),
    #[error("body is not a JSON object with a string field \"encrypt\"")]
    InvalidBody,
    #[error("signature does not match")]
    Signature,
    #[error("timestamp is not a number of milliseconds")]
    InvalidTimestamp,
    #[error("timestamp is outside the replay window")]
    StaleTimestamp,
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    #[error("decrypted message is not valid UTF-8")]
    Utf8,
    #[error("decrypted message is not a JSON object")]
    Json,
}

impl CallbackError {
    /// Short stable code, used in error replies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            CallbackError::MissingParameter(_) => "missing_parameter",
            CallbackError::InvalidBody => "invalid_body",
            CallbackError::Signature => "invalid_signature",
            CallbackError::InvalidTimestamp => "invalid_timestamp",
            CallbackError::StaleTimestamp => "stale_timestamp",
            CallbackError::Decrypt(e) => e.code(),
            CallbackError::Utf8 => "invalid_utf8",
            CallbackError::Json => "invalid_json",
        }
    }

    /// The HTTP status to answer: 401 when the signature does not match, 403 when a correctly
    /// signed callback was encrypted for another receiver id, 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            CallbackError::Signature => 401,
            CallbackError::Decrypt(DecryptError::ReceiverMismatch) => 403,
            _ => 400,
        }
    }
}

/// The query parameters of a callback, with both spellings DingTalk has used accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params<'a> {
    pub signature: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
}

impl<'a> Params<'a> {
    pub fn from_query(query: &'a HashMap<String, String>) -> Result<Self, CallbackError> {
        let get = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|n| query.get(*n).map(String::as_str))
                .ok_or(CallbackError::MissingParameter(names[0]))
        };
        Ok(Params {
            signature: get(&["msg_signature", "signature"])?,
            timestamp: get(&["timestamp", "timeStamp"])?,
            nonce: get(&["nonce"])?,
        })
    }
}

#[derive(Deserialize)]
struct Envelope {
    encrypt: String,
}

/// A verified, decrypted callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The decrypted JSON exactly as DingTalk sent it.
    pub plaintext: Vec<u8>,
    /// `EventType`, as sent (not yet sanitised for a subject).
    pub event_type: Option<String>,
    /// `CorpId`/`corpId` when the payload names the organisation.
    pub corp_id: Option<String>,
}

impl Event {
    pub fn is_check_url(&self) -> bool {
        self.event_type.as_deref() == Some(CHECK_URL)
    }
}

/// Verifies, checks the replay window and decrypts one callback.
pub fn open(
    crypt: &MsgCrypt,
    params: &Params<'_>,
    body: &[u8],
    now_ms: u64,
    replay_window: Option<Duration>,
) -> Result<Event, CallbackError> {
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|_| CallbackError::InvalidBody)?;
    if !crypt.verify(
        params.signature,
        params.timestamp,
        params.nonce,
        &envelope.encrypt,
    ) {
        return Err(CallbackError::Signature);
    }
    if let Some(window) = replay_window {
        let ts: u64 = params
            .timestamp
            .parse()
            .map_err(|_| CallbackError::InvalidTimestamp)?;
        if now_ms.abs_diff(ts) > window.as_millis() as u64 {
            return Err(CallbackError::StaleTimestamp);
        }
    }
    let decrypted = crypt.decrypt(&envelope.encrypt)?;
    let text = std::str::from_utf8(&decrypted.message).map_err(|_| CallbackError::Utf8)?;
    let fields: EventFields = serde_json::from_str(text).map_err(|_| CallbackError::Json)?;
    // [U] Payload key casing is not confirmed for every event family (PROTOCOLS.md §1.5), so
    // both spellings are read, the PascalCase one first.
    let [event_type, corp_id] = fields.0.map(|[pascal, camel]| pascal.or(camel));
    Ok(Event {
        plaintext: decrypted.message,
        event_type,
        corp_id,
    })
}

/// The two fields the bridge reads from a decrypted event, `EventType` and `CorpId`, each as
/// `[PascalCase, camelCase]`. Read field by field rather than as a `serde_json::Value`: the
/// rest of the event is checked to be JSON and skipped without being built, which would cost
/// an allocation per key and value of every callback. As with a `Value`, the whole text must
/// be one JSON object, a repeated key counts by its last value, and a value that is not a
/// string counts as absent. Unlike a `Value`, nesting deeper than 128 levels under the other
/// keys is read: what is skipped is skipped by serde_json without recursion, so depth costs
/// no stack.
#[derive(Default)]
struct EventFields([[Option<String>; 2]; 2]);

impl<'de> Deserialize<'de> for EventFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = EventFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EventFields, A::Error> {
                let mut fields = EventFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Known(field, spelling) => &mut fields.0[field][spelling],
                        Key::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    // Rarely anything but a string; any other value counts as absent.
                    *slot = match map.next_value()? {
                        serde_json::Value::String(value) => Some(value),
                        _ => None,
                    };
                }
                Ok(fields)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A key of the event: one of the two fields read (which, in which spelling) or another.
enum Key {
    Known(usize, usize),
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "EventType" => Key::Known(0, 0),
                    "eventType" => Key::Known(0, 1),
                    "CorpId" => Key::Known(1, 0),
                    "corpId" => Key::Known(1, 1),
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// The reply DingTalk requires: an encrypted `success` signed over the reply's own timestamp and
/// nonce. Note the camel-case `timeStamp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub msg_signature: String,
    #[serde(rename = "timeStamp")]
    pub time_stamp: String,
    pub nonce: String,
    pub encrypt: String,
}

/// Builds the `success` reply with the given timestamp, nonce and random prefix.
pub fn reply_with(crypt: &MsgCrypt, time_stamp: &str, nonce: &str, random: &[u8; 16]) -> Reply {
    let encrypt = crypt.encrypt(random, b"success");
    Reply {
        msg_signature: crypt.signature(time_stamp, nonce, &encrypt),
        time_stamp: time_stamp.to_owned(),
        nonce: nonce.to_owned(),
        encrypt,
    }
}

/// Builds the `success` reply with the current time, a fresh 16-character nonce (the Java SDK
/// rejects other lengths) and a fresh random prefix.
pub fn reply(crypt: &MsgCrypt, now_ms: u64) -> Reply {
    let nonce = msgcrypt::random_alnum::<16>();
    let random = msgcrypt::random_alnum::<16>();
    reply_with(
        crypt,
        &now_ms.to_string(),
        std::str::from_utf8(&nonce).expect("ascii"),
        &random,
    )
}

/// A callback as DingTalk sends one: the query (`msg_signature`, `timestamp` in ms, `nonce`)
/// and the JSON body `{"encrypt": …}`. imbridge sends one itself to check a URL before
/// registering it, so that a wrong URL fails at once and not in DingTalk's hands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub query: Vec<(&'static str, String)>,
    pub body: String,
}

/// Encrypts and signs `plaintext` as DingTalk would, at `now_ms`.
pub fn seal(crypt: &MsgCrypt, plaintext: &[u8], now_ms: u64) -> Sealed {
    let encrypt = crypt.encrypt_fresh(plaintext);
    let timestamp = now_ms.to_string();
    let nonce = String::from_utf8(msgcrypt::random_alnum::<16>().to_vec()).expect("ascii");
    Sealed {
        query: vec![
            (
                "msg_signature",
                crypt.signature(&timestamp, &nonce, &encrypt),
            ),
            ("timestamp", timestamp),
            ("nonce", nonce),
        ],
        body: serde_json::json!({ "encrypt": encrypt }).to_string(),
    }
}

/// The `check_url` callback DingTalk sends when a callback is registered.
pub fn check_url(crypt: &MsgCrypt, now_ms: u64) -> Sealed {
    seal(crypt, br#"{"EventType":"check_url"}"#, now_ms)
}

/// Why a reply is not the one DingTalk accepts (PROTOCOLS.md §1.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the answer is not DingTalk's reply JSON (msg_signature, timeStamp, nonce, encrypt)")]
    NotAReply,
    #[error("the reply's signature does not verify with this app's token")]
    Signature,
    #[error("the reply does not decrypt with this app's aes_key and receiver_id: {0}")]
    Decrypt(#[from] DecryptError),
    #[error("the reply decrypts to {0:?}, not \"success\"")]
    NotSuccess(String),
}

/// Checks a reply as DingTalk does: signed with the token over its own timestamp and nonce,
/// and decrypting to `success` for this receiver id.
pub fn check_reply(crypt: &MsgCrypt, body: &[u8]) -> Result<(), ReplyError> {
    let reply: Reply = serde_json::from_slice(body).map_err(|_| ReplyError::NotAReply)?;
    if !crypt.verify(
        &reply.msg_signature,
        &reply.time_stamp,
        &reply.nonce,
        &reply.encrypt,
    ) {
        return Err(ReplyError::Signature);
    }
    let message = crypt.decrypt(&reply.encrypt)?.message;
    if message != b"success" {
        let shown = String::from_utf8_lossy(&message);
        return Err(ReplyError::NotSuccess(
            crate::platform::outbound::truncate_utf8(&shown, 64),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json")).unwrap()
    }

    fn crypt_of(v: &serde_json::Value) -> MsgCrypt {
        MsgCrypt::new(
            v["token"].as_str().unwrap(),
            v["encoding_aes_key"].as_str().unwrap(),
            v["owner_key(corpId)"].as_str().unwrap(),
        )
        .unwrap()
    }

    fn query_of(v: &serde_json::Value) -> HashMap<String, String> {
        v["query"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn d1_vendor_ciphertext_opens_to_check_url() {
        let all = vectors();
        let v = &all["dingtalk_callback"]["D1_vendor_decrypt"];
        let crypt = crypt_of(v);
        let query = query_of(v);
        let body = serde_json::to_vec(&v["body"]).unwrap();
        let params = Params::from_query(&query).unwrap();
        let event = open(&crypt, &params, &body, 0, None).unwrap();
        assert_eq!(
            event.plaintext,
            v["expected_plaintext"].as_str().unwrap().as_bytes()
        );
        assert!(event.is_check_url());
        let d = crypt
            .decrypt(v["body"]["encrypt"].as_str().unwrap())
            .unwrap();
        assert_eq!(&d.random, v["random_prefix"].as_str().unwrap().as_bytes());
        let raw = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v["body"]["encrypt"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(raw.len() % 32, 0);
        // Pad byte 31: 16 + 4 + 25 + 20 = 65 bytes, padded to 96.
        assert_eq!(
            96 - (16 + 4 + 25 + 20),
            v["pad_byte"].as_u64().unwrap() as usize
        );
    }

    #[test]
    fn d2_reply_matches_vendor_bytes() {
        let all = vectors();
        let v = &all["dingtalk_callback"]["D2_reply_success"];
        let crypt = crypt_of(v);
        let random: [u8; 16] = v["random16"]
            .as_str()
            .unwrap()
            .as_bytes()
            .try_into()
            .unwrap();
        let reply = reply_with(
            &crypt,
            v["timeStamp"].as_str().unwrap(),
            v["nonce"].as_str().unwrap(),
            &random,
        );
        let expected: Reply = serde_json::from_value(v["expected_reply_json"].clone()).unwrap();
        assert_eq!(reply, expected);
        assert_eq!(
            serde_json::to_value(&reply).unwrap(),
            v["expected_reply_json"]
        );
    }

    #[test]
    fn d3_utf8_event_with_full_pad_block() {
        let all = vectors();
        let v = &all["dingtalk_callback"]["D3_event_full_pad_block"];
        let crypt = crypt_of(v);
        let plaintext = v["plaintext_utf8"].as_str().unwrap();
        let random: [u8; 16] = v["random16"]
            .as_str()
            .unwrap()
            .as_bytes()
            .try_into()
            .unwrap();
        let encrypt = crypt.encrypt(&random, plaintext.as_bytes());
        assert_eq!(encrypt, v["expected_encrypt"].as_str().unwrap());
        let query = query_of(v);
        let params = Params::from_query(&query).unwrap();
        assert_eq!(
            crypt.signature(params.timestamp, params.nonce, &encrypt),
            params.signature
        );
        let body = serde_json::json!({ "encrypt": encrypt }).to_string();
        let event = open(&crypt, &params, body.as_bytes(), 0, None).unwrap();
        assert_eq!(event.plaintext, plaintext.as_bytes());
        assert_eq!(event.plaintext.len(), 344);
        assert_eq!(event.event_type.as_deref(), Some("bpms_instance_change"));
        assert_eq!(event.corp_id.as_deref(), Some("ding6ccabc44d2c8d38b"));
    }

    #[test]
    fn alternative_parameter_spellings() {
        let q: HashMap<String, String> = [("signature", "s"), ("timeStamp", "1"), ("nonce", "n")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let p = Params::from_query(&q).unwrap();
        assert_eq!((p.signature, p.timestamp, p.nonce), ("s", "1", "n"));
        let mut missing = q.clone();
        missing.remove("nonce");
        assert_eq!(
            Params::from_query(&missing),
            Err(CallbackError::MissingParameter("nonce"))
        );
    }

    #[test]
    fn replay_window_is_checked_after_the_signature() {
        let all = vectors();
        let v = &all["dingtalk_callback"]["D1_vendor_decrypt"];
        let crypt = crypt_of(v);
        let query = query_of(v);
        let params = Params::from_query(&query).unwrap();
        let body = serde_json::to_vec(&v["body"]).unwrap();
        let hour = Some(Duration::from_secs(3600));
        let ts: u64 = params.timestamp.parse().unwrap();
        assert!(open(&crypt, &params, &body, ts + 3_600_000, hour).is_ok());
        assert_eq!(
            open(&crypt, &params, &body, ts + 3_600_001, hour),
            Err(CallbackError::StaleTimestamp)
        );
        assert_eq!(
            open(&crypt, &params, &body, ts - 3_600_001, hour),
            Err(CallbackError::StaleTimestamp)
        );
        let forged = Params {
            timestamp: "1608001896815",
            ..params.clone()
        };
        assert_eq!(
            open(&crypt, &forged, &body, ts, hour),
            Err(CallbackError::Signature)
        );
    }

    #[test]
    fn a_sealed_check_url_opens_and_its_reply_checks() {
        let all = vectors();
        let crypt = crypt_of(&all["dingtalk_callback"]["D1_vendor_decrypt"]);
        let now = 1_608_001_896_814;
        let sealed = check_url(&crypt, now);
        let query: HashMap<String, String> = sealed
            .query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let params = Params::from_query(&query).unwrap();
        assert_eq!(params.nonce.len(), 16);
        let event = open(&crypt, &params, sealed.body.as_bytes(), now, None).unwrap();
        assert!(event.is_check_url());

        let good = serde_json::to_vec(&reply(&crypt, now)).unwrap();
        assert_eq!(check_reply(&crypt, &good), Ok(()));
        // The D2 vendor reply checks too.
        let d2 = serde_json::to_vec(
            &all["dingtalk_callback"]["D2_reply_success"]["expected_reply_json"],
        )
        .unwrap();
        assert_eq!(check_reply(&crypt, &d2), Ok(()));

        assert_eq!(check_reply(&crypt, b"success"), Err(ReplyError::NotAReply));
        let other_token = MsgCrypt::new(
            "other",
            "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7",
            "ding6ccabc44d2c8d38b",
        )
        .unwrap();
        let signed_elsewhere = serde_json::to_vec(&reply(&other_token, now)).unwrap();
        assert_eq!(
            check_reply(&crypt, &signed_elsewhere),
            Err(ReplyError::Signature)
        );
        let other_receiver = MsgCrypt::new(
            "mryue",
            "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7",
            "dingother",
        )
        .unwrap();
        let for_other = serde_json::to_vec(&reply(&other_receiver, now)).unwrap();
        assert_eq!(
            check_reply(&crypt, &for_other),
            Err(ReplyError::Decrypt(DecryptError::ReceiverMismatch))
        );
        let encrypt = crypt.encrypt_fresh(b"fail");
        let not_success = Reply {
            msg_signature: crypt.signature("1", "n", &encrypt),
            time_stamp: "1".into(),
            nonce: "n".into(),
            encrypt,
        };
        assert_eq!(
            check_reply(&crypt, &serde_json::to_vec(&not_success).unwrap()),
            Err(ReplyError::NotSuccess("fail".into()))
        );
    }

    /// The fields read without building the event agree with reading it as a
    /// `serde_json::Value`, on every shape an event could take.
    #[test]
    fn event_fields_read_as_a_value_would() {
        let as_value = |text: &str| -> Option<[Option<String>; 2]> {
            let value: serde_json::Value = serde_json::from_str(text).ok()?;
            let object = value.as_object()?;
            let field = |names: [&str; 2]| {
                names
                    .iter()
                    .find_map(|n| object.get(*n).and_then(|v| v.as_str()))
                    .map(str::to_owned)
            };
            Some([
                field(["EventType", "eventType"]),
                field(["CorpId", "corpId"]),
            ])
        };
        let read = |text: &str| -> Option<[Option<String>; 2]> {
            let fields: EventFields = serde_json::from_str(text).ok()?;
            Some(fields.0.map(|[pascal, camel]| pascal.or(camel)))
        };
        for text in [
            r#"{"EventType":"bpms_instance_change","CorpId":"ding1"}"#,
            r#"{"eventType":"user_add_org","corpId":"ding2","UserId":["u1","u2"]}"#,
            // Both spellings: PascalCase wins.
            r#"{"eventType":"b","EventType":"a","corpId":"y","CorpId":"x"}"#,
            // Not a string: absent, and the other spelling is used.
            r#"{"EventType":7,"eventType":"b","CorpId":null,"corpId":{"a":[1,{"b":2}]}}"#,
            r#"{"EventType":["a"],"CorpId":true}"#,
            // A repeated key counts by its last value, a string or not.
            r#"{"EventType":"a","EventType":"b"}"#,
            r#"{"EventType":"a","EventType":1.5}"#,
            // Escaped keys and values.
            r#"{"Event\u0054ype":"\u5ba1\u6279","CorpId":"a\"b"}"#,
            r#"{"title":"张三","nested":{"EventType":"inner"},"list":[{"corpId":"x"}]}"#,
            r#"{}"#,
            r#"  {"EventType":"a"}  "#,
            // Not one JSON object: refused by both.
            r#"[{"EventType":"a"}]"#,
            r#""EventType""#,
            r#"null"#,
            r#"{"EventType":"a"} {"EventType":"b"}"#,
            r#"{"EventType":"a""#,
            r#"{"EventType":"a",}"#,
            r#"{"EventType":"a","x":[1,2}"#,
            "",
        ] {
            assert_eq!(read(text), as_value(text), "{text}");
        }
        // Where they differ: a `Value` refuses nesting beyond 128 levels, while what is
        // skipped is skipped without recursion (serde_json keeps its own stack), so a deep
        // event is read, on a test thread's small stack too.
        let deep = format!(
            "{{\"EventType\":\"a\",\"x\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(read(&deep), Some([Some("a".to_owned()), None]));
        assert_eq!(as_value(&deep), None);
        let unclosed = format!("{{\"EventType\":\"a\",\"x\":{}", "[".repeat(100_000));
        assert_eq!(read(&unclosed), None);
    }
}
