//! Lark / Feishu.

pub mod callback;
pub mod robot;
