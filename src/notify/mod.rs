//! The outbound direction: consume `notify.<target>`, render, rate-limit, send, retry,
//! dead-letter (DESIGN.md §3).

pub mod limiter;
pub mod message;
pub mod pipeline;
pub mod shape;
pub mod template;
pub mod token;
