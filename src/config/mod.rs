//! Configuration: one function loads it (defaults → TOML file → `IMBRIDGE_` environment) and
//! one validates it into [`Settings`], reporting every problem at once.
//!
//! # Layout
//!
//! - `load`: the figment layers, the extraction into the raw structs, and the reading of each
//!   target table for its kind.
//! - [`raw`]: the serde structs, mirroring the TOML. Values that need parsing (addresses,
//!   durations, keys) stay strings there, so that validation can name every bad key in one
//!   pass instead of stopping at the first. [`raw::targets`] gives each target kind its shape.
//! - `ignored`: unknown keys, collected through `serde_ignored` rather than refused by serde
//!   one at a time, and reported with the rest.
//! - `validate`: one function per section, turning the raw structs into [`Settings`] and each
//!   problem into a [`Problem`] naming its key.
//! - `settings`: the typed [`Settings`] handed to the daemon; each domain's own settings types
//!   live in the domain (`bus`, `notify`, `platform`), which never imports `config`.
//! - `error`: [`Problem`] and [`ConfigError`]; `parse`: durations and rate limits.
//!
//! This file only declares and re-exports: its children import each other, never it.

mod error;
mod ignored;
mod load;
mod parse;
pub mod raw;
mod settings;
mod validate;

pub use error::{ConfigError, Problem};
pub use load::{figment, from_figment, load, load_file, ENV_PREFIX};
pub use parse::{parse_duration, parse_limit, ValueError};
pub use raw::{Config, LogConfig};
pub use settings::{ServerSettings, Settings};

// The domain types the settings are made of, so that a caller of `load` names them here.
pub use crate::bus::{BusSettings, EngineSettings};
pub use crate::notify::settings::{LimiterStore, NotifySettings};
pub use crate::platform::Limit;

#[cfg(test)]
mod tests;
