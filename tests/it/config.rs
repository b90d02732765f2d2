//! Configuration: the example loads, layers apply in order, every problem names its key, and
//! `imbridge check-config` exits 64 on errors.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use figment::Jail;
use imbridge::bus::EngineSettings;
use imbridge::config;
use imbridge::notify::settings::LimiterStore;
use imbridge::platform::Limit;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("imbridge.example.toml")
}

fn keys(err: &config::ConfigError) -> Vec<&str> {
    err.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn example_config_loads_with_documented_defaults() {
    Jail::expect_with(|_| {
        let s = config::load(Some(&example())).expect("example config is valid");
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.server.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(s.server.replay_window, Some(Duration::from_secs(120)));
        assert_eq!(s.server.replay_capacity, 12_000);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert!(matches!(s.bus.engine, EngineSettings::Memory(_)));
        assert_eq!(
            s.dingtalk_apps["main"].crypt.receiver_id(),
            "ding6ccabc44d2c8d38b"
        );
        Ok(())
    });
}

#[test]
fn example_config_documents_every_default() {
    // Every key the daemon knows appears in the example with its default value: the example
    // is the reference, so it must not drift from the code.
    let example: toml::Value =
        toml::from_str(&std::fs::read_to_string(example()).unwrap()).unwrap();
    let defaults = toml::Value::try_from(config::Config::default()).unwrap();
    fn walk(path: &str, default: &toml::Value, example: &toml::Value) {
        match default {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = format!("{path}.{k}");
                    let e = example
                        .get(k)
                        .unwrap_or_else(|| panic!("{p} missing from the example"));
                    walk(&p, v, e);
                }
            }
            _ => assert_eq!(default, example, "{path} differs from its default"),
        }
    }
    walk("", &defaults, &example);
}

#[test]
fn environment_overrides_file_and_nests_with_double_underscore() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "imbridge.toml",
            r#"
            [bus]
            kind = "memory"
            [apps.dingtalk.main]
            token = "from-file"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
            receiver_id = "ding1"
            "#,
        )?;
        jail.set_env("IMBRIDGE_BUS__KIND", "nats");
        jail.set_env("IMBRIDGE_BUS__NATS__URL", "nats://10.0.0.1:4222");
        jail.set_env("IMBRIDGE_BUS__NATS__DUPLICATE_WINDOW", "30m");
        // A numeric token arrives from the environment as a number; it is still a string.
        jail.set_env("IMBRIDGE_APPS__DINGTALK__MAIN__TOKEN", "123456");
        jail.set_env("IMBRIDGE_APPS__DINGTALK__OTHER__TOKEN", "t2");
        jail.set_env(
            "IMBRIDGE_APPS__DINGTALK__OTHER__AES_KEY",
            "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        );
        jail.set_env("IMBRIDGE_APPS__DINGTALK__OTHER__RECEIVER_ID", "dingkey");
        let s = config::load(Some(Path::new("imbridge.toml"))).expect("valid");
        let EngineSettings::Nats(n) = &s.bus.engine else {
            panic!("env did not select nats")
        };
        assert_eq!(n.url, "nats://10.0.0.1:4222");
        assert_eq!(n.duplicate_window, Duration::from_secs(1800));
        assert_eq!(n.stream, "IMBRIDGE_EVENTS");
        let main = &s.dingtalk_apps["main"].crypt;
        assert_eq!(main.receiver_id(), "ding1");
        // The token from the environment is the one used for signatures.
        let by_env = imbridge::platform::msgcrypt::MsgCrypt::new(
            "123456",
            "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7",
            "ding1",
        )
        .unwrap();
        assert_eq!(
            main.signature("1", "n", "e"),
            by_env.signature("1", "n", "e")
        );
        assert!(s.dingtalk_apps.contains_key("other"));
        Ok(())
    });
}

#[test]
fn every_problem_is_reported_with_its_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "bad.toml",
            r#"
            [server]
            listen = "localhost"
            admin_listen = "0.0.0.0:99999"
            replay_window = "an hour"
            shutdown_grace = "5 parsecs"
            [log]
            format = "xml"
            [bus]
            kind = "rabbitmq"
            [apps.dingtalk.main]
            token = ""
            aes_key = "too-short"
            receiver_id = "ding1"
            [apps.dingtalk.second]
            token = "t"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ec!7"
            receiver_id = ""
            "#,
        )?;
        let err = config::load(Some(Path::new("bad.toml"))).unwrap_err();
        let keys = keys(&err);
        for expected in [
            "server.listen",
            "server.admin_listen",
            "server.replay_window",
            "server.shutdown_grace",
            "log.format",
            "bus.kind",
            "apps.dingtalk.main.token",
            "apps.dingtalk.main.aes_key",
            "apps.dingtalk.second.aes_key",
            "apps.dingtalk.second.receiver_id",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        // The message never echoes a secret value back.
        assert!(!err.to_string().contains("too-short"));
        Ok(())
    });
}

#[test]
fn nats_settings_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "nats.toml",
            r#"
            [bus]
            kind = "nats"
            [bus.nats]
            storage = "tape"
            replicas = 0
            duplicate_window = "2d"
            max_age = "1d"
            publish_timeout = "0"
            user = "only-user"
            "#,
        )?;
        let err = config::load(Some(Path::new("nats.toml"))).unwrap_err();
        let keys = keys(&err);
        for expected in [
            "bus.nats.storage",
            "bus.nats.replicas",
            "bus.nats.duplicate_window",
            "bus.nats.publish_timeout",
            "bus.nats.user",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        Ok(())
    });
}

#[test]
fn wecom_and_lark_apps_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "apps.toml",
            r#"
            [apps.wecom.bad]
            token = ""
            aes_key = "short"
            corp_id = ""
            [apps.wecom.good]
            token = "t"
            aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
            corp_id = "ww1436e0e65a779aee"
            keep_raw_xml = true
            [apps.lark.open]
            [apps.lark."bad name"]
            verification_token = "x"
            "#,
        )?;
        let err = config::load(Some(Path::new("apps.toml"))).unwrap_err();
        let reported = keys(&err);
        for expected in [
            "apps.wecom.bad.token",
            "apps.wecom.bad.aes_key",
            "apps.wecom.bad.corp_id",
            "apps.lark.open",
            "apps.lark.bad name",
        ] {
            assert!(
                reported.contains(&expected),
                "{expected} not reported in {err}"
            );
        }
        assert!(!reported.iter().any(|k| k.contains("good")), "{err}");

        jail.create_file(
            "ok.toml",
            r#"
            [apps.wecom.good]
            token = "t"
            aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
            corp_id = "ww1436e0e65a779aee"
            [apps.lark.signed]
            encrypt_key = "k"
            "#,
        )?;
        jail.set_env(
            "IMBRIDGE_APPS__LARK__SIGNED__VERIFICATION_TOKEN",
            "secret-token",
        );
        let s = config::load(Some(Path::new("ok.toml"))).expect("valid");
        assert_eq!(
            s.wecom_apps["good"].crypt.receiver_id(),
            "ww1436e0e65a779aee"
        );
        assert!(!s.wecom_apps["good"].keep_raw_xml);
        let lark = &s.lark_apps["signed"];
        assert_eq!(lark.verification_token.as_deref(), Some("secret-token"));
        assert_eq!(lark.encrypt_key.as_deref(), Some("k"));
        assert!(
            !format!("{s:?}").contains("secret-token"),
            "secrets stay out of Debug"
        );
        Ok(())
    });
}

#[test]
fn subject_pointers_are_validated_naming_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "subjects.toml",
            r#"
            [apps.dingtalk.main]
            token = "mryue"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
            receiver_id = "ding6ccabc44d2c8d38b"
            [apps.dingtalk.main.subjects]
            bpms_instance_change = ["/processCode", "processCode"]
            "" = ["/a"]
            too_deep = ["/a", "/b", "/c", "/d", "/e"]
            [apps.lark.l]
            encrypt_key = "k"
            [apps.lark.l.subjects]
            "im.message.receive_v1" = [""]
            [apps.wecom.w]
            token = "t"
            aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
            corp_id = "ww1436e0e65a779aee"
            [apps.wecom.w.subjects]
            "*" = ["/ChangeType"]
            "#,
        )?;
        let err = config::load(Some(Path::new("subjects.toml"))).unwrap_err();
        assert_eq!(
            keys(&err),
            [
                "apps.dingtalk.main.subjects.",
                "apps.dingtalk.main.subjects.bpms_instance_change[1]",
                "apps.dingtalk.main.subjects.too_deep",
                "apps.lark.l.subjects.im.message.receive_v1[0]",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("must start with"), "{err}");
        Ok(())
    });
}

#[test]
fn kafka_settings_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "kafka.toml",
            r#"
            [bus]
            kind = "kafka"
            [bus.kafka]
            brokers = " "
            group_id = ""
            partitions = 0
            replication_factor = 0
            publish_timeout = "10ms"
            duplicate_window = "soon"
            [bus.kafka.properties]
            acks = "1"
            "enable.idempotence" = false
            "enable.auto.commit" = "true"
            "bootstrap.servers" = "elsewhere:9092"
            [bus.kafka.keys]
            "dingtalk.bpms_instance_change" = "processInstanceId"
            "#,
        )?;
        let err = config::load(Some(Path::new("kafka.toml"))).unwrap_err();
        let reported = keys(&err);
        for expected in [
            "bus.kafka.brokers",
            "bus.kafka.group_id",
            "bus.kafka.partitions",
            "bus.kafka.replication_factor",
            "bus.kafka.publish_timeout",
            "bus.kafka.duplicate_window",
            "bus.kafka.properties.\"acks\"",
            "bus.kafka.properties.\"enable.idempotence\"",
            "bus.kafka.properties.\"enable.auto.commit\"",
            "bus.kafka.properties.\"bootstrap.servers\"",
            "bus.kafka.keys.\"dingtalk.bpms_instance_change\"",
        ] {
            assert!(
                reported.contains(&expected),
                "{expected} not reported in {err}"
            );
        }
        // The kafka_log limiter needs the kafka bus, and nats_kv the nats bus.
        jail.create_file(
            "limiter.toml",
            "[bus]\nkind = \"kafka\"\n[notify]\nlimiter = \"nats_kv\"\n",
        )?;
        let err = config::load(Some(Path::new("limiter.toml"))).unwrap_err();
        assert_eq!(keys(&err), ["notify.limiter"], "{err}");
        jail.create_file("limiter2.toml", "[notify]\nlimiter = \"kafka_log\"\n")?;
        let err = config::load(Some(Path::new("limiter2.toml"))).unwrap_err();
        assert_eq!(keys(&err), ["notify.limiter"], "{err}");
        Ok(())
    });
}

#[test]
fn kafka_properties_come_from_the_environment_without_echoing_secrets() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "kafka.toml",
            r#"
            [bus]
            kind = "kafka"
            [bus.kafka]
            brokers = "k1:9093,k2:9093"
            [bus.kafka.properties]
            "security.protocol" = "SASL_SSL"
            "sasl.mechanisms" = "SCRAM-SHA-512"
            "socket.keepalive.enable" = true
            [bus.kafka.keys]
            "dingtalk.bpms_instance_change" = "/processInstanceId"
            "#,
        )?;
        // Kubernetes Secrets reach the daemon as environment variables, whose names have no
        // dots: "_" stands for ".".
        jail.set_env("IMBRIDGE_BUS__KAFKA__PROPERTIES__SASL_USERNAME", "imbridge");
        jail.set_env(
            "IMBRIDGE_BUS__KAFKA__PROPERTIES__SASL_PASSWORD",
            "hunter2-secret",
        );
        let s = config::load(Some(Path::new("kafka.toml"))).expect("valid");
        let EngineSettings::Kafka(k) = &s.bus.engine else {
            panic!("kafka not selected")
        };
        assert_eq!(k.brokers, "k1:9093,k2:9093");
        assert_eq!(k.group_id, "imbridge");
        assert_eq!(k.publish_timeout, Duration::from_secs(2));
        let props: Vec<(&str, &str)> = k
            .properties
            .iter()
            .map(|(key, v)| (key.as_str(), v.expose()))
            .collect();
        for expected in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("socket.keepalive.enable", "true"),
            ("sasl.username", "imbridge"),
            ("sasl.password", "hunter2-secret"),
        ] {
            assert!(props.contains(&expected), "{expected:?} in {props:?}");
        }
        assert_eq!(
            k.keys,
            [(
                "dingtalk.bpms_instance_change".to_owned(),
                "/processInstanceId".to_owned()
            )]
        );
        assert_eq!(s.notify.limiter, LimiterStore::KafkaLog);
        assert!(
            !format!("{s:?}").contains("hunter2"),
            "secrets print as ***"
        );
        Ok(())
    });
}

#[test]
fn unknown_keys_and_wrong_types_are_errors_naming_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("typo.toml", "[server]\nlisten_addr = \"0.0.0.0:1\"\n")?;
        let err = config::load(Some(Path::new("typo.toml"))).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");

        jail.create_file("type.toml", "[server]\nmax_body_bytes = \"big\"\n")?;
        let err = config::load(Some(Path::new("type.toml"))).unwrap_err();
        assert_eq!(keys(&err), ["server.max_body_bytes"], "{err}");

        jail.set_env("IMBRIDGE_BUS__NATSS__URL", "x");
        let err = config::load(None).unwrap_err();
        assert!(err.to_string().contains("natss"), "{err}");
        Ok(())
    });
}

#[test]
fn replay_window_zero_disables_the_check() {
    Jail::expect_with(|jail| {
        jail.set_env("IMBRIDGE_SERVER__REPLAY_WINDOW", "0");
        let s = config::load(None).expect("valid");
        assert_eq!(s.server.replay_window, None);
        Ok(())
    });
}

fn check_config(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .arg("check-config")
        .args(args)
        .current_dir(dir)
        // Other tests in this process set IMBRIDGE_ variables inside their jails.
        .env_clear()
        .output()
        .unwrap()
}

/// A route's `from` must be able to match an inbound subject (`dingtalk.>`, `wecom.>`,
/// `lark.>`, without the bus prefix), and is refused on Kafka; each problem names its key and
/// `check-config` exits 64.
#[test]
fn route_from_patterns_are_validated_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(example()).unwrap();
    let check = |config: &str| {
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, config).unwrap();
        let out = check_config(&["--config", path.to_str().unwrap()], dir.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let from = "from = [\"dingtalk.bpms_instance_change.*.finish\"]";
    assert!(
        example.contains(from),
        "the example shows a route on events"
    );

    let broken = example.replacen(
        from,
        "from = [\"notify.ops\", \"dingtalk.bpms_instance_change.*.finish\", \"dingtalk\"]",
        1,
    );
    let (code, stderr) = check(&broken);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("routes.approvals.from[0]"), "{stderr}");
    assert!(stderr.contains("routes.approvals.from[2]"), "{stderr}");
    assert!(!stderr.contains("routes.approvals.from[1]"), "{stderr}");
    assert!(stderr.contains("matches no inbound subject"), "{stderr}");

    let on_kafka = example.replacen("kind = \"memory\"", "kind = \"kafka\"", 1);
    assert_ne!(on_kafka, example);
    let (code, stderr) = check(&on_kafka);
    assert_eq!(code, Some(0), "routes on events run on Kafka too: {stderr}");
    assert!(!stderr.contains("without a template"), "{stderr}");

    // An event is no notification: a chat target reached without a template would
    // dead-letter every one. A webhook (the example's hr-contacts) takes the event as it is.
    let untemplated = example.replacen("template = \"approval\"\n", "", 1);
    assert_ne!(untemplated, example);
    let (code, stderr) = check(&untemplated);
    assert_eq!(code, Some(0), "a warning, not an error: {stderr}");
    assert!(stderr.contains("routes.approvals"), "{stderr}");
    assert!(
        stderr.contains("reach ops-dingtalk (dingtalk_robot) without a template"),
        "{stderr}"
    );
    assert!(!stderr.contains("routes.hr-contacts"), "{stderr}");
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check_config(&["--config", example().to_str().unwrap()], dir.path());
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[bus]\nkind = \"kafkaa\"\n[server]\nlisten = \"nope\"\n",
    )
    .unwrap();
    let out = check_config(&["--config", bad.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bus.kind") && stderr.contains("server.listen"),
        "{stderr}"
    );

    let missing = check_config(&["--config", "/nonexistent/imbridge.toml"], dir.path());
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[test]
fn check_config_refuses_a_subject_that_is_no_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let example = std::fs::read_to_string(example()).unwrap();
    let broken = example.replacen("[\"/processCode\", \"/type\"]", "[\"processCode\"]", 1);
    assert_ne!(broken, example, "the example shows business subjects");
    std::fs::write(&bad, broken).unwrap();
    let out = check_config(&["--config", bad.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("apps.dingtalk.main.subjects.bpms_instance_change[0]"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_an_invalid_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nreplay_window = \"soon\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["serve", "--config", bad.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.replay_window"));
}

#[test]
fn targets_and_rate_limits_are_parsed_and_validated() {
    Jail::expect_with(|jail| {
        let s = config::load(Some(&example())).expect("valid");
        let lark = &s.targets["team-lark"];
        assert_eq!(
            lark.limits,
            [
                Limit::new(5, Duration::from_secs(1)),
                Limit::new(100, Duration::from_secs(60))
            ]
        );
        let ding = &s.targets["ops-dingtalk"];
        assert_eq!(ding.limits, [Limit::new(20, Duration::from_secs(60))]);
        assert_eq!(ding.pause_on_rate_limit, Duration::from_secs(600));
        assert!(matches!(s.notify.limiter, LimiterStore::Local));

        jail.create_file(
            "targets.toml",
            r#"
            [targets.a]
            kind = "slack"
            url = "https://example.com/hook"
            [targets.b]
            kind = "dingtalk_robot"
            url = "ftp://secret-token-here"
            rate_limit = "twenty a minute"
            [targets.c]
            kind = "wecom_robot"
            url = "https://example.com/?key=k"
            secret = "x"
            rate_limit = ["5/s", "0/min"]
            [targets."bad.name"]
            kind = "lark_robot"
            url = "https://example.com/"
            [targets.d]
            kind = "wecom_robot"
            url = "https://example.com/?key=k"
            rate_limit = []
            [notify]
            limiter = "nats_kv"
            max_attempts = 0
            request_timeout = "0"
            max_wait = "100y"
            "#,
        )?;
        let err = config::load(Some(Path::new("targets.toml"))).unwrap_err();
        let keys = keys(&err);
        for expected in [
            "targets.a.kind",
            "targets.b.url",
            "targets.b.rate_limit",
            "targets.c.secret",
            "targets.c.rate_limit",
            "targets.bad.name",
            "targets.d.rate_limit",
            "notify.limiter",
            "notify.max_attempts",
            "notify.request_timeout",
            "notify.max_wait",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        assert!(!err.to_string().contains("secret-token-here"), "{err}");

        // Defaults per kind, and "auto" picks the shared limiter on NATS.
        jail.create_file(
            "defaults.toml",
            r#"
            [bus]
            kind = "nats"
            [targets.w]
            kind = "wecom_robot"
            url = "https://example.com/?key=k"
            "#,
        )?;
        let s = config::load(Some(Path::new("defaults.toml"))).expect("valid");
        assert_eq!(
            s.targets["w"].limits,
            [Limit::new(20, Duration::from_secs(60))]
        );
        assert_eq!(s.targets["w"].pause_on_rate_limit, Duration::from_secs(60));
        assert!(matches!(s.notify.limiter, LimiterStore::NatsKv));
        Ok(())
    });
}

#[test]
fn app_targets_users_routes_and_templates_are_validated() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "apps.toml",
            r#"
            [users.zhangsan]
            wecom = "ZhangSan"
            [users.nobody]
            name = "No Ids"

            [targets.robot]
            kind = "dingtalk_robot"
            app_secret = "app-secret-value"
            users = ["zhangsan"]

            [targets.work]
            kind = "dingtalk_work"
            agent_id = "not-a-number"
            url = "https://x.invalid/robot"

            [targets.wecom]
            kind = "wecom_app"
            app_id = "x"
            app_secret = "s"
            users = ["ghost"]
            member_rate_limit = "lots"
            base_url = "ftp://qyapi"
            template = "nope"

            [targets.lark]
            kind = "lark_app"
            app_id = "cli_1"
            app_secret = "s"
            agent_id = 7

            [targets.feishu]
            kind = "lark_robot"
            url = "https://x.invalid/hook"
            member_rate_limit = "3/s"

            [routes.lark]
            targets = ["robot"]

            [routes.zentao]
            template = "nope"
            [[routes.zentao.rules]]
            targets = ["missing"]
            match = { product = [] }

            [routes.empty]

            [templates.bad]
            text = "{{ oops "
            "#,
        )?;
        let err = config::load(Some(Path::new("apps.toml"))).unwrap_err();
        let keys = keys(&err);
        for expected in [
            "users.nobody",
            "targets.robot.app_secret",
            "targets.robot.url",
            "targets.robot.users",
            "targets.work.url",
            "targets.work.app_id",
            "targets.work.app_secret",
            "targets.work.agent_id",
            "targets.wecom.corp_id",
            "targets.wecom.app_id",
            "targets.wecom.agent_id",
            "targets.wecom.users",
            "targets.wecom.member_rate_limit",
            "targets.wecom.base_url",
            "targets.wecom.template",
            "targets.lark.agent_id",
            "targets.feishu.member_rate_limit",
            "routes.lark",
            "routes.zentao",
            "routes.zentao.rules[0].targets",
            "routes.zentao.rules[0].match.product",
            "routes.empty.targets",
            "templates.bad.text",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        assert!(!err.to_string().contains("app-secret-value"));
        Ok(())
    });
}

#[test]
fn unknown_keys_in_targets_and_routes_are_refused() {
    for (section, body) in [
        (
            "targets",
            "kind = \"dingtalk_robot\"\nurl = \"https://x\"\ntemplte = \"t\"",
        ),
        ("routes", "targets = [\"a\"]\nrecipient = [\"mailto\"]"),
        ("users", "wecom = \"w\"\nphone = \"138\""),
    ] {
        Jail::expect_with(|jail| {
            jail.create_file("typo.toml", &format!("[{section}.x]\n{body}\n"))?;
            let err = config::load(Some(Path::new("typo.toml"))).unwrap_err();
            assert!(
                err.to_string().contains("unknown field"),
                "{section}: {err}"
            );
            Ok(())
        });
    }
}
