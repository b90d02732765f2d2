//! DingTalk. HTTP event callbacks (PROTOCOLS.md §1): a JSON envelope `{"encrypt": …}` around
//! the shared AES scheme, query parameters `msg_signature`|`signature`, `timestamp`|`timeStamp`
//! (milliseconds) and `nonce`, and an encrypted `success` as the required reply.

pub mod callback;
pub mod robot;
pub mod work;
