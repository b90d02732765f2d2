//! The platform API gateway's protocol side (`/api/<platform>/<app>/<path>` and NATS
//! `api.<platform>.<app>`): which base a path goes to, where the app's access token goes, which
//! answers say the token was refused, the default request rates, and how a client's path is
//! normalised before it is matched against the client's globs. Pure functions; the HTTP is
//! `notify::gateway`'s.

use std::time::Duration;

use super::kind::{AppCredentials, Kind, Limit, Platform};
use super::{dingtalk, lark, wecom};

/// One app the gateway calls APIs for: its credentials (the token endpoint's base is
/// `credentials.base_url`), the newer API's base (DingTalk `api.dingtalk.com`) and its rate.
#[derive(Debug, Clone)]
pub struct ApiApp {
    pub platform: Platform,
    /// DingTalk: AppKey/AppSecret at the oapi base; WeCom: corp id/app Secret at the qyapi
    /// base; Lark: App ID/App Secret at the domain. `agent_id` is 0: a token is per app.
    pub credentials: AppCredentials,
    /// DingTalk's `/v1.0/…` API; the same as the credentials' base on the others.
    pub api_base: String,
    /// At most this many calls per window across every replica (`api_rate_limit`).
    pub limits: Vec<Limit>,
    /// How its calls (and its token fetches) leave: the app's `proxy`, else `[http] proxy`.
    pub egress: crate::egress::Egress,
}

/// Where the access token goes on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// `?access_token=…` (DingTalk oapi, WeCom).
    Query,
    /// `x-acs-dingtalk-access-token: …` (DingTalk `/v1.0/…`).
    DingTalkHeader,
    /// `Authorization: Bearer …` (Lark).
    Bearer,
}

/// The header DingTalk's newer API takes the token in (PROTOCOLS.md §4).
pub const DINGTALK_TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";

/// The query parameter the classic DingTalk API and WeCom take the token in.
pub const TOKEN_QUERY: &str = "access_token";

/// Where a call goes: the base URL and how the token is added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream<'a> {
    pub base: &'a str,
    pub placement: Placement,
}

impl ApiApp {
    /// The notify kind whose tokens this app's are: the same kind, base, id and secret give
    /// the same token cache key, so a `dingtalk_work`, `wecom_app` or `lark_app` target of
    /// the same app and the gateway share one token (and one fetch).
    pub fn token_kind(&self) -> Kind {
        match self.platform {
            Platform::DingTalk => Kind::DingTalkWork,
            Platform::WeCom => Kind::WeComApp,
            Platform::Lark => Kind::LarkApp,
        }
    }

    /// Where `path` (normalised, without a leading slash) goes. DingTalk: `v1.0/…` (any
    /// `v<digits>.<digits>/` first segment, as the newer API versions its paths) to the api
    /// base with the token in a header, everything else to oapi with the token in the query.
    pub fn upstream(&self, path: &str) -> Upstream<'_> {
        match self.platform {
            Platform::DingTalk if is_versioned(path) => Upstream {
                base: &self.api_base,
                placement: Placement::DingTalkHeader,
            },
            Platform::DingTalk | Platform::WeCom => Upstream {
                base: &self.credentials.base_url,
                placement: Placement::Query,
            },
            Platform::Lark => Upstream {
                base: &self.credentials.base_url,
                placement: Placement::Bearer,
            },
        }
    }

    /// Whether an answer says the access token was refused (expired, revoked, invalid): the
    /// gateway forgets it, fetches another and calls once more.
    pub fn is_token_rejected(&self, status: u16, body: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return false;
        };
        let code = |field: &str| v.get(field).and_then(serde_json::Value::as_i64);
        match self.platform {
            // 88 wraps a sub_code ("40014: 不合法的access_token") in topapi answers; the
            // newer API answers 401 with code "InvalidAuthentication" [U: as DingTalk's
            // SDKs handle it; PROTOCOLS.md has no list].
            Platform::DingTalk => {
                code("errcode").is_some_and(|c| c == 88 || dingtalk::work::is_token_rejected(c))
                    || (status == 401
                        && v.get("code").and_then(serde_json::Value::as_str)
                            == Some("InvalidAuthentication"))
            }
            Platform::WeCom => code("errcode").is_some_and(wecom::app::is_token_rejected),
            Platform::Lark => code("code").is_some_and(lark::app::is_token_rejected),
        }
    }
}

fn is_versioned(path: &str) -> bool {
    let first = path.split('/').next().unwrap_or_default();
    let Some(version) = first.strip_prefix('v') else {
        return false;
    };
    let mut parts = version.split('.');
    let digits =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// The request rate an app's gateway keeps to unless `api_rate_limit` says otherwise.
/// - DingTalk: 20/s. [U] DingTalk documents per-app and per-corp QPS/QPM codes (143103,
///   143104) without numbers in PROTOCOLS.md; 20 calls a second per app is the figure widely
///   quoted for internal apps, and the one the work-notification targets use.
/// - WeCom: 150/s, from the documented 10,000 calls per minute per corp and API ("主动调用频率
///   限制", as quoted by SDKs; not in PROTOCOLS.md): 150 × 60 = 9,000 stays under it whichever
///   API is called, and keeps the shared log short (a limit of N keeps N entries).
/// - Lark: 5/s and 100/min, the tenant-level limit PROTOCOLS.md §8.2 documents (code 11232).
///   [U] Many of Lark's APIs allow more (their tier is on each API's page): raise it per app.
pub fn default_limits(platform: Platform) -> Vec<Limit> {
    let second = Duration::from_secs(1);
    match platform {
        Platform::DingTalk => vec![Limit::new(20, second)],
        Platform::WeCom => vec![Limit::new(150, second)],
        Platform::Lark => vec![
            Limit::new(5, second),
            Limit::new(100, Duration::from_secs(60)),
        ],
    }
}

/// Why a path is refused before anything is forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path climbs above the app's API root")]
    Escapes,
    #[error(
        "the path holds an encoded slash or backslash, a control character or bad percent-encoding"
    )]
    Malformed,
    #[error("the path is empty")]
    Empty,
}

/// The path a client asked for (what follows `/api/<platform>/<app>/`, as it came, still
/// percent-encoded) in the one form that is both matched against the globs and forwarded:
/// each segment percent-decoded, `.` and empty segments (`//`) dropped, `..` taking back the
/// segment before it. An encoded `/` or `\` inside a segment is refused rather than
/// decoded, since a platform (or a proxy before it) might read it as a separator after the
/// glob saw one segment; `..` above the root is refused too.
pub fn normalise(raw: &str) -> Result<Vec<String>, PathError> {
    let mut segments: Vec<String> = Vec::new();
    for raw_segment in raw.split('/') {
        let segment = super::percent_decode(raw_segment).ok_or(PathError::Malformed)?;
        if segment.contains(['/', '\\']) || segment.chars().any(char::is_control) {
            return Err(PathError::Malformed);
        }
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::Escapes)?;
            }
            _ => segments.push(segment),
        }
    }
    if segments.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(segments)
}

/// The normalised segments as a URL path (no leading slash), each percent-encoded again
/// where it must be.
pub fn encode_path(segments: &[String]) -> String {
    segments
        .iter()
        .map(|s| percent_encode(s))
        .collect::<Vec<_>>()
        .join("/")
}

/// Everything but RFC 3986's unreserved characters and a few sub-delims platforms use in
/// paths (`:` `@` `!` `$` `'` `(` `)` `*` `+` `,` `;` `=`) is escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~:@!$'()*+,;=".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The client's query without any `access_token` of its own (the gateway adds the app's), as
/// it came otherwise, then the token where the platform takes it in the query.
pub fn forward_query(raw: &str, token: Option<&str>) -> String {
    let mut pairs: Vec<String> = raw
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            super::percent_decode(&key.replace('+', " ")).as_deref() != Some(TOKEN_QUERY)
        })
        .map(str::to_owned)
        .collect();
    if let Some(token) = token {
        pairs.push(format!("{TOKEN_QUERY}={}", percent_encode(token)));
    }
    pairs.join("&")
}

/// Request headers never forwarded: hop-by-hop ones (RFC 9110 §7.6.1), the client's own
/// credentials (its imbridge token in `Authorization`, cookies), a token header of its own,
/// what the HTTP client sets itself, and the internal network's forwarding trail.
/// `accept-encoding` too: the answer is read to find token refusals and scrub the token.
pub fn is_dropped_request_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&name.as_str())
        || matches!(
            name.as_str(),
            "authorization"
                | "cookie"
                | "host"
                | "content-length"
                | "accept-encoding"
                | "forwarded"
                | "x-real-ip"
                | DINGTALK_TOKEN_HEADER
        )
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-imbridge-")
}

/// Answer headers never passed back: hop-by-hop ones, lengths and encodings the gateway
/// sets again, and cookies (the platform's session is imbridge's, not the client's).
pub fn is_dropped_response_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&name.as_str())
        || matches!(
            name.as_str(),
            "content-length" | "content-encoding" | "set-cookie"
        )
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn app(platform: Platform) -> ApiApp {
        ApiApp {
            egress: Default::default(),
            platform,
            credentials: AppCredentials {
                base_url: "https://oapi.example".into(),
                app_id: "key".into(),
                secret: Secret::new("s"),
                agent_id: 0,
            },
            api_base: "https://api.example".into(),
            limits: default_limits(platform),
        }
    }

    fn norm(raw: &str) -> Result<String, PathError> {
        normalise(raw).map(|s| s.join("/"))
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        assert_eq!(norm("topapi/v2/user/get").unwrap(), "topapi/v2/user/get");
        assert_eq!(
            norm("topapi//v2/./user/get/").unwrap(),
            "topapi/v2/user/get"
        );
        assert_eq!(
            norm("topapi/v2/user/../../message/send").unwrap(),
            "topapi/message/send"
        );
        assert_eq!(
            norm("topapi/v2/user/%2e%2e/%2E%2E/message").unwrap(),
            "topapi/message"
        );
        assert_eq!(norm(".."), Err(PathError::Escapes));
        assert_eq!(norm("a/../../b"), Err(PathError::Escapes));
        assert_eq!(
            norm("topapi/v2/user/..%2f..%2fx"),
            Err(PathError::Malformed)
        );
        assert_eq!(norm("a%5c..%5cb"), Err(PathError::Malformed));
        assert_eq!(norm("a%00b"), Err(PathError::Malformed));
        assert_eq!(norm("a%zz"), Err(PathError::Malformed));
        assert_eq!(norm("a%e4"), Err(PathError::Malformed));
        assert_eq!(norm("//"), Err(PathError::Empty));
        // What is matched is what is forwarded: decoded once, encoded again.
        let segs = normalise("open-apis/contact/v3/users/ou_%E5%BC%A0%20x").unwrap();
        assert_eq!(segs[4], "ou_张 x");
        assert_eq!(
            encode_path(&segs),
            "open-apis/contact/v3/users/ou_%E5%BC%A0%20x"
        );
        assert_eq!(
            encode_path(&normalise("a/%252e%252e").unwrap()),
            "a/%252e%252e"
        );
    }

    #[test]
    fn each_platform_places_its_token() {
        let d = app(Platform::DingTalk);
        assert_eq!(
            d.upstream("topapi/v2/user/get"),
            Upstream {
                base: "https://oapi.example",
                placement: Placement::Query
            }
        );
        assert_eq!(
            d.upstream("v1.0/contact/users/me"),
            Upstream {
                base: "https://api.example",
                placement: Placement::DingTalkHeader
            }
        );
        assert_eq!(d.upstream("v1x/a").placement, Placement::Query);
        assert_eq!(
            app(Platform::WeCom).upstream("cgi-bin/user/get").placement,
            Placement::Query
        );
        assert_eq!(
            app(Platform::Lark).upstream("open-apis/x").placement,
            Placement::Bearer
        );
    }

    #[test]
    fn token_refusals_by_platform() {
        let d = app(Platform::DingTalk);
        assert!(d.is_token_rejected(200, br#"{"errcode":40014}"#));
        assert!(d.is_token_rejected(200, br#"{"errcode":88,"sub_code":"40014"}"#));
        assert!(d.is_token_rejected(401, br#"{"code":"InvalidAuthentication"}"#));
        assert!(!d.is_token_rejected(200, br#"{"errcode":0}"#));
        let w = app(Platform::WeCom);
        assert!(w.is_token_rejected(200, br#"{"errcode":42001}"#));
        assert!(!w.is_token_rejected(200, br#"{"errcode":88}"#));
        let l = app(Platform::Lark);
        assert!(l.is_token_rejected(400, br#"{"code":99991663}"#));
        assert!(l.is_token_rejected(400, br#"{"code":99991661}"#));
        assert!(!l.is_token_rejected(200, b"not json"));
    }

    #[test]
    fn the_clients_token_query_is_replaced() {
        assert_eq!(
            forward_query("userid=1&access_token=evil&access%5Ftoken=x", Some("t/1")),
            "userid=1&access_token=t%2F1"
        );
        assert_eq!(forward_query("", None), "");
        assert!(is_dropped_request_header("Authorization"));
        assert!(is_dropped_request_header("X-Acs-Dingtalk-Access-Token"));
        assert!(is_dropped_request_header("Connection"));
        assert!(!is_dropped_request_header("content-type"));
        assert!(is_dropped_response_header("Transfer-Encoding"));
    }
}
