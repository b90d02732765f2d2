//! Valid encrypted DingTalk callbacks, made with the daemon's own crypto: each with a fresh
//! random prefix and a unique 1 KiB event, so none is a duplicate of another.

use std::sync::atomic::{AtomicU64, Ordering};

use imbridge::platform::msgcrypt::MsgCrypt;

pub const TOKEN: &str = "mryue";
pub const AES_KEY: &str = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7";
pub const CORP_ID: &str = "ding6ccabc44d2c8d38b";

/// The `[apps.dingtalk.bench]` section the daemon is configured with.
pub fn app_toml() -> String {
    format!(
        "[apps.dingtalk.bench]\ntoken = \"{TOKEN}\"\naes_key = \"{AES_KEY}\"\nreceiver_id = \"{CORP_ID}\"\n"
    )
}

/// Event size the benchmark promises (before encryption).
pub const EVENT_BYTES: usize = 1024;

pub struct Maker {
    crypt: MsgCrypt,
    next: AtomicU64,
}

/// One callback: the query string and the JSON body.
pub struct Callback {
    pub query: String,
    pub body: String,
}

impl Maker {
    pub fn new() -> Self {
        Maker {
            crypt: MsgCrypt::new(TOKEN, AES_KEY, CORP_ID).expect("valid key"),
            next: AtomicU64::new(0),
        }
    }

    /// A 1 KiB approval event, unique by its instance id, encrypted and signed now.
    pub fn make(&self) -> Callback {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut event = format!(
            r#"{{"EventType":"bpms_instance_change","processInstanceId":"bench-{n:016}","corpId":"{CORP_ID}","createTime":1608001800000,"title":"张三提交的请假","type":"finish","staffId":"manager75","result":"agree","processCode":"PROC-BENCH","remark":""#
        );
        let pad = EVENT_BYTES.saturating_sub(event.len() + 2);
        event.push_str(&"x".repeat(pad));
        event.push_str("\"}");
        let encrypt = self.crypt.encrypt_fresh(event.as_bytes());
        let ts = imbridge::platform::now_ms().to_string();
        let nonce = "benchnonce";
        let signature = self.crypt.signature(&ts, nonce, &encrypt);
        Callback {
            query: format!("msg_signature={signature}&timestamp={ts}&nonce={nonce}"),
            body: serde_json::json!({ "encrypt": encrypt }).to_string(),
        }
    }
}
