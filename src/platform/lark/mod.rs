//! Lark / Feishu.
