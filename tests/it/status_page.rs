//! The status page at `/` on the admin listener, looked at in a real headless browser
//! (Debian's chromium): the DOM it renders and a screenshot. Where chromium is missing the
//! test says so and passes, except under CI (`CI` set), where `./test` installs it and its
//! absence is a failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::engine::Engine;
use crate::common::fakes::{Robot, RobotFarm, Scripted};
use crate::common::receiver::Receiver;
use crate::common::{approval_event, toml_with, DingTalk, TestApp, MAIN_APP, WAIT};

/// The browser, when this machine has one.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing; ./test installs it (apt-get install chromium)"
        );
        eprintln!("status_page: no chromium on this machine; the browser checks are skipped");
    }
    found
}

/// Runs the headless browser on `url` with `args`; its stdout.
async fn browse(browser: &Path, profile: &Path, args: &[String], url: &str) -> String {
    let mut command = tokio::process::Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("chromium within 90 s")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `<tr>` whose `attr` is `value`, as the browser serialised it.
fn row<'a>(dom: &'a str, attr: &str, value: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr {attr}=\"{value}\""))
        .unwrap_or_else(|| panic!("no row {attr}={value} in {dom}"));
    let end = dom[start..].find("</tr>").unwrap() + start;
    &dom[start..end]
}

/// The text of the first `<td class="…{class}…">` in `row`, tags stripped.
fn cell(row: &str, class: &str) -> String {
    let start = row
        .find(&format!("class=\"{class}"))
        .or_else(|| row.find(&format!(" {class}\"")))
        .unwrap_or_else(|| panic!("no cell {class} in {row}"));
    let from = row[start..].find('>').unwrap() + start + 1;
    let to = row[from..].find("</td>").unwrap() + from;
    let mut text = String::new();
    let mut in_tag = false;
    for c in row[from..to].chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// PNG width and height, from its IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test]
async fn the_status_page_shows_apps_targets_and_their_state_in_a_browser() {
    let Some(browser) = chromium() else { return };
    for engine in [Engine::Memory, Engine::nats()] {
        page_on(&engine, &browser).await;
    }
}

async fn page_on(engine: &Engine, browser: &Path) {
    let robots = RobotFarm::start().await;
    let group_url = robots.add(Robot::dingtalk("status-group"));
    // "Too fast" (DingTalk's 130101): the target pauses, its message waiting.
    let busy_url = robots.add(Robot::dingtalk("status-busy"));
    robots.script("status-busy", vec![Scripted::ErrCode(130101)]);
    // Refuses for good: the hook's message is dead-lettered at once.
    let receiver = Receiver::start(vec![(400, None, "no".into())]).await;
    let app = TestApp::start(&toml_with(&format!(
        "{}\n{MAIN_APP}\n\
         [apps.dingtalk.streamed]\nmode = \"stream\"\nclient_id = \"id\"\n\
         client_secret = \"secret\"\napi_base = \"http://127.0.0.1:1\"\n\
         allow_insecure_http = true\n\n\
         [streams]\ndown_fails_readiness = false\n\n\
         [targets.group]\nkind = \"dingtalk_robot\"\nurl = \"{group_url}\"\n\n\
         [targets.busy]\nkind = \"dingtalk_robot\"\nurl = \"{busy_url}\"\n\
         pause_on_rate_limit = \"1h\"\n\n\
         [targets.hook]\nkind = \"webhook\"\nurl = \"{}\"\n\n\
         [targets.idle]\nkind = \"webhook\"\nurl = \"{}\"\n",
        engine.toml(),
        receiver.url,
        receiver.url
    )))
    .await;
    app.wait_ready().await;
    let res = DingTalk::main()
        .callback(&approval_event("status-page"))
        .post(&app, "main")
        .await;
    assert_eq!(res.status(), 200);
    for target in ["group", "hook", "busy"] {
        let body = serde_json::json!({"text": format!("to {target}")});
        let res = app
            .http
            .post(app.url(&format!("/notify/{target}")))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
    }
    robots.wait_accepted("status-group", 1, WAIT).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while robots.requests("status-busy") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "busy never asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.wait_for(1).await;
    // The dead letter is stored after the refusal came back.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app
        .get_admin("/metrics")
        .await
        .text()
        .await
        .unwrap()
        .lines()
        .all(|l| {
            !(l.starts_with("imbridge_notify_dead_letters_total") && l.contains("target=\"hook\""))
        })
    {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("http://{}/", app.admin);
    let profile = tempfile::tempdir().unwrap();
    let dom = browse(browser, profile.path(), &["--dump-dom".into()], &url).await;

    assert!(dom.contains("<title>imbridge status</title>"), "{dom}");
    let bus = format!("<strong id=\"bus\">{}</strong>", engine.name());
    assert!(dom.contains(&bus), "{dom}");
    assert!(dom.contains("id=\"readiness\" class=\"ok\">ready"), "{dom}");
    // Apps: the callback app's last event; the long connection that cannot connect.
    let main = row(&dom, "data-app", "dingtalk/main");
    assert!(cell(main, "last-event").contains("UTC"), "{main}");
    assert_eq!(cell(main, "connection"), "callbacks");
    let streamed = row(&dom, "data-app", "dingtalk/streamed");
    assert_eq!(cell(streamed, "last-event"), "none yet");
    assert!(
        cell(streamed, "connection").starts_with("down for"),
        "{streamed}"
    );
    // Targets: delivered; refused and dead-lettered; never used.
    let group = row(&dom, "data-target", "group");
    assert!(
        cell(group, "last-send").starts_with("delivered code 0"),
        "{group}"
    );
    assert_eq!(cell(group, "num queued"), "0");
    assert_eq!(cell(group, "num dead-letters"), "0");
    let hook = row(&dom, "data-target", "hook");
    assert!(cell(hook, "last-send").starts_with("permanent"), "{hook}");
    assert_eq!(cell(hook, "num dead-letters"), "1");
    assert_eq!(cell(hook, "paused"), "not paused");
    assert!(cell(hook, "last-send").contains("HTTP 400"), "{hook}");
    // Paused: the pause's end.
    let busy = row(&dom, "data-target", "busy");
    assert!(cell(busy, "paused").ends_with("UTC"), "{busy}");
    let idle = row(&dom, "data-target", "idle");
    assert_eq!(cell(idle, "last-send"), "nothing sent yet");
    // Nothing secret: no URL of a target, no app secret.
    let secrets = [
        group_url.as_str(),
        "access_token",
        "secret",
        &receiver.url,
        "RECEIVER-TOKEN",
    ];
    for secret in secrets {
        assert!(!dom.contains(secret), "{secret} is on the page");
    }

    let shot = profile.path().join("status.png");
    let arg = format!("--screenshot={}", shot.display());
    browse(browser, profile.path(), &[arg], &url).await;
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(png_size(&png), (1280, 900));
    // A blank page compresses to a few kilobytes; tables of text do not.
    assert!(
        png.len() > 20_000,
        "a near-empty screenshot ({} bytes)",
        png.len()
    );
    if let Some(dir) = std::env::var_os("IMBRIDGE_SCREENSHOT_DIR") {
        let name = format!("status-{}.png", engine.name());
        std::fs::copy(&shot, Path::new(&dir).join(name)).unwrap();
    }
    app.stop().await;
}
