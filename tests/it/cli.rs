//! The `imbridge` binary itself: it serves, logs where, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::daemon::Daemon;

#[test]
fn serve_runs_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imbridge.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imbridge"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_clear()
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("imbridge serving"))
        .expect("serving line");
    // JSON logs, as configured, naming both bound addresses.
    let line: serde_json::Value = serde_json::from_str(&serving).unwrap();
    assert!(line["ingress"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["admin"].as_str().unwrap().starts_with("127.0.0.1:"));

    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(lines
        .map_while(Result::ok)
        .any(|l| l.contains("shutdown complete")));
}

/// Sends raw bytes and returns the first line of the answer.
fn http_status_line(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn shutdown_ends_within_the_grace_whatever_clients_and_targets_hold_and_sums_up_refusals() {
    use std::io::Write;
    // A platform that accepts connections and never answers: a send stays in flight.
    let platform = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let platform_addr = platform.local_addr().unwrap();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in platform.incoming() {
            held.push(stream);
            let _ = accepted_tx.send(());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imbridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            admin_listen = "127.0.0.1:0"
            internal_listen = "127.0.0.1:0"
            shutdown_grace = "2s"
            header_timeout = "60s"
            body_timeout = "60s"
            [log]
            format = "json"
            level = "info"
            [notify]
            request_timeout = "60s"
            [clients.ops]
            token = "a-client-token-for-this-test"
            targets = ["*"]
            [targets.hang]
            kind = "wecom_robot"
            url = "http://{platform_addr}/cgi-bin/webhook/send?key=k"
            allow_insecure_http = true
            "#
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, &[]);

    // Twenty refused callbacks: summed up in one line, not logged one by one.
    for _ in 0..20 {
        let status = http_status_line(
            &daemon.ingress,
            "POST /callbacks/dingtalk/nosuch HTTP/1.1\r\nHost: i\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    }
    let status = http_status_line(
        daemon.internal.as_deref().unwrap(),
        "POST /notify/hang HTTP/1.1\r\nHost: i\r\nAuthorization: Bearer a-client-token-for-this-test\r\n\
         Content-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{\"text\":\"hang\"}",
    );
    assert!(status.starts_with("HTTP/1.1 202"), "{status}");
    accepted
        .recv_timeout(Duration::from_secs(20))
        .expect("the send never reached the platform");
    // A slowloris client, an idle one and a request whose body never finishes.
    let mut slow = std::net::TcpStream::connect(&daemon.ingress).unwrap();
    slow.write_all(b"POST /callbacks/dingtalk/x HTTP/1.1\r\nHost: i\r\n")
        .unwrap();
    let _idle = std::net::TcpStream::connect(&daemon.ingress).unwrap();
    let mut trickle = std::net::TcpStream::connect(&daemon.ingress).unwrap();
    trickle
        .write_all(b"POST /callbacks/dingtalk/x HTTP/1.1\r\nHost: i\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (took, code) = daemon.terminate();
    let bound = Duration::from_secs(2) + imbridge::app::SHUTDOWN_SLACK;
    assert!(took < bound, "shutdown took {took:?}, more than {bound:?}");
    assert_eq!(code, Some(0));
    let lines: Vec<String> = daemon.lines.try_iter().collect();
    assert!(lines.iter().any(|l| l.contains("shutdown complete")));
    assert!(
        !lines.iter().any(|l| l.contains("callback refused")),
        "a refusal was logged on its own at info"
    );
    let summary: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("unknown_app="))
        .collect();
    assert_eq!(summary.len(), 1, "{lines:#?}");
    assert!(summary[0].contains("unknown_app=20"), "{}", summary[0]);
}
