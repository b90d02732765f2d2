//! Notification bodies as `POST /notify/<target>` and the bus receive them: JSON notifications,
//! ZenTao/Sanplex payloads as JSON or as a form, and anything else. Each is parsed and then
//! previewed for one target of every kind (without a template), through composition, mention
//! and recipient resolution, and the platform's rendering with splitting and truncation.
#![no_main]

use imbridge::message;
use imbridge_fuzz::preview;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TARGETS: &[&str] = &[
    "ding-robot",
    "wecom-robot",
    "lark-card",
    "lark-post",
    "ding-work",
    "wecom-app",
    "lark-app",
];

fuzz_target!(|data: &[u8]| {
    let parsed = message::parse(data);
    match &parsed {
        Ok(p) => {
            assert!(p.payload.is_object());
            let n = &p.notification;
            assert!(p.zentao.is_some() || !n.text.trim().is_empty() || n.raw.is_some());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // A JSON object is taken as it is, field for field.
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(data) {
        assert_eq!(message::payload(data), Ok(map));
    }
    for name in TARGETS {
        let rendered = preview(name, data);
        // Without a template, a target renders nothing the parser refused.
        assert!(
            !rendered || parsed.is_ok(),
            "{name} rendered a body the parser refused"
        );
    }
});
