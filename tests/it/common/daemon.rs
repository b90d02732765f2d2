//! The daemon as its own process: what a signal (SIGTERM, SIGKILL) does to it can only be seen
//! there. Its listeners' addresses come from its JSON "serving" line; its log lines are kept
//! as they come. Dropped (or the test dying): killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{dies_with_test, WAIT};

pub struct Daemon {
    pub child: Child,
    /// Every line it logged, in order (the reader thread drains its stderr to the end, so it
    /// never blocks on logging).
    pub lines: mpsc::Receiver<String>,
    /// `host:port` of each listener.
    pub ingress: String,
    pub admin: String,
    pub internal: Option<String>,
}

impl Daemon {
    /// `imbridge serve --config <path>`, with a clean environment (the config tests of this
    /// process set `IMBRIDGE_` variables in their jails) plus `env`. The configuration must
    /// log JSON (`[log] format = "json"`).
    pub fn start(config: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(config, &[], env)
    }

    /// [`Daemon::start`] with more arguments to `serve` (`--watch`).
    pub fn start_with(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut command = dies_with_test(Command::new(env!("CARGO_BIN_EXE_imbridge")));
        command
            .args(["serve", "--config"])
            .arg(config)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let serving = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains("imbridge serving") => break line,
                Ok(_) => {}
                Err(_) => panic!("the daemon never served"),
            }
        };
        let line: serde_json::Value = serde_json::from_str(&serving).unwrap();
        let addr = |name: &str| line[name].as_str().map(str::to_owned);
        Daemon {
            ingress: addr("ingress").expect("an ingress listener"),
            admin: addr("admin").expect("an admin listener"),
            internal: addr("internal"),
            child,
            lines,
        }
    }

    /// `http://<ingress>`.
    pub fn public_url(&self) -> String {
        format!("http://{}", self.ingress)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        let deadline = Instant::now() + WAIT;
        loop {
            let ok = reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then how long the process took to exit and its exit code.
    pub fn terminate(&mut self) -> (Duration, Option<i32>) {
        let started = Instant::now();
        self.signal("TERM");
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (started.elapsed(), s.code());
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: nothing is finished, flushed or handed back.
    pub fn kill(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
