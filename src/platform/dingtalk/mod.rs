//! DingTalk. HTTP event callbacks (PROTOCOLS.md §1): a JSON envelope `{"encrypt": …}` around
//! the shared AES scheme, query parameters `msg_signature`|`signature`, `timestamp`|`timeStamp`
//! (milliseconds) and `nonce`, and an encrypted `success` as the required reply. Stream mode
//! (STREAMS.md §A): the same events over a WebSocket the app dials out on (`stream`).

pub mod callback;
pub mod oapi;
pub mod robot;
pub mod stream;
pub mod work;
