//! WeCom (WeChat Work).
