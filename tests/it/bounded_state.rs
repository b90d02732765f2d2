//! State keyed by input stays bounded: a flood of distinct recipient ids leaves the rate
//! limiters (in this process and in NATS) as small as before once their windows have passed,
//! and ids chosen by notify clients live apart from callback ids in the bus's duplicate
//! namespaces.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::common::apps::{AppFarm, WeComApp};
use crate::common::daemon::Daemon;
use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm};
use crate::common::*;

const CORP: &str = "corp-bounded";

/// Recipients per message: as many as one WeCom `touser` takes.
const PER_MESSAGE: usize = 1000;

/// Member ids of the warm-up.
const WARM_UP: usize = 5 * PER_MESSAGE;

/// Distinct member ids sent through one target.
const MEMBERS: usize = 100_000;

/// What the daemon may keep after a second 100,000 members have come and gone, beyond what it
/// kept after the first: allocator slack and the peak of the members inside their window at
/// once (seen between 0.5 and 6 MiB on an idle machine). Never forgetting them costs about
/// 31 MiB per 100,000 (about 315 bytes a member), well above this.
const RSS_SLACK_KIB: u64 = 12 * 1024;

fn distinct_ids(n: usize) -> Vec<String> {
    let mut seen = HashSet::with_capacity(n);
    while seen.len() < n {
        seen.insert(format!("u{:016x}", rand::random::<u64>()));
    }
    seen.into_iter().collect()
}

async fn farm_with(users: &[String]) -> AppFarm {
    let farm = AppFarm::start().await;
    farm.add_wecom(WeComApp {
        corp_id: CORP.into(),
        secret: "wecom-secret".into(),
        agent_id: 1000002,
        users: users.to_vec(),
    });
    farm
}

/// A WeCom app target limiting each member to one message per `window`, with `margin`.
fn config(engine: &Engine, farm: &AppFarm, window: &str, margin: &str) -> String {
    toml_with(&format!(
        r#"
        {}
        [log]
        format = "json"
        [notify]
        rate_limit_margin = "{margin}"
        request_timeout = "5s"
        [targets.members]
        kind = "wecom_app"
        base_url = "{}"
        corp_id = "{CORP}"
        app_secret = "wecom-secret"
        agent_id = 1000002
        member_rate_limit = "1/{window}"
        "#,
        engine.toml(),
        farm.base_url()
    ))
}

async fn send_to(http: &reqwest::Client, url: &str, ids: &[String]) {
    let body = json!({"text": "bounded", "to": {"user_ids": ids}});
    let (status, answer) = post_json(http, url.to_owned(), body).await;
    assert_eq!(status, 202, "{answer}");
}

/// Resident memory (VmRSS) of a process, in KiB.
fn rss_kib(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The daemon as its own process, so its memory is its own (the tests in this binary allocate
/// concurrently); with two malloc arenas, not eight per core, so that what is measured is the
/// daemon's own state, not how many threads happened to allocate once.
fn spawn(config: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imbridge.toml");
    std::fs::write(&path, config).unwrap();
    (Daemon::start(&path, &[("MALLOC_ARENA_MAX", "2")]), dir)
}

/// 100,000 distinct member ids through one target with the in-process limiter, twice: once
/// their window has passed, the second 100,000 leave the daemon holding no more than the first
/// did, give or take [`RSS_SLACK_KIB`]. The first flood brings the allocator to its working
/// size (what it keeps after a peak varies from run to run by several MiB); a leak of the
/// members' state grows with every flood (about 31 MiB each).
#[tokio::test]
async fn rate_limiter_forgets_100k_members_rss_stays_flat() {
    let ids = distinct_ids(WARM_UP + 2 * (MEMBERS + 1));
    let farm = farm_with(&ids).await;
    let (daemon, _dir) = spawn(&config(&Engine::Memory, &farm, "200ms", "50ms"));
    let notify_url = format!(
        "http://{}/notify/members",
        daemon.internal.as_deref().unwrap()
    );
    let http = client_with_token(CLIENT_TOKEN);
    let (warm_up, rest) = ids.split_at(WARM_UP);
    let (first, second) = rest.split_at(MEMBERS + 1);

    // Warm up (connections, token) with messages of the same shape.
    let mut sent = 0;
    for chunk in warm_up.chunks(PER_MESSAGE) {
        send_to(&http, &notify_url, chunk).await;
        sent += 1;
    }
    farm.wait_sent(CORP, sent, WAIT).await;

    let mut rss = Vec::new();
    for flood in [first, second] {
        let (members, last) = flood.split_at(MEMBERS);
        let started = std::time::Instant::now();
        for chunk in members.chunks(PER_MESSAGE) {
            send_to(&http, &notify_url, chunk).await;
            sent += 1;
            farm.wait_sent(CORP, sent, WAIT).await;
        }
        let took = started.elapsed();
        // Past the window and the limiter's sweep; any later send finds the spent logs gone.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        send_to(&http, &notify_url, last).await;
        sent += 1;
        farm.wait_sent(CORP, sent, WAIT).await;
        // Freed memory leaves the resident set when the allocator gets round to it: the
        // lowest of a few samples is what the daemon holds.
        let mut low = u64::MAX;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            low = low.min(rss_kib(&daemon));
        }
        eprintln!("{MEMBERS} members in {took:?}: VmRSS {low} KiB after");
        rss.push(low);
    }
    let (after_first, after_second) = (rss[0], rss[1]);
    assert!(
        after_second <= after_first + RSS_SLACK_KIB,
        "VmRSS grew from {after_first} KiB after the first 100,000 members to {after_second} KiB after the second"
    );
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
}

/// The NATS limiter's member entries leave their stream once their window has passed: the
/// server removes them (the stream's `max_age`), whatever ids were sent.
#[tokio::test]
async fn nats_limiter_member_entries_expire_after_their_window() {
    let engine = Engine::nats();
    let ids = distinct_ids(MEMBERS);
    let farm = farm_with(&ids).await;
    // A pass over 1,001 keys in NATS takes longer than a small margin, and a pass slower
    // than the margin is taken again.
    let app = TestApp::start(&config(&engine, &farm, "1s", "2s")).await;
    app.wait_ready().await;
    let url = app.url("/notify/members");
    for (i, chunk) in ids.chunks(PER_MESSAGE).enumerate() {
        send_to(&app.http, &url, chunk).await;
        if i % 10 == 9 {
            farm.wait_sent(CORP, i + 1, WAIT).await;
        }
    }
    farm.wait_sent(CORP, MEMBERS / PER_MESSAGE, WAIT).await;
    let Engine::Nats(server) = &engine else {
        unreachable!()
    };
    let js = async_nats::jetstream::new(server.client().await);
    let mut stream = js
        .get_stream(format!(
            "imbridge_rate_limits{}",
            imbridge::notify::limiter::MEMBERS_SUFFIX
        ))
        .await
        .expect("the member stream");
    let subjects = |s: &async_nats::jetstream::stream::Info| s.state.subjects_count;
    let peak = subjects(stream.info().await.unwrap());
    assert!(peak > 0, "the entries were there");
    // Window 1 s plus two margins; the server checks ages about once per max_age.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let left = loop {
        let left = subjects(stream.info().await.unwrap());
        if left <= 10 || tokio::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("member subjects: {peak} right after the last send, {left} after the window");
    assert!(left <= 10, "{left} member entries outlived their window");
    assert!(farm.violations().is_empty(), "{:?}", farm.violations());
    app.stop().await;
}

/// A notification whose id (its `Idempotency-Key`) is a callback's ce-id is stored and
/// delivered all the same: notify ids live in their own duplicate namespace.
#[tokio::test]
async fn a_callback_and_a_notification_with_the_same_id_are_both_stored() {
    for engine in Engine::all() {
        let name = engine.name();
        let robots = RobotFarm::start().await;
        let url = robots.add(Robot::wecom("same-id"));
        let app = TestApp::start(&toml_with(&format!(
            "{}\n{MAIN_APP}\n[targets.ops]\nkind = \"wecom_robot\"\nurl = \"{url}\"\n",
            engine.toml()
        )))
        .await;
        app.wait_ready().await;
        let mut watch = engine.watch(&app, "dingtalk.bpms_instance_change");
        let res = DingTalk::main()
            .callback(&approval_event(&format!("same-id-{name}")))
            .post(&app, "main")
            .await;
        assert_eq!(res.status(), 200, "{name}");
        let stored = watch.next(&engine, 1).await;
        let id = stored[0]
            .header(&engine.ce("id"))
            .expect("a ce-id")
            .to_owned();

        let res = app
            .http
            .post(app.url("/notify/ops"))
            .header("Idempotency-Key", &id)
            .json(&json!({"text": "same id as a callback"}))
            .timeout(WAIT)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{name}");
        let got = robots.wait_accepted("same-id", 1, WAIT).await;
        assert!(
            got[0].body.to_string().contains("same id as a callback"),
            "{name}: {:?}",
            got[0].body
        );
        assert_eq!(app.callbacks("main", "duplicate"), 0, "{name}");
        app.stop().await;
    }
}
