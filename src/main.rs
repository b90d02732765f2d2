//! The `imbridge` command: wires configuration, logging and signals to [`imbridge::app`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imbridge::config::{self, ConfigError};

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
        /// TOML configuration file; without it, defaults and IMBRIDGE_ variables only.
        #[arg(long, short)]
        config: Option<PathBuf>,
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
        Command::Serve { config } => {
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
            let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
            let served = runtime.block_on(serve(settings));
            // The drain already ran under its own deadline; what is still running (a blocking
            // producer flush that overran it) must not hold the exit up.
            runtime.shutdown_timeout(std::time::Duration::from_millis(500));
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

async fn serve(settings: config::Settings) -> anyhow::Result<()> {
    let shutdown = imbridge::shutdown::Shutdown::new();
    shutdown.on_signals()?;
    imbridge::app::App::build(settings, shutdown)
        .await?
        .run()
        .await
}
