//! What the fuzz targets share: the credentials each callback target signs and encrypts the
//! fuzzer's input with (as the platform would, so that the input reaches the code behind
//! authentication), the notify catalog the body and template targets render through, and a
//! builder of hostile JSON payloads.
//!
//! Credentials are the test vectors' (`tests/data/platform-vectors.json`), so that the seeds,
//! which are those vectors' plaintexts, open exactly as they do in the unit tests.

use std::sync::OnceLock;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use imbridge::config::{self, Config};
use imbridge::notify::notifier::Catalog;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// DingTalk vector D1.
pub const DINGTALK_TOKEN: &str = "mryue";
pub const DINGTALK_AES_KEY: &str = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7";
pub const DINGTALK_RECEIVER: &str = "ding6ccabc44d2c8d38b";

/// WeCom vectors W1/W2.
pub const WECOM_TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
pub const WECOM_AES_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
pub const WECOM_CORP: &str = "ww1436e0e65a779aee";

/// Lark vectors L2–L4.
pub const LARK_KEY: &str = "test key";
pub const LARK_TOKEN: &str = "vtoken123";

/// The request's signed timestamp and nonce (seconds; DingTalk's are milliseconds).
pub const TIMESTAMP_S: u64 = 1_700_000_000;
pub const NONCE: &str = "13894283";

/// The first byte of an input chooses what the target does with the rest.
pub fn split_mode(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(m, rest)| (*m, rest))
}

/// The notify configuration of the body and template targets: one target of every kind, small
/// text limits (so that splitting and truncation run on short inputs), templates using every
/// helper and filter, a route with rules, and bound users.
const NOTIFY_TOML: &str = include_str!("../notify.toml");

/// The catalog of [`NOTIFY_TOML`], validated by the daemon's own config loader.
pub fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(NOTIFY_TOML));
        match config::from_figment(figment) {
            Ok(settings) => settings.catalog(),
            // The harness's own config is wrong: nothing would be fuzzed, so stop loudly.
            Err(e) => panic!("fuzz/notify.toml does not load: {e}"),
        }
    })
}

/// Field names the templates and routes of `notify.toml` read, and the notification's own.
const KEYS: &[&str] = &[
    "objectType",
    "objectID",
    "product",
    "execution",
    "action",
    "actor",
    "date",
    "comment",
    "text",
    "title",
    "url",
    "format",
    "assignedTo",
    "mailto",
    "mentions",
    "to",
    "raw",
    "users",
    "user_ids",
    "items",
];

/// Strings that take the interesting branches of filters and splitting.
const STRINGS: &[&str] = &[
    "",
    "zhangsan",
    "lisi,zhangsan,",
    ",1,2,",
    "bug",
    "closed",
    "2024-01-01 10:00:00",
    "2024-01-01T10:00:00+08:00",
    "1700000000",
    "1700000000000",
    "<p>a&nbsp;<b>b</b><br/>c</p>",
    "<script>x</script>",
    "[#1::x](https://e.example/1)",
    "markdown",
    "text",
    "@all",
    "张三创建了Bug",
    "{{ payload }}",
    "{% for i in range(9) %}",
];

/// A JSON object with keys the templates read and values of every JSON type, nested a few
/// levels: the shapes a hostile sender can post, far more often than raw bytes are JSON.
pub fn payload(u: &mut Unstructured<'_>) -> Result<Value> {
    Ok(Value::Object(object(u, 3)?))
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    let n = u.int_in_range(0..=8u8)?;
    for _ in 0..n {
        let key = if u.ratio(7, 8)? {
            (*u.choose(KEYS)?).to_owned()
        } else {
            u.arbitrary::<String>()?
        };
        map.insert(key, value(u, depth)?);
    }
    Ok(map)
}

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let top = if depth == 0 { 5 } else { 7 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(u.arbitrary::<i64>()?.into()),
        3 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::String((*u.choose(STRINGS)?).to_owned()),
        5 => Value::String(u.arbitrary()?),
        6 => {
            let n = u.int_in_range(0..=4u8)?;
            let items = (0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?;
            Value::Array(items)
        }
        _ => Value::Object(object(u, depth - 1)?),
    })
}

/// Previews `body` for the catalog target or route `name` and checks what would be sent:
/// every request body is JSON a client can serialise, and every app message names somebody.
/// A refusal is a typed error with a message. Returns whether it rendered.
pub fn preview(name: &str, body: &[u8]) -> bool {
    match imbridge::notify::preview::preview(catalog(), name, body, "fuzz-id") {
        Ok(preview) => {
            for (target, place, request) in &preview.requests {
                assert!(!place.is_empty(), "{target}: request without a destination");
                serde_json::to_vec(&request.body).expect("request body serialises");
                let kind = catalog().targets[target.as_str()].kind;
                if kind.is_app() {
                    assert!(
                        !request.members.is_empty(),
                        "{target}: app message without recipients"
                    );
                }
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}
