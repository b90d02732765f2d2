//! Lark long-connection frames: any bytes go through `Frame::decode_bytes` (as the connection
//! reads a binary message), `endpoint` (as an endpoint answer) and `ClientConfig::apply` (as a
//! pong's payload); a decoded data frame goes into a small `Fragments`. No panic; a frame
//! decoded is encoded back to something that decodes to the same frame; an answer repeats the
//! frame's numbers and headers; the fragments never hold more than their bounds.
#![no_main]

use std::time::{Duration, Instant};

use imbridge::platform::lark::ws::{self, ClientConfig, Fragments, Frame};
use libfuzzer_sys::fuzz_target;

/// Small bounds, so that eviction and the size limit are reached too.
const MAX_SETS: usize = 4;
const MAX_BYTES: usize = 256;

fuzz_target!(|data: &[u8]| {
    let _ = ws::endpoint(200, data);
    let mut config = ClientConfig::default();
    if config.apply(data) {
        assert!(config.ping_interval >= 1);
    }
    let Ok(frame) = Frame::decode_bytes(data) else {
        return;
    };
    let again = Frame::decode_bytes(&frame.to_bytes()).expect("an encoded frame decodes");
    assert_eq!(again, frame);
    let _ = frame.kind();
    let answer = frame.answer(true, Duration::from_millis(3));
    assert_eq!(
        (answer.seq_id, answer.log_id, answer.service, answer.method),
        (frame.seq_id, frame.log_id, frame.service, frame.method)
    );
    assert_eq!(answer.header("biz_rt"), Some("3"));
    let mut fragments = Fragments::new(Duration::from_secs(5), MAX_SETS, MAX_BYTES);
    let now = Instant::now();
    for _ in 0..2 {
        if let Ok(Some(whole)) = fragments.add(&frame, now) {
            assert!(whole.len() <= MAX_BYTES);
        }
        assert!(fragments.len() <= MAX_SETS);
    }
});
