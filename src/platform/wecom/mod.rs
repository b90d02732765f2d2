//! WeCom (WeChat Work).

pub mod app;
pub mod callback;
pub mod robot;
