//! DingTalk Stream frames: any text goes through `stream::parse` (as the connection reads a
//! text frame) and `message_id_of`, and a registration answer through `open_answer`. No
//! panic; a published push keeps its `data` byte for byte and always has a messageId to ACK,
//! and every ACK built for it is a JSON object carrying that messageId.
#![no_main]

use imbridge::platform::dingtalk::stream::{self, Frame};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The frame cap of the target: small, so the oversize path is reached too.
const MAX: usize = 2048;

fn check_ack(text: &str, message_id: &str) {
    let ack: Value = serde_json::from_str(text).expect("an ACK is JSON");
    assert_eq!(ack["headers"]["messageId"], message_id);
    assert!(ack["data"].is_string());
}

fuzz_target!(|data: &[u8]| {
    let _ = stream::open_answer(200, data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = stream::message_id_of(text);
    match stream::parse(text, MAX) {
        Ok(Frame::Publish(push)) => {
            assert!(!push.message_id.is_empty());
            let raw: Value = serde_json::from_str(text).expect("a published frame is JSON");
            assert_eq!(raw["data"].as_str(), Some(push.data.as_str()));
            assert!(serde_json::from_str::<Value>(&push.data).is_ok_and(|v| v.is_object()));
            check_ack(&stream::ack_success(&push.message_id), &push.message_id);
            check_ack(&stream::ack_later(&push.message_id, "x"), &push.message_id);
        }
        Ok(Frame::Ping { message_id, data }) => {
            check_ack(&stream::ack_ping(&message_id, &data), &message_id);
        }
        Ok(_) => {}
        Err(e) => assert!(!e.label().is_empty()),
    }
});
