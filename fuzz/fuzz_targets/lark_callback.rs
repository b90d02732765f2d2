//! Lark / Feishu event callbacks, v1 and 2.0, behind authentication: the harness encrypts and
//! signs what the fuzzer produces with the app's Encrypt Key, so `callback::open` gets past the
//! signature and classifies it. First byte:
//! 0 = the input is the decrypted JSON, encrypted and signed; 1 = the input is a plain body
//! for an app with a verification token only; 2 = the input is the request body, signed;
//! 3 = the input is the request body, unsigned (the handshake path, which must not tell a
//! stranger anything but "bad signature"); 4 = the input is the raw ciphertext, signed.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imbridge::platform::lark::callback::{
    encrypt_with_iv, open, signature, CallbackError, Headers, Incoming, LarkApp,
};
use imbridge_fuzz::{split_mode, LARK_KEY, LARK_TOKEN, NONCE};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TIMESTAMP: &str = "1700000000";
/// The clock the harness opens callbacks at: the signed timestamp, so the replay window holds.
const NOW_MS: u64 = 1_700_000_000_000;
const WINDOW: Option<std::time::Duration> = Some(std::time::Duration::from_secs(120));

fn app(key: bool) -> LarkApp {
    LarkApp {
        verification_token: Some(LARK_TOKEN.to_owned()),
        encrypt_key: key.then(|| LARK_KEY.to_owned()),
    }
}

fn open_signed(body: &[u8]) -> Result<Incoming, CallbackError> {
    let sig = signature(TIMESTAMP, NONCE, LARK_KEY, body);
    let headers = Headers {
        timestamp: Some(TIMESTAMP),
        nonce: Some(NONCE),
        signature: Some(&sig),
    };
    open(&app(true), &headers, body, NOW_MS, WINDOW)
}

fn envelope(encrypt: &str) -> Vec<u8> {
    serde_json::json!({ "encrypt": encrypt })
        .to_string()
        .into_bytes()
}

/// An event that opened is the body exactly as sent, with a type and an id.
fn check_event(result: &Result<Incoming, CallbackError>, body: &[u8]) {
    if let Ok(Incoming::Event(event)) = result {
        assert_eq!(event.body, body);
        assert!(!event.event_type.is_empty() && !event.event_id.is_empty());
        assert_ne!(event.tenant_key.as_deref(), Some(""));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, input)) = split_mode(data) else {
        return;
    };
    let result = match mode % 5 {
        0 => {
            let encrypt = encrypt_with_iv(LARK_KEY, [7; 16], input);
            let result = open_signed(&envelope(&encrypt));
            check_event(&result, input);
            // Authentic bytes that are no JSON object are refused as such.
            let is_object = std::str::from_utf8(input)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .is_some_and(|v| v.is_object());
            if is_object {
                // It got past the signature and the decryption.
                assert!(
                    !matches!(
                        result,
                        Err(CallbackError::Signature
                            | CallbackError::MissingSignature
                            | CallbackError::Base64
                            | CallbackError::CiphertextLength(_)
                            | CallbackError::Padding(_))
                    ),
                    "{result:?}"
                );
            } else {
                assert!(
                    matches!(result, Err(CallbackError::Utf8 | CallbackError::Json)),
                    "{result:?}"
                );
            }
            result
        }
        1 => {
            let result = open(&app(false), &Headers::default(), input, NOW_MS, WINDOW);
            check_event(&result, input);
            result
        }
        2 => open_signed(input),
        3 => {
            let result = open(&app(true), &Headers::default(), input, NOW_MS, WINDOW);
            // Without a signature only the handshake is answered. Past the public envelope
            // checks, a failure is the signature refusal, or the handshake's own token and
            // challenge checks once it decrypted to a url_verification: never a padding,
            // base64 or JSON error about the plaintext, which would be an oracle on the
            // ciphertext for someone without the key.
            let outer_is_object =
                serde_json::from_slice::<Value>(input).is_ok_and(|v| v.is_object());
            match &result {
                Err(CallbackError::Utf8 | CallbackError::Json) => assert!(!outer_is_object),
                Ok(Incoming::Challenge { .. })
                | Err(
                    CallbackError::InvalidBody
                    | CallbackError::MissingSignature
                    | CallbackError::Token
                    | CallbackError::MissingChallenge,
                ) => {}
                other => panic!("unsigned request gave {other:?}"),
            }
            result
        }
        _ => open_signed(&envelope(&STANDARD.encode(input))),
    };
    if let Err(e) = result {
        assert!(!e.code().is_empty());
        assert!(matches!(e.http_status(), 400 | 401), "{e:?}");
        assert!(!e.to_string().is_empty());
    }
});
