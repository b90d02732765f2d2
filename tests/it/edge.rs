//! The listeners under hostile clients: slowloris and idle connections are closed after the
//! header timeout while a real callback is still answered at once, connections beyond the cap
//! are closed and counted, a trickled body gets 408, oversized headers 431, and HTTP/2 is not
//! spoken.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::engine::Engine;
use crate::common::*;

const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

async fn app(server: &str) -> TestApp {
    TestApp::start(&toml_with(&format!("{server}\n{MAIN_APP}"))).await
}

/// Reads until the server closes the connection; everything it sent.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// Waits until the count of open connections satisfies `ok`; fails with `what` and the count.
async fn open_until(open: &prometheus::IntGauge, ok: impl Fn(i64) -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !ok(open.get()) {
        assert!(Instant::now() < deadline, "{what}: {} open", open.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A slowloris client: starts a request, then sends one more header byte every second;
/// returns how long the server let it go on.
async fn slowloris(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Duration::ZERO;
    };
    let _ = s
        .write_all(b"POST /callbacks/dingtalk/main HTTP/1.1\r\nHost: imbridge\r\nX-Slow: ")
        .await;
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if s.write_all(b"a").await.is_err() {
                    return start.elapsed();
                }
            }
        }
    }
}

/// A client that connects and sends nothing; how long the server kept the connection.
async fn idle(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Duration::ZERO;
    };
    read_to_close(&mut s).await;
    start.elapsed()
}

/// An attacker's connection: as soon as the server closes it, another one, until `stop`.
/// Returns the longest the server kept one open.
async fn keep_attacking(addr: SocketAddr, slow: bool, stop: Arc<AtomicBool>) -> Duration {
    let mut longest = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let held = if slow {
            slowloris(addr).await
        } else {
            idle(addr).await
        };
        longest = longest.max(held);
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_closed_while_a_signed_callback_is_answered() {
    let app = app(r#"header_timeout = "3s"
        max_connections = 8192"#)
    .await;
    let addr = app.ingress;
    let stop = Arc::new(AtomicBool::new(false));
    let mut attack = tokio::task::JoinSet::new();
    for i in 0..4000 {
        attack.spawn(keep_attacking(addr, i % 2 == 0, stop.clone()));
    }
    // Wait until the attack holds most of its connections (on a busy machine some are always
    // between a close and their next connect).
    let open = app.metrics.connections_open.with_label_values(&["public"]);
    open_until(
        &open,
        |n| n >= 3000,
        "the attack opened too few connections",
    )
    .await;

    let started = Instant::now();
    let res = DingTalk::main()
        .callback(&approval_event("during-the-attack"))
        .post(&app, "main")
        .await;
    let took = started.elapsed();
    assert_eq!(res.status(), 200);
    assert!(
        took < Duration::from_secs(1),
        "callback took {took:?} under attack"
    );
    assert_eq!(app.callbacks("main", "published"), 1);

    stop.store(true, Ordering::Relaxed);
    let mut longest = Duration::ZERO;
    while let Some(held) = tokio::time::timeout(WAIT, attack.join_next())
        .await
        .unwrap()
    {
        longest = longest.max(held.unwrap());
    }
    // Each was closed by the header timeout, give or take a busy machine's scheduling.
    assert!(
        longest >= HEADER_TIMEOUT && longest < HEADER_TIMEOUT + Duration::from_secs(3),
        "a hostile connection stayed open {longest:?}"
    );
    let timed_out = app
        .metrics
        .connections_closed_total
        .with_label_values(&["public", "header_timeout"])
        .get();
    assert!(
        timed_out >= 4000,
        "{timed_out} closed by the header timeout"
    );
    assert_eq!(open.get(), 0);
    app.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted() {
    let app = app("max_connections = 5").await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(app.ingress).await.unwrap());
    }
    let open = app.metrics.connections_open.with_label_values(&["public"]);
    open_until(&open, |n| n == 5, "the five were never accepted").await;
    let mut sixth = TcpStream::connect(app.ingress).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(1), read_to_close(&mut sixth)).await;
    assert_eq!(closed.expect("the sixth connection stayed open"), b"");
    let refused = app
        .metrics
        .connections_refused_total
        .with_label_values(&["public"]);
    assert_eq!(refused.get(), 1);

    // A slot freed is a slot usable again.
    drop(held.pop());
    open_until(
        &open,
        |n| n == 4,
        "the closed connection was never released",
    )
    .await;
    let res = DingTalk::main()
        .callback(&approval_event("after-a-slot-freed"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_body_trickled_past_the_body_timeout_is_answered_408_and_closed() {
    let app = app(r#"body_timeout = "1s""#).await;
    let mut s = TcpStream::connect(app.ingress).await.unwrap();
    s.write_all(
        b"POST /callbacks/dingtalk/main?msg_signature=a&timestamp=1&nonce=n HTTP/1.1\r\n\
          Host: imbridge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"enc",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut s))
        .await
        .expect("no answer to a trickled body");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(app.callbacks("main", "body_timeout"), 1);
    app.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_431() {
    let app = app("").await;
    let too_many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let too_long = format!("X-Long: {}\r\n", "a".repeat(20 * 1024));
    for extra in [too_many, too_long] {
        let mut s = TcpStream::connect(app.ingress).await.unwrap();
        let request = format!("POST /callbacks/dingtalk/main HTTP/1.1\r\nHost: i\r\n{extra}\r\n");
        let _ = s.write_all(request.as_bytes()).await;
        let answer = tokio::time::timeout(WAIT, read_to_close(&mut s))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    let counted = app
        .metrics
        .connections_closed_total
        .with_label_values(&["public", "headers_too_large"]);
    assert_eq!(counted.get(), 2);
    app.stop().await;
}

#[tokio::test]
async fn http2_is_not_spoken() {
    let app = app("").await;
    let mut s = TcpStream::connect(app.ingress).await.unwrap();
    // An HTTP/2 prior-knowledge client's connection preface.
    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut s))
        .await
        .unwrap();
    // An HTTP/2 server would answer with a SETTINGS frame; this one answers in HTTP/1 or not.
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let res = DingTalk::main()
        .callback(&approval_event("after-h2"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    app.stop().await;
}

/// A client that shuts its side of the connection once its callback is sent (HTTP/1.1 allows
/// it) still gets its answer, and the event is stored: the daemon does not watch the socket
/// for a hang-up while the publish is on its way. The broker is paused meanwhile, so the
/// half-close arrives while the publish waits.
#[tokio::test]
async fn a_callback_whose_client_half_closes_is_answered_and_stored() {
    let engine = Engine::nats();
    let app = TestApp::start(&toml_with(&format!("{}\n{MAIN_APP}", engine.toml()))).await;
    app.wait_ready().await;
    let dt = DingTalk::main();
    let cb = dt.callback(&approval_event("half-close"));
    let query = serde_urlencoded::to_string(&cb.query).unwrap();
    let mut s = TcpStream::connect(app.ingress).await.unwrap();
    let request = format!(
        "POST /callbacks/dingtalk/main?{query} HTTP/1.1\r\nHost: imbridge\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        cb.body.len(),
        cb.body
    );
    engine.pause();
    s.write_all(request.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine.signal("-CONT");
    let answer = tokio::time::timeout(WAIT, read_to_close(&mut s))
        .await
        .expect("no answer to a half-closed callback");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    dt.check_reply(&serde_json::from_str(body).unwrap());
    assert_eq!(app.callbacks("main", "published"), 1);
    assert_eq!(engine.stored("dingtalk.bpms_instance_change").await, 1);
    app.stop().await;
}
