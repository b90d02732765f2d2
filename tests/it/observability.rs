//! The Grafana dashboard (`deploy/grafana/imbridge.json`) and the alerts
//! (`deploy/prometheus/imbridge-rules.yaml`) name only metrics the daemon has. promtool is not
//! available, so the PromQL is read by a small tokenizer: the metric names are the identifiers
//! left once strings, label matchers, ranges, function names, grouping labels and keywords are
//! set aside; each is looked up among a running daemon's registered metric families (a family
//! with no series yet counts: most appear only once used).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/grafana/imbridge.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

fn rules() -> Value {
    let text =
        std::fs::read_to_string(root().join("deploy/prometheus/imbridge-rules.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("the rules are YAML")
}

/// Every string under a key named `key`, anywhere in `v`.
fn strings_at(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match child {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_at(child, key, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| strings_at(i, key, out)),
        _ => {}
    }
}

/// PromQL's keywords and aggregation modifiers: identifiers that are not metrics.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Aggregation operators, which may put `by (…)`/`without (…)` between their name and `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names `expr` selects.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c == b'{' {
            i = skip_to(b, i, b'}');
        } else if c == b'[' {
            i = skip_to(b, i, b']');
        } else if c == b'$' {
            // A Grafana variable ($__rate_interval, ${datasource}).
            i += 1;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'{' | b'}'))
            {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b':')) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < b.len() && b[next].is_ascii_whitespace() {
                next += 1;
            }
            let lower = word.to_ascii_lowercase();
            if KEYWORDS.contains(&lower.as_str()) {
                // `by (a, b)`: the list holds labels.
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) && b.get(next) == Some(&b'(')
                {
                    i = skip_to(b, next, b')');
                }
            } else if b.get(next) == Some(&b'(') {
                // A function call.
            } else if AGGREGATIONS.contains(&lower.as_str())
                && ["by", "without"].iter().any(|m| {
                    expr[next..].starts_with(m)
                        && !expr[next + m.len()..]
                            .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                })
            {
                // `sum by (…) (…)`: the modifier comes next.
            } else {
                names.push(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

fn skip_string(b: &[u8], open: usize) -> usize {
    let quote = b[open];
    let mut i = open + 1;
    while i < b.len() && b[i] != quote {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    i + 1
}

/// Past the `close` matching the bracket at `open`, strings inside skipped.
fn skip_to(b: &[u8], open: usize, close: u8) -> usize {
    let mut i = open + 1;
    while i < b.len() && b[i] != close {
        i = if matches!(b[i], b'"' | b'\'' | b'`') {
            skip_string(b, i)
        } else {
            i + 1
        };
    }
    i + 1
}

#[test]
fn the_tokenizer_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, engine) (rate(a_bucket{job=~"$job", x="y{z}"}[$__rate_interval])))
           / on(instance) group_left(version) b + max without (target) (c offset 5m) - time() > 0.5 and d"#,
    );
    assert_eq!(names, ["a_bucket", "b", "c", "d"]);
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_the_daemons_metrics() {
    let app = TestApp::start(&toml_with("")).await;
    app.wait_ready().await;
    let families: BTreeSet<String> = app.metrics.family_names().iter().cloned().collect();
    // The exposition is served, and a family in use is in both.
    let exposition = app.get_admin("/metrics").await.text().await.unwrap();
    assert!(exposition.contains("imbridge_build_info"), "{exposition}");
    assert!(families.contains("imbridge_build_info"));

    // The dashboard's variables list the replicas by imbridge_build_info.
    let mut variables = Vec::new();
    strings_at(&dashboard()["templating"], "definition", &mut variables);
    assert!(!variables.is_empty());
    for v in variables {
        assert!(v.starts_with("label_values(imbridge_build_info"), "{v}");
    }

    let mut exprs = Vec::new();
    strings_at(&dashboard(), "expr", &mut exprs);
    let panels = exprs.len();
    assert!(panels >= 15, "only {panels} dashboard queries");
    strings_at(&rules(), "expr", &mut exprs);
    assert!(exprs.len() >= panels + 6, "rules missing");

    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|base| families.contains(*base)))
                .unwrap_or(&name);
            assert!(
                families.contains(family),
                "{name} (in {expr}) is not a metric of the daemon"
            );
            used.insert(family.to_owned());
        }
    }
    // What the dashboard promises to show, and the alerts to watch.
    for family in [
        "imbridge_callbacks_total",
        "imbridge_bus_publish_duration_seconds",
        "imbridge_bus_connected",
        "imbridge_notify_sent_total",
        "imbridge_notify_failed_total",
        "imbridge_notify_dead_letters_total",
        "imbridge_notify_queue_depth",
        "imbridge_notify_limiter_wait_seconds",
        "imbridge_notify_paused_until_seconds",
        "imbridge_stream_connected",
        "imbridge_stream_reconnects_total",
        "imbridge_api_requests_total",
    ] {
        assert!(used.contains(family), "{family} is on no panel or alert");
    }
    app.stop().await;
}

#[test]
fn every_alert_says_how_long_how_bad_and_what() {
    let rules = rules();
    assert_eq!(rules["kind"], "PrometheusRule");
    let mut alerts = Vec::new();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"]
                .as_str()
                .expect("only alerting rules")
                .to_owned();
            let for_ = rule["for"].as_str().unwrap_or_default();
            assert!(
                !for_.is_empty()
                    && for_
                        .trim_end_matches(char::is_alphabetic)
                        .parse::<u32>()
                        .is_ok(),
                "{name}: for {for_:?}"
            );
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                matches!(severity, "warning" | "critical"),
                "{name}: severity {severity:?}"
            );
            let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
            assert!(!summary.trim().is_empty(), "{name}: no summary");
            alerts.push(name);
        }
    }
    for want in [
        "ImbridgeCallbacksRefused",
        "ImbridgeBusDisconnected",
        "ImbridgeDeadLettersGrowing",
        "ImbridgeTargetPaused",
        "ImbridgeStreamDisconnected",
        "ImbridgeLimiterWaitsLong",
    ] {
        assert!(
            alerts.iter().any(|a| a == want),
            "{want} missing from {alerts:?}"
        );
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard() {
    let d = dashboard();
    assert_eq!(d["uid"], "imbridge");
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        let grid = &p["gridPos"];
        assert!(grid["w"].as_u64().unwrap() + grid["x"].as_u64().unwrap() <= 24);
        if p["type"] != "row" {
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{}: no query",
                p["title"]
            );
        }
    }
}
