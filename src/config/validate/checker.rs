//! The problem list every section writes to, and the value parsers that report into it.
//! Problems name the key and what was expected, never the value: a secret set on the wrong
//! key must not be printed.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::error::{ConfigError, Problem};
use crate::config::parse::{parse_duration, parse_limit};
use crate::config::raw::OneOrMany;
use crate::platform::Limit;

/// Collects problems while validating, so every one of them is reported, and warnings about
/// what is allowed but probably unwise.
#[derive(Default)]
pub(super) struct Checker {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker {
    pub fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(key, message));
    }

    pub fn warning(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem::new(key, message));
    }

    /// How many problems so far: a section compares it before and after a check.
    pub fn count(&self) -> usize {
        self.problems.len()
    }

    /// `Err` with every problem, if there is any; otherwise the warnings.
    pub fn finish(self) -> Result<Vec<Problem>, ConfigError> {
        if self.problems.is_empty() {
            Ok(self.warnings)
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        }
    }

    /// A name that becomes a subject token, a URL path segment or a metric label.
    pub fn name(&mut self, key: &str, name: &str, what: &str) {
        if !crate::bus::is_valid_token(name) {
            self.problem(key, format!("{what} names must be of [A-Za-z0-9_-]"));
        }
    }

    pub fn duration(&mut self, key: &str, value: &str) -> Duration {
        // Longer than this is a typo, and would overflow time arithmetic.
        const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
        match parse_duration(value) {
            Ok(d) if d > MAX => {
                self.problem(key, "is a duration longer than 10 years");
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(key, e.to_string());
                Duration::ZERO
            }
        }
    }

    /// Parsed limits; `None` when not configured (the kind's default applies).
    pub fn limits(&mut self, key: &str, value: Option<&OneOrMany>) -> Option<Vec<Limit>> {
        let value = value?;
        if value.items().is_empty() {
            self.problem(
                key,
                "must not be empty (omit it for the platform's default)",
            );
            return Some(Vec::new());
        }
        Some(
            value
                .items()
                .into_iter()
                .filter_map(|item| {
                    parse_limit(item)
                        .map_err(|e| self.problem(key, e.to_string()))
                        .ok()
                })
                .collect(),
        )
    }

    pub fn addr(&mut self, key: &str, value: &str) -> SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                "is not a listen address (expected e.g. \"0.0.0.0:8080\")",
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }
}
