//! WeCom (WeChat Work).

pub mod robot;
