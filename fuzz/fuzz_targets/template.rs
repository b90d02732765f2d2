//! Templates rendering hostile payloads: the configured templates (every helper and filter, see
//! `fuzz/notify.toml`) render whatever a sender posts, through a route with rules and through
//! targets, then the platform's rendering. First byte: even = the input is the body as sent;
//! odd = the input builds a JSON object whose keys are the fields the templates read and whose
//! values are of every JSON type, nested.
#![no_main]

use imbridge_fuzz::{payload, preview, split_mode};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &["zentao", "ding-robot-t", "wecom-app-t", "lark-app-t"];

fuzz_target!(|data: &[u8]| {
    let Some((mode, input)) = split_mode(data) else {
        return;
    };
    let body = if mode % 2 == 0 {
        input.to_vec()
    } else {
        match payload(&mut Unstructured::new(input)) {
            Ok(value) => serde_json::to_vec(&value).expect("a JSON value serialises"),
            Err(_) => return,
        }
    };
    for name in NAMES {
        preview(name, &body);
    }
});
