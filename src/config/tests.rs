//! What `check-config` reports: every unknown key and every semantic problem of a file at
//! once, each naming its full key.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;

use super::{load, ConfigError};

fn keys(err: &ConfigError) -> Vec<&str> {
    err.problems.iter().map(|p| p.key.as_str()).collect()
}

/// The problems of `toml` loaded as a file, with the environment of the jail.
fn problems(jail: &mut Jail, toml: &str) -> ConfigError {
    jail.create_file("imbridge.toml", toml)
        .expect("write the config");
    load(Some(Path::new("imbridge.toml"))).expect_err("the config is invalid")
}

#[test]
fn unknown_keys_in_three_sections_are_all_reported() {
    Jail::expect_with(|jail| {
        let err = problems(
            jail,
            r#"
            [server]
            listen_adress = "0.0.0.0:8080"
            [bus.nats]
            ulr = "nats://x"
            [apps.dingtalk.main]
            token = "t"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
            receiver_id = "ding1"
            keep_raw_xml = true
            "#,
        );
        assert_eq!(
            keys(&err),
            [
                "apps.dingtalk.main.keep_raw_xml",
                "bus.nats.ulr",
                "server.listen_adress"
            ],
            "{err}"
        );
        assert!(err
            .problems
            .iter()
            .all(|p| p.message.contains("unknown field")));
        Ok(())
    });
}
