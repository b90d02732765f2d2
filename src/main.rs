//! The `imbridge` command: wires configuration, logging and signals to [`imbridge::app`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imbridge::config::{self, ConfigError};

/// jemalloc rather than glibc's malloc. Under load glibc's allocator took about a sixth of the
/// daemon's CPU samples (`_int_malloc`, `malloc_consolidate`, `_int_free`, and arena locks
/// waited on in futexes), measured with `perf` on the ingress benchmark. jemalloc also holds
/// less per idle connection: 20.6 KiB per callback in flight, against glibc's 30.0 and
/// mimalloc's 42.1, in runs of the same benchmark (bench/ANALYSIS.md).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for an invalid configuration (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Bridge DingTalk, WeCom and Lark with NATS JetStream or Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// TOML configuration file; without it, defaults and IMBRIDGE_ variables only. SIGHUP
        /// reloads it (targets, routes, templates, users, clients, app credentials).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also reload when the file's content changes (checked every 2 seconds; follows a
        /// Kubernetes ConfigMap's symlink swap).
        #[arg(long, requires = "config")]
        watch: bool,
    },
    /// Validate a configuration, print every problem, exit 64 if there is one.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print what a target (or each target of a route) would send for the payload on stdin,
    /// without sending: a `# target: where` line, then the JSON body, per request.
    Render {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A target or route name, as in `notify.<name>` (`--route` reads better for a route
        /// on inbound events, whose payload on stdin is the event).
        #[arg(long, short, alias = "route")]
        target: String,
        /// The message id to render with (Lark's idempotency uuid is derived from it).
        #[arg(long, default_value = "render")]
        id: String,
    },
    /// The dead letters of one target (`dlq.notify.<target>`): list, show, replay, purge.
    /// Exits 0 when done, 64 on a configuration or usage problem, 69 when the bus (or, on
    /// the in-process bus, the daemon's internal listener) could not be reached or refused.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Send a test notification to a target through the running daemon's internal listener
    /// (`POST /notify/<target>`), or with --direct from this process, and print the result.
    /// Exits 0 when delivered (or, without --wait, accepted), 64 on a configuration or usage
    /// problem (or a token or target the daemon refused), 65 when the platform (or the
    /// target's template) refused the message, 69 when the daemon could not be reached.
    Send(SendArgs),
    /// DingTalk's server API for one app.
    Dingtalk {
        #[command(subcommand)]
        command: DingTalkCommand,
    },
}

#[derive(Subcommand)]
enum DingTalkCommand {
    /// The app's event callback, registered with DingTalk's classic API (`call_back/*`).
    /// Exits 0 when done, 64 on a configuration or usage problem, 69 when DingTalk refused or
    /// could not be reached, or the URL failed its check_url check.
    Callback {
        #[command(subcommand)]
        action: CallbackAction,
    },
}

#[derive(Subcommand)]
enum CallbackAction {
    /// Check that the URL answers check_url with this app's keys, then register it.
    Register(SetArgs),
    /// Check that the URL answers check_url with this app's keys, then replace the
    /// registration with it.
    Update(SetArgs),
    /// Print the registration (token and aes_key masked, compared with the app's).
    Get(AppArgs),
    /// Delete the registration.
    Delete(AppArgs),
    /// Fetch DingTalk's list of the pushes it failed to deliver, once, and publish each to the
    /// configured bus (as recover_failed does, without waiting for it); prints what was
    /// published. DingTalk hands each entry out once: run it against the bus the daemon uses.
    Failed(AppArgs),
}

#[derive(clap::Args)]
struct AppArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The app, as in `[apps.dingtalk.<app>]`.
    #[arg(long)]
    app: String,
}

#[derive(clap::Args)]
struct SetArgs {
    #[command(flatten)]
    app: AppArgs,
    /// The public URL DingTalk pushes to, e.g.
    /// https://imbridge.example.com/callbacks/dingtalk/<app>.
    #[arg(long)]
    url: Option<String>,
    /// The events, comma-separated (default: the app's `callback_tags`).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
}

#[derive(clap::Args)]
struct SendArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The target, as in `[targets.<name>]` (a route too, without --wait).
    #[arg(long, short)]
    target: String,
    /// The message (default: "imbridge test message from <hostname> at <time>").
    #[arg(long)]
    text: Option<String>,
    /// Wait for the platform's answer (`?wait=true`) and print it with its code.
    #[arg(long)]
    wait: bool,
    /// Send from this process, without a daemon, through the same delivery code (always waits).
    #[arg(long, conflicts_with_all = ["url", "token"])]
    direct: bool,
    /// The daemon's internal listener (default: server.internal_listen).
    #[arg(long)]
    url: Option<String>,
    /// A client token allowed to use the target.
    #[arg(long, env = "IMBRIDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `imbridge send`.
fn send(args: SendArgs) -> ExitCode {
    let settings = match load(args.config.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let req = imbridge::send::Request {
        target: args.target,
        text: args.text,
        wait: args.wait,
        direct: args.direct,
        url: args.url,
        token: args.token,
    };
    let outcome = run_async(imbridge::send::run(&settings, &req));
    match outcome {
        Ok(lines) => {
            for line in &lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[derive(Subcommand)]
enum DlqAction {
    /// One line per letter: id, time, reason, attempts, HTTP status, original ce-id.
    List(DlqArgs),
    /// Letters in full: headers and body.
    Show(DlqArgs),
    /// Publish each selected letter again to `notify.<target>` with the id
    /// `<ce-id>.replay.<letter id>`, and remove it once the bus acknowledged the publish.
    Replay(DlqArgs),
    /// Remove the selected letters; needs a filter, or --all.
    Purge {
        #[command(flatten)]
        args: DlqArgs,
        /// Purge every letter of the target.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct DlqArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The target (or route) whose dead letters these are.
    #[arg(long, short)]
    target: String,
    /// Only letters with this reason (permanent, attempts_exhausted, expired, …).
    #[arg(long)]
    reason: Option<String>,
    /// Only letters stored since: a duration back from now (30m, 2h) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// At most this many letters, oldest first (default 100).
    #[arg(long)]
    limit: Option<usize>,
    /// Only the letter with this id (as `list` prints it).
    #[arg(long)]
    id: Option<String>,
    /// In-process bus: the daemon's internal listener (default: server.internal_listen).
    #[arg(long)]
    url: Option<String>,
    /// In-process bus: a client token allowed to use the target.
    #[arg(long, env = "IMBRIDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `imbridge dlq …`.
fn dlq(action: DlqAction) -> ExitCode {
    use imbridge::dlq::{self, Action, Request};
    use imbridge::notify::dlq::Filter;
    let (action, args) = match action {
        DlqAction::List(a) => (Action::List, a),
        DlqAction::Show(a) => (Action::Show, a),
        DlqAction::Replay(a) => (Action::Replay, a),
        DlqAction::Purge { args, all } => (Action::Purge { all }, args),
    };
    let settings = match load(args.config.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let since = match args
        .since
        .as_deref()
        .map(|s| Filter::parse_since(s, std::time::SystemTime::now()))
    {
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Some(Ok(s)) => Some(s),
        None => None,
    };
    let req = Request {
        action,
        target: args.target,
        filter: Filter {
            reason: args.reason,
            since,
            id: args.id,
            limit: args.limit,
        },
        url: args.url,
        token: args.token,
    };
    let outcome = run_async(dlq::run(&settings, &req));
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    for line in &outcome.lines {
        println!("{line}");
    }
    match outcome.error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Exit code for a payload the target cannot use (EX_DATAERR in sysexits.h).
const EXIT_DATA: u8 = 65;

fn render(config: Option<&PathBuf>, target: &str, id: &str) -> ExitCode {
    use std::io::{Read, Write};
    let settings = match load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("cannot read the payload from stdin: {e}");
        return ExitCode::from(EXIT_DATA);
    }
    let preview = match imbridge::notify::preview::preview(&settings.catalog(), target, &body, id) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_DATA);
        }
    };
    for (target, accounts) in &preview.unbound {
        eprintln!(
            "{target}: not bound on this platform, skipped: {}",
            accounts.join(", ")
        );
    }
    for (target, reason, e) in &preview.failed {
        eprintln!(
            "{target}: would be dead-lettered as {}: {e}",
            reason.label()
        );
    }
    if preview.requests.is_empty() && preview.failed.is_empty() {
        eprintln!("{target}: no rule matches this payload; nothing would be sent");
    }
    let mut out = std::io::stdout().lock();
    for (target, to, request) in &preview.requests {
        let body = serde_json::to_string_pretty(&request.body).expect("JSON values serialise");
        if writeln!(out, "# {target}: {to}\n{body}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    if preview.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DATA)
    }
}

fn dingtalk_callback(action: CallbackAction) -> ExitCode {
    use imbridge::ingress::registration::{self, Action, App};
    let (action, args, url, tags) = match action {
        CallbackAction::Failed(args) => return dingtalk_failed(args),
        CallbackAction::Register(a) => (Action::Register, a.app, a.url, a.tags),
        CallbackAction::Update(a) => (Action::Update, a.app, a.url, a.tags),
        CallbackAction::Get(a) => (Action::Get, a, None, Vec::new()),
        CallbackAction::Delete(a) => (Action::Delete, a, None, Vec::new()),
    };
    let settings = match load(args.config.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let name = args.app.as_str();
    let known = settings.dingtalk_apps.contains_key(name)
        || settings.dingtalk_streams.contains_key(name)
        || settings.dingtalk_oapi.contains_key(name);
    if !known {
        let names: std::collections::BTreeSet<&String> = settings
            .dingtalk_apps
            .keys()
            .chain(settings.dingtalk_streams.keys())
            .collect();
        let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
        eprintln!(
            "apps.dingtalk.{name}: no such app (configured: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let app = App {
        name,
        oapi: settings.dingtalk_oapi.get(name),
        callback: settings.dingtalk_apps.get(name),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    match runtime.block_on(registration::run(app, action, url.as_deref(), &tags)) {
        Ok(outcome) => {
            for w in &outcome.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", outcome.output);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `imbridge dingtalk callback failed`: one recovery pass by hand.
fn dingtalk_failed(args: AppArgs) -> ExitCode {
    use imbridge::ingress::recover::{self, OnceError};
    use imbridge::ingress::registration::{EXIT_CONFIG, EXIT_REMOTE};
    let settings = match load(args.config.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let app = args.app.as_str();
    let pass = run_async(recover::once(
        app,
        settings.dingtalk_oapi.get(app),
        &settings.bus,
        &settings.subjects,
    ));
    match pass {
        Ok(pass) => {
            for p in &pass.published {
                let time = p.event_time.map(|t| t.to_string()).unwrap_or_default();
                let note = if p.duplicate {
                    " (already on the bus)"
                } else {
                    ""
                };
                println!("dingtalk.{}\t{time}\t{}{note}", p.tag, p.subject_id);
            }
            eprintln!(
                "{} published from {} page(s); {} unreadable (logged)",
                pass.published.len(),
                pass.pages,
                pass.unreadable
            );
            ExitCode::SUCCESS
        }
        Err(e @ OnceError::NoCredentials(_)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_REMOTE)
        }
    }
}

fn load(path: Option<&PathBuf>) -> Result<config::Settings, ConfigError> {
    match path {
        Some(p) => config::load_file(p),
        None => config::load(None),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(s) => {
                // Allowed, so not a failure; on stderr, where the problems go.
                for w in &s.warnings {
                    eprintln!("warning: {w}");
                }
                println!(
                    "configuration is valid: bus {}, {} DingTalk app(s), ingress {}, admin {}",
                    match s.bus.engine {
                        imbridge::bus::EngineSettings::Memory(_) => "memory",
                        imbridge::bus::EngineSettings::Nats(_) => "nats",
                        imbridge::bus::EngineSettings::Kafka(_) => "kafka",
                    },
                    s.dingtalk_apps.len(),
                    s.server.listen,
                    s.server.admin_listen
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Render { config, target, id } => render(config.as_ref(), &target, &id),
        Command::Dingtalk {
            command: DingTalkCommand::Callback { action },
        } => dingtalk_callback(action),
        Command::Dlq { action } => dlq(action),
        Command::Send(args) => send(args),
        Command::Serve { config, watch } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            imbridge::telemetry::init(&settings.log);
            for w in &settings.warnings {
                tracing::warn!(key = %w.key, "{}", w.message);
            }
            let served = run_async(serve(settings, config, watch));
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "imbridge stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(
    settings: config::Settings,
    path: Option<PathBuf>,
    watch: bool,
) -> anyhow::Result<()> {
    let shutdown = imbridge::shutdown::Shutdown::new();
    shutdown.on_signals()?;
    let app = imbridge::app::App::build(settings, shutdown.clone()).await?;
    let reloads = app.serve_reloads(path, watch)?;
    let served = app.run().await;
    let _ = reloads.await;
    served
}

/// Runs `work` on a runtime of its own and returns its result. The daemon's drain and each
/// command's calls run under their own deadlines; what is still running after (a blocking
/// producer flush that overran them) must not hold the exit up.
fn run_async<F: std::future::Future>(work: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    let output = runtime.block_on(work);
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    output
}
