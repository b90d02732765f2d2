//! Generic webhooks: the event posted to any HTTP endpoint as a CloudEvents binary-mode
//! request, signed the way Stripe-style webhooks are, and the answer read by its HTTP status
//! alone (a receiver's body follows no schema).
//!
//! The signature header is `imbridge-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! t + "." + body)>`: the timestamp inside the signed text lets a receiver refuse replays of an
//! old request, and the `v1=` label lets the scheme change without breaking receivers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::outbound::{detail, Answer, Class, Origin};
use crate::message::Notification;
use crate::secret::Secret;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "imbridge-signature";

/// The CloudEvents `type` of what a webhook target sends.
pub const EVENT_TYPE: &str = "imbridge.notification";

/// Success codes when the target names none.
pub const DEFAULT_SUCCESS: [u16; 4] = [200, 201, 202, 204];

/// The HTTP methods a webhook may use: both carry a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s.to_ascii_uppercase().as_str() {
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// Where a webhook target's requests go, and how they are made and judged.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// May hold a credential (a token in the query): never logged.
    pub url: Secret,
    /// Signs each request when set.
    pub secret: Option<Secret>,
    /// Extra headers; values may be credentials.
    pub headers: Vec<(String, Secret)>,
    pub method: Method,
    /// Per request; the notify default when `None`.
    pub timeout: Option<Duration>,
    /// Statuses meaning "delivered".
    pub success: Vec<u16>,
    /// The CloudEvents `source`: `/imbridge/targets/<name>`.
    pub source: String,
}

/// The event a webhook carries: a notification's `raw` body when it has one (the event as its
/// publisher shaped it), otherwise the notification itself.
pub fn render(n: &Notification) -> Value {
    match &n.raw {
        Some(raw) => raw.clone(),
        None => serde_json::to_value(n).unwrap_or(Value::Null),
    }
}

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, t + "." + body)>`.
pub fn signature(secret: &str, unix_s: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(unix_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_s},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The headers of one request besides `content-type` (always JSON): CloudEvents binary mode
/// (the attributes as `ce-*` headers, the event as the body; the type and source are the
/// inbound event's when `origin` says so, else a notification's), the signature when the
/// target has a secret, then the target's own. `id` is stable per message and target, so a
/// receiver can drop a redelivered event.
pub fn headers(
    hook: &Webhook,
    id: &str,
    origin: Option<&Origin>,
    body: &[u8],
    now_ms: u64,
) -> Vec<(String, String)> {
    let time = UNIX_EPOCH + Duration::from_millis(now_ms);
    let (ty, source) = match origin {
        Some(o) => (o.ty.clone(), o.source.clone()),
        None => (EVENT_TYPE.to_owned(), hook.source.clone()),
    };
    let mut out = vec![
        ("ce-specversion".to_owned(), "1.0".to_owned()),
        ("ce-id".to_owned(), id.to_owned()),
        ("ce-type".to_owned(), ty),
        ("ce-source".to_owned(), source),
        ("ce-time".to_owned(), rfc3339(time)),
    ];
    if let Some(secret) = &hook.secret {
        let sig = signature(secret.expose(), now_ms / 1000, body);
        out.push((SIGNATURE_HEADER.to_owned(), sig));
    }
    out.extend((hook.headers.iter()).map(|(k, v)| (k.to_ascii_lowercase(), v.expose().to_owned())));
    out
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A receiver's answer: the success codes are delivered; 408, 429 and 5xx are worth trying
/// again (after `retry_after` when the receiver said how long, pausing the target: it asked
/// for calm, not for this message to be retried sooner); any other status is permanent.
pub fn classify(
    success: &[u16],
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Answer {
    let class = if success.contains(&status) {
        Class::Ok
    } else if status == 429 || (retry_after.is_some() && (status == 408 || status >= 500)) {
        Class::RateLimited { pause: retry_after }
    } else if status == 408 || status >= 500 {
        Class::Transient
    } else {
        Class::Permanent
    };
    Answer {
        class,
        code: None,
        status,
        detail: format!("HTTP {status}: {}", detail(body)),
    }
}

/// `Retry-After` in seconds or as an HTTP date (a date already past means now), capped at an
/// hour so a receiver cannot park a target for good.
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    retry_after_at(value, SystemTime::now())
}

fn retry_after_at(value: Option<&str>, now: SystemTime) -> Option<Duration> {
    let value = value?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(wait.min(Duration::from_secs(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_of_timestamp_dot_body() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec
        let sig = signature("whsec", 1_700_000_000, br#"{"a":1}"#);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec").unwrap();
        mac.update(br#"1700000000.{"a":1}"#);
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000,v1={want}"));
    }

    #[test]
    fn cloudevents_type_and_source_follow_the_origin() {
        let hook = Webhook {
            url: Secret::new("https://receiver.test/"),
            secret: None,
            headers: Vec::new(),
            method: Method::Post,
            timeout: None,
            success: DEFAULT_SUCCESS.to_vec(),
            source: "/imbridge/targets/hr".to_owned(),
        };
        let get = |h: &[(String, String)], k: &str| {
            h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        let own = headers(&hook, "id1", None, b"{}", 0);
        assert_eq!(get(&own, "ce-type").as_deref(), Some(EVENT_TYPE));
        assert_eq!(
            get(&own, "ce-source").as_deref(),
            Some("/imbridge/targets/hr")
        );
        let origin = Origin {
            ty: "wecom.change_contact".to_owned(),
            source: "wecom/main".to_owned(),
        };
        let event = headers(&hook, "id1", Some(&origin), b"{}", 0);
        assert_eq!(
            get(&event, "ce-type").as_deref(),
            Some("wecom.change_contact")
        );
        assert_eq!(get(&event, "ce-source").as_deref(), Some("wecom/main"));
        assert_eq!(
            get(&event, "ce-time").as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
    }

    #[test]
    fn classification_by_status() {
        let ok = &DEFAULT_SUCCESS;
        assert_eq!(classify(ok, 204, None, b"").class, Class::Ok);
        assert_eq!(classify(&[299], 299, None, b"").class, Class::Ok);
        assert_eq!(classify(&[299], 200, None, b"").class, Class::Permanent);
        assert_eq!(classify(ok, 503, None, b"").class, Class::Transient);
        assert_eq!(classify(ok, 408, None, b"").class, Class::Transient);
        assert_eq!(classify(ok, 400, None, b"").class, Class::Permanent);
        assert_eq!(classify(ok, 302, None, b"").class, Class::Permanent);
        let wait = Some(Duration::from_secs(2));
        assert_eq!(
            classify(ok, 429, None, b"").class,
            Class::RateLimited { pause: None }
        );
        assert_eq!(
            classify(ok, 503, wait, b"").class,
            Class::RateLimited { pause: wait }
        );
    }

    #[test]
    fn excerpt_is_capped_and_redacted() {
        let body = format!("bad https://x/?access_token=S3CRET {}", "x".repeat(5000));
        let a = classify(&DEFAULT_SUCCESS, 400, None, body.as_bytes());
        assert!(a.detail.starts_with("HTTP 400: "), "{}", a.detail);
        assert!(!a.detail.contains("S3CRET"));
        assert!(a.detail.len() < 600);
    }

    #[test]
    fn retry_after_seconds_or_date_capped() {
        assert_eq!(retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some("99999")), Some(Duration::from_secs(3600)));
        assert_eq!(retry_after(None), None);
        assert_eq!(retry_after(Some("soon")), None);
        // 2015-10-21T07:28:00Z
        let date = Some("Wed, 21 Oct 2015 07:28:00 GMT");
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(
            retry_after_at(date, at(1_445_412_480 - 90)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after_at(date, at(1_445_412_480 + 5)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after_at(date, at(1_445_412_480 - 86_400)),
            Some(Duration::from_secs(3600))
        );
    }
}
