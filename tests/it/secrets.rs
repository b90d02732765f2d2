//! Nothing secret leaves the process: configuration errors name keys, never values; platform
//! URLs are `https://` unless a target opts out; and a failing send's URL credentials appear
//! neither in its dead letter, nor in the answer to `?wait=true`, nor in the logs.

// figment's `Jail` closures return its large error type.
#![allow(clippy::result_large_err)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use figment::Jail;
use imbridge::config;

use crate::common::engine::Engine;
use crate::common::*;

const LEAK: &str = "LEAKME0123456789";

fn keys(err: &config::ConfigError) -> Vec<&str> {
    err.problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn config_errors_name_the_key_never_the_value() {
    Jail::expect_with(|jail| {
        // One level too high: the URL lands where the target's table should be.
        let url = format!("https://oapi.dingtalk.com/robot/send?access_token={LEAK}");
        jail.set_env("IMBRIDGE_TARGETS__OPS", &url);
        let err = config::load(None).unwrap_err();
        assert!(keys(&err).contains(&"targets.ops"), "{err}");
        assert!(err.to_string().contains("expected"), "{err}");
        assert!(!err.to_string().contains(LEAK), "{err}");
        jail.clear_env();

        // A value of the wrong type in the file.
        jail.create_file(
            "type.toml",
            &format!("[server]\nmax_body_bytes = \"https://x/?token={LEAK}\"\n"),
        )?;
        let err = config::load(Some(Path::new("type.toml"))).unwrap_err();
        assert_eq!(keys(&err), ["server.max_body_bytes"], "{err}");
        assert!(!err.to_string().contains(LEAK), "{err}");

        // A TOML syntax error quotes the line: the line is not shown.
        jail.create_file(
            "syntax.toml",
            &format!("[targets.ops]\nkind = \"dingtalk_robot\"\nurl = \"https://x/?key={LEAK}\n"),
        )?;
        let err = config::load(Some(Path::new("syntax.toml"))).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(!err.to_string().contains(LEAK), "{err}");
        Ok(())
    });

    // And `check-config` prints no more than that.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .arg("check-config")
        .current_dir(dir.path())
        .env_clear()
        .env(
            "IMBRIDGE_TARGETS__OPS",
            format!("https://oapi.dingtalk.com/robot/send?access_token={LEAK}"),
        )
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(64), "{printed}");
    assert!(printed.contains("targets.ops"), "{printed}");
    assert!(!printed.contains(LEAK), "{printed}");
}

#[test]
fn http_platform_urls_need_allow_insecure_http() {
    let config = |insecure: &str| {
        format!(
            "[targets.robot]\nkind = \"wecom_robot\"\nurl = \"http://qyapi.example/send?key={LEAK}\"\n{insecure}\n\
             [targets.app]\nkind = \"lark_app\"\napp_id = \"cli_1\"\napp_secret = \"s\"\n\
             base_url = \"http://open.example\"\n{insecure}\n\
             [targets.ftp]\nkind = \"wecom_robot\"\nurl = \"ftp://x/?key={LEAK}\"\n"
        )
    };
    Jail::expect_with(|jail| {
        jail.create_file("plain.toml", &config(""))?;
        let err = config::load(Some(Path::new("plain.toml"))).unwrap_err();
        assert_eq!(
            keys(&err),
            [
                "targets.app.base_url",
                "targets.ftp.url",
                "targets.robot.url"
            ],
            "{err}"
        );
        for p in &err.problems[..3] {
            assert!(!p.message.contains(LEAK), "{p}");
        }
        assert!(
            err.problems[0].message.contains("allow_insecure_http"),
            "{err}"
        );
        assert!(
            err.problems[2].message.contains("allow_insecure_http"),
            "{err}"
        );

        // Allowed per target; ftp:// never is.
        jail.create_file("allowed.toml", &config("allow_insecure_http = true"))?;
        let err = config::load(Some(Path::new("allowed.toml"))).unwrap_err();
        assert_eq!(keys(&err), ["targets.ftp.url"], "{err}");
        Ok(())
    });
}

/// A platform that answers every request with a DingTalk error quoting the request URL.
async fn echoing_platform() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let n = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let body = format!(
                    r#"{{"errcode":310000,"errmsg":"sign not match, url http://{addr}{path}"}}"#
                );
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    format!("http://{addr}/robot/send?access_token={LEAK}")
}

fn echoing_target(url: &str) -> String {
    format!("[targets.ops]\nkind = \"dingtalk_robot\"\nurl = \"{url}\"\nsecret = \"SECabc\"\n")
}

#[tokio::test]
async fn a_failing_sends_url_credentials_stay_out_of_answers_and_dead_letters() {
    let engine = Engine::Memory;
    let url = echoing_platform().await;
    let app = TestApp::start(&toml_with(&echoing_target(&url))).await;
    app.wait_ready().await;
    let mut letters = engine.watch(&app, "dlq.notify.ops");

    let (status, answer) = post_json(
        &app.http,
        app.url("/notify/ops?wait=true"),
        serde_json::json!({"text": "x"}),
    )
    .await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["answer"]["code"], 310000, "{answer}");
    assert!(!answer.to_string().contains(LEAK), "{answer}");

    let (status, _) = post_json(
        &app.http,
        app.url("/notify/ops"),
        serde_json::json!({"text": "x"}),
    )
    .await;
    assert_eq!(status, 202);
    let letter = &letters.next(&engine, 1).await[0];
    let quoted = letter.header("imbridge-dlq-answer").unwrap();
    // The platform's answer is kept, its credentials masked.
    assert!(quoted.contains("sign not match"), "{quoted}");
    assert!(quoted.contains("access_token=***"), "{quoted}");
    assert!(!quoted.contains(LEAK), "{quoted}");
    assert!(
        !letter
            .headers
            .iter()
            .any(|(k, v)| k.contains(LEAK) || v.contains(LEAK)),
        "{:?}",
        letter.headers
    );
    app.stop().await;
}

// Two workers: the fake platform must keep answering while this test blocks on the log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sends_url_credentials_stay_out_of_the_logs() {
    let url = echoing_platform().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imbridge.toml");
    let toml = toml_with(&format!(
        "[log]\nformat = \"json\"\nlevel = \"imbridge=debug,info\"\n{}",
        echoing_target(&url)
    ));
    std::fs::write(&config, toml).unwrap();
    let mut child = dies_with_test(Command::new(env!("CARGO_BIN_EXE_imbridge")))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_clear()
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut next_line = |what: &str| {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no {what} line in {seen:#?}"));
        seen.push(line.clone());
        line
    };
    let internal = loop {
        let line = next_line("serving");
        if line.contains("imbridge serving") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["internal"]
                .as_str()
                .or(v["internal"].as_str())
                .unwrap()
                .to_owned();
        }
    };
    let client = client_with_token(CLIENT_TOKEN);
    let (status, _) = post_json(
        &client,
        format!("http://{internal}/notify/ops"),
        serde_json::json!({"text": "x"}),
    )
    .await;
    assert_eq!(status, 202);
    loop {
        if next_line("dead-letter").contains("notification dead-lettered") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let leaked: Vec<&String> = seen.iter().filter(|l| l.contains(LEAK)).collect();
    assert!(leaked.is_empty(), "{leaked:#?}");
    assert!(
        seen.iter().any(|l| l.contains("access_token=***")),
        "the answer is logged, masked: {seen:#?}"
    );
}
