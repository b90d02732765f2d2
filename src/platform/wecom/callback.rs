//! Opening a WeCom callback and building its passive reply (PROTOCOLS.md §5). Pure functions
//! over bytes: the HTTP layer parses the query, reads the body and maps [`CallbackError`] to a
//! status with [`CallbackError::status`].
//!
//! - `GET` (URL verification, §5.1): [`verify_url`] checks the signature over `echostr`,
//!   decrypts it, and returns the plaintext to echo back as the whole response body.
//! - `POST` (message or event push, §5.2): [`open`] reads the `Encrypt` value from the XML (or
//!   JSON) envelope, checks the signature over it, decrypts it, and turns the decrypted XML into
//!   a flat JSON object ([`Event`]) for the bus. A bridge answers 200 with an empty body; an
//!   encrypted passive reply ([`passive_reply`]) is there for completeness.
//!
//! The crypto is the scheme DingTalk shares ([`crate::platform::msgcrypt`]); the receiver id is
//! the corpId (or a suiteId), and `msgcrypt` already refuses any other one.
//!
//! # XML to JSON
//!
//! WeCom payloads are flat XML documents with an occasional nested block (`<ExtAttr><Item>…`,
//! `<SendLocationInfo>`, `<BatchJob>`, approval details). [`xml_to_json`] maps them as follows:
//!
//! - The root element (`<xml>`, whatever its name) becomes the JSON object; its name is dropped.
//! - An element with no child element becomes a **string**: its text, CDATA unwrapped, the five
//!   predefined entities and character references resolved, line ends normalised to `\n` (as
//!   XML 1.0 requires), and nothing trimmed. `<a/>` and `<a></a>` become `""`. Numbers stay
//!   strings (`CreateTime`, `AgentID`, `MsgId`): XML has no types and guessing would change an
//!   id such as `007`.
//! - An element with child elements becomes an **object** keyed by child name. Whitespace
//!   between children is formatting and is dropped; other text (mixed content, which WeCom never
//!   sends) is kept, trimmed, under the key `#text`, a name no XML element can have.
//! - A name that occurs more than once among siblings becomes an **array** of the values in
//!   document order; a name that occurs once stays a single value. So one `<Item>` is an
//!   object and two are an array: consumers of repeatable blocks must accept both.
//! - Attributes, comments, processing instructions and the XML declaration are ignored (WeCom
//!   uses none of them for data).
//! - A `DOCTYPE` (the only place entities can be declared, hence XXE and "billion laughs") and
//!   any reference to an entity other than the five predefined ones are refused as
//!   `unsupported_xml`; nothing is ever expanded or fetched. Documents larger than
//!   [`Limits::max_xml_bytes`] or nested deeper than [`Limits::max_depth`] are refused before
//!   or while parsing, so the work per request stays bounded.
//!
//! The JSON object is a `serde_json::Map`: key order carries no meaning, and ids derived from it
//! ([`Event::ce_id`]) never depend on it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::platform::msgcrypt::{self, DecryptError, MsgCrypt};

/// A WeCom app ready to verify and decrypt callbacks.
#[derive(Debug, Clone)]
pub struct WeComApp {
    pub crypt: MsgCrypt,
    pub keep_raw_xml: bool,
}

/// Which XML document a parse error is about: the envelope anyone can send, or the decrypted
/// message, which only someone holding the key can write. Both get the same error code; the
/// message says which, so a log tells a scanner from a misconfigured key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Envelope,
    Message,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Envelope => "envelope",
            Part::Message => "decrypted message",
        })
    }
}

/// Why a callback was refused. Each variant is a distinct reply code and metric label
/// ([`code`](Self::code)); [`status`](Self::status) is the HTTP status the ingress answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("missing query parameter {0}")]
    MissingParameter(&'static str),
    #[error("body looks like JSON but is not a JSON object: {0}")]
    InvalidJson(String),
    #[error("{0} is not well-formed XML: {1}")]
    InvalidXml(Part, String),
    #[error("{0} uses an XML feature that is refused: {1}")]
    UnsupportedXml(Part, String),
    #[error("{part} is {size} bytes, more than the {max} allowed")]
    XmlTooLarge { part: Part, size: usize, max: usize },
    #[error("{0} nests elements deeper than {1} levels")]
    XmlTooDeep(Part, usize),
    #[error("body has no text Encrypt element or \"encrypt\" field")]
    MissingEncrypt,
    #[error("signature does not match")]
    Signature,
    #[error("timestamp is not a number of seconds")]
    InvalidTimestamp,
    #[error("timestamp is outside the replay window")]
    StaleTimestamp,
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    #[error("decrypted message is not valid UTF-8")]
    Utf8,
}

impl CallbackError {
    /// Short stable code, used in error replies and metric labels. Codes shared with DingTalk
    /// ([`crate::platform::dingtalk::callback::CallbackError::code`], [`DecryptError::code`])
    /// mean the same thing, so one dashboard reads both platforms.
    pub fn code(&self) -> &'static str {
        match self {
            CallbackError::MissingParameter(_) => "missing_parameter",
            CallbackError::InvalidJson(_) => "invalid_json",
            CallbackError::InvalidXml(..) => "invalid_xml",
            CallbackError::UnsupportedXml(..) => "unsupported_xml",
            CallbackError::XmlTooLarge { .. } => "xml_too_large",
            CallbackError::XmlTooDeep(..) => "xml_too_deep",
            CallbackError::MissingEncrypt => "missing_encrypt",
            CallbackError::Signature => "invalid_signature",
            CallbackError::InvalidTimestamp => "invalid_timestamp",
            CallbackError::StaleTimestamp => "stale_timestamp",
            CallbackError::Decrypt(e) => e.code(),
            CallbackError::Utf8 => "invalid_utf8",
        }
    }

    /// The HTTP status to answer: 401 when the signature does not match (the sender does not
    /// hold the token), 403 when a correctly signed and encrypted message is for another corp
    /// (our key, someone else's receiver id), 400 for everything else. All are final: WeCom
    /// retrying the same bytes cannot succeed.
    pub fn status(&self) -> u16 {
        match self {
            CallbackError::Signature => 401,
            CallbackError::Decrypt(DecryptError::ReceiverMismatch) => 403,
            _ => 400,
        }
    }
}

/// Bounds on the XML this module parses, so that one request costs bounded work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest envelope body and largest decrypted message, in bytes.
    pub max_xml_bytes: usize,
    /// Deepest element nesting; the root element is level 1. WeCom's deepest payloads
    /// (`<xml><ExtAttr><Item><Web>…`) use 4.
    pub max_depth: usize,
}

impl Default for Limits {
    /// 256 KiB and 32 levels: far above anything WeCom sends (a text message holds at most
    /// 2048 bytes), far below anything that costs real time to parse.
    fn default() -> Self {
        Limits {
            max_xml_bytes: 256 * 1024,
            max_depth: 32,
        }
    }
}

/// The query parameters of a callback. WeCom always spells them `msg_signature`, `timestamp`
/// (seconds) and `nonce`; `echostr` comes with the `GET` verification only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params<'a> {
    pub signature: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    /// `echostr`, repaired by [`repair_base64`]; `None` on a `POST`.
    pub echostr: Option<Cow<'a, str>>,
}

impl<'a> Params<'a> {
    /// Reads the parameters from an already percent-decoded query map.
    pub fn from_query(query: &'a HashMap<String, String>) -> Result<Self, CallbackError> {
        let get = |name: &'static str| {
            query
                .get(name)
                .map(String::as_str)
                .ok_or(CallbackError::MissingParameter(name))
        };
        Ok(Params {
            signature: get("msg_signature")?,
            timestamp: get("timestamp")?,
            nonce: get("nonce")?,
            echostr: query.get("echostr").map(|e| repair_base64(e)),
        })
    }
}

/// Undoes what a query decoder may have done to a base64 value, so that the signature is
/// computed over the ciphertext exactly as Tencent signed it (PROTOCOLS.md §0.4, §5.1).
///
/// - A space becomes `+` again. Base64 has no spaces, but it has `+`, which a form decoder
///   (warp's, `serde_urlencoded`) turns into a space. Tencent encodes `+` as `%2B` (§5.1), but a
///   proxy or a hand-written client may not, so this is lenient and costs nothing: the
///   signature still has to match.
/// - If the value still contains `%`, it is percent-decoded once more. `%` is not a base64
///   character, so a value holding one is not base64 as it is: it was encoded twice (W3's
///   `%2F`, `%2B` and `%3D` seen through a proxy that escaped the `%`) or the caller handed us
///   the raw query value. A malformed escape or a non-UTF-8 result leaves the value as it was;
///   it then fails the signature or base64 check.
///
/// `%2B` decodes to `+`, never to a space: this is percent-decoding, not form decoding.
pub fn repair_base64(value: &str) -> Cow<'_, str> {
    let value = if value.contains(' ') {
        Cow::Owned(value.replace(' ', "+"))
    } else {
        Cow::Borrowed(value)
    };
    if !value.contains('%') {
        return value;
    }
    match crate::platform::percent_decode(&value) {
        Some(decoded) => Cow::Owned(decoded),
        None => value,
    }
}

/// Checks the signature over `encrypt` and, when a window is configured, that the request's
/// timestamp (seconds) is within it of `now_ms`. The window is checked after the signature, so
/// that an unsigned request never learns anything about our clock.
fn authenticate(
    crypt: &MsgCrypt,
    params: &Params<'_>,
    encrypt: &str,
    now_ms: u64,
    replay_window: Option<Duration>,
) -> Result<(), CallbackError> {
    if !crypt.verify(params.signature, params.timestamp, params.nonce, encrypt) {
        return Err(CallbackError::Signature);
    }
    if let Some(window) = replay_window {
        let ts: u64 = params
            .timestamp
            .parse()
            .map_err(|_| CallbackError::InvalidTimestamp)?;
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if now_ms.abs_diff(ts.saturating_mul(1000)) > window_ms {
            return Err(CallbackError::StaleTimestamp);
        }
    }
    Ok(())
}

/// Answers the `GET` URL verification (PROTOCOLS.md §5.1): verifies the signature over the
/// (repaired) `echostr`, decrypts it (which also checks that the receiver id is the configured
/// corpId), and returns the plaintext. The HTTP body must be exactly these bytes: no quotes, no
/// BOM, no newline.
pub fn verify_url(
    crypt: &MsgCrypt,
    params: &Params<'_>,
    now_ms: u64,
    replay_window: Option<Duration>,
) -> Result<Vec<u8>, CallbackError> {
    let echostr = params
        .echostr
        .as_deref()
        .ok_or(CallbackError::MissingParameter("echostr"))?;
    authenticate(crypt, params, echostr, now_ms, replay_window)?;
    Ok(crypt.decrypt(echostr)?.message)
}

/// A verified, decrypted message or event push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The decrypted XML exactly as WeCom sent it.
    pub xml: String,
    /// The flat JSON object of the message (see the module documentation), serialised: what
    /// the bus carries.
    pub body: Vec<u8>,
    fields: Map<String, Value>,
}

impl Event {
    /// The flat JSON object the body was serialised from.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// A top-level field with a text value (nested blocks and repeated fields are not text).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// The subject suffix on the bus: the `Event` value for `MsgType=event` (`change_contact`,
    /// `enter_agent`, …), `msg.<MsgType>` for messages (`msg.text`, `msg.image`, …), so that
    /// messages and events never share a name. `unknown` stands in for a missing value. Not
    /// sanitised for a subject: that is the bus's business (`bus::sanitize_event_type`).
    pub fn event_type(&self) -> String {
        let non_empty = |name| self.field(name).filter(|v| !v.is_empty());
        match non_empty("MsgType") {
            Some("event") => non_empty("Event").unwrap_or("unknown").to_owned(),
            Some(msg_type) => format!("msg.{msg_type}"),
            None => "unknown".to_owned(),
        }
    }

    /// The corp the message is for: `ToUserName` of the decrypted message (authenticated,
    /// unlike the envelope's copy).
    pub fn tenant(&self) -> Option<&str> {
        self.field("ToUserName")
    }

    /// The app (`AgentID`) the message is for; some events (contact changes) have none.
    pub fn agent_id(&self) -> Option<&str> {
        self.field("AgentID").filter(|v| !v.is_empty())
    }

    /// A stable event id, `wecom-` and 32 hex digits, so that WeCom's retries of one push
    /// (PROTOCOLS.md §5.2: up to 3, each re-encrypted) get the same id and the bus drops them.
    ///
    /// - Messages: a hash of `MsgId`, the documented dedupe key, scoped by corp and agent so
    ///   that two corps' ids can never collide in one stream.
    /// - Events (no `MsgId`): PROTOCOLS.md suggests `FromUserName + CreateTime`, but two
    ///   contact changes in the same second (two users added, a user and a tag updated) share
    ///   those. The id is therefore a hash of the whole flat JSON object, which includes
    ///   `FromUserName`, `CreateTime`, `Event`, `ChangeType`, `UserID`, `Id`, `TagId`, … A
    ///   retry carries the same content; it is hashed with keys sorted, so neither the
    ///   document's element order nor its whitespace between elements changes the id.
    pub fn ce_id(&self) -> String {
        let mut h = Sha256::new();
        match self.field("MsgId").filter(|v| !v.is_empty()) {
            Some(msg_id) => {
                for part in [
                    "msg",
                    self.tenant().unwrap_or(""),
                    self.agent_id().unwrap_or(""),
                    msg_id,
                ] {
                    h.update(part.as_bytes());
                    h.update([0]);
                }
            }
            None => {
                h.update(b"event\0");
                hash_canonical(&mut h, &Value::Object(self.fields.clone()));
            }
        }
        format!("wecom-{}", hex::encode(&h.finalize()[..16]))
    }
}

/// Feeds a value to the hasher with object keys sorted and every item length-prefixed, so the
/// bytes are unambiguous and independent of map order (serde_json's `preserve_order` feature,
/// if some crate ever enables it, would otherwise change ids).
fn hash_canonical(h: &mut Sha256, value: &Value) {
    fn text(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    match value {
        Value::Object(map) => {
            h.update(b"o");
            h.update((map.len() as u64).to_be_bytes());
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                text(h, k);
                hash_canonical(h, v);
            }
        }
        Value::Array(items) => {
            h.update(b"a");
            h.update((items.len() as u64).to_be_bytes());
            for v in items {
                hash_canonical(h, v);
            }
        }
        Value::String(s) => {
            h.update(b"s");
            text(h, s);
        }
        // xml_to_json only makes objects, arrays and strings.
        other => {
            h.update(b"j");
            text(h, &other.to_string());
        }
    }
}

/// Opens a `POST` push (PROTOCOLS.md §5.2): reads `Encrypt` from the envelope, checks the
/// signature over it and the replay window, decrypts it (checking the receiver id), and maps
/// the decrypted XML to flat JSON.
///
/// The envelope is `<xml><ToUserName/><Encrypt/><AgentID/></xml>`, or for some products the
/// JSON object `{"tousername", "encrypt", "agentid"}`; a body whose first non-blank character
/// is `{` is read as JSON, anything else as XML. Only `Encrypt` is used from it: `ToUserName`
/// and `AgentID` there are unauthenticated copies of what the decrypted message says.
pub fn open(
    crypt: &MsgCrypt,
    params: &Params<'_>,
    body: &[u8],
    now_ms: u64,
    replay_window: Option<Duration>,
    limits: &Limits,
) -> Result<Event, CallbackError> {
    let encrypt = envelope_encrypt(body, limits)?;
    authenticate(crypt, params, &encrypt, now_ms, replay_window)?;
    let decrypted = crypt.decrypt(&encrypt)?;
    let xml = String::from_utf8(decrypted.message).map_err(|_| CallbackError::Utf8)?;
    let fields = xml_to_json(&xml, Part::Message, limits)?;
    let body = serde_json::to_vec(&fields).expect("a JSON map serialises");
    Ok(Event { xml, body, fields })
}

/// The `Encrypt` value of an XML or JSON envelope, with the layout of a pretty-printed envelope
/// removed ([`trim_layout`]) and then repaired like `echostr` (a space becomes `+`; see
/// [`repair_base64`]).
fn envelope_encrypt(body: &[u8], limits: &Limits) -> Result<String, CallbackError> {
    if body.len() > limits.max_xml_bytes {
        return Err(CallbackError::XmlTooLarge {
            part: Part::Envelope,
            size: body.len(),
            max: limits.max_xml_bytes,
        });
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    // The JSON variant is an object; an array cannot be XML either, so it is refused as JSON.
    let fields = if matches!(first, Some(b'{' | b'[')) {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(CallbackError::InvalidJson("not an object".into())),
            Err(e) => return Err(CallbackError::InvalidJson(e.to_string())),
        }
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|_| CallbackError::InvalidXml(Part::Envelope, "not UTF-8".into()))?;
        xml_to_json(text, Part::Envelope, limits)?
    };
    // XML says `Encrypt`, the JSON variant `encrypt`; any other casing is accepted too, the
    // exact spellings first so that a body holding two of them is read predictably.
    let value = fields
        .get("Encrypt")
        .or_else(|| fields.get("encrypt"))
        .or_else(|| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("encrypt"))
                .map(|(_, v)| v)
        })
        .and_then(Value::as_str)
        .ok_or(CallbackError::MissingEncrypt)?;
    let value = trim_layout(value);
    if value.is_empty() || value.bytes().all(|b| b.is_ascii_whitespace()) {
        return Err(CallbackError::MissingEncrypt);
    }
    Ok(repair_base64(value).into_owned())
}

/// Removes leading and trailing whitespace that is layout, keeping spaces that stand for a
/// lost `+`. Base64 has no whitespace of its own, but a ciphertext can begin or end with `+`
/// (W2's ends with one), which a form decoder turns into a space; indentation, on the other
/// hand, always comes with a line break. So a leading or trailing run of whitespace is dropped
/// when it holds a line break or a tab, and left for [`repair_base64`] when it is spaces only.
fn trim_layout(s: &str) -> &str {
    let layout = |run: &str| run.contains(['\n', '\r', '\t']);
    let start = s.len()
        - s.trim_start_matches(|c: char| c.is_ascii_whitespace())
            .len();
    let s = if layout(&s[..start]) { &s[start..] } else { s };
    let end = s.trim_end_matches(|c: char| c.is_ascii_whitespace()).len();
    if layout(&s[end..]) {
        &s[..end]
    } else {
        s
    }
}

/// One open element while parsing.
struct Frame {
    name: String,
    children: Map<String, Value>,
    has_children: bool,
    text: String,
}

impl Frame {
    fn new(name: String) -> Self {
        Frame {
            name,
            children: Map::new(),
            has_children: false,
            text: String::new(),
        }
    }

    /// Adds a child value; a repeated name turns into an array in document order. Element
    /// values are only ever strings or objects, so an array here can only come from repetition.
    fn add(&mut self, name: String, value: Value) {
        self.has_children = true;
        match self.children.entry(name) {
            serde_json::map::Entry::Vacant(e) => {
                e.insert(value);
            }
            serde_json::map::Entry::Occupied(mut e) => match e.get_mut() {
                Value::Array(items) => items.push(value),
                first => {
                    let first = first.take();
                    e.insert(Value::Array(vec![first, value]));
                }
            },
        }
    }

    /// The object form: children, plus non-blank mixed text under `#text`.
    fn into_object(mut self) -> Map<String, Value> {
        let text = self.text.trim();
        if !text.is_empty() {
            self.children
                .insert("#text".to_owned(), Value::String(text.to_owned()));
        }
        self.children
    }

    /// A leaf is its text, untrimmed; an element with children is an object.
    fn into_value(self) -> Value {
        if self.has_children {
            Value::Object(self.into_object())
        } else {
            Value::String(self.text)
        }
    }
}

/// Parses a WeCom XML document into a flat JSON object, refusing DOCTYPEs, entity references
/// other than the predefined ones, and documents over the [`Limits`]. The rules are in the
/// module documentation.
pub fn xml_to_json(
    xml: &str,
    part: Part,
    limits: &Limits,
) -> Result<Map<String, Value>, CallbackError> {
    if xml.len() > limits.max_xml_bytes {
        return Err(CallbackError::XmlTooLarge {
            part,
            size: xml.len(),
            max: limits.max_xml_bytes,
        });
    }
    let invalid = |detail: String| CallbackError::InvalidXml(part, detail);
    let mut reader = Reader::from_str(xml);
    // Defaults kept on purpose: end tags must match their start tags, and a lone `&` is an
    // error rather than text.
    reader.config_mut().check_end_names = true;
    reader.config_mut().allow_dangling_amp = false;
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Map<String, Value>> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| invalid(format!("at byte {}: {e}", reader.error_position())))?;
        match event {
            XmlEvent::Start(e) | XmlEvent::Empty(e) if stack.is_empty() && root.is_some() => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                return Err(invalid(format!("second root element <{name}>")));
            }
            XmlEvent::Start(e) => {
                if stack.len() >= limits.max_depth {
                    return Err(CallbackError::XmlTooDeep(part, limits.max_depth));
                }
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                stack.push(Frame::new(name));
            }
            XmlEvent::Empty(e) => {
                if stack.len() >= limits.max_depth {
                    return Err(CallbackError::XmlTooDeep(part, limits.max_depth));
                }
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                match stack.last_mut() {
                    Some(parent) => parent.add(name, Value::String(String::new())),
                    None => root = Some(Map::new()),
                }
            }
            XmlEvent::End(_) => {
                // quick-xml has checked that the name matches the open element.
                let Some(frame) = stack.pop() else {
                    return Err(invalid("end tag without a start tag".into()));
                };
                match stack.last_mut() {
                    Some(parent) => {
                        let name = frame.name.clone();
                        parent.add(name, frame.into_value());
                    }
                    None => root = Some(frame.into_object()),
                }
            }
            XmlEvent::Text(t) => {
                let text = t.xml10_content().map_err(|e| invalid(e.to_string()))?;
                match stack.last_mut() {
                    Some(frame) => frame.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(invalid("text outside the root element".into())),
                }
            }
            XmlEvent::CData(t) => {
                let text = t.xml10_content().map_err(|e| invalid(e.to_string()))?;
                match stack.last_mut() {
                    Some(frame) => frame.text.push_str(&text),
                    None => return Err(invalid("CDATA outside the root element".into())),
                }
            }
            XmlEvent::GeneralRef(r) => {
                let resolved = resolve_reference(&r, part)?;
                match stack.last_mut() {
                    Some(frame) => frame.text.push_str(&resolved),
                    None => return Err(invalid("reference outside the root element".into())),
                }
            }
            XmlEvent::DocType(_) => {
                return Err(CallbackError::UnsupportedXml(
                    part,
                    "DOCTYPE (and with it entity declarations) is not accepted".into(),
                ));
            }
            XmlEvent::Decl(_) | XmlEvent::PI(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(invalid(format!("element <{}> is not closed", open.name)));
    }
    root.ok_or_else(|| invalid("no root element".into()))
}

/// The text a character or entity reference stands for. Without a DOCTYPE no entity but the
/// predefined ones can be declared: a reference to another is either an error or an attempt
/// to make a lenient parser fetch or expand it.
fn resolve_reference(
    r: &quick_xml::events::BytesRef<'_>,
    part: Part,
) -> Result<String, CallbackError> {
    let invalid = |detail: String| CallbackError::InvalidXml(part, detail);
    let name = r.decode().map_err(|e| invalid(e.to_string()))?;
    let resolved = if r.is_char_ref() {
        r.resolve_char_ref()
            .map_err(|e| invalid(e.to_string()))?
            .map(String::from)
    } else {
        quick_xml::escape::resolve_xml_entity(&name).map(str::to_owned)
    };
    resolved.ok_or_else(|| {
        CallbackError::UnsupportedXml(part, format!("reference to undeclared entity &{name};"))
    })
}

/// Escapes text for a CDATA section: `]]>` would end it early, so it is split across two
/// sections. Base64 and hex never contain it; a nonce from the request might.
fn cdata(text: &str) -> String {
    format!("<![CDATA[{}]]>", text.replace("]]>", "]]]]><![CDATA[>"))
}

/// The encrypted passive reply (PROTOCOLS.md §5.2, vector W4): `plaintext_xml` encrypted with
/// the given random prefix, signed over (token, `timestamp`, `nonce`, Encrypt), in the
/// envelope `<xml><Encrypt><![CDATA[…]]></Encrypt><MsgSignature><![CDATA[…]]></MsgSignature>
/// <TimeStamp>…</TimeStamp><Nonce><![CDATA[…]]></Nonce></xml>` with no whitespace between
/// elements. The request's timestamp and nonce may be reused.
pub fn passive_reply(
    crypt: &MsgCrypt,
    plaintext_xml: &str,
    timestamp: &str,
    nonce: &str,
    random: &[u8; 16],
) -> String {
    let encrypt = crypt.encrypt(random, plaintext_xml.as_bytes());
    let signature = crypt.signature(timestamp, nonce, &encrypt);
    format!(
        "<xml><Encrypt>{}</Encrypt><MsgSignature>{}</MsgSignature><TimeStamp>{}</TimeStamp><Nonce>{}</Nonce></xml>",
        cdata(&encrypt),
        cdata(&signature),
        quick_xml::escape::escape(timestamp),
        cdata(nonce),
    )
}

/// [`passive_reply`] with a fresh random prefix of 16 ASCII alphanumerics, as the vendor SDKs
/// use.
pub fn passive_reply_fresh(
    crypt: &MsgCrypt,
    plaintext_xml: &str,
    timestamp: &str,
    nonce: &str,
) -> String {
    passive_reply(
        crypt,
        plaintext_xml,
        timestamp,
        nonce,
        &msgcrypt::random_alnum::<16>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../../tests/data/platform-vectors.json")).unwrap()
    }

    fn wecom(name: &str) -> Value {
        vectors()["wecom_callback"][name].clone()
    }

    /// W1, W2 and W4 share the credentials given in W1 (PROTOCOLS.md §5.3).
    fn corp() -> MsgCrypt {
        let v = wecom("W1_vendor_verify_url");
        MsgCrypt::new(
            v["token"].as_str().unwrap(),
            v["encoding_aes_key"].as_str().unwrap(),
            v["receive_id(corpId)"].as_str().unwrap(),
        )
        .unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn w1_query() -> HashMap<String, String> {
        let q = &wecom("W1_vendor_verify_url")["query"];
        map(&[
            ("msg_signature", q["msg_signature"].as_str().unwrap()),
            ("timestamp", q["timestamp"].as_str().unwrap()),
            ("nonce", q["nonce"].as_str().unwrap()),
            ("echostr", q["echostr(url-decoded)"].as_str().unwrap()),
        ])
    }

    fn w2_query() -> HashMap<String, String> {
        let q = &wecom("W2_vendor_decrypt_msg")["query"];
        map(&[
            ("msg_signature", q["msg_signature"].as_str().unwrap()),
            ("timestamp", q["timestamp"].as_str().unwrap()),
            ("nonce", q["nonce"].as_str().unwrap()),
        ])
    }

    fn w2_body() -> String {
        wecom("W2_vendor_decrypt_msg")["post_body_xml"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn open_default(
        crypt: &MsgCrypt,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Result<Event, CallbackError> {
        let params = Params::from_query(query).unwrap();
        open(crypt, &params, body, 0, None, &Limits::default())
    }

    /// A POST whose decrypted message is `message`, correctly encrypted and signed for `crypt`.
    fn signed_post(crypt: &MsgCrypt, message: &str) -> (HashMap<String, String>, String) {
        let encrypt = crypt.encrypt(b"0123456789abcdef", message.as_bytes());
        let query = map(&[
            (
                "msg_signature",
                &crypt.signature("1700000000", "nonce1", &encrypt),
            ),
            ("timestamp", "1700000000"),
            ("nonce", "nonce1"),
        ]);
        let body = format!(
            "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt><AgentID><![CDATA[1000002]]></AgentID></xml>"
        );
        (query, body)
    }

    fn flat(xml: &str) -> Result<Map<String, Value>, CallbackError> {
        xml_to_json(xml, Part::Message, &Limits::default())
    }

    // --- vectors -------------------------------------------------------------------------

    #[test]
    fn w1_verify_url_echoes_the_plaintext() {
        let v = wecom("W1_vendor_verify_url");
        let crypt = corp();
        // The key's last base64 digit has non-zero trailing bits, as msgcrypt allows.
        let lenient = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let key = base64::Engine::decode(
            &lenient,
            format!("{}=", v["encoding_aes_key"].as_str().unwrap()),
        )
        .unwrap();
        assert_eq!(hex::encode(key), v["aes_key_hex"].as_str().unwrap());
        let query = w1_query();
        let params = Params::from_query(&query).unwrap();
        let body = verify_url(&crypt, &params, 0, None).unwrap();
        assert_eq!(body, v["expected_http_body"].as_str().unwrap().as_bytes());
        let d = crypt.decrypt(params.echostr.as_deref().unwrap()).unwrap();
        assert_eq!(&d.random, v["random_prefix"].as_str().unwrap().as_bytes());
    }

    #[test]
    fn w2_push_opens_to_flat_json() {
        let v = wecom("W2_vendor_decrypt_msg");
        let crypt = corp();
        assert_eq!(crypt.receiver_id(), v["receive_id"].as_str().unwrap());
        let event = open_default(&crypt, &w2_query(), w2_body().as_bytes()).unwrap();
        assert_eq!(event.xml, v["expected_plaintext_xml"].as_str().unwrap());
        let expected = json!({
            "ToUserName": "ww1436e0e65a779aee",
            "FromUserName": "ChenJiaShun",
            "CreateTime": "1476422779",
            "MsgType": "text",
            "Content": "你好",
            "MsgId": "1456453720",
            "AgentID": "1000002",
        });
        assert_eq!(Value::Object(event.fields().clone()), expected);
        assert_eq!(
            serde_json::from_slice::<Value>(&event.body).unwrap(),
            expected
        );
        assert_eq!(event.event_type(), "msg.text");
        assert_eq!(event.tenant(), Some("ww1436e0e65a779aee"));
        assert_eq!(event.agent_id(), Some("1000002"));
        let id = event.ce_id();
        assert!(id.starts_with("wecom-"), "{id}");
        assert_eq!(id.len(), "wecom-".len() + 32);
        assert!(id["wecom-".len()..].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn w3_verify_url_from_the_raw_query() {
        let v = wecom("W3_vendor_verify_url_old");
        let crypt = MsgCrypt::new(
            v["token"].as_str().unwrap(),
            v["encoding_aes_key"].as_str().unwrap(),
            v["receive_id"].as_str().unwrap(),
        )
        .unwrap();
        let expected = v["expected_http_body"].as_str().unwrap().as_bytes();
        // As the ingress sees it: the raw query through a form decoder.
        let raw = v["raw_query"].as_str().unwrap();
        let query: HashMap<String, String> = serde_urlencoded::from_str(raw).unwrap();
        let params = Params::from_query(&query).unwrap();
        assert_eq!(
            params.echostr.as_deref(),
            v["decoded_query"]["echostr"].as_str()
        );
        assert_eq!(verify_url(&crypt, &params, 0, None).unwrap(), expected);
        // Still percent-encoded (decoded once too few): decoded here once more.
        let still_encoded = raw.split("echostr=").nth(1).unwrap();
        assert!(still_encoded.contains("%2F"));
        let mut query = query.clone();
        query.insert("echostr".into(), still_encoded.into());
        let params = Params::from_query(&query).unwrap();
        assert_eq!(
            params.echostr.as_deref(),
            v["decoded_query"]["echostr"].as_str()
        );
        assert_eq!(verify_url(&crypt, &params, 0, None).unwrap(), expected);
    }

    #[test]
    fn w4_passive_reply_matches_the_vendor() {
        let v = wecom("W4_passive_reply");
        let crypt = MsgCrypt::new(
            v["token"].as_str().unwrap(),
            v["encoding_aes_key"].as_str().unwrap(),
            v["receive_id"].as_str().unwrap(),
        )
        .unwrap();
        let random: [u8; 16] = v["random16"]
            .as_str()
            .unwrap()
            .as_bytes()
            .try_into()
            .unwrap();
        let (ts, nonce) = (
            v["timestamp"].as_str().unwrap(),
            v["nonce"].as_str().unwrap(),
        );
        let plaintext = v["reply_plaintext_xml"].as_str().unwrap();
        let reply = passive_reply(&crypt, plaintext, ts, nonce, &random);
        let (encrypt, signature) = (
            v["expected_Encrypt"].as_str().unwrap(),
            v["expected_MsgSignature"].as_str().unwrap(),
        );
        assert_eq!(
            reply,
            format!(
                "<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt><MsgSignature><![CDATA[{signature}]]></MsgSignature><TimeStamp>{ts}</TimeStamp><Nonce><![CDATA[{nonce}]]></Nonce></xml>"
            )
        );
        // Same fields as wechatpy's envelope, which only adds newlines between elements.
        let ours = flat(&reply).unwrap();
        let theirs = flat(v["wechatpy_envelope"].as_str().unwrap()).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(ours["Encrypt"], encrypt);
        // And it decrypts back.
        assert_eq!(
            crypt.decrypt(encrypt).unwrap().message,
            plaintext.as_bytes()
        );

        // The fresh variant differs in the ciphertext only, and still verifies and decrypts.
        let fresh = flat(&passive_reply_fresh(&crypt, plaintext, ts, nonce)).unwrap();
        let fresh_encrypt = fresh["Encrypt"].as_str().unwrap();
        assert_ne!(fresh_encrypt, encrypt);
        assert!(crypt.verify(
            fresh["MsgSignature"].as_str().unwrap(),
            ts,
            nonce,
            fresh_encrypt
        ));
        assert_eq!(
            crypt.decrypt(fresh_encrypt).unwrap().message,
            plaintext.as_bytes()
        );
    }

    // --- refusals ------------------------------------------------------------------------

    #[test]
    fn wrong_signature_is_401() {
        let crypt = corp();
        let mut query = w1_query();
        query.insert(
            "msg_signature".into(),
            "012bc692d0a58dd4b10f8dfe5c4ac00ae211ebec".into(),
        );
        let params = Params::from_query(&query).unwrap();
        let err = verify_url(&crypt, &params, 0, None).unwrap_err();
        assert_eq!(err, CallbackError::Signature);
        assert_eq!((err.code(), err.status()), ("invalid_signature", 401));

        let mut query = w2_query();
        query.insert("timestamp".into(), "1476422780".into());
        let err = open_default(&crypt, &query, w2_body().as_bytes()).unwrap_err();
        assert_eq!(err, CallbackError::Signature);
        // Another token, same key: the signature is what fails.
        let v = wecom("W1_vendor_verify_url");
        let other = MsgCrypt::new(
            "another-token",
            v["encoding_aes_key"].as_str().unwrap(),
            crypt.receiver_id(),
        )
        .unwrap();
        assert_eq!(
            open_default(&other, &w2_query(), w2_body().as_bytes()),
            Err(CallbackError::Signature)
        );
    }

    #[test]
    fn echostr_not_base64_is_400() {
        let crypt = corp();
        let echostr = "not*base64!";
        let query = map(&[
            ("msg_signature", &crypt.signature("1", "n", echostr)),
            ("timestamp", "1"),
            ("nonce", "n"),
            ("echostr", echostr),
        ]);
        let params = Params::from_query(&query).unwrap();
        let err = verify_url(&crypt, &params, 0, None).unwrap_err();
        assert_eq!(err, CallbackError::Decrypt(DecryptError::Base64));
        assert_eq!((err.code(), err.status()), ("invalid_base64", 400));
    }

    #[test]
    fn receiver_other_than_the_corp_is_403() {
        let v = wecom("W1_vendor_verify_url");
        let key = v["encoding_aes_key"].as_str().unwrap();
        let token = v["token"].as_str().unwrap();
        let other_corp = MsgCrypt::new(token, key, "wwsomeothercorp0000").unwrap();
        let crypt = corp();

        // GET: the echostr was made for another corp with our token and key.
        let echostr = other_corp.encrypt_fresh(b"12345");
        let query = map(&[
            ("msg_signature", &crypt.signature("1", "n", &echostr)),
            ("timestamp", "1"),
            ("nonce", "n"),
            ("echostr", &echostr),
        ]);
        let params = Params::from_query(&query).unwrap();
        let err = verify_url(&crypt, &params, 0, None).unwrap_err();
        assert_eq!(err, CallbackError::Decrypt(DecryptError::ReceiverMismatch));
        assert_eq!((err.code(), err.status()), ("receiver_mismatch", 403));

        // POST: W2 itself is refused by a crypt configured for another corp.
        let err = open_default(&other_corp, &w2_query(), w2_body().as_bytes()).unwrap_err();
        assert_eq!(err, CallbackError::Decrypt(DecryptError::ReceiverMismatch));
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn missing_parameters() {
        let full = w1_query();
        for name in ["msg_signature", "timestamp", "nonce"] {
            let mut q = full.clone();
            q.remove(name);
            let err = Params::from_query(&q).unwrap_err();
            assert_eq!(err, CallbackError::MissingParameter(name));
            assert_eq!((err.code(), err.status()), ("missing_parameter", 400));
        }
        // echostr is optional in the query (POST has none) but required to verify the URL.
        let mut q = full.clone();
        q.remove("echostr");
        let params = Params::from_query(&q).unwrap();
        assert_eq!(params.echostr, None);
        assert_eq!(
            verify_url(&corp(), &params, 0, None),
            Err(CallbackError::MissingParameter("echostr"))
        );
    }

    #[test]
    fn envelope_without_encrypt() {
        let crypt = corp();
        for body in [
            "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><AgentID>1</AgentID></xml>",
            "<xml><Encrypt></Encrypt></xml>",
            "<xml><Encrypt><![CDATA[  ]]></Encrypt></xml>",
            "<xml><Encrypt><Inner>x</Inner></Encrypt></xml>",
            "<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>",
            r#"{"tousername":"ww1436e0e65a779aee","agentid":1}"#,
            r#"{"encrypt":42}"#,
        ] {
            let err = open_default(&crypt, &w2_query(), body.as_bytes()).unwrap_err();
            assert_eq!(err, CallbackError::MissingEncrypt, "{body}");
            assert_eq!((err.code(), err.status()), ("missing_encrypt", 400));
        }
    }

    #[test]
    fn json_envelope_is_accepted_in_either_casing() {
        let crypt = corp();
        let encrypt = flat(&w2_body()).unwrap()["Encrypt"].clone();
        for key in ["encrypt", "Encrypt", "ENCRYPT"] {
            let body =
                json!({ "tousername": "ww1436e0e65a779aee", key: encrypt, "agentid": 1000002 });
            let event = open_default(&crypt, &w2_query(), body.to_string().as_bytes()).unwrap();
            assert_eq!(event.field("MsgId"), Some("1456453720"), "{key}");
        }
        for body in ["{not json", "[1,2]", " {\"encrypt\": \"x\"} trailing"] {
            let err = open_default(&crypt, &w2_query(), body.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "invalid_json", "{body}");
        }
    }

    #[test]
    fn malformed_envelope_xml() {
        let crypt = corp();
        for body in [
            "",
            "   ",
            "not xml at all",
            "<xml><Encrypt>abc</Encrypt>",
            "<xml><Encrypt>abc</Encrypt></xm>",
            "<xml><Encrypt>abc</xml>",
            "<xml><Encrypt>a&b</Encrypt></xml>",
            "<xml><Encrypt>abc</Encrypt></xml><xml/>",
            "<xml><Encrypt>abc</Encrypt></xml>trailing",
            "<xml><Encrypt><![CDATA[abc</Encrypt></xml>",
        ] {
            let err = open_default(&crypt, &w2_query(), body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, CallbackError::InvalidXml(Part::Envelope, _)),
                "{body:?}: {err:?}"
            );
            assert_eq!((err.code(), err.status()), ("invalid_xml", 400));
        }
        let err = open_default(&crypt, &w2_query(), b"<xml>\xff</xml>").unwrap_err();
        assert!(matches!(err, CallbackError::InvalidXml(Part::Envelope, _)));
    }

    #[test]
    fn malformed_decrypted_xml_after_a_valid_signature() {
        let crypt = corp();
        for message in ["<xml><MsgType>text</xml>", "plain text", "<xml><a>x</a>"] {
            let (query, body) = signed_post(&crypt, message);
            let err = open_default(&crypt, &query, body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, CallbackError::InvalidXml(Part::Message, _)),
                "{message}: {err:?}"
            );
        }
        // Not UTF-8 at all.
        let encrypt = crypt.encrypt(b"0123456789abcdef", b"<xml>\xff</xml>");
        let query = map(&[
            ("msg_signature", &crypt.signature("1", "n", &encrypt)),
            ("timestamp", "1"),
            ("nonce", "n"),
        ]);
        let body = json!({ "encrypt": encrypt }).to_string();
        assert_eq!(
            open_default(&crypt, &query, body.as_bytes()),
            Err(CallbackError::Utf8)
        );
    }

    #[test]
    fn oversized_xml_is_refused() {
        let crypt = corp();
        let limits = Limits {
            max_xml_bytes: 300,
            ..Limits::default()
        };
        let query = w2_query();
        let params = Params::from_query(&query).unwrap();
        let body = w2_body();
        assert!(body.len() > 300);
        let err = open(&crypt, &params, body.as_bytes(), 0, None, &limits).unwrap_err();
        assert_eq!(
            err,
            CallbackError::XmlTooLarge {
                part: Part::Envelope,
                size: body.len(),
                max: 300
            }
        );
        assert_eq!((err.code(), err.status()), ("xml_too_large", 400));
        let at_limit = Limits {
            max_xml_bytes: body.len(),
            ..limits
        };
        assert!(open(&crypt, &params, body.as_bytes(), 0, None, &at_limit).is_ok());

        // The decrypted message is checked too (it is always smaller than its envelope, so
        // this is the parser's own guard).
        let xml = format!("<xml><Content>{}</Content></xml>", "a".repeat(100));
        let small = Limits {
            max_xml_bytes: xml.len() - 1,
            ..Limits::default()
        };
        assert!(matches!(
            xml_to_json(&xml, Part::Message, &small),
            Err(CallbackError::XmlTooLarge {
                part: Part::Message,
                ..
            })
        ));
    }

    #[test]
    fn nesting_is_capped() {
        let nested = |depth: usize| {
            let mut s = String::new();
            for _ in 0..depth {
                s.push_str("<a>");
            }
            s.push('x');
            for _ in 0..depth {
                s.push_str("</a>");
            }
            s
        };
        let limits = Limits::default();
        assert!(xml_to_json(&nested(32), Part::Message, &limits).is_ok());
        let err = xml_to_json(&nested(33), Part::Message, &limits).unwrap_err();
        assert_eq!(err, CallbackError::XmlTooDeep(Part::Message, 32));
        assert_eq!((err.code(), err.status()), ("xml_too_deep", 400));
        // A self-closing element counts as a level too.
        let mut empty_at_33 = nested(32);
        empty_at_33.insert_str(32 * 3, "<b/>");
        assert_eq!(
            xml_to_json(&empty_at_33, Part::Message, &limits),
            Err(CallbackError::XmlTooDeep(Part::Message, 32))
        );
        // A deep envelope is refused before the signature is even looked at.
        let body = format!("<xml><Encrypt>abc</Encrypt>{}</xml>", nested(40));
        assert_eq!(
            open_default(&corp(), &w2_query(), body.as_bytes()),
            Err(CallbackError::XmlTooDeep(Part::Envelope, 32))
        );
    }

    const BILLION_LAUGHS: &str = r#"<?xml version="1.0"?>
<!DOCTYPE xml [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<xml><Content>&lol3;</Content></xml>"#;

    const XXE: &str = r#"<?xml version="1.0"?>
<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<xml><Content>&xxe;</Content></xml>"#;

    #[test]
    fn doctype_and_entities_are_refused_in_the_envelope() {
        let crypt = corp();
        let encrypt = flat(&w2_body()).unwrap()["Encrypt"]
            .as_str()
            .unwrap()
            .to_owned();
        let cases = [
            BILLION_LAUGHS.to_owned(),
            XXE.to_owned(),
            format!("<!DOCTYPE xml><xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"),
            "<xml><Encrypt>&xxe;</Encrypt></xml>".to_owned(),
        ];
        for body in cases {
            // The W2 query is correctly signed for the real Encrypt value: the refusal comes
            // from the envelope itself, not from a signature mismatch.
            let err = open_default(&crypt, &w2_query(), body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, CallbackError::UnsupportedXml(Part::Envelope, _)),
                "{body}: {err:?}"
            );
            assert_eq!((err.code(), err.status()), ("unsupported_xml", 400));
        }
    }

    #[test]
    fn doctype_and_entities_are_refused_in_the_decrypted_message() {
        let crypt = corp();
        for message in [
            BILLION_LAUGHS,
            XXE,
            "<xml><Content>&nbsp;</Content></xml>",
            "<xml><Content>&lol3;</Content></xml>",
            // A DOCTYPE is refused even when nothing refers to what it declares.
            "<!DOCTYPE xml [<!ENTITY e \"x\">]><xml><MsgType>text</MsgType></xml>",
            "<!DOCTYPE xml SYSTEM \"http://example.com/x.dtd\"><xml><MsgType>text</MsgType></xml>",
        ] {
            let (query, body) = signed_post(&crypt, message);
            let err = open_default(&crypt, &query, body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, CallbackError::UnsupportedXml(Part::Message, _)),
                "{message}: {err:?}"
            );
            assert_eq!(err.code(), "unsupported_xml");
        }
    }

    #[test]
    fn spaces_are_restored_to_plus() {
        let crypt = corp();
        let w1 = wecom("W1_vendor_verify_url");
        let expected = w1["expected_http_body"].as_str().unwrap().as_bytes();
        // A raw `+` in the query, form-decoded to a space.
        let mut query = w1_query();
        let echostr = query["echostr"].clone();
        assert!(echostr.contains('+'));
        let raw = format!(
            "msg_signature={}&timestamp={}&nonce={}&echostr={}",
            query["msg_signature"], query["timestamp"], query["nonce"], echostr
        );
        let decoded: HashMap<String, String> = serde_urlencoded::from_str(&raw).unwrap();
        assert!(decoded["echostr"].contains(' ') && !decoded["echostr"].contains('+'));
        let params = Params::from_query(&decoded).unwrap();
        assert_eq!(params.echostr.as_deref(), Some(echostr.as_str()));
        assert_eq!(verify_url(&crypt, &params, 0, None).unwrap(), expected);
        // %2B decodes to `+`, not to a space.
        query.insert("echostr".into(), echostr.replace('+', "%2B"));
        let params = Params::from_query(&query).unwrap();
        assert_eq!(verify_url(&crypt, &params, 0, None).unwrap(), expected);

        // The same damage to the POST envelope's Encrypt.
        let body = w2_body();
        // W2's ciphertext also ends with `+`: a trailing space must not be trimmed away.
        assert!(body.contains("+]]></Encrypt>"));
        let damaged = body.replace('+', " ");
        let event = open_default(&crypt, &w2_query(), damaged.as_bytes()).unwrap();
        assert_eq!(event.field("MsgId"), Some("1456453720"));
        // And whitespace around a pretty-printed Encrypt is not part of it.
        let encrypt = flat(&body).unwrap()["Encrypt"].as_str().unwrap().to_owned();
        let pretty = format!("<xml>\n  <Encrypt>\n    {encrypt}\n  </Encrypt>\n</xml>\n");
        assert!(open_default(&crypt, &w2_query(), pretty.as_bytes()).is_ok());
        let tabbed = format!("<xml><Encrypt>\t{encrypt}\r\n</Encrypt></xml>");
        assert!(open_default(&crypt, &w2_query(), tabbed.as_bytes()).is_ok());
    }

    #[test]
    fn trim_layout_keeps_spaces_that_were_plus() {
        assert_eq!(trim_layout("abc"), "abc");
        assert_eq!(trim_layout(" abc "), " abc ");
        assert_eq!(trim_layout("\n    abc\n  "), "abc");
        assert_eq!(trim_layout("\tabc "), "abc ");
        assert_eq!(trim_layout(" abc\r\n"), " abc");
        assert_eq!(trim_layout("\n \n"), "");
    }

    #[test]
    fn repair_base64_cases() {
        assert_eq!(repair_base64("ab+c/d=="), "ab+c/d==");
        assert!(matches!(repair_base64("ab+c/d=="), Cow::Borrowed(_)));
        assert_eq!(repair_base64("ab c/d=="), "ab+c/d==");
        assert_eq!(repair_base64("ab%2Bc%2Fd%3D%3D"), "ab+c/d==");
        assert_eq!(repair_base64("ab%2bc%2fd%3d%3d"), "ab+c/d==");
        // Only once: a twice-encoded `%` stays encoded once.
        assert_eq!(repair_base64("ab%252B"), "ab%2B");
        // Malformed escapes are left alone (and then fail the signature or base64 check).
        assert_eq!(repair_base64("ab%2"), "ab%2");
        assert_eq!(repair_base64("ab%zz"), "ab%zz");
        assert_eq!(repair_base64("%ff%fe"), "%ff%fe");
    }

    #[test]
    fn replay_window_is_checked_after_the_signature() {
        let crypt = corp();
        let query = w2_query();
        let params = Params::from_query(&query).unwrap();
        let body = w2_body();
        let ts_ms = 1_476_422_779_000u64;
        let hour = Some(Duration::from_secs(3600));
        let limits = Limits::default();
        let run =
            |params: &Params<'_>, now| open(&crypt, params, body.as_bytes(), now, hour, &limits);
        assert!(run(&params, ts_ms + 3_600_000).is_ok());
        assert!(run(&params, ts_ms - 3_600_000).is_ok());
        assert_eq!(
            run(&params, ts_ms + 3_600_001),
            Err(CallbackError::StaleTimestamp)
        );
        assert_eq!(
            run(&params, ts_ms - 3_600_001),
            Err(CallbackError::StaleTimestamp)
        );
        let forged = Params {
            timestamp: "1476422780",
            ..params.clone()
        };
        assert_eq!(run(&forged, ts_ms), Err(CallbackError::Signature));
        // GET too.
        let q1 = w1_query();
        let p1 = Params::from_query(&q1).unwrap();
        assert_eq!(
            verify_url(&crypt, &p1, 0, hour),
            Err(CallbackError::StaleTimestamp)
        );
        assert!(verify_url(&crypt, &p1, 1_476_416_373_000, hour).is_ok());
        // A correctly signed non-numeric timestamp.
        let (mut query, body) = signed_post(&crypt, "<xml/>");
        let encrypt = flat(&body).unwrap()["Encrypt"].as_str().unwrap().to_owned();
        query.insert("timestamp".into(), "yesterday".into());
        query.insert(
            "msg_signature".into(),
            crypt.signature("yesterday", "nonce1", &encrypt),
        );
        let params = Params::from_query(&query).unwrap();
        assert_eq!(
            open(&crypt, &params, body.as_bytes(), 0, hour, &limits),
            Err(CallbackError::InvalidTimestamp)
        );
    }

    // --- XML to JSON ---------------------------------------------------------------------

    #[test]
    fn flat_json_unwraps_cdata_and_resolves_entities() {
        let got = flat(concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<!-- a comment -->\n",
            "<xml>\n",
            "  <ToUserName><![CDATA[ww1]]></ToUserName>\n",
            "  <Content><![CDATA[a < b & <i>c</i> ]]]></Content>\n",
            "  <Escaped>Tom &amp; Jerry &lt;3 &quot;q&quot; &apos;a&apos; &gt;</Escaped>\n",
            "  <Chars>&#20320;&#x597D;</Chars>\n",
            "  <Mixed>x<![CDATA[y]]>&amp;z</Mixed>\n",
            "  <Spaced>  two  spaces\r\n</Spaced>\n",
            "  <Empty/>\n",
            "  <Empty2></Empty2>\n",
            "  <Attr lang=\"en\">value</Attr>\n",
            "  <?pi ignored?>\n",
            "</xml>\n",
        ))
        .unwrap();
        assert_eq!(
            Value::Object(got),
            json!({
                "ToUserName": "ww1",
                "Content": "a < b & <i>c</i> ]",
                "Escaped": "Tom & Jerry <3 \"q\" 'a' >",
                "Chars": "你好",
                "Mixed": "xy&z",
                "Spaced": "  two  spaces\n",
                "Empty": "",
                "Empty2": "",
                "Attr": "value",
            })
        );
    }

    #[test]
    fn flat_json_nests_blocks_and_collects_repeats() {
        // A contact change with ExtAttr (two Items, so an array) and an approval-style block.
        let got = flat(concat!(
            "<xml><ToUserName><![CDATA[ww1]]></ToUserName>",
            "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[change_contact]]></Event>",
            "<ChangeType>update_user</ChangeType><UserID>zhangsan</UserID>",
            "<Department><![CDATA[1,2,3]]></Department>",
            "<ExtAttr>",
            "<Item><Name><![CDATA[爱好]]></Name><Type>0</Type><Text><Value><![CDATA[travel]]></Value></Text></Item>",
            "<Item><Name><![CDATA[site]]></Name><Type>1</Type><Web><Title>t</Title><Url>http://x/?a=1&amp;b=2</Url></Web></Item>",
            "</ExtAttr>",
            "<SendLocationInfo><Location_X>23.1</Location_X><Location_Y>113.3</Location_Y><Poiname/></SendLocationInfo>",
            "<One><Item><K>v</K></Item></One>",
            "<Tag>a</Tag><Tag>b</Tag><Tag>c</Tag>",
            "<Outer>\n  mixed <In>x</In>\n</Outer>",
            "</xml>",
        ))
        .unwrap();
        assert_eq!(
            Value::Object(got),
            json!({
                "ToUserName": "ww1",
                "MsgType": "event",
                "Event": "change_contact",
                "ChangeType": "update_user",
                "UserID": "zhangsan",
                "Department": "1,2,3",
                "ExtAttr": { "Item": [
                    { "Name": "爱好", "Type": "0", "Text": { "Value": "travel" } },
                    { "Name": "site", "Type": "1", "Web": { "Title": "t", "Url": "http://x/?a=1&b=2" } },
                ]},
                "SendLocationInfo": { "Location_X": "23.1", "Location_Y": "113.3", "Poiname": "" },
                "One": { "Item": { "K": "v" } },
                "Tag": ["a", "b", "c"],
                "Outer": { "In": "x", "#text": "mixed" },
            })
        );
    }

    #[test]
    fn flat_json_root_shapes() {
        assert_eq!(flat("<xml/>").unwrap(), Map::new());
        assert_eq!(flat("<xml></xml>").unwrap(), Map::new());
        assert_eq!(flat("<root><A>1</A></root>").unwrap()["A"], "1");
        assert_eq!(
            Value::Object(flat("<xml>only text</xml>").unwrap()),
            json!({ "#text": "only text" })
        );
        for bad in ["<xml/><xml/>", "<a></a><b/>", "x<xml/>", "<xml/>&amp;"] {
            assert!(
                matches!(flat(bad), Err(CallbackError::InvalidXml(Part::Message, _))),
                "{bad}"
            );
        }
    }

    // --- Event accessors -----------------------------------------------------------------

    fn event_of(xml: &str) -> Event {
        let crypt = corp();
        let (query, body) = signed_post(&crypt, xml);
        open_default(&crypt, &query, body.as_bytes()).unwrap()
    }

    const ADD_ZHANGSAN: &str = "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><FromUserName><![CDATA[sys]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[change_contact]]></Event><ChangeType>create_user</ChangeType><UserID><![CDATA[zhangsan]]></UserID></xml>";

    #[test]
    fn event_type_names_events_and_messages() {
        let event = event_of(ADD_ZHANGSAN);
        assert_eq!(event.event_type(), "change_contact");
        assert_eq!(event.tenant(), Some("ww1436e0e65a779aee"));
        assert_eq!(event.agent_id(), None);
        assert_eq!(
            event_of("<xml><MsgType>image</MsgType><AgentID></AgentID></xml>").event_type(),
            "msg.image"
        );
        assert_eq!(
            event_of("<xml><MsgType>image</MsgType><AgentID></AgentID></xml>").agent_id(),
            None
        );
        assert_eq!(
            event_of("<xml><MsgType>event</MsgType></xml>").event_type(),
            "unknown"
        );
        assert_eq!(
            event_of("<xml><Content>x</Content></xml>").event_type(),
            "unknown"
        );
    }

    #[test]
    fn ce_id_is_stable_across_retries_and_distinct_across_events() {
        let id = event_of(ADD_ZHANGSAN).ce_id();
        assert!(id.starts_with("wecom-") && id.len() == 38, "{id}");
        // A retry is encrypted afresh; formatting and element order do not matter either.
        assert_eq!(event_of(ADD_ZHANGSAN).ce_id(), id);
        let reordered = "<xml>\n<UserID>zhangsan</UserID>\n<ChangeType>create_user</ChangeType><Event>change_contact</Event><MsgType>event</MsgType><CreateTime>1700000000</CreateTime><FromUserName>sys</FromUserName><ToUserName>ww1436e0e65a779aee</ToUserName></xml>";
        assert_eq!(event_of(reordered).ce_id(), id);
        // Same second, same sender: another user, another change type, another field.
        for other in [
            ADD_ZHANGSAN.replace("zhangsan", "lisi"),
            ADD_ZHANGSAN.replace("create_user", "update_user"),
            ADD_ZHANGSAN.replace("UserID>", "Id>"),
            ADD_ZHANGSAN.replace("</xml>", "<TagId>1</TagId></xml>"),
            ADD_ZHANGSAN.replace("1700000000", "1700000001"),
        ] {
            assert_ne!(event_of(&other).ce_id(), id, "{other}");
        }

        // Messages: MsgId decides, scoped by corp and agent; other content does not matter.
        let msg = |corp: &str, agent: &str, id: &str, content: &str| {
            event_of(&format!("<xml><ToUserName>{corp}</ToUserName><MsgType>text</MsgType><Content>{content}</Content><MsgId>{id}</MsgId><AgentID>{agent}</AgentID></xml>")).ce_id()
        };
        let base = msg("ww1", "1000002", "42", "hi");
        assert_eq!(msg("ww1", "1000002", "42", "edited"), base);
        assert_ne!(msg("ww1", "1000002", "43", "hi"), base);
        assert_ne!(msg("ww2", "1000002", "42", "hi"), base);
        assert_ne!(msg("ww1", "1000003", "42", "hi"), base);
        // W2's id is a pure function of its MsgId, corp and agent.
        let w2 = open_default(&corp(), &w2_query(), w2_body().as_bytes()).unwrap();
        assert_eq!(
            w2.ce_id(),
            msg("ww1436e0e65a779aee", "1000002", "1456453720", "other")
        );
    }

    #[test]
    fn status_groups() {
        assert_eq!(CallbackError::Signature.status(), 401);
        assert_eq!(
            CallbackError::Decrypt(DecryptError::ReceiverMismatch).status(),
            403
        );
        for e in [
            CallbackError::MissingEncrypt,
            CallbackError::Decrypt(DecryptError::Padding(0)),
            CallbackError::UnsupportedXml(Part::Envelope, String::new()),
            CallbackError::StaleTimestamp,
            CallbackError::Utf8,
        ] {
            assert_eq!(e.status(), 400, "{e:?}");
        }
    }
}
