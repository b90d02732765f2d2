//! Lark / Feishu.

pub mod app;
pub mod callback;
pub mod robot;
pub mod ws;
