//! Lark / Feishu.

pub mod robot;
