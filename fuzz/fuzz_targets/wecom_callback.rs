//! WeCom callbacks behind the signature, XML and JSON: the harness encrypts and signs what the
//! fuzzer produces with the app's credentials, so `callback::open` and `verify_url` get past
//! authentication and parse it. First byte:
//! 0 = the input is the decrypted XML, in an XML envelope; 1 = the same in a JSON envelope;
//! 2 = the input is the request body, XML or JSON (signed over the `Encrypt` value a plain
//! reading finds in it, so that most well-formed envelopes pass the signature);
//! 3 = the input is the raw ciphertext (arbitrary AES blocks behind a valid signature);
//! 4 = the input is `echostr` of a URL verification, signed; 5 = the input is the raw query
//! string of a URL verification; 6 = the input is XML for `xml_to_json` with tight limits.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imbridge::platform::msgcrypt::MsgCrypt;
use imbridge::platform::wecom::callback::{
    open, repair_base64, verify_url, xml_to_json, CallbackError, Limits, Params, Part,
};
use imbridge_fuzz::{split_mode, NONCE, TIMESTAMP_S, WECOM_AES_KEY, WECOM_CORP, WECOM_TOKEN};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const NOW_MS: u64 = TIMESTAMP_S * 1000;
const TIMESTAMP: &str = "1700000000";
const WINDOW: Option<Duration> = Some(Duration::from_secs(3600));

fn crypt() -> &'static MsgCrypt {
    static CRYPT: OnceLock<MsgCrypt> = OnceLock::new();
    CRYPT.get_or_init(|| MsgCrypt::new(WECOM_TOKEN, WECOM_AES_KEY, WECOM_CORP).expect("vector key"))
}

fn params<'a>(signature: &'a str) -> Params<'a> {
    Params {
        signature,
        timestamp: TIMESTAMP,
        nonce: NONCE,
        echostr: None,
    }
}

fn open_signed(
    body: &[u8],
    encrypt: &str,
) -> Result<imbridge::platform::wecom::callback::Event, CallbackError> {
    let signature = crypt().signature(TIMESTAMP, NONCE, encrypt);
    open(
        crypt(),
        &params(&signature),
        body,
        NOW_MS,
        WINDOW,
        &Limits::default(),
    )
}

fn xml_envelope(encrypt: &str) -> Vec<u8> {
    format!(
        "<xml><ToUserName><![CDATA[{WECOM_CORP}]]></ToUserName>\n<Encrypt><![CDATA[{encrypt}]]></Encrypt>\n<AgentID><![CDATA[218]]></AgentID>\n</xml>"
    )
    .into_bytes()
}

fn json_envelope(encrypt: &str) -> Vec<u8> {
    serde_json::json!({ "tousername": WECOM_CORP, "encrypt": encrypt, "agentid": "218" })
        .to_string()
        .into_bytes()
}

/// Opens an authentic message and checks it against a direct parse of the same XML.
fn authentic(input: &[u8], envelope: fn(&str) -> Vec<u8>) -> Result<(), CallbackError> {
    let encrypt = crypt().encrypt(&[b'r'; 16], input);
    let result = open_signed(&envelope(&encrypt), &encrypt);
    let expected =
        std::str::from_utf8(input).map(|xml| xml_to_json(xml, Part::Message, &Limits::default()));
    match (&result, expected) {
        (Ok(event), Ok(Ok(fields))) => {
            assert_eq!(event.xml.as_bytes(), input);
            assert_eq!(event.fields(), &fields);
            let body: Map<String, Value> =
                serde_json::from_slice(&event.body).expect("body is JSON");
            assert_eq!(body, fields);
            let id = event.ce_id();
            assert_eq!(id, event.ce_id(), "ce-id must be stable");
            assert!(id.len() == 38 && id.starts_with("wecom-"), "{id}");
            assert!(id[6..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            assert!(!event.event_type().is_empty());
            let _ = (event.tenant(), event.agent_id());
        }
        (Err(e), Ok(Err(direct))) => assert_eq!(e, &direct),
        (Err(CallbackError::Utf8), Err(_)) => {}
        (other, expected) => panic!("open gave {other:?}, a direct parse {expected:?}"),
    }
    result.map(|_| ())
}

/// The `Encrypt` value a plain reading of the envelope finds; the daemon's own reading also
/// trims layout, so a body signed over this may still fail the signature, which is fine.
fn guess_encrypt(body: &[u8]) -> String {
    let fields = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => std::str::from_utf8(body)
            .ok()
            .and_then(|s| xml_to_json(s, Part::Envelope, &Limits::default()).ok()),
    };
    let value = fields.as_ref().and_then(|f| {
        f.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("encrypt"))
            .and_then(|(_, v)| v.as_str())
    });
    repair_base64(value.unwrap_or_default().trim()).into_owned()
}

fn check_refusal(result: Result<(), CallbackError>) {
    if let Err(e) = result {
        assert!(!e.code().is_empty());
        assert!(matches!(e.status(), 400 | 401 | 403), "{e:?}");
        assert!(!e.to_string().is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, input)) = split_mode(data) else {
        return;
    };
    let result = match mode % 7 {
        0 => authentic(input, xml_envelope),
        1 => authentic(input, json_envelope),
        2 => open_signed(input, &guess_encrypt(input)).map(|_| ()),
        3 => {
            let encrypt = STANDARD.encode(input);
            open_signed(&xml_envelope(&encrypt), &encrypt).map(|_| ())
        }
        4 => {
            let query: HashMap<String, String> = [
                ("msg_signature", ""),
                ("timestamp", TIMESTAMP),
                ("nonce", NONCE),
                ("echostr", &String::from_utf8_lossy(input)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            let unsigned = Params::from_query(&query).expect("all parameters present");
            let echostr = unsigned.echostr.as_deref().expect("echostr present");
            let signature = crypt().signature(TIMESTAMP, NONCE, echostr);
            let signed = Params {
                signature: &signature,
                ..unsigned.clone()
            };
            let result = verify_url(crypt(), &signed, NOW_MS, WINDOW);
            if let Ok(plain) = &result {
                // Only a ciphertext under our key and corp decrypts; it echoes the plaintext.
                assert_eq!(
                    crypt().decrypt(echostr).map(|d| &d.message == plain),
                    Ok(true)
                );
            }
            result.map(|_| ())
        }
        5 => {
            let raw = String::from_utf8_lossy(input);
            match imbridge::ingress::parse_query(&raw) {
                Ok(query) => Params::from_query(&query)
                    .and_then(|p| verify_url(crypt(), &p, NOW_MS, WINDOW))
                    .map(|_| ()),
                Err(_) => Ok(()),
            }
        }
        _ => {
            let limits = Limits {
                max_xml_bytes: 2048,
                max_depth: 4,
            };
            match std::str::from_utf8(input) {
                Ok(xml) => xml_to_json(xml, Part::Envelope, &limits).map(|_| ()),
                Err(_) => Ok(()),
            }
        }
    };
    check_refusal(result);
});
