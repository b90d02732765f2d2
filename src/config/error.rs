//! What a configuration that does not validate returns: every problem, each naming its key.

use std::fmt;

use figment::error::{Actual, Kind};

/// One configuration problem, naming the key it is about (`targets.ops.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration; the daemon prints them and exits 64.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(super) fn single(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem::new(key, message)],
        }
    }
}

/// What a figment error says, by kinds only: never the value. Figment and serde quote the
/// value they could not use ("found string \"https://…?access_token=…\""), and the value may
/// be a secret given to the wrong key (an environment variable nested one level too high, say).
pub(super) fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => message(m),
        Kind::InvalidType(found, expected) => {
            format!("expected {expected}, found {}", what(found))
        }
        Kind::InvalidValue(found, expected) => {
            format!("invalid value ({}): expected {expected}", what(found))
        }
        Kind::InvalidLength(len, expected) => format!("{len} items, expected {expected}"),
        Kind::UnknownVariant(_, expected) => {
            format!("unknown value: expected one of {}", expected.join(", "))
        }
        Kind::UnknownField(field, _) => format!("unknown field `{field}`"),
        Kind::MissingField(field) => format!("missing field `{field}`"),
        Kind::DuplicateField(field) => format!("duplicate field `{field}`"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "integer out of range".into(),
        Kind::Unsupported(found) => format!("{} is not supported here", what(found)),
        Kind::UnsupportedKey(found, need) => {
            format!("keys must be {need}, found {}", what(found))
        }
    }
}

/// The kind of value found, without the value.
fn what(found: &Actual) -> &'static str {
    match found {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Unit | Actual::Option => "no value",
        Actual::Seq => "an array",
        Actual::Map => "a table",
        _ => "another kind of value",
    }
}

/// A free-form message (a TOML syntax error, say) without what quotes the file: the excerpt
/// lines (`3 | token = "…`) and anything in double quotes.
fn message(m: &str) -> String {
    let kept: Vec<String> = m
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .map(|l| {
            l.split('"')
                .enumerate()
                .map(|(i, part)| if i % 2 == 1 { "\"…\"" } else { part })
                .collect()
        })
        .collect();
    crate::secret::redact(&kept.join(": ")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figment_errors_are_described_without_their_values() {
        let secret = "https://oapi.example.com/robot/send?access_token=S3CRET";
        let cases = [
            (
                Kind::InvalidType(Actual::Str(secret.into()), "a map".into()),
                "expected a map, found a string",
            ),
            (
                Kind::InvalidValue(Actual::Str(secret.into()), "a duration".into()),
                "invalid value (a string): expected a duration",
            ),
            (
                Kind::UnknownVariant(secret.into(), &["split", "truncate"]),
                "unknown value: expected one of split, truncate",
            ),
            (
                Kind::Message(format!(
                    "TOML parse error at line 3, column 7\n  |\n3 | url = \"{secret}\n  |       ^\ninvalid basic string\n"
                )),
                "TOML parse error at line 3, column 7: invalid basic string",
            ),
            (
                Kind::Message(format!("bad \"{secret}\" here, see ?token=S3CRET")),
                "bad \"…\" here, see ?token=***",
            ),
        ];
        for (kind, expected) in cases {
            assert_eq!(describe(&kind), expected);
        }
    }
}
