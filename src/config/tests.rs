//! What `check-config` reports: every unknown key and every semantic problem of a file at
//! once, each naming its full key.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::path::Path;

use figment::Jail;

use super::{load, ConfigError};
use crate::egress::Egress;

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

#[test]
fn unknown_keys_anywhere_are_reported_with_their_full_key() {
    Jail::expect_with(|jail| {
        jail.set_env("IMBRIDGE_BUS__KAFKA__BROKER", "k1:9092");
        let err = problems(
            jail,
            r#"
            [log]
            colour = true
            [notify]
            max_retries = 3
            [apps.lark.main]
            encrypt_key = "k"
            app_secert = "s"
            [targets.ops]
            kind = "dingtalk_robot"
            url = "https://oapi.dingtalk.com/robot/send?access_token=x"
            secrte = "SEC1"
            [routes.zentao]
            targets = ["ops"]
            [[routes.zentao.rules]]
            targets = ["ops"]
            tagrets = ["ops"]
            [users.zhangsan]
            wecom = "ZhangSan"
            phone = "138"
            [templates.t]
            text = "{{ text }}"
            body = "x"
            "#,
        );
        let keys = keys(&err);
        for expected in [
            "apps.lark.main.app_secert",
            "bus.kafka.broker",
            "log.colour",
            "notify.max_retries",
            "routes.zentao.rules[0].tagrets",
            "targets.ops.secrte",
            "templates.t.body",
            "users.zhangsan.phone",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        assert_eq!(keys.len(), 8, "{err}");
        Ok(())
    });
}

#[test]
fn a_key_of_another_kind_is_refused_naming_it() {
    Jail::expect_with(|jail| {
        let err = problems(
            jail,
            r#"
            [targets.robot]
            kind = "dingtalk_robot"
            url = "https://oapi.dingtalk.com/robot/send?access_token=x"
            app_secret = "app-secret-value"
            [targets.app]
            kind = "dingtalk_work"
            app_key = "k"
            app_secret = "s"
            agent_id = 1
            url = "https://oapi.dingtalk.com/robot/send?access_token=x"
            [targets.wecom]
            kind = "wecom_app"
            corp_id = "ww1"
            app_secret = "s"
            agent_id = "1000002"
            app_id = "x"
            [targets.bot]
            kind = "wecom_robot"
            url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"
            lark_markdown = "post"
            "#,
        );
        assert_eq!(
            keys(&err),
            [
                "targets.app.url",
                "targets.bot.lark_markdown",
                "targets.robot.app_secret",
                "targets.wecom.app_id",
            ],
            "{err}"
        );
        let message = |key: &str| {
            let p = err.problems.iter().find(|p| p.key == key).unwrap();
            p.message.clone()
        };
        assert_eq!(
            message("targets.robot.app_secret"),
            "unknown field for a dingtalk_robot target: only app targets (dingtalk_work, \
             wecom_app, lark_app) take app credentials"
        );
        assert!(message("targets.wecom.app_id").contains("corp_id and agent_id"));
        assert!(message("targets.app.url").contains("not a webhook"));
        assert!(!err.to_string().contains("app-secret-value"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_keys_and_semantic_problems_are_reported_together() {
    Jail::expect_with(|jail| {
        let err = problems(
            jail,
            r#"
            [server]
            listen = "localhost"
            listen_addr = "0.0.0.0:1"
            [bus]
            kind = "rabbitmq"
            [targets.ops]
            kind = "lark_robot"
            url = "ftp://hook"
            agent_id = 7
            [targets.slack]
            kind = "slack"
            webhook = "https://hooks.slack.com/x"
            [targets.nokind]
            url = "https://x.invalid/hook"
            [routes.zentao]
            targets = ["slack", "ghost"]
            "#,
        );
        let keys = keys(&err);
        for expected in [
            "server.listen_addr",
            "server.listen",
            "bus.kind",
            "targets.ops.agent_id",
            "targets.ops.url",
            "targets.slack.kind",
            "targets.nokind.kind",
            "routes.zentao.targets",
        ] {
            assert!(keys.contains(&expected), "{expected} not reported in {err}");
        }
        // A target whose kind is unknown is not read further, and a route may still name it:
        // only the missing one is reported.
        let routes: Vec<&str> = err
            .problems
            .iter()
            .filter(|p| p.key == "routes.zentao.targets")
            .map(|p| p.message.as_str())
            .collect();
        assert_eq!(routes, ["no [targets.ghost] is configured"], "{err}");
        Ok(())
    });
}

#[test]
fn a_wrong_type_in_a_target_names_its_key_and_source_without_stopping_the_others() {
    Jail::expect_with(|jail| {
        jail.set_env("IMBRIDGE_TARGETS__OPS__MAX_BYTES", "many");
        let err = problems(
            jail,
            r#"
            [targets.ops]
            kind = "dingtalk_robot"
            url = "https://oapi.dingtalk.com/robot/send?access_token=x"
            [targets.other]
            kind = "wecom_robot"
            url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"
            mention = "assignedTo"
            typo = 1
            "#,
        );
        assert_eq!(
            keys(&err),
            ["targets.ops.max_bytes", "targets.other.mention"],
            "{err}"
        );
        assert!(
            err.problems[0]
                .message
                .ends_with("(from `IMBRIDGE_` environment variable(s))"),
            "{err}"
        );
        assert!(
            err.problems[1].message.ends_with("(from imbridge.toml)"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn the_example_file_loads() {
    Jail::expect_with(|_| {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("imbridge.example.toml");
        let s = load(Some(&example)).expect("the example is valid");
        assert_eq!(s.targets.len(), 7);
        assert_eq!(s.targets["audit-hook"].kind, crate::platform::Kind::Webhook);
        assert_eq!(s.targets["audit-hook"].concurrency, 1);
        assert_eq!(s.targets["ding-work"].endpoint.agent_id(), 123456789);
        assert_eq!(s.targets["wecom-app"].users, ["zhangsan"]);
        assert_eq!(
            s.targets["ops-dingtalk"].composition.template, None,
            "a target without template"
        );
        assert_eq!(s.routes["zentao"].rules.len(), 2);
        Ok(())
    });
}

#[test]
fn zones_and_proxies_are_checked_by_key_and_proxies_never_printed() {
    Jail::expect_with(|jail| {
        jail.set_env("IMBRIDGE_HTTP__PROXY", "socks5://admin:hunter2@proxy:1080");
        let err = problems(
            jail,
            r#"
            [notify]
            timezone = "Asia/Shanghia"
            [templates.t]
            text = "{{ d | date(tz='Europe/Pariss') }}"
            [apps.lark.main]
            app_id = "cli_x"
            app_secret = "s"
            verification_token = "v"
            proxy = ""
            "#,
        );
        let keys = keys(&err);
        for key in [
            "notify.timezone",
            "templates.t.text",
            "http.proxy",
            "apps.lark.main.proxy",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        let text = err.to_string();
        assert!(
            text.contains("Asia/Shanghia") && text.contains("Europe/Pariss"),
            "{text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        Ok(())
    });
}

#[test]
fn every_target_and_app_gets_its_proxy_or_the_global_one() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "imbridge.toml",
            r#"
            [http]
            proxy = "http://global:3128"
            no_proxy = [".corp"]
            [apps.dingtalk.ops]
            mode = "stream"
            client_id = "dingops"
            client_secret = "s"
            [apps.dingtalk.main]
            token = "t"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
            receiver_id = "ding1"
            app_key = "k"
            app_secret = "s"
            proxy = "none"
            [apps.wecom.main]
            token = "t"
            aes_key = "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7"
            corp_id = "ww1"
            app_secret = "s"
            proxy = "https://wecom-proxy:443"
            [targets.bot]
            kind = "wecom_robot"
            url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"
            [targets.direct]
            kind = "wecom_robot"
            url = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"
            proxy = "none"
            "#,
        )?;
        let s = load(Some(Path::new("imbridge.toml"))).expect("valid");
        let global = Egress::proxy("http://global:3128", &[".corp".to_owned()]).unwrap();
        let wecom = Egress::proxy("https://wecom-proxy:443", &[".corp".to_owned()]).unwrap();
        assert_eq!(s.targets["bot"].egress, global);
        assert_eq!(s.targets["direct"].egress, Egress::Direct);
        assert_eq!(s.dingtalk_streams["ops"].egress, global);
        assert_eq!(s.dingtalk_oapi["main"].egress, Egress::Direct);
        assert_eq!(s.api_apps["dingtalk/main"].egress, Egress::Direct);
        assert_eq!(s.api_apps["wecom/main"].egress, wecom);
        // The stream's WebSocket is dialed directly: said, not hidden.
        let warned: Vec<&str> = s.warnings.iter().map(|w| w.key.as_str()).collect();
        assert!(warned.contains(&"apps.dingtalk.ops.proxy"), "{warned:?}");
        Ok(())
    });
}
