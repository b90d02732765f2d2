//! WeCom (WeChat Work).

pub mod callback;
pub mod robot;
