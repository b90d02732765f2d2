//! Loading: defaults → TOML file → `IMBRIDGE_` environment (`__` separates nesting levels),
//! extracted into the raw structs and handed to validation.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

use super::error::{describe, ConfigError, Problem};
use super::ignored::Checked;
use super::raw::targets::{self, ReadError};
use super::raw::{Config, TargetConfig};
use super::settings::Settings;
use super::validate;

/// Prefix of the environment variables that override the file; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "IMBRIDGE_";

/// Variables under the prefix that are not configuration: `IMBRIDGE_TOKEN` is the client
/// token of the one-off commands that talk to a running daemon (`imbridge dlq`), and a
/// top-level `token` key does not exist.
pub const ENV_NOT_CONFIG: &[&str] = &["TOKEN"];

/// Builds the layered figment: defaults → TOML file → `IMBRIDGE_` environment.
pub fn figment(path: Option<&Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed(ENV_PREFIX).ignore(ENV_NOT_CONFIG).split("__"))
}

/// Loads and validates the configuration from `path` (if any) and the environment.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    from_figment(figment(path))
}

/// Loads the configuration for a command, turning a missing file into a problem too.
pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::single(
            "--config",
            format!("file {} does not exist", path.display()),
        ));
    }
    load(Some(path))
}

/// Extracts and validates a configuration from an already-built figment (used by tests).
///
/// Unknown keys are reported together with what validation finds. A value of the wrong type
/// stops extraction and is reported alone, with its key; in a target table it only stops
/// that target.
pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
    let Checked {
        value: raw,
        unknown,
    } = figment
        .extract::<Checked<Config>>()
        .map_err(|e| ConfigError {
            problems: problems(e).collect(),
        })?;
    let mut problems: Vec<Problem> = unknown
        .iter()
        .map(|u| Problem::new(u.key(), "unknown field"))
        .collect();
    let targets = read_targets(&raw, &figment, &mut problems);
    match validate::validate(&raw, &targets) {
        Ok(settings) if problems.is_empty() => return Ok(settings),
        Ok(_) => {}
        Err(e) => problems.extend(e.problems),
    }
    // By key, so that the problems of one table are listed together.
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    Err(ConfigError { problems })
}

/// Reads each target table for its kind; what cannot be read is a problem, and the target is
/// left out.
fn read_targets(
    raw: &Config,
    figment: &Figment,
    out: &mut Vec<Problem>,
) -> BTreeMap<String, TargetConfig> {
    let mut read = BTreeMap::new();
    for (name, table) in &raw.targets {
        let key = format!("targets.{name}");
        match targets::read(table) {
            Ok(r) => {
                let kind = r.target.kind.kind();
                for field in r.unknown {
                    let mut message = format!("unknown field for a {} target", kind.as_str());
                    if let Some(why) = targets::refusal(kind, &field) {
                        message = format!("{message}: {why}");
                    }
                    out.push(Problem::new(format!("{key}.{field}"), message));
                }
                read.insert(name.clone(), r.target);
            }
            Err(ReadError::Values(errors)) => {
                for mut e in errors {
                    // The table was read on its own: give back its place and source.
                    let value = e.path.first().and_then(|field| table.get(field));
                    e.metadata = value.and_then(|v| figment.get_metadata(v.tag())).cloned();
                    e.path.splice(0..0, ["targets".to_owned(), name.clone()]);
                    out.extend(problems(e));
                }
            }
            Err(e) => out.push(Problem::new(format!("{key}.kind"), e.to_string())),
        }
    }
    read
}

/// A figment error (a wrong type, a missing file) as problems naming their keys, and the kinds
/// of value expected and found, never the value ([`describe`]).
fn problems(err: figment::Error) -> impl Iterator<Item = Problem> {
    err.into_iter().map(|e| {
        let key = if e.path.is_empty() {
            "<config>".to_owned()
        } else {
            e.path.join(".")
        };
        let mut message = describe(&e.kind);
        // The file, or else the provider: "`IMBRIDGE_` environment variable(s)".
        if let Some(m) = &e.metadata {
            match &m.source {
                Some(source) => message.push_str(&format!(" (from {source})")),
                None => message.push_str(&format!(" (from {})", m.name)),
            }
        }
        Problem { key, message }
    })
}
