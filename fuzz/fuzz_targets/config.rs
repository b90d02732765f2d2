//! Config loading: any TOML text goes through the daemon's loader (defaults, then the text as
//! the file) and validation. It loads, or is refused with problems that each name a key; and
//! the value parsers (durations, rate limits) take any string.
#![no_main]

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use imbridge::config::{self, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
    match config::from_figment(figment) {
        Ok(settings) => {
            let _ = settings.catalog();
        }
        Err(e) => {
            assert!(!e.problems.is_empty(), "refused without a problem");
            for p in &e.problems {
                assert!(!p.key.is_empty() && !p.message.is_empty(), "{p:?}");
            }
            let _ = e.to_string();
        }
    }
    let _ = config::parse_duration(text);
    let _ = config::parse_limit(text);
});
