//! Processes the benchmarks run beside the load generator: the daemon (release build), a
//! JetStream server with file storage, tansu, the trivial baseline server; and what is read of
//! them from /proc (RSS, CPU time).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process, killed when dropped, and killed by the kernel if the bench dies.
pub struct Proc {
    pub child: Child,
    /// Files and folders it uses, removed with it.
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU time used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid())
    }
}

/// User + system CPU time process `pid` has used so far (`/proc/<pid>/stat`).
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dies_with_parent(mut command: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `url` answers 200.
pub async fn wait_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(1)).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The release binary of the daemon, next to this one; or `BENCH_DAEMON`, such as a script that
/// runs it under a heap profiler (it must `exec`, so signals reach the daemon). Not named
/// `IMBRIDGE_…`: the daemon takes those as settings and refuses unknown ones.
pub fn daemon_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BENCH_DAEMON") {
        return bin.into();
    }
    let me = std::env::current_exe().expect("own path");
    me.with_file_name("imbridge")
}

/// A running daemon: its ingress, internal (when asked for) and admin ports.
pub struct Daemon {
    pub proc: Proc,
    pub ingress: u16,
    pub internal: Option<u16>,
    pub admin: u16,
}

impl Daemon {
    /// Starts `imbridge serve` with `toml` plus its listeners, and waits for `/readyz`.
    pub async fn start(toml: &str) -> anyhow::Result<Daemon> {
        Daemon::start_with(toml, None).await
    }

    /// [`Daemon::start`] with the internal listener too.
    pub async fn start_internal(toml: &str) -> anyhow::Result<Daemon> {
        Daemon::start_with(toml, Some(free_port())).await
    }

    async fn start_with(toml: &str, internal: Option<u16>) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let (ingress, admin) = (free_port(), free_port());
        let config = dir.path().join("imbridge.toml");
        let mut f = std::fs::File::create(&config)?;
        let internal_listen = internal
            .map(|p| format!("internal_listen = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        // Room for the memory scenario's 10,000 connections held at once: the default cap
        // (4,096) is what a listener facing the internet should have, not what is measured.
        writeln!(
            f,
            "[server]\nlisten = \"127.0.0.1:{ingress}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             {internal_listen}max_body_bytes = 1048576\nmax_connections = 16384\n\
             [log]\nlevel = \"warn\"\n{toml}"
        )?;
        let child = dies_with_parent(Command::new(daemon_bin()))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", daemon_bin().display()))?;
        let proc = Proc {
            child,
            _dir: Some(dir),
        };
        wait_ok(
            &format!("http://127.0.0.1:{admin}/readyz"),
            Duration::from_secs(60),
        )
        .await?;
        Ok(Daemon {
            proc,
            ingress,
            internal,
            admin,
        })
    }
}

/// `nats-server -js` with file storage in a fresh folder; returns it and its port.
pub fn nats_server() -> anyhow::Result<(Proc, u16)> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let mut child = dies_with_parent(Command::new(find("nats-server")?))
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Server is ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("nats-server did not start")?;
    Ok((
        Proc {
            child,
            _dir: Some(dir),
        },
        port,
    ))
}

/// tansu with memory storage; returns it and its port once it accepts connections.
pub async fn tansu() -> anyhow::Result<(Proc, u16)> {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = dies_with_parent(Command::new(find("tansu")?))
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("tansu did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((Proc { child, _dir: None }, port))
}

/// This binary in another mode (the trivial baseline server), as its own process so it does
/// not share the load generator's runtime.
pub async fn own_mode(args: &[&str]) -> anyhow::Result<Proc> {
    let child = dies_with_parent(Command::new(std::env::current_exe()?))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Proc { child, _dir: None })
}

/// A program on PATH, in /usr/sbin (Debian's nats-server) or in cargo's bin folder (tansu).
pub fn find(program: &str) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into_os_string()))
    {
        dirs.push(Path::new(&home).join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found (bench/run installs what is missing)"))
}
