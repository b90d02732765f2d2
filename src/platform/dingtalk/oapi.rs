//! DingTalk's server API as one app calls it: its credentials (`gettoken`'s AppKey and
//! AppSecret) and where the classic API (`oapi.dingtalk.com`: `gettoken`, `call_back/*`,
//! `topapi/*`) and the newer one (`api.dingtalk.com`: `/v1.0/…`) are.

use std::time::Duration;

use crate::platform::AppCredentials;

/// The classic API, where `gettoken` and the callback registration live.
pub const OAPI_BASE: &str = "https://oapi.dingtalk.com";

/// The newer API (`/v1.0/…` paths), where Stream connections are registered too.
pub const API_BASE: &str = "https://api.dingtalk.com";

/// A DingTalk app's server-API side, validated: present when the app has an AppKey and
/// AppSecret (or, in stream mode, its Client ID and Secret, which are the same).
#[derive(Debug, Clone)]
pub struct DingTalkOapi {
    /// `base_url` is the classic API's base, without a trailing slash; `app_id` the AppKey.
    pub credentials: AppCredentials,
    /// The newer API's base, without a trailing slash.
    pub api_base: String,
    /// What `imbridge dingtalk callback register|update` subscribes to without `--tags`.
    pub callback_tags: Vec<String>,
    /// How often failed pushes are polled and published; `None`: never.
    pub recover_failed: Option<Duration>,
    /// `http://` bases allowed (tests, private gateways).
    pub allow_insecure: bool,
}
