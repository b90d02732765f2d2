//! Platform protocols: pure functions over bytes, no HTTP server here. One module per
//! platform; the AES scheme DingTalk and WeCom share is in [`msgcrypt`]; generic HTTP
//! receivers in [`webhook`].

pub mod api;
pub mod dingtalk;
pub mod kind;
pub mod lark;
pub mod msgcrypt;
pub mod outbound;
pub mod webhook;
pub mod wecom;

pub use kind::{AppCredentials, Endpoint, Kind, Limit, Platform};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
