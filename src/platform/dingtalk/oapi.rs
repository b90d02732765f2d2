//! DingTalk's server API as one app calls it: its credentials (`gettoken`'s AppKey and
//! AppSecret) and where the classic API (`oapi.dingtalk.com`: `gettoken`, `call_back/*`,
//! `topapi/*`) and the newer one (`api.dingtalk.com`: `/v1.0/…`) are; and a client of the
//! classic API's `gettoken` and `call_back/*` calls (PROTOCOLS.md §1.1): requests built and
//! answers read by pure functions; `ingress::oapi` sends them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::platform::outbound::{self, endpoint, query, IssuedToken};
use crate::platform::AppCredentials;
use crate::secret::{redact, Secret};

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
    /// How its calls leave: the app's `proxy`, else `[http] proxy`.
    pub egress: crate::egress::Egress,
}

// The classic API's calls: `gettoken` and `call_back/*` (PROTOCOLS.md §1.1). Requests are
// built and answers read here; `ingress::oapi::OapiClient` only sends them.

/// Why a call to DingTalk's server API failed. Each variant is a different thing for the
/// operator to fix: the credentials or request (`Refused`), the network (`Transport`), or
/// whatever answered in DingTalk's place (`Status`, `Unexpected`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OapiError {
    /// DingTalk answered, with an `errcode` other than 0.
    #[error("DingTalk refused {call}: errcode {errcode}, errmsg {errmsg:?}")]
    Refused {
        call: &'static str,
        errcode: i64,
        errmsg: String,
    },
    /// No answer: connection refused, DNS, TLS, timeout. Never holds the URL (it holds the
    /// app secret or the access token).
    #[error("no answer from DingTalk to {call}: {detail}")]
    Transport { call: &'static str, detail: String },
    /// An HTTP status other than 200 without DingTalk's JSON.
    #[error("DingTalk answered {call} with HTTP {status}: {detail}")]
    Status {
        call: &'static str,
        status: u16,
        detail: String,
    },
    /// HTTP 200 but not the answer DingTalk documents (not JSON, no `errcode`, a field missing).
    #[error("DingTalk's answer to {call} is not what its API documents: {detail}")]
    Unexpected { call: &'static str, detail: String },
}

impl OapiError {
    /// DingTalk's `errcode`, when it answered with one.
    pub fn errcode(&self) -> Option<i64> {
        match self {
            OapiError::Refused { errcode, .. } => Some(*errcode),
            _ => None,
        }
    }

    /// Whether the access token was rejected (invalid 40014, expired 42001, or 88, which
    /// DingTalk's newer gateway answers for both): fetch another and try once more. [U] 88 is
    /// from issue 17's list; PROTOCOLS.md names no token-rejected code for DingTalk.
    pub fn is_token_rejected(&self) -> bool {
        matches!(self.errcode(), Some(40014 | 42001 | 88))
    }

    /// Worth trying again later as it is (network, 5xx, DingTalk's "system busy" -1); the
    /// others need a change first.
    pub fn is_transient(&self) -> bool {
        match self {
            OapiError::Transport { .. } | OapiError::Unexpected { .. } => true,
            OapiError::Status { status, .. } => *status >= 500 || *status == 429,
            OapiError::Refused { errcode, .. } => *errcode == -1,
        }
    }
}

/// The names of the calls, as errors show them.
pub mod call {
    pub const GETTOKEN: &str = "gettoken";
    pub const REGISTER: &str = "call_back/register_call_back";
    pub const UPDATE: &str = "call_back/update_call_back";
    pub const GET: &str = "call_back/get_call_back";
    pub const DELETE: &str = "call_back/delete_call_back";
    pub const FAILED: &str = "call_back/get_call_back_failed_result";
}

/// Reads one answer of the classic API: HTTP 200 and a JSON object with `errcode` 0 (DingTalk
/// answers errors with HTTP 200 too, so `errcode` decides). The object is returned for the
/// caller to pick its fields from. Texts quoted from the answer are credential-masked.
pub fn parse_answer(call: &'static str, status: u16, body: &[u8]) -> Result<Value, OapiError> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let object = parsed.filter(Value::is_object);
    let errcode = object
        .as_ref()
        .and_then(|v| v.get("errcode"))
        .and_then(|c| {
            c.as_i64()
                .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))
        });
    match (object, errcode) {
        (Some(v), Some(0)) if status == 200 => Ok(v),
        (Some(v), Some(errcode)) if errcode != 0 => Err(OapiError::Refused {
            call,
            errcode,
            errmsg: v
                .get("errmsg")
                .and_then(Value::as_str)
                .map(|m| outbound::truncate_utf8(&redact(m), 256))
                .unwrap_or_default(),
        }),
        _ if status != 200 => Err(OapiError::Status {
            call,
            status,
            detail: outbound::detail(body),
        }),
        (Some(_), _) => Err(OapiError::Unexpected {
            call,
            detail: "a JSON object without errcode".into(),
        }),
        (None, _) => Err(OapiError::Unexpected {
            call,
            detail: format!("not a JSON object: {}", outbound::detail(body)),
        }),
    }
}

/// `GET {oapi}/gettoken?appkey=…&appsecret=…`. The URL holds the secret: never show it.
pub fn gettoken_url(credentials: &AppCredentials) -> String {
    let q = query(&[
        ("appkey", credentials.app_id.as_str()),
        ("appsecret", credentials.secret.expose()),
    ]);
    endpoint(&credentials.base_url, &format!("/gettoken?{q}"))
}

/// The token of a `gettoken` answer: `access_token` and its lifetime `expires_in` (seconds;
/// DingTalk documents 7200, taken when it is missing).
pub fn parse_token(status: u16, body: &[u8]) -> Result<IssuedToken, OapiError> {
    let v = parse_answer(call::GETTOKEN, status, body)?;
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| OapiError::Unexpected {
            call: call::GETTOKEN,
            detail: "errcode 0 without access_token".into(),
        })?;
    let secs = v
        .get("expires_in")
        .and_then(|e| {
            e.as_u64()
                .or_else(|| e.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|s| *s > 0)
        .unwrap_or(7200);
    Ok(IssuedToken {
        token: token.to_owned(),
        expires_in: Duration::from_secs(secs),
    })
}

/// `{oapi}/call_back/<name>?access_token=…`. The URL holds the token: never show it.
pub fn call_url(oapi_base: &str, name: &str, access_token: &Secret) -> String {
    let q = query(&[("access_token", access_token.expose())]);
    endpoint(oapi_base, &format!("/{name}?{q}"))
}

/// What a callback registration holds: the events, where they go, and the token and
/// EncodingAESKey they are signed and encrypted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub tags: Vec<String>,
    pub url: String,
    pub token: Secret,
    pub aes_key: Secret,
}

impl Registration {
    /// The body of `register_call_back` and `update_call_back`. It holds the token and the
    /// key: never log it.
    pub fn body(&self) -> Value {
        json!({
            "call_back_tag": self.tags,
            "token": self.token.expose(),
            "aes_key": self.aes_key.expose(),
            "url": self.url,
        })
    }
}

/// The registration of a `get_call_back` answer: `call_back_tag`, `url`, `token`, `aes_key`.
pub fn parse_registration(status: u16, body: &[u8]) -> Result<Registration, OapiError> {
    let v = parse_answer(call::GET, status, body)?;
    let text = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or_default();
    let tags = match v.get("call_back_tag") {
        Some(Value::Array(tags)) => tags
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        // [U] Seen documented as an array only; a comma-separated string is read as well.
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    Ok(Registration {
        tags,
        url: text("url").to_owned(),
        token: Secret::new(text("token")),
        aes_key: Secret::new(text("aes_key")),
    })
}

/// A page of `get_call_back_failed_result`: the pushes DingTalk could not deliver (kept 7
/// days), oldest first as DingTalk hands them out [U].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedPage {
    /// More pages follow: ask again once this one is handled (DingTalk drops what it handed
    /// out, so there is no cursor).
    pub has_more: bool,
    pub entries: Vec<FailedEntry>,
}

/// One failed push. Entries are never dropped for being unreadable: `data` says why instead,
/// so that the caller counts and logs it with its tag and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    /// `call_back_tag`, the event type; empty when the entry has none.
    pub tag: String,
    /// `event_time`, in milliseconds, when the entry has a readable one.
    pub event_time: Option<u64>,
    /// `corpid` (or the event's own `CorpId`/`corpId`).
    pub corp_id: Option<String>,
    /// `id`, as text (DingTalk sends a number [U]).
    pub id: Option<String>,
    /// The event's JSON (an object) as the push would have carried it, or why it could not
    /// be read.
    pub data: Result<String, String>,
}

/// Reads a `get_call_back_failed_result` answer. The event's data comes in one of two shapes,
/// both accepted: documented, `call_back_data`, a JSON string (PROTOCOLS.md §1.1); seen in the
/// wild, a field named after the tag (`"bpms_instance_change": {…}` or a JSON string).
pub fn parse_failed(status: u16, body: &[u8]) -> Result<FailedPage, OapiError> {
    let v = parse_answer(call::FAILED, status, body)?;
    let has_more = match v.get("has_more") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    };
    let entries = match v.get("failed_list") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().map(failed_entry).collect(),
        Some(_) => {
            return Err(OapiError::Unexpected {
                call: call::FAILED,
                detail: "failed_list is not an array".into(),
            })
        }
    };
    Ok(FailedPage { has_more, entries })
}

fn failed_entry(entry: &Value) -> FailedEntry {
    let text = |name: &str| match entry.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let tag = text("call_back_tag").unwrap_or_default();
    let event_time = entry.get("event_time").and_then(|t| {
        t.as_u64()
            .or_else(|| t.as_str().and_then(|s| s.trim().parse().ok()))
    });
    let data = failed_data(entry, &tag);
    let corp_id = text("corpid").or_else(|| text("corpId")).or_else(|| {
        let data: Value = serde_json::from_str(data.as_ref().ok()?).ok()?;
        ["CorpId", "corpId"]
            .iter()
            .find_map(|k| data.get(*k).and_then(Value::as_str).map(str::to_owned))
    });
    FailedEntry {
        tag,
        event_time,
        corp_id,
        id: text("id"),
        data,
    }
}

/// The event JSON of an entry: `call_back_data`, else the field named after the tag; either
/// a JSON object or a string holding one.
fn failed_data(entry: &Value, tag: &str) -> Result<String, String> {
    let (field, value) = match entry.get("call_back_data") {
        Some(v) if !v.is_null() => ("call_back_data", v),
        _ if tag.is_empty() => return Err("no call_back_tag and no call_back_data".into()),
        _ => match entry.get(tag) {
            Some(v) if !v.is_null() => (tag, v),
            _ => return Err(format!("neither call_back_data nor a field {tag:?}")),
        },
    };
    match value {
        Value::Object(_) => Ok(value.to_string()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(_)) => Ok(s.clone()),
            Ok(_) => Err(format!("{field} is a JSON string but not of an object")),
            Err(e) => Err(format!("{field} is not JSON: {e}")),
        },
        _ => Err(format!("{field} is neither an object nor a JSON string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(base: &str) -> AppCredentials {
        AppCredentials {
            base_url: base.to_owned(),
            app_id: "ding key".into(),
            secret: Secret::new("s+c/r=t&x"),
            agent_id: 0,
        }
    }

    #[test]
    fn answers_are_judged_by_errcode_then_status() {
        let ok = parse_answer("c", 200, br#"{"errcode":0,"errmsg":"ok","x":1}"#).unwrap();
        assert_eq!(ok["x"], 1);
        // DingTalk answers errors with HTTP 200; the errcode and errmsg are what is shown.
        let e = parse_answer(
            "c",
            200,
            r#"{"errcode":71007,"errmsg":"回调地址已存在"}"#.as_bytes(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            OapiError::Refused {
                call: "c",
                errcode: 71007,
                errmsg: "回调地址已存在".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "DingTalk refused c: errcode 71007, errmsg \"回调地址已存在\""
        );
        // A code as a string is still a code; a refusal on a 4xx is still a refusal.
        let e = parse_answer("c", 403, br#"{"errcode":"40001","errmsg":"bad"}"#).unwrap_err();
        assert_eq!(e.errcode(), Some(40001));
        // An errmsg quoting a URL does not quote its token.
        let e = parse_answer(
            "c",
            200,
            br#"{"errcode":40014,"errmsg":"invalid token: /x?access_token=t0k"}"#,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("t0k"), "{e}");
        assert!(e.is_token_rejected() && !e.is_transient());
        // Not DingTalk's answers.
        let e = parse_answer("c", 502, b"<html>bad gateway</html>").unwrap_err();
        assert!(matches!(e, OapiError::Status { status: 502, .. }) && e.is_transient());
        let e = parse_answer("c", 200, b"[]").unwrap_err();
        assert!(matches!(e, OapiError::Unexpected { .. }));
        let e = parse_answer("c", 200, br#"{"errmsg":"ok"}"#).unwrap_err();
        assert!(matches!(e, OapiError::Unexpected { .. }));
        // errcode 0 on an error status is not a success.
        let e = parse_answer("c", 500, br#"{"errcode":0}"#).unwrap_err();
        assert!(matches!(e, OapiError::Status { status: 500, .. }));
        let busy =
            parse_answer("c", 200, r#"{"errcode":-1,"errmsg":"系统繁忙"}"#.as_bytes()).unwrap_err();
        assert!(busy.is_transient());
    }

    #[test]
    fn gettoken_url_and_answer() {
        let url = gettoken_url(&creds("https://oapi.dingtalk.com"));
        assert_eq!(
            url,
            "https://oapi.dingtalk.com/gettoken?appkey=ding+key&appsecret=s%2Bc%2Fr%3Dt%26x"
        );
        let t = parse_token(
            200,
            br#"{"errcode":0,"access_token":"t-1","expires_in":7200}"#,
        )
        .unwrap();
        assert_eq!(
            (t.token.as_str(), t.expires_in),
            ("t-1", Duration::from_secs(7200))
        );
        let t = parse_token(200, br#"{"errcode":0,"access_token":"t-1"}"#).unwrap();
        assert_eq!(t.expires_in, Duration::from_secs(7200));
        let e = parse_token(
            200,
            r#"{"errcode":40089,"errmsg":"不合法的corpid或corpsecret"}"#.as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.errcode(), Some(40089));
        assert!(e.to_string().contains("gettoken"), "{e}");
        let e = parse_token(200, br#"{"errcode":0,"access_token":""}"#).unwrap_err();
        assert!(matches!(e, OapiError::Unexpected { .. }));
    }

    #[test]
    fn registration_body_and_get_answer() {
        let url = call_url("http://h:1/", call::REGISTER, &Secret::new("a&b"));
        assert_eq!(
            url,
            "http://h:1/call_back/register_call_back?access_token=a%26b"
        );
        let r = Registration {
            tags: vec!["user_add_org".into(), "bpms_instance_change".into()],
            url: "https://im.example.com/callbacks/dingtalk/main".into(),
            token: Secret::new("tok"),
            aes_key: Secret::new("k".repeat(43)),
        };
        assert_eq!(
            r.body(),
            json!({
                "call_back_tag": ["user_add_org", "bpms_instance_change"],
                "token": "tok",
                "aes_key": "k".repeat(43),
                "url": "https://im.example.com/callbacks/dingtalk/main",
            })
        );
        // Debug (logs) shows neither the token nor the key.
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("tok\"") && !shown.contains("kkkk"),
            "{shown}"
        );

        let got = parse_registration(
            200,
            br#"{"errcode":0,"errmsg":"ok","call_back_tag":["user_add_org"],"token":"tok","aes_key":"kk","url":"https://x/"}"#,
        )
        .unwrap();
        assert_eq!(got.tags, ["user_add_org"]);
        assert_eq!(got.url, "https://x/");
        assert_eq!(got.token.expose(), "tok");
        assert_eq!(got.aes_key.expose(), "kk");
        let e = parse_registration(200, r#"{"errcode":71004,"errmsg":"回调不存在"}"#.as_bytes())
            .unwrap_err();
        assert_eq!(e.errcode(), Some(71004));
    }

    #[test]
    fn failed_entries_in_both_shapes_and_unreadable_ones_kept() {
        let body = json!({
            "errcode": 0,
            "errmsg": "ok",
            "has_more": true,
            "failed_list": [
                // Documented: call_back_data, a JSON string, next to corpid and id.
                {
                    "call_back_tag": "user_add_org",
                    "event_time": 1608001896814u64,
                    "corpid": "ding1",
                    "id": 42,
                    "call_back_data": "{\"EventType\":\"user_add_org\",\"UserId\":[\"u1\"]}"
                },
                // Seen in the wild: the data under a field named after the tag.
                {
                    "call_back_tag": "bpms_instance_change",
                    "event_time": "1608001896900",
                    "bpms_instance_change": {"EventType": "bpms_instance_change", "corpId": "ding2"}
                },
                {
                    "call_back_tag": "org_dept_create",
                    "event_time": 1,
                    "org_dept_create": "{\"EventType\":\"org_dept_create\"}"
                },
                // Unreadable ones: reported, not dropped.
                {"call_back_tag": "user_leave_org", "event_time": 2, "call_back_data": "{oops"},
                {"call_back_tag": "chat_quit", "event_time": 3},
                {"event_time": 4},
                {"call_back_tag": "check_in", "call_back_data": "[1]"},
            ]
        });
        let page = parse_failed(200, body.to_string().as_bytes()).unwrap();
        assert!(page.has_more);
        let e = &page.entries;
        assert_eq!(e.len(), 7);
        assert_eq!(
            e[0],
            FailedEntry {
                tag: "user_add_org".into(),
                event_time: Some(1608001896814),
                corp_id: Some("ding1".into()),
                id: Some("42".into()),
                data: Ok(r#"{"EventType":"user_add_org","UserId":["u1"]}"#.into()),
            }
        );
        assert_eq!(e[1].event_time, Some(1608001896900));
        assert_eq!(e[1].corp_id.as_deref(), Some("ding2"));
        assert_eq!(e[1].id, None);
        let data: Value = serde_json::from_str(e[1].data.as_ref().unwrap()).unwrap();
        assert_eq!(data["EventType"], "bpms_instance_change");
        assert_eq!(
            e[2].data.as_deref(),
            Ok(r#"{"EventType":"org_dept_create"}"#)
        );
        assert!(e[3].data.as_ref().unwrap_err().contains("not JSON"));
        assert_eq!(e[3].tag, "user_leave_org");
        assert!(e[4].data.as_ref().unwrap_err().contains("\"chat_quit\""));
        assert_eq!((e[5].tag.as_str(), e[5].event_time), ("", Some(4)));
        assert!(e[5].data.is_err());
        assert!(e[6].data.as_ref().unwrap_err().contains("not of an object"));
        assert_eq!(e[6].event_time, None);

        let empty = parse_failed(200, br#"{"errcode":0,"has_more":false}"#).unwrap();
        assert_eq!(
            empty,
            FailedPage {
                has_more: false,
                entries: vec![]
            }
        );
        let bad = parse_failed(200, br#"{"errcode":0,"failed_list":{}}"#).unwrap_err();
        assert!(matches!(bad, OapiError::Unexpected { .. }));
    }
}
