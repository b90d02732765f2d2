//! Opening a Lark / Feishu event-subscription callback (PROTOCOLS.md §7). Pure functions over
//! the request's bytes, three headers and the clock; answering, publishing and deduplicating
//! are the HTTP layer's business.
//!
//! With an Encrypt Key the body is `{"encrypt":"<base64>"}`: the request is signed with a plain
//! SHA-256 (not an HMAC) over timestamp ‖ nonce ‖ key ‖ raw body, and the ciphertext is
//! AES-256-CBC under SHA-256(key) with the IV as its first 16 bytes and PKCS#7 padding with a
//! block size of 16. Unlike DingTalk and WeCom ([`crate::platform::msgcrypt`]) there is no random
//! prefix, no length field and no receiver id. Without an Encrypt Key the body is the JSON
//! itself and nothing is signed; only the Verification Token, when configured, is checked.
//! A signed request's timestamp must be within the replay window, as DingTalk's and WeCom's.
//!
//! The plaintext is a `url_verification` handshake (answered with its challenge, never
//! published), a schema 2.0 event or a v1 event.

use std::time::Duration;

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Header carrying the request time in seconds; signed, and checked against the replay window.
pub const TIMESTAMP_HEADER: &str = "X-Lark-Request-Timestamp";
/// Header carrying the request nonce.
pub const NONCE_HEADER: &str = "X-Lark-Request-Nonce";
/// Header carrying the lowercase hex signature.
pub const SIGNATURE_HEADER: &str = "X-Lark-Signature";

/// The `type` of the subscription handshake; answered with its challenge, never published.
pub const URL_VERIFICATION: &str = "url_verification";

/// The only `schema` value Lark has defined; a payload naming another one is refused rather than
/// guessed at, so a future format shows up as an error instead of as malformed events.
pub const SCHEMA_V2: &str = "2.0";

/// AES block size, which is also the PKCS#7 block size here (DingTalk/WeCom pad to 32).
const BLOCK: usize = 16;

/// Why a callback was refused. Each variant is a distinct reply code and metric label; the
/// status the HTTP layer answers with is [`CallbackError::http_status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("body or decrypted message is not valid UTF-8")]
    Utf8,
    #[error("body or decrypted message is not a JSON object")]
    Json,
    #[error(
        "body is not a JSON object with a string field \"encrypt\" although an encrypt key is \
         configured; is the Encrypt Key also set in Lark's console?"
    )]
    InvalidBody,
    #[error(
        "body is encrypted but no encrypt key is configured; configure the Encrypt Key set in \
         Lark's console"
    )]
    UnexpectedEncrypt,
    #[error("signature headers are missing although an encrypt key is configured")]
    MissingSignature,
    #[error("signature does not match")]
    Signature,
    #[error("timestamp is not a number of seconds")]
    InvalidTimestamp,
    #[error("timestamp is outside the replay window")]
    StaleTimestamp,
    #[error("ciphertext is not valid base64")]
    Base64,
    #[error("ciphertext length {0} is shorter than 32 bytes or not a multiple of 16")]
    CiphertextLength(usize),
    #[error("padding byte {0} is outside 1..=16 or the padding bytes differ")]
    Padding(u8),
    #[error("verification token does not match")]
    Token,
    #[error("url_verification has no string field \"challenge\"")]
    MissingChallenge,
    #[error("unknown schema: {}", .0.as_deref().unwrap_or("neither \"schema\" nor \"uuid\""))]
    UnknownSchema(Option<String>),
    #[error("event has no event type (header.event_type in 2.0, event.type in v1)")]
    MissingEventType,
    #[error("event has no event id (header.event_id in 2.0, uuid in v1)")]
    MissingEventId,
}

impl CallbackError {
    /// Short stable code, used in error replies and metric labels. Codes shared with
    /// DingTalk/WeCom (`invalid_signature`, `invalid_base64`, …) mean the same thing there.
    pub fn code(&self) -> &'static str {
        match self {
            CallbackError::Utf8 => "invalid_utf8",
            CallbackError::Json => "invalid_json",
            CallbackError::InvalidBody => "invalid_body",
            CallbackError::UnexpectedEncrypt => "unexpected_encrypt",
            CallbackError::MissingSignature => "missing_signature",
            CallbackError::Signature => "invalid_signature",
            CallbackError::InvalidTimestamp => "invalid_timestamp",
            CallbackError::StaleTimestamp => "stale_timestamp",
            CallbackError::Base64 => "invalid_base64",
            CallbackError::CiphertextLength(_) => "invalid_ciphertext_length",
            CallbackError::Padding(_) => "invalid_padding",
            CallbackError::Token => "invalid_token",
            CallbackError::MissingChallenge => "missing_challenge",
            CallbackError::UnknownSchema(_) => "unknown_schema",
            CallbackError::MissingEventType => "missing_event_type",
            CallbackError::MissingEventId => "missing_event_id",
        }
    }

    /// 401 when the sender could not prove it knows the key or token, 400 for a request that is
    /// authentic (or could not be checked) but malformed. Lark retries any non-200 answer.
    pub fn http_status(&self) -> u16 {
        match self {
            CallbackError::MissingSignature | CallbackError::Signature | CallbackError::Token => {
                401
            }
            _ => 400,
        }
    }
}

/// The credentials of one Lark app's event subscription, as set in Lark's console.
///
/// An empty string counts as not set: Lark's console has no empty Encrypt Key (clearing it turns
/// encryption off), and an empty token could only ever match a missing one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LarkApp {
    /// Compared with `token` (v1 and url_verification) or `header.token` (2.0) when set.
    pub verification_token: Option<String>,
    /// When set, bodies must be encrypted and events signed with it.
    pub encrypt_key: Option<String>,
}

impl std::fmt::Debug for LarkApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs; whether they are set is what a reader needs.
        f.debug_struct("LarkApp")
            .field("verification_token", &self.token().map(|_| "<set>"))
            .field("encrypt_key", &self.key().map(|_| "<set>"))
            .finish()
    }
}

impl LarkApp {
    /// Whether its events are signed: only with an encrypt key.
    pub fn is_signed(&self) -> bool {
        self.key().is_some()
    }

    fn token(&self) -> Option<&str> {
        self.verification_token.as_deref().filter(|t| !t.is_empty())
    }

    fn key(&self) -> Option<&str> {
        self.encrypt_key.as_deref().filter(|k| !k.is_empty())
    }
}

/// The three signature headers, `None` when absent. The caller looks them up (names are
/// [`TIMESTAMP_HEADER`], [`NONCE_HEADER`], [`SIGNATURE_HEADER`]; HTTP header names are
/// case-insensitive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headers<'a> {
    pub timestamp: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// What a callback turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// The subscription handshake: answer HTTP 200 `{"challenge": challenge}` within 1 s.
    Challenge { challenge: String },
    /// An event to publish, then answer HTTP 200 within 3 s.
    Event(Event),
}

/// An authenticated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The decrypted (or plain) JSON exactly as Lark sent it, byte for byte: consumers may verify
    /// or diff it, and re-serialising would reorder keys and re-escape strings.
    pub body: Vec<u8>,
    /// `header.event_type` (2.0, e.g. `im.message.receive_v1`) or `event.type` (v1, e.g.
    /// `approval_instance`), as sent (not yet sanitised for a subject).
    pub event_type: String,
    /// `header.event_id` (2.0) or `uuid` (v1): the same on every retry of one event (up to 4
    /// retries over about 7 h, PROTOCOLS.md §7.6), so it is the dedupe key and the ce-id.
    pub event_id: String,
    /// The tenant (organisation) the event belongs to, when the payload names it.
    pub tenant_key: Option<String>,
}

/// Authenticates, decrypts and classifies one callback.
///
/// With an encrypt key, every event must carry a valid signature, and a signed timestamp
/// (seconds) within `replay_window` of `now_ms` when a window is set. The one exception is an
/// encrypted `url_verification`, answered without a signature (see the comment inside).
/// Without an encrypt key nothing is signed, and the Verification Token, when configured, is
/// the only proof of origin; with neither configured, anyone who knows the URL can post events.
pub fn open(
    app: &LarkApp,
    headers: &Headers<'_>,
    raw_body: &[u8],
    now_ms: u64,
    replay_window: Option<Duration>,
) -> Result<Incoming, CallbackError> {
    // Errors up to the decryption depend only on public bytes, so they can be told apart
    // without helping anyone who lacks the key.
    let outer = json_object(raw_body)?;
    let Some(key) = app.key() else {
        if outer.contains_key("encrypt") {
            return Err(CallbackError::UnexpectedEncrypt);
        }
        return classify(app, raw_body.to_vec(), &outer);
    };
    let encrypt = outer
        .get("encrypt")
        .and_then(Value::as_str)
        .ok_or(CallbackError::InvalidBody)?;
    match check_signature(headers, key, raw_body) {
        Ok(()) => {
            check_timestamp(headers.timestamp, now_ms, replay_window)?;
            let plaintext = decrypt(key, encrypt)?;
            let inner = json_object(&plaintext)?;
            classify(app, plaintext, &inner)
        }
        Err(refusal) => {
            // [U] PROTOCOLS.md §7.4 does not say whether Lark signs url_verification requests;
            // it says the SDK answers the challenge before, and without, checking the signature
            // (vector L4 has no headers). So an encrypted url_verification is answered whatever
            // its headers: decrypting it to well-formed JSON already proves the sender holds the
            // key, and a challenge only echoes a string. Anything else needs the signature.
            //
            // Every failure on this unauthenticated path is reported as the signature refusal
            // alone. Telling bad padding from bad JSON here would be a CBC padding oracle,
            // letting a stranger decrypt recorded ciphertexts byte by byte.
            let plaintext = decrypt(key, encrypt).map_err(|_| refusal.clone())?;
            let inner = json_object(&plaintext).map_err(|_| refusal.clone())?;
            if !is_url_verification(&inner) {
                return Err(refusal);
            }
            classify(app, plaintext, &inner)
        }
    }
}

/// Decrypts an `encrypt` value: base64 of IV ‖ AES-256-CBC ciphertext, key = SHA-256 of the
/// Encrypt Key, PKCS#7 with a block size of 16. Returns the plaintext bytes.
pub fn decrypt(encrypt_key: &str, encrypt: &str) -> Result<Vec<u8>, CallbackError> {
    let mut buf = STANDARD
        .decode(encrypt)
        .map_err(|_| CallbackError::Base64)?;
    // The IV plus at least one block; a pad block is always present, so a shorter input cannot
    // come from Lark.
    if buf.len() < 2 * BLOCK || buf.len() % BLOCK != 0 {
        return Err(CallbackError::CiphertextLength(buf.len()));
    }
    let (iv, ciphertext) = buf.split_at_mut(BLOCK);
    let iv: [u8; BLOCK] = (&*iv).try_into().expect("split at the block size");
    let plain = Aes256CbcDec::new(&aes_key(encrypt_key).into(), &iv.into())
        .decrypt_padded_mut::<NoPadding>(ciphertext)
        .expect("whole blocks");
    // Strict PKCS#7, as lark-oapi 1.7.5 now is (PROTOCOLS.md §7.2): every pad byte is checked,
    // not only the last one.
    let pad = *plain.last().expect("at least one block");
    let n = pad as usize;
    if n == 0 || n > BLOCK || plain[plain.len() - n..].iter().any(|&b| b != pad) {
        return Err(CallbackError::Padding(pad));
    }
    Ok(plain[..plain.len() - n].to_vec())
}

/// Encrypts `plaintext` as Lark does, with a chosen IV: base64 of IV ‖ AES-256-CBC ciphertext,
/// key = SHA-256 of the Encrypt Key, PKCS#7 with a block size of 16. For tests that play Lark;
/// Lark itself uses a random IV.
pub fn encrypt_with_iv(encrypt_key: &str, iv: [u8; 16], plaintext: &[u8]) -> String {
    let pad = BLOCK - plaintext.len() % BLOCK;
    let mut buf = Vec::with_capacity(BLOCK + plaintext.len() + pad);
    buf.extend_from_slice(&iv);
    buf.extend_from_slice(plaintext);
    buf.resize(BLOCK + plaintext.len() + pad, pad as u8);
    let n = buf.len() - BLOCK;
    Aes256CbcEnc::new(&aes_key(encrypt_key).into(), &iv.into())
        .encrypt_padded_mut::<NoPadding>(&mut buf[BLOCK..], n)
        .expect("buffer is a multiple of the block size");
    STANDARD.encode(buf)
}

/// `X-Lark-Signature`: lowercase hex of SHA-256(timestamp ‖ nonce ‖ encrypt_key ‖ body), a
/// plain hash over the concatenation, not an HMAC. `body` is the raw request body as sent.
pub fn signature(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
    let mut sha = Sha256::new();
    sha.update(timestamp.as_bytes());
    sha.update(nonce.as_bytes());
    sha.update(encrypt_key.as_bytes());
    sha.update(body);
    hex::encode(sha.finalize())
}

/// The AES-256 key: SHA-256 of the Encrypt Key's UTF-8 bytes.
fn aes_key(encrypt_key: &str) -> [u8; 32] {
    Sha256::digest(encrypt_key.as_bytes()).into()
}

/// All three headers must be present. Compared in constant time and case-insensitively (it is
/// hex; Lark sends lowercase, and accepting uppercase is as strict for anyone without the key).
fn check_signature(headers: &Headers<'_>, key: &str, body: &[u8]) -> Result<(), CallbackError> {
    let (Some(timestamp), Some(nonce), Some(given)) =
        (headers.timestamp, headers.nonce, headers.signature)
    else {
        return Err(CallbackError::MissingSignature);
    };
    let expected = signature(timestamp, nonce, key, body);
    let given = given.to_ascii_lowercase();
    if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        Ok(())
    } else {
        Err(CallbackError::Signature)
    }
}

/// Checks a signed timestamp (seconds) against the replay window, after the signature, so that
/// an unsigned request never learns anything about our clock.
///
/// [U] PROTOCOLS.md does not say whether Lark's retries (15 s to 6 h later) carry a new
/// timestamp; the header is named the request's timestamp and is signed with each request, so
/// each retry is taken to carry its own. Without an encrypt key the timestamp is not signed, and
/// checking it would refuse nothing a forger could not fix, so it is not checked then.
fn check_timestamp(
    timestamp: Option<&str>,
    now_ms: u64,
    replay_window: Option<Duration>,
) -> Result<(), CallbackError> {
    let Some(window) = replay_window else {
        return Ok(());
    };
    let seconds: u64 = timestamp
        .unwrap_or("")
        .parse()
        .map_err(|_| CallbackError::InvalidTimestamp)?;
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    if now_ms.abs_diff(seconds.saturating_mul(1000)) > window_ms {
        return Err(CallbackError::StaleTimestamp);
    }
    Ok(())
}

/// The signed timestamp of a request, in milliseconds, when it has one that parses.
pub fn signed_at_ms(headers: &Headers<'_>) -> Option<u64> {
    let seconds: u64 = headers.timestamp?.parse().ok()?;
    Some(seconds.saturating_mul(1000))
}

/// Parses bytes that must be a JSON object, telling bad UTF-8 from bad JSON.
/// An event pushed over the long connection (STREAMS.md §B.4): the plain event JSON, neither
/// encrypted nor signed, and no token to check (the connection was authenticated when it was
/// opened). Read as HTTP mode reads a decrypted callback, so that both publish the same
/// subject, id and tenant, and the same bytes.
pub fn pushed_event(body: Vec<u8>) -> Result<Event, CallbackError> {
    let object = json_object(&body)?;
    let unchecked = LarkApp {
        verification_token: None,
        encrypt_key: None,
    };
    match classify(&unchecked, body, &object)? {
        Incoming::Event(event) => Ok(event),
        // A handshake belongs to HTTP mode's URL check; over the connection it is no event.
        Incoming::Challenge { .. } => Err(CallbackError::UnknownSchema(Some(
            "url_verification".to_owned(),
        ))),
    }
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, CallbackError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CallbackError::Utf8)?;
    match serde_json::from_str(text).map_err(|_| CallbackError::Json)? {
        Value::Object(object) => Ok(object),
        _ => Err(CallbackError::Json),
    }
}

fn is_url_verification(object: &Map<String, Value>) -> bool {
    object.get("type").and_then(Value::as_str) == Some(URL_VERIFICATION)
}

/// A string field's value, treating an empty string like an absent field.
fn non_empty(value: Option<&Value>) -> Option<String> {
    value
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Checks the verification token, when one is configured, in constant time. An absent or
/// non-string token is a mismatch.
fn check_token(app: &LarkApp, given: Option<&Value>) -> Result<(), CallbackError> {
    let Some(expected) = app.token() else {
        return Ok(());
    };
    let given = given.and_then(Value::as_str).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(CallbackError::Token)
    }
}

/// Tells the handshake, a 2.0 event and a v1 event apart, and checks the token of each.
fn classify(
    app: &LarkApp,
    body: Vec<u8>,
    object: &Map<String, Value>,
) -> Result<Incoming, CallbackError> {
    // The handshake has neither `schema` nor `uuid`, in both subscription versions.
    if is_url_verification(object) {
        check_token(app, object.get("token"))?;
        let challenge = object
            .get("challenge")
            .and_then(Value::as_str)
            .ok_or(CallbackError::MissingChallenge)?;
        return Ok(Incoming::Challenge {
            challenge: challenge.to_owned(),
        });
    }
    // Like the SDK, the version is told by the presence of `schema` (2.0) or `uuid` (v1).
    match object.get("schema") {
        Some(Value::String(s)) if s == SCHEMA_V2 => v2(app, body, object),
        Some(other) => Err(CallbackError::UnknownSchema(Some(other.to_string()))),
        None if object.contains_key("uuid") => v1(app, body, object),
        None => Err(CallbackError::UnknownSchema(None)),
    }
}

/// `{"schema":"2.0","header":{"event_id","event_type","create_time","token","app_id",
/// "tenant_key"},"event":{…}}`.
fn v2(
    app: &LarkApp,
    body: Vec<u8>,
    object: &Map<String, Value>,
) -> Result<Incoming, CallbackError> {
    let header = object.get("header").and_then(Value::as_object);
    // The token first: an unauthenticated request learns nothing about what else is wrong.
    check_token(app, header.and_then(|h| h.get("token")))?;
    let field = |name: &str| non_empty(header.and_then(|h| h.get(name)));
    let event_type = field("event_type").ok_or(CallbackError::MissingEventType)?;
    let event_id = field("event_id").ok_or(CallbackError::MissingEventId)?;
    Ok(Incoming::Event(Event {
        body,
        event_type,
        event_id,
        tenant_key: field("tenant_key"),
    }))
}

/// `{"uuid","token","ts","type":"event_callback","event":{"type",…}}`.
fn v1(
    app: &LarkApp,
    body: Vec<u8>,
    object: &Map<String, Value>,
) -> Result<Incoming, CallbackError> {
    check_token(app, object.get("token"))?;
    let event = object.get("event").and_then(Value::as_object);
    // Lenient: the top-level `type` ("event_callback") is not checked, as the SDK does not
    // check it either; `uuid` and `event.type` are what identify a v1 event.
    let event_type =
        non_empty(event.and_then(|e| e.get("type"))).ok_or(CallbackError::MissingEventType)?;
    let event_id = non_empty(object.get("uuid")).ok_or(CallbackError::MissingEventId)?;
    // [U] v1 payloads put the tenant in `event.tenant_key`; some older ones have it at the top
    // level only. Neither is confirmed for every event family, so both are read, the event's
    // first.
    let tenant_key = non_empty(event.and_then(|e| e.get("tenant_key")))
        .or_else(|| non_empty(object.get("tenant_key")));
    Ok(Incoming::Event(Event {
        body,
        event_type,
        event_id,
        tenant_key,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const KEY: &str = "test key";
    const TOKEN: &str = "vtoken123";
    const TS: &str = "1700000000";
    const NONCE: &str = "13894283";

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json")).unwrap()
    }

    fn s(v: &Value) -> &str {
        v.as_str().unwrap()
    }

    fn app(token: Option<&str>, key: Option<&str>) -> LarkApp {
        LarkApp {
            verification_token: token.map(str::to_owned),
            encrypt_key: key.map(str::to_owned),
        }
    }

    /// [`super::open`] without a replay window: the vectors were signed years ago. The window
    /// has tests of its own.
    fn open(app: &LarkApp, headers: &Headers<'_>, body: &[u8]) -> Result<Incoming, CallbackError> {
        super::open(app, headers, body, 0, None)
    }

    /// Opens `body` signed as Lark would sign it with `key`.
    fn open_signed(app: &LarkApp, key: &str, body: &[u8]) -> Result<Incoming, CallbackError> {
        let sig = signature(TS, NONCE, key, body);
        let headers = Headers {
            timestamp: Some(TS),
            nonce: Some(NONCE),
            signature: Some(&sig),
        };
        open(app, &headers, body)
    }

    /// `{"encrypt":…}` around `plaintext`, encrypted with the vector's IV.
    fn envelope(key: &str, plaintext: &[u8]) -> Vec<u8> {
        let encrypt = encrypt_with_iv(key, std::array::from_fn(|i| i as u8), plaintext);
        json!({ "encrypt": encrypt }).to_string().into_bytes()
    }

    /// Encrypts already padded blocks, so that any padding can be produced.
    fn raw_envelope(key: &str, padded: &[u8]) -> Vec<u8> {
        assert_eq!(padded.len() % BLOCK, 0);
        let mut buf = vec![7u8; BLOCK];
        buf.extend_from_slice(padded);
        let n = padded.len();
        Aes256CbcEnc::new(&aes_key(key).into(), &[7u8; BLOCK].into())
            .encrypt_padded_mut::<NoPadding>(&mut buf[BLOCK..], n)
            .unwrap();
        json!({ "encrypt": STANDARD.encode(buf) })
            .to_string()
            .into_bytes()
    }

    fn event_of(result: Result<Incoming, CallbackError>) -> Event {
        match result {
            Ok(Incoming::Event(e)) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn challenge(c: &str) -> Result<Incoming, CallbackError> {
        Ok(Incoming::Challenge {
            challenge: c.to_owned(),
        })
    }

    #[test]
    fn signed_timestamp_is_checked_against_the_replay_window_after_the_signature() {
        let key = "test key";
        let a = app(None, Some(key));
        let body = envelope(key, v2_body(None).as_bytes());
        let window = Some(std::time::Duration::from_secs(120));
        let ts: u64 = TS.parse().unwrap();
        let at = |ts: &str, sig: &str, now_s: u64| {
            let headers = Headers {
                timestamp: Some(ts),
                nonce: Some(NONCE),
                signature: Some(sig),
            };
            super::open(&a, &headers, &body, now_s * 1000, window)
        };
        let sig = signature(TS, NONCE, key, &body);
        assert!(at(TS, &sig, ts + 120).is_ok(), "at the window's edge");
        assert!(at(TS, &sig, ts - 120).is_ok(), "as far in the future");
        assert_eq!(at(TS, &sig, ts + 121), Err(CallbackError::StaleTimestamp));
        assert_eq!(at(TS, &sig, ts - 121), Err(CallbackError::StaleTimestamp));
        // A correctly signed timestamp that is no number.
        let sig = signature("soon", NONCE, key, &body);
        assert_eq!(at("soon", &sig, ts), Err(CallbackError::InvalidTimestamp));
        // Unsigned requests learn nothing about the clock.
        assert_eq!(
            at(TS, &"0".repeat(64), ts + 10_000),
            Err(CallbackError::Signature)
        );
        // Without a window, any signed time goes.
        let sig = signature(TS, NONCE, key, &body);
        let headers = Headers {
            timestamp: Some(TS),
            nonce: Some(NONCE),
            signature: Some(&sig),
        };
        assert!(super::open(&a, &headers, &body, u64::MAX, None).is_ok());
        assert_eq!(signed_at_ms(&headers), Some(ts * 1000));
    }

    #[test]
    fn unsigned_apps_do_not_check_the_timestamp_header() {
        // Without an encrypt key nothing is signed: a stale header is no reason to refuse.
        let headers = Headers {
            timestamp: Some("1"),
            ..Headers::default()
        };
        let window = Some(std::time::Duration::from_secs(120));
        let body = v2_body(None);
        assert!(super::open(
            &app(None, None),
            &headers,
            body.as_bytes(),
            u64::MAX / 2,
            window
        )
        .is_ok());
    }

    #[test]
    fn l1_documented_decrypt() {
        let all = vectors();
        let v = &all["lark"]["L1_documented_decrypt"];
        let key = s(&v["encrypt_key"]);
        assert_eq!(hex::encode(aes_key(key)), s(&v["key_sha256_hex"]));
        let raw = STANDARD.decode(s(&v["encrypt"])).unwrap();
        assert_eq!(hex::encode(&raw[..16]), s(&v["iv_hex"]));
        assert_eq!(
            decrypt(key, s(&v["encrypt"])).unwrap(),
            s(&v["expected_plaintext"]).as_bytes()
        );
        // `hello world` is not JSON: a signed request carrying it is refused as such.
        let body = json!({ "encrypt": v["encrypt"] }).to_string();
        assert_eq!(
            open_signed(&app(None, Some(key)), key, body.as_bytes()),
            Err(CallbackError::Json)
        );
    }

    #[test]
    fn l2_encrypt_matches_vector_bytes() {
        let all = vectors();
        let v = &all["lark"]["L2_L3_encrypted_event_and_signature"];
        let iv: [u8; 16] = hex::decode(s(&v["iv_hex"])).unwrap().try_into().unwrap();
        let encrypt = encrypt_with_iv(s(&v["encrypt_key"]), iv, s(&v["plaintext"]).as_bytes());
        assert_eq!(encrypt, s(&v["expected_encrypt"]));
        assert_eq!(format!("{{\"encrypt\":\"{encrypt}\"}}"), s(&v["http_body"]));
        assert_eq!(
            decrypt(s(&v["encrypt_key"]), &encrypt).unwrap(),
            s(&v["plaintext"]).as_bytes()
        );
    }

    #[test]
    fn l3_signature_and_open() {
        let all = vectors();
        let v = &all["lark"]["L2_L3_encrypted_event_and_signature"];
        let h = &v["headers"];
        let key = s(&v["encrypt_key"]);
        let body = s(&v["http_body"]).as_bytes();
        assert_eq!(
            signature(
                s(&h["X-Lark-Request-Timestamp"]),
                s(&h["X-Lark-Request-Nonce"]),
                key,
                body
            ),
            s(&h["X-Lark-Signature"])
        );
        let headers = Headers {
            timestamp: Some(s(&h["X-Lark-Request-Timestamp"])),
            nonce: Some(s(&h["X-Lark-Request-Nonce"])),
            signature: Some(s(&h["X-Lark-Signature"])),
        };
        let a = app(Some(s(&v["verification_token"])), Some(key));
        let event = event_of(open(&a, &headers, body));
        assert_eq!(
            event,
            Event {
                body: s(&v["plaintext"]).as_bytes().to_vec(),
                event_type: "im.message.receive_v1".into(),
                event_id: "5e3702a84e847582be8db7fb73283c02".into(),
                tenant_key: Some("2ca1d211f64f6438".into()),
            }
        );
        // Upper-case hex is the same signature.
        let upper = s(&h["X-Lark-Signature"]).to_uppercase();
        let headers_upper = Headers {
            signature: Some(&upper),
            ..headers
        };
        assert_eq!(open(&a, &headers_upper, body), Ok(Incoming::Event(event)));
        // The token is checked on top of the signature.
        let other = app(Some("another"), Some(key));
        assert_eq!(open(&other, &headers, body), Err(CallbackError::Token));
    }

    #[test]
    fn wrong_signature_is_refused() {
        let all = vectors();
        let v = &all["lark"]["L2_L3_encrypted_event_and_signature"];
        let h = &v["headers"];
        let key = s(&v["encrypt_key"]);
        let body = s(&v["http_body"]).as_bytes();
        let good = Headers {
            timestamp: Some(s(&h["X-Lark-Request-Timestamp"])),
            nonce: Some(s(&h["X-Lark-Request-Nonce"])),
            signature: Some(s(&h["X-Lark-Signature"])),
        };
        let a = app(None, Some(key));
        assert!(open(&a, &good, body).is_ok());
        let mut flipped = s(&h["X-Lark-Signature"]).to_owned();
        flipped.replace_range(0..1, "3");
        let cases = [
            Headers {
                signature: Some(&flipped),
                ..good
            },
            Headers {
                signature: Some(""),
                ..good
            },
            Headers {
                timestamp: Some("1700000001"),
                ..good
            },
            Headers {
                nonce: Some("13894284"),
                ..good
            },
        ];
        for headers in cases {
            assert_eq!(
                open(&a, &headers, body),
                Err(CallbackError::Signature),
                "{headers:?}"
            );
        }
        // Another key, or one byte of the body changed (same JSON meaning, other bytes).
        assert_eq!(
            open(&app(None, Some("other key")), &good, body),
            Err(CallbackError::Signature)
        );
        let spaced = s(&v["http_body"]).replacen(':', ": ", 1);
        assert_eq!(
            open(&a, &good, spaced.as_bytes()),
            Err(CallbackError::Signature)
        );
    }

    #[test]
    fn missing_signature_headers_are_refused_for_events() {
        let all = vectors();
        let v = &all["lark"]["L2_L3_encrypted_event_and_signature"];
        let h = &v["headers"];
        let body = s(&v["http_body"]).as_bytes();
        let a = app(None, Some(s(&v["encrypt_key"])));
        let full = Headers {
            timestamp: Some(s(&h["X-Lark-Request-Timestamp"])),
            nonce: Some(s(&h["X-Lark-Request-Nonce"])),
            signature: Some(s(&h["X-Lark-Signature"])),
        };
        let cases = [
            Headers::default(),
            Headers {
                timestamp: None,
                ..full
            },
            Headers {
                nonce: None,
                ..full
            },
            Headers {
                signature: None,
                ..full
            },
        ];
        for headers in cases {
            assert_eq!(
                open(&a, &headers, body),
                Err(CallbackError::MissingSignature),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn l4_encrypted_url_verification() {
        let all = vectors();
        let v = &all["lark"]["L4_encrypted_url_verification"];
        let key = s(&v["encrypt_key"]);
        let body = s(&v["http_body"]).as_bytes();
        let iv: [u8; 16] = hex::decode(s(&v["iv_hex"])).unwrap().try_into().unwrap();
        let encrypt = encrypt_with_iv(key, iv, s(&v["plaintext"]).as_bytes());
        assert_eq!(format!("{{\"encrypt\":\"{encrypt}\"}}"), s(&v["http_body"]));
        let expected = challenge(s(&v["expected_response"]["challenge"]));
        // Without headers, as in the vector; with a configured token that matches; without one.
        assert_eq!(
            open(&app(Some(TOKEN), Some(key)), &Headers::default(), body),
            expected
        );
        assert_eq!(
            open(&app(None, Some(key)), &Headers::default(), body),
            expected
        );
        // With valid headers, and with wrong ones (the SDK never checks them for a challenge).
        assert_eq!(open_signed(&app(None, Some(key)), key, body), expected);
        let wrong = Headers {
            timestamp: Some(TS),
            nonce: Some(NONCE),
            signature: Some("00"),
        };
        assert_eq!(open(&app(None, Some(key)), &wrong, body), expected);
        // The token is still checked.
        assert_eq!(
            open(&app(Some("another"), Some(key)), &Headers::default(), body),
            Err(CallbackError::Token)
        );
        // Another key cannot decrypt it, so it is just an unsigned request.
        assert_eq!(
            open(&app(None, Some("other key")), &Headers::default(), body),
            Err(CallbackError::MissingSignature)
        );
    }

    #[test]
    fn plain_url_verification_with_and_without_token() {
        let all = vectors();
        let v = &all["lark"]["L4_encrypted_url_verification"];
        let body = s(&v["plaintext"]).as_bytes();
        let expected = challenge("ajls384kdjx98XX");
        let none = Headers::default();
        assert_eq!(open(&app(None, None), &none, body), expected);
        assert_eq!(open(&app(Some(TOKEN), None), &none, body), expected);
        assert_eq!(
            open(&app(Some("vtoken124"), None), &none, body),
            Err(CallbackError::Token)
        );
        let no_token = br#"{"challenge":"c1","type":"url_verification"}"#;
        assert_eq!(open(&app(None, None), &none, no_token), challenge("c1"));
        assert_eq!(
            open(&app(Some(TOKEN), None), &none, no_token),
            Err(CallbackError::Token)
        );
        let no_challenge = br#"{"token":"vtoken123","type":"url_verification"}"#;
        assert_eq!(
            open(&app(Some(TOKEN), None), &none, no_challenge),
            Err(CallbackError::MissingChallenge)
        );
        // An empty configured token counts as not set.
        assert_eq!(open(&app(Some(""), None), &none, no_token), challenge("c1"));
    }

    #[test]
    fn unauthenticated_failures_all_look_alike() {
        // Without a valid signature, only a decryptable url_verification passes; every other
        // outcome of decrypting must give the same answer (no padding oracle).
        let a = app(None, Some(KEY));
        let mut bad_pad = vec![b'{'; 32];
        bad_pad[31] = 0;
        let bodies = [
            br#"{"encrypt":"***"}"#.to_vec(),
            json!({ "encrypt": STANDARD.encode([0u8; 20]) })
                .to_string()
                .into_bytes(),
            raw_envelope(KEY, &bad_pad),
            envelope(KEY, b"not json"),
            envelope(KEY, &[0xff, 0xfe]),
            envelope(KEY, br#"{"schema":"9"}"#),
        ];
        let wrong = Headers {
            timestamp: Some(TS),
            nonce: Some(NONCE),
            signature: Some("00"),
        };
        for body in &bodies {
            assert_eq!(
                open(&a, &Headers::default(), body),
                Err(CallbackError::MissingSignature)
            );
            assert_eq!(open(&a, &wrong, body), Err(CallbackError::Signature));
        }
        // The same bodies, signed, are told apart.
        let codes: Vec<_> = bodies
            .iter()
            .map(|b| open_signed(&a, KEY, b).unwrap_err().code())
            .collect();
        assert_eq!(
            codes,
            [
                "invalid_base64",
                "invalid_ciphertext_length",
                "invalid_padding",
                "invalid_json",
                "invalid_utf8",
                "unknown_schema"
            ]
        );
    }

    #[test]
    fn ciphertext_must_be_base64_and_whole_blocks_after_the_iv() {
        let a = app(None, Some(KEY));
        for n in [0usize, 15, 16, 31, 33, 40, 47] {
            let body = json!({ "encrypt": STANDARD.encode(vec![1u8; n]) }).to_string();
            assert_eq!(
                open_signed(&a, KEY, body.as_bytes()),
                Err(CallbackError::CiphertextLength(n)),
                "{n}"
            );
        }
        for bad in ["***", "AAAA AAAA", "AAA", "AAECAwQFBgcICQoLDA0ODw=="] {
            let body = json!({ "encrypt": bad }).to_string();
            let got = open_signed(&a, KEY, body.as_bytes()).unwrap_err();
            // The last one is valid base64 of 16 bytes: too short.
            let want = if bad.len() == 24 {
                CallbackError::CiphertextLength(16)
            } else {
                CallbackError::Base64
            };
            assert_eq!(got, want, "{bad}");
        }
    }

    #[test]
    fn padding_is_checked_strictly() {
        let a = app(None, Some(KEY));
        let mut block = br#"{"schema":"2.0"}"#.to_vec(); // 16 bytes
        block.extend_from_slice(&[0u8; 16]);
        for (last, also_15th) in [(0u8, 0u8), (17, 17), (0xff, 0xff), (2, 3), (16, 15)] {
            let mut padded = block.clone();
            padded[31] = last;
            padded[30] = also_15th;
            if last == 16 {
                // All 16 bytes 16 except one.
                padded[16..30].fill(16);
            }
            assert_eq!(
                open_signed(&a, KEY, &raw_envelope(KEY, &padded)),
                Err(CallbackError::Padding(last)),
                "{last}"
            );
        }
        // A whole block of 16s is valid and stripped.
        let mut full = block.clone();
        full[16..].fill(16);
        assert_eq!(
            decrypt(
                KEY,
                s(&json_object(&raw_envelope(KEY, &full)).unwrap()["encrypt"])
            ),
            Ok(block[..16].to_vec())
        );
        // One byte of padding.
        let mut one = block.clone();
        one[31] = 1;
        assert_eq!(
            decrypt(
                KEY,
                s(&json_object(&raw_envelope(KEY, &one)).unwrap()["encrypt"])
            ),
            Ok(one[..31].to_vec())
        );
    }

    #[test]
    fn plaintext_must_be_utf8_json_object() {
        let a = app(None, Some(KEY));
        let cases: [(&[u8], CallbackError); 5] = [
            (b"\xff\xfe{}", CallbackError::Utf8),
            (b"hello world", CallbackError::Json),
            (b"", CallbackError::Json),
            (b"[1,2]", CallbackError::Json),
            (b"\"url_verification\"", CallbackError::Json),
        ];
        for (plaintext, want) in cases {
            assert_eq!(
                open_signed(&a, KEY, &envelope(KEY, plaintext)),
                Err(want),
                "{plaintext:?}"
            );
        }
    }

    #[test]
    fn outer_body_must_match_the_configuration() {
        let none = Headers::default();
        // Encrypted body, no key configured.
        let enc = envelope(KEY, br#"{"challenge":"c","type":"url_verification"}"#);
        assert_eq!(
            open(&app(None, None), &none, &enc),
            Err(CallbackError::UnexpectedEncrypt)
        );
        // An empty configured key counts as not set.
        assert_eq!(
            open(&app(None, Some("")), &none, &enc),
            Err(CallbackError::UnexpectedEncrypt)
        );
        // Plain body, key configured: refused even when signed.
        let a = app(None, Some(KEY));
        let plain = br#"{"challenge":"c","type":"url_verification"}"#;
        assert_eq!(open_signed(&a, KEY, plain), Err(CallbackError::InvalidBody));
        assert_eq!(
            open_signed(&a, KEY, br#"{"encrypt":42}"#),
            Err(CallbackError::InvalidBody)
        );
        assert_eq!(
            open_signed(&a, KEY, br#"["encrypt"]"#),
            Err(CallbackError::Json)
        );
        // Raw body not UTF-8 or not JSON, with and without a key.
        for a in [app(None, None), app(None, Some(KEY))] {
            assert_eq!(
                open(&a, &none, b"{\"a\":\"\xff\"}"),
                Err(CallbackError::Utf8)
            );
            assert_eq!(open(&a, &none, b"{"), Err(CallbackError::Json));
        }
        assert_eq!(
            open(&app(None, None), &none, b"[]"),
            Err(CallbackError::Json)
        );
    }

    fn v2_body(token: Option<&str>) -> String {
        let mut header = json!({
            "event_id": "ev1",
            "event_type": "im.message.receive_v1",
            "create_time": "1608725989000",
            "app_id": "cli_x",
            "tenant_key": "tk2"
        });
        if let Some(t) = token {
            header["token"] = json!(t);
        }
        json!({ "schema": "2.0", "header": header, "event": {} }).to_string()
    }

    #[test]
    fn v2_plain_event_and_token() {
        let none = Headers::default();
        let body = v2_body(Some(TOKEN));
        let want = Event {
            body: body.as_bytes().to_vec(),
            event_type: "im.message.receive_v1".into(),
            event_id: "ev1".into(),
            tenant_key: Some("tk2".into()),
        };
        for a in [app(None, None), app(Some(TOKEN), None)] {
            assert_eq!(
                open(&a, &none, body.as_bytes()),
                Ok(Incoming::Event(want.clone()))
            );
        }
        let a = app(Some(TOKEN), None);
        for bad in [v2_body(Some("vtoken12")), v2_body(Some("")), v2_body(None)] {
            assert_eq!(
                open(&a, &none, bad.as_bytes()),
                Err(CallbackError::Token),
                "{bad}"
            );
        }
        // A top-level token does not stand in for header.token in 2.0.
        let top =
            br#"{"schema":"2.0","token":"vtoken123","header":{"event_id":"e","event_type":"t"}}"#;
        assert_eq!(open(&a, &none, top), Err(CallbackError::Token));
    }

    #[test]
    fn v2_needs_event_type_and_id() {
        let a = app(None, None);
        let none = Headers::default();
        let cases: [(&[u8], CallbackError); 6] = [
            (
                br#"{"schema":"2.0","header":{"event_id":"e"}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"schema":"2.0","header":{"event_id":"e","event_type":""}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"schema":"2.0","header":{"event_id":"e","event_type":7}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"schema":"2.0","event":{}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"schema":"2.0","header":{"event_type":"t"}}"#,
                CallbackError::MissingEventId,
            ),
            (
                br#"{"schema":"2.0","header":{"event_type":"t","event_id":""}}"#,
                CallbackError::MissingEventId,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                open(&a, &none, body),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let ok = br#"{"schema":"2.0","header":{"event_type":"t","event_id":"e"}}"#;
        assert_eq!(
            open(&a, &none, ok),
            Ok(Incoming::Event(Event {
                body: ok.to_vec(),
                event_type: "t".into(),
                event_id: "e".into(),
                tenant_key: None,
            }))
        );
    }

    #[test]
    fn unknown_schema_is_refused() {
        let a = app(None, None);
        let none = Headers::default();
        let cases: [(&[u8], Option<&str>); 5] = [
            (
                br#"{"schema":"1.0","header":{"event_type":"t","event_id":"e"}}"#,
                Some("\"1.0\""),
            ),
            (
                br#"{"schema":"3.0","uuid":"u","event":{"type":"t"}}"#,
                Some("\"3.0\""),
            ),
            (
                br#"{"schema":2,"header":{"event_type":"t","event_id":"e"}}"#,
                Some("2"),
            ),
            (br#"{"schema":null}"#, Some("null")),
            (br#"{"type":"event_callback","event":{"type":"t"}}"#, None),
        ];
        for (body, schema) in cases {
            assert_eq!(
                open(&a, &none, body),
                Err(CallbackError::UnknownSchema(schema.map(str::to_owned))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn v1_event_token_and_fields() {
        let none = Headers::default();
        let body = br#"{"uuid":"41b5f371157e3d5341b38b20396e77a3","token":"vtoken123","ts":"1550038209.428520","type":"event_callback","event":{"type":"approval_instance","tenant_key":"tk1","instance_code":"x"}}"#;
        let want = Event {
            body: body.to_vec(),
            event_type: "approval_instance".into(),
            event_id: "41b5f371157e3d5341b38b20396e77a3".into(),
            tenant_key: Some("tk1".into()),
        };
        for a in [app(None, None), app(Some(TOKEN), None)] {
            assert_eq!(open(&a, &none, body), Ok(Incoming::Event(want.clone())));
        }
        let a = app(Some(TOKEN), None);
        let wrong =
            br#"{"uuid":"u","token":"vtoken","type":"event_callback","event":{"type":"t"}}"#;
        let absent = br#"{"uuid":"u","type":"event_callback","event":{"type":"t"}}"#;
        let in_event =
            br#"{"uuid":"u","type":"event_callback","event":{"type":"t","token":"vtoken123"}}"#;
        for bad in [&wrong[..], &absent[..], &in_event[..]] {
            assert_eq!(open(&a, &none, bad), Err(CallbackError::Token));
        }
        // Tenant at the top level when the event has none; the event's wins otherwise.
        let top = br#"{"uuid":"u","tenant_key":"top","event":{"type":"t"}}"#;
        assert_eq!(
            event_of(open(&app(None, None), &none, top))
                .tenant_key
                .as_deref(),
            Some("top")
        );
        let both = br#"{"uuid":"u","tenant_key":"top","event":{"type":"t","tenant_key":"ev"}}"#;
        assert_eq!(
            event_of(open(&app(None, None), &none, both))
                .tenant_key
                .as_deref(),
            Some("ev")
        );
        let neither = br#"{"uuid":"u","event":{"type":"t"}}"#;
        assert_eq!(
            event_of(open(&app(None, None), &none, neither)).tenant_key,
            None
        );
    }

    #[test]
    fn v1_needs_event_type_and_id() {
        let a = app(None, None);
        let none = Headers::default();
        let cases: [(&[u8], CallbackError); 5] = [
            (
                br#"{"uuid":"u","type":"event_callback"}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"uuid":"u","type":"event_callback","event":{}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"uuid":"u","type":"approval","event":{"type":""}}"#,
                CallbackError::MissingEventType,
            ),
            (
                br#"{"uuid":7,"event":{"type":"t"}}"#,
                CallbackError::MissingEventId,
            ),
            (
                br#"{"uuid":"","event":{"type":"t"}}"#,
                CallbackError::MissingEventId,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                open(&a, &none, body),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn encrypted_events_keep_their_bytes_and_check_the_token() {
        // Odd spacing, key order and escapes survive: the body is not re-serialised.
        let plaintext = "{ \"uuid\" : \"u1\",\"token\":\"vtoken123\", \"event\":{\"text\":\"\\u4f60\u{597d}\",\"type\":\"t\"} }\n";
        let a = app(Some(TOKEN), Some(KEY));
        let event = event_of(open_signed(&a, KEY, &envelope(KEY, plaintext.as_bytes())));
        assert_eq!(event.body, plaintext.as_bytes());
        assert_eq!(
            (event.event_type.as_str(), event.event_id.as_str()),
            ("t", "u1")
        );
        let wrong = plaintext.replace("vtoken123", "vtoken321");
        assert_eq!(
            open_signed(&a, KEY, &envelope(KEY, wrong.as_bytes())),
            Err(CallbackError::Token)
        );
        let v2 = v2_body(Some("nope"));
        assert_eq!(
            open_signed(&a, KEY, &envelope(KEY, v2.as_bytes())),
            Err(CallbackError::Token)
        );
        let v2 = v2_body(Some(TOKEN));
        assert_eq!(
            event_of(open_signed(&a, KEY, &envelope(KEY, v2.as_bytes()))).body,
            v2.as_bytes()
        );
    }

    #[test]
    fn codes_and_statuses() {
        let table = [
            (CallbackError::Utf8, "invalid_utf8", 400),
            (CallbackError::Json, "invalid_json", 400),
            (CallbackError::InvalidBody, "invalid_body", 400),
            (CallbackError::UnexpectedEncrypt, "unexpected_encrypt", 400),
            (CallbackError::MissingSignature, "missing_signature", 401),
            (CallbackError::Signature, "invalid_signature", 401),
            (CallbackError::Base64, "invalid_base64", 400),
            (
                CallbackError::CiphertextLength(3),
                "invalid_ciphertext_length",
                400,
            ),
            (CallbackError::Padding(0), "invalid_padding", 400),
            (CallbackError::Token, "invalid_token", 401),
            (CallbackError::MissingChallenge, "missing_challenge", 400),
            (CallbackError::UnknownSchema(None), "unknown_schema", 400),
            (CallbackError::MissingEventType, "missing_event_type", 400),
            (CallbackError::MissingEventId, "missing_event_id", 400),
        ];
        for (e, code, status) in table {
            assert_eq!((e.code(), e.http_status()), (code, status), "{e}");
        }
        assert_eq!(
            CallbackError::UnknownSchema(Some("\"1.0\"".into())).to_string(),
            "unknown schema: \"1.0\""
        );
        // The codes shared with DingTalk/WeCom are spelled the same there.
        use crate::platform::msgcrypt::DecryptError;
        assert_eq!(DecryptError::Base64.code(), CallbackError::Base64.code());
        assert_eq!(
            DecryptError::Padding(0).code(),
            CallbackError::Padding(0).code()
        );
        assert_eq!(
            DecryptError::CiphertextLength(1).code(),
            CallbackError::CiphertextLength(1).code()
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let shown = format!("{:?}", app(Some("s3cret-token"), Some("s3cret-key")));
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<set>"), "{shown}");
    }

    proptest! {
        #[test]
        fn round_trip(plaintext in proptest::collection::vec(any::<u8>(), 0..200),
                      iv in any::<[u8; 16]>(),
                      key in "[ -~]{1,40}") {
            let encrypt = encrypt_with_iv(&key, iv, &plaintext);
            let raw = STANDARD.decode(&encrypt).unwrap();
            prop_assert_eq!(&raw[..16], &iv[..]);
            prop_assert_eq!(raw.len() % 16, 0);
            prop_assert!(raw.len() > 16 + plaintext.len());
            prop_assert_eq!(decrypt(&key, &encrypt).unwrap(), plaintext);
        }

        #[test]
        fn never_panics_on_arbitrary_input(body in proptest::collection::vec(any::<u8>(), 0..200),
                                            blocks in proptest::collection::vec(any::<u8>(), 0..6)) {
            let a = app(Some(TOKEN), Some(KEY));
            let _ = open(&a, &Headers::default(), &body);
            let _ = open(&app(None, None), &Headers::default(), &body);
            let ct = STANDARD.encode(blocks.iter().flat_map(|b| [*b; 16]).collect::<Vec<_>>());
            let _ = open_signed(&a, KEY, json!({ "encrypt": ct }).to_string().as_bytes());
        }
    }
}
