//! DingTalk HTTP callbacks behind the signature: the harness encrypts and signs what the fuzzer
//! produces with the app's credentials, so `callback::open` gets past authentication and parses
//! it. First byte: 0 = the input is the decrypted JSON; 1 = the input is the request body (the
//! harness signs whatever string `encrypt` it finds in it); 2 = the input is the raw ciphertext
//! (arbitrary AES blocks behind a valid signature).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imbridge::platform::dingtalk::callback::{open, CallbackError, Params};
use imbridge::platform::msgcrypt::MsgCrypt;
use imbridge_fuzz::{split_mode, DINGTALK_AES_KEY, DINGTALK_RECEIVER, DINGTALK_TOKEN, NONCE};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Milliseconds, as DingTalk signs them.
const NOW_MS: u64 = 1_700_000_000_000;
const TIMESTAMP: &str = "1700000000000";

fn crypt() -> &'static MsgCrypt {
    static CRYPT: OnceLock<MsgCrypt> = OnceLock::new();
    CRYPT.get_or_init(|| {
        MsgCrypt::new(DINGTALK_TOKEN, DINGTALK_AES_KEY, DINGTALK_RECEIVER).expect("vector key")
    })
}

fn open_signed(
    body: &[u8],
    encrypt: &str,
) -> Result<imbridge::platform::dingtalk::callback::Event, CallbackError> {
    let signature = crypt().signature(TIMESTAMP, NONCE, encrypt);
    let params = Params {
        signature: &signature,
        timestamp: TIMESTAMP,
        nonce: NONCE,
    };
    open(
        crypt(),
        &params,
        body,
        NOW_MS,
        Some(Duration::from_secs(3600)),
    )
}

fn envelope(encrypt: &str) -> Vec<u8> {
    serde_json::json!({ "encrypt": encrypt })
        .to_string()
        .into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, input)) = split_mode(data) else {
        return;
    };
    let result = match mode % 3 {
        0 => {
            let encrypt = crypt().encrypt(&[b'r'; 16], input);
            let result = open_signed(&envelope(&encrypt), &encrypt);
            // An authentic message opens exactly when it is a JSON object, and unchanged.
            let parsed = std::str::from_utf8(input).map(serde_json::from_str::<Value>);
            // `open` skips the keys it does not read without recursion, so it also opens an
            // object nested deeper than a `Value` may be: no oracle for that one.
            let too_deep = matches!(&parsed, Ok(Err(e)) if e.to_string().starts_with("recursion limit exceeded"));
            let object = parsed.ok().and_then(Result::ok).filter(Value::is_object);
            match (&result, object) {
                _ if too_deep => {}
                (Ok(event), Some(object)) => {
                    assert_eq!(event.plaintext, input);
                    let field = |names: &[&str]| {
                        names
                            .iter()
                            .find_map(|n| object.get(*n).and_then(Value::as_str))
                            .map(str::to_owned)
                    };
                    assert_eq!(event.event_type, field(&["EventType", "eventType"]));
                    assert_eq!(event.corp_id, field(&["CorpId", "corpId"]));
                }
                (Err(CallbackError::Utf8 | CallbackError::Json), None) => {}
                (other, object) => panic!(
                    "{other:?} for a message that is an object: {}",
                    object.is_some()
                ),
            }
            result.map(|_| ())
        }
        1 => {
            let encrypt = serde_json::from_slice::<Value>(input)
                .ok()
                .and_then(|v| v.get("encrypt")?.as_str().map(str::to_owned))
                .unwrap_or_default();
            open_signed(input, &encrypt).map(|_| ())
        }
        _ => {
            let encrypt = STANDARD.encode(input);
            open_signed(&envelope(&encrypt), &encrypt).map(|_| ())
        }
    };
    if let Err(e) = result {
        // A refusal is a value with a code and a status, never a panic.
        assert!(!e.code().is_empty());
        assert!(matches!(e.status(), 400 | 401 | 403), "{e:?}");
        assert!(!e.to_string().is_empty());
    }
});
