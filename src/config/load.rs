//! Loading: defaults → TOML file → `IMBRIDGE_` environment (`__` separates nesting levels),
//! extracted into the raw structs and handed to validation.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

use super::error::{ConfigError, Problem};
use super::ignored::Checked;
use super::raw::Config;
use super::settings::Settings;
use super::validate;

/// Prefix of the environment variables that override the file; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "IMBRIDGE_";

/// Builds the layered figment: defaults → TOML file → `IMBRIDGE_` environment.
pub fn figment(path: Option<&Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed(ENV_PREFIX).split("__"))
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
/// Unknown keys are reported together with what validation finds; a value of the wrong type
/// stops extraction, and is reported alone, with its key.
pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
    let Checked {
        value: raw,
        unknown,
    } = figment
        .extract::<Checked<Config>>()
        .map_err(figment_error)?;
    let mut problems: Vec<Problem> = unknown
        .iter()
        .map(|u| Problem::new(u.key(), "unknown field"))
        .collect();
    match validate::validate(&raw) {
        Ok(settings) if problems.is_empty() => Ok(settings),
        Ok(_) => Err(ConfigError { problems }),
        Err(e) => {
            problems.extend(e.problems);
            Err(ConfigError { problems })
        }
    }
}

/// A figment error (a wrong type, a missing file) as problems naming their keys.
fn figment_error(err: figment::Error) -> ConfigError {
    ConfigError {
        problems: err
            .into_iter()
            .map(|e| {
                let key = if e.path.is_empty() {
                    "<config>".to_owned()
                } else {
                    e.path.join(".")
                };
                let mut message = e.kind.to_string();
                if let Some(source) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                    message.push_str(&format!(" (from {source})"));
                }
                Problem { key, message }
            })
            .collect(),
    }
}
