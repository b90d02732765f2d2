//! The two value syntaxes of the configuration that are not plain TOML: durations ("90s") and
//! rate limits ("20/min").

use std::time::Duration;

use crate::platform::Limit;

/// Why a duration or a rate limit does not parse. The message is what the problem list shows
/// after the key: what was expected, never the value (which may be a secret set on the wrong
/// key).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// Not a duration humantime reads.
    #[error("is not a duration (expected e.g. \"30s\", \"10m\", \"1h\")")]
    Duration(humantime::DurationError),
    #[error("is not N/WINDOW (e.g. \"20/min\")")]
    NotALimit(String),
    #[error("the count of N/WINDOW is not a positive number")]
    Count(String),
    #[error("count and window of N/WINDOW must be greater than 0")]
    Zero(String),
}

/// Parses a duration such as "90s", "10m", "1h", "7d"; a bare "0" means zero.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(ValueError::Duration)
}

/// Parses "20/min", "5/s", "100/60s", "20/1m", "1000/h".
pub fn parse_limit(s: &str) -> Result<Limit, ValueError> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| ValueError::NotALimit(s.to_owned()))?;
    let max: u32 = n
        .trim()
        .parse()
        .map_err(|_| ValueError::Count(n.to_owned()))?;
    let window = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other)?,
    };
    if max == 0 || window.is_zero() {
        return Err(ValueError::Zero(s.to_owned()));
    }
    Ok(Limit { max, window })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_limits_parse_or_say_why() {
        assert_eq!(parse_duration(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "is not a duration (expected e.g. \"30s\", \"10m\", \"1h\")"
        );
        assert_eq!(
            parse_limit("100/60s"),
            Ok(Limit::new(100, Duration::from_secs(60)))
        );
        assert_eq!(
            parse_limit("20/min"),
            Ok(Limit::new(20, Duration::from_secs(60)))
        );
        assert_eq!(
            parse_limit("0/min").unwrap_err().to_string(),
            "count and window of N/WINDOW must be greater than 0"
        );
        assert_eq!(
            parse_limit("lots"),
            Err(ValueError::NotALimit("lots".into()))
        );
        assert_eq!(parse_limit("x/s"), Err(ValueError::Count("x".into())));
    }
}
