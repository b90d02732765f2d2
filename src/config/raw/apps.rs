//! `[apps.<platform>.<name>]`: the platform apps whose callbacks the ingress accepts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::targets::OneOrMany;
use crate::secret::{lenient_string, Secret};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AppsConfig {
    /// DingTalk apps by name: `POST /callbacks/dingtalk/<name>`, or a Stream-mode connection.
    pub dingtalk: BTreeMap<String, DingTalkAppConfig>,
    /// WeCom apps by name: `GET|POST /callbacks/wecom/<name>`.
    pub wecom: BTreeMap<String, WeComAppConfig>,
    /// Lark / Feishu apps by name: `POST /callbacks/lark/<name>`.
    pub lark: BTreeMap<String, LarkAppConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct WeComAppConfig {
    /// The callback Token chosen in the admin console ("接收消息" settings).
    pub token: Secret,
    /// The 43-character EncodingAESKey chosen there.
    pub aes_key: Secret,
    /// The corpId (企业ID) the callbacks are encrypted for.
    #[serde(deserialize_with = "lenient_string")]
    pub corp_id: String,
    /// Also carry the decrypted XML, byte for byte, in the event body under `"#xml"`.
    #[serde(default)]
    pub keep_raw_xml: bool,
    /// The app's Secret (with corp_id), for its server API through the gateway; no gateway
    /// for this app when unset.
    pub app_secret: Secret,
    /// Where WeCom's server API is called. Default `https://qyapi.weixin.qq.com`.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_base: Option<String>,
    /// Accept an `http://` api_base (tests, private gateways). Default false: the token
    /// request carries the app secret.
    pub allow_insecure_http: bool,
    /// This app's proxy, over `[http] proxy`, for its API calls (tokens, the API gateway):
    /// a URL, or "none" for a direct connection. Unset: `[http] proxy`. A secret.
    pub proxy: Option<Secret>,
    /// The API gateway's rate for this app across every replica, e.g. "20/s" or
    /// ["5/s", "100/min"]. Default: the platform's documented limit (README, "Calling the
    /// platforms' APIs through imbridge").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_rate_limit: Option<OneOrMany>,
    /// Business tokens appended to this app's inbound subjects, per event type as the platform
    /// names it (`"*"`: every type without a key of its own): JSON pointers into the event as
    /// published, e.g. `bpms_instance_change = ["/processCode", "/type"]` publishes to
    /// `dingtalk.bpms_instance_change.PROC-123.finish`. Values are sanitised to one token of
    /// `[A-Za-z0-9_-]` (at most 64 characters), `_` when absent. Unset: today's subjects.
    pub subjects: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct LarkAppConfig {
    /// How events reach imbridge: "http" (the default: Lark posts them to
    /// `/callbacks/lark/<name>`, which needs a public URL) or "websocket" (imbridge opens
    /// Lark's long connection: no public URL, no route).
    #[serde(deserialize_with = "lenient_string")]
    pub mode: String,
    /// The app's App ID (`cli_…`): websocket mode's credentials, and (either mode) the API
    /// gateway's.
    #[serde(deserialize_with = "lenient_string")]
    pub app_id: String,
    /// The app's App Secret, with app_id.
    pub app_secret: Secret,
    /// Where the long connection's endpoint is asked for and the API gateway calls. Default
    /// `https://open.feishu.cn`;
    /// `https://open.larksuite.com` for Lark (international).
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub domain: Option<String>,
    /// Accept an `http://` domain and the `ws://` URL it hands out (tests,
    /// private gateways). Default false: the endpoint call carries the app secret.
    pub allow_insecure_http: bool,
    /// This app's proxy, over `[http] proxy`, for its API calls (tokens, the API gateway, the websocket endpoint call):
    /// a URL, or "none" for a direct connection. Unset: `[http] proxy`. A secret.
    pub proxy: Option<Secret>,
    /// The API gateway's rate for this app across every replica, e.g. "20/s" or
    /// ["5/s", "100/min"]. Default: the platform's documented limit (README, "Calling the
    /// platforms' APIs through imbridge").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_rate_limit: Option<OneOrMany>,
    /// HTTP mode: the Verification Token of the app's event subscription; checked when set.
    #[serde(default)]
    pub verification_token: Option<Secret>,
    /// The Encrypt Key; when set, events must be encrypted and signed with it.
    #[serde(default)]
    pub encrypt_key: Option<Secret>,
    /// Accept this app's callbacks without an encrypt key, authenticated by the verification
    /// token alone. Unsafe: that token travels inside every event published, so anyone who
    /// can read the bus could forge this app's callbacks; and unsigned callbacks have no
    /// timestamp to bound their replay.
    pub allow_unsigned: bool,
    /// Business tokens appended to this app's inbound subjects, per event type as the platform
    /// names it (`"*"`: every type without a key of its own): JSON pointers into the event as
    /// published, e.g. `bpms_instance_change = ["/processCode", "/type"]` publishes to
    /// `dingtalk.bpms_instance_change.PROC-123.finish`. Values are sanitised to one token of
    /// `[A-Za-z0-9_-]` (at most 64 characters), `_` when absent. Unset: today's subjects.
    pub subjects: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct DingTalkAppConfig {
    /// How events reach imbridge: "http" (the default: DingTalk posts them to
    /// `/callbacks/dingtalk/<name>`, which needs a public URL) or "stream" (imbridge opens a
    /// WebSocket to DingTalk, Stream mode: no public URL, no route).
    #[serde(deserialize_with = "lenient_string")]
    pub mode: String,
    /// Stream mode: the app's Client ID (AppKey; the suiteKey for an ISV app).
    #[serde(deserialize_with = "lenient_string")]
    pub client_id: String,
    /// Stream mode: the app's Client Secret (AppSecret).
    pub client_secret: Secret,
    /// Stream mode: where `connections/open` is called. Default `https://api.dingtalk.com`;
    /// `https://api.dingtalk.io` overseas.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_base: Option<String>,
    /// Stream mode: accept an `http://` api_base and the `ws://` endpoint it hands out.
    /// Default false: the registration carries the client secret, so only `https://` (and
    /// `wss://`) are accepted (tests and private gateways set this).
    pub allow_insecure_http: bool,
    /// This app's proxy, over `[http] proxy`, for its API calls (tokens, the API gateway, callback registration, failed-push recovery, the stream registration):
    /// a URL, or "none" for a direct connection. Unset: `[http] proxy`. A secret.
    pub proxy: Option<Secret>,
    /// The app's AppKey, for its server API (`gettoken`): registering the callback, recovering
    /// failed pushes, the API gateway. In stream mode, `client_id` when unset.
    #[serde(deserialize_with = "lenient_string")]
    pub app_key: String,
    /// The app's AppSecret, with `app_key`. In stream mode, `client_secret` when unset.
    pub app_secret: Secret,
    /// Where DingTalk's classic server API (`gettoken`, `call_back/*`, `topapi/*`) is called.
    /// Default `https://oapi.dingtalk.com`.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub oapi_base: Option<String>,
    /// The events `imbridge dingtalk callback register|update` subscribes to when `--tags` is
    /// not given, e.g. `["user_add_org", "bpms_instance_change"]`.
    pub callback_tags: Vec<String>,
    /// Poll `call_back/get_call_back_failed_result` this often and publish what DingTalk could
    /// not push (one replica at a time); off when unset.
    #[serde(
        default,
        deserialize_with = "crate::secret::lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub recover_failed: Option<String>,
    /// The API gateway's rate for this app across every replica, e.g. "20/s" or
    /// ["5/s", "100/min"]. Default: the platform's documented limit (README, "Calling the
    /// platforms' APIs through imbridge").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_rate_limit: Option<OneOrMany>,
    /// HTTP mode: the callback token chosen when registering the URL.
    pub token: Secret,
    /// HTTP mode: the 43-character EncodingAESKey ("aes_key") chosen when registering the URL.
    pub aes_key: Secret,
    /// HTTP mode: corpId (API-registered callback), appKey (in-house app event subscription) or suiteKey.
    #[serde(deserialize_with = "lenient_string")]
    pub receiver_id: String,
    /// Business tokens appended to this app's inbound subjects, per event type as the platform
    /// names it (`"*"`: every type without a key of its own): JSON pointers into the event as
    /// published, e.g. `bpms_instance_change = ["/processCode", "/type"]` publishes to
    /// `dingtalk.bpms_instance_change.PROC-123.finish`. Values are sanitised to one token of
    /// `[A-Za-z0-9_-]` (at most 64 characters), `_` when absent. Unset: today's subjects.
    pub subjects: BTreeMap<String, Vec<String>>,
}
