//! Nothing a platform answers leads a request elsewhere or grows the process: redirects are
//! not followed, answers are read up to a cap.

use std::time::Duration;

use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

/// A platform that answers every request with `response` (raw HTTP), then closes.
async fn canned_platform(response: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await;
                let _ = conn.write_all(&response).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    format!("http://{addr}/robot/send?access_token=x")
}

#[tokio::test]
async fn platform_answers_are_not_followed_elsewhere_nor_read_without_bound() {
    let farm = RobotFarm::start().await;
    let elsewhere = farm.add(Robot::wecom("elsewhere"));
    let redirect = canned_platform(
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {elsewhere}\r\ncontent-length: 0\r\n\r\n"
        )
        .into_bytes(),
    )
    .await;
    let huge = {
        let body = format!("{{\"errcode\":0,\"pad\":\"{}\"}}", "x".repeat(200_000));
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        canned_platform([head.into_bytes(), body.into_bytes()].concat()).await
    };
    let app = TestApp::start(&toml_with(&format!(
        "[notify]\nmax_attempts = 2\nretry_initial = \"10ms\"\nretry_max = \"20ms\"\n\n\
         [targets.redirect]\nkind = \"wecom_robot\"\nurl = \"{redirect}\"\n\n\
         [targets.huge]\nkind = \"wecom_robot\"\nurl = \"{huge}\"\n"
    )))
    .await;
    app.wait_ready().await;
    for target in ["redirect", "huge"] {
        let (status, body) = post_json(
            &app.http,
            app.url(&format!("/notify/{target}?wait=true")),
            serde_json::json!({"text": "x"}),
        )
        .await;
        assert_eq!(status, 502, "{target}: {body}");
        assert_ne!(body["answer"]["class"], "ok", "{target}: {body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        farm.accepted("elsewhere").is_empty(),
        "the redirect was followed"
    );
    app.stop().await;
}
