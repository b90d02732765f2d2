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

/// `%XX` decoded, as UTF-8; `None` on a malformed escape or invalid UTF-8. Strict on purpose
/// (the `percent-encoding` crate keeps a malformed escape as it is): what cannot be decoded
/// exactly is refused, for a signed query or a path matched against a client's globs alike.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
