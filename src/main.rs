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
                println!(
                    "configuration is valid: bus {}, {} DingTalk app(s), ingress {}, admin {}",
                    match s.bus.engine {
                        config::EngineSettings::Memory(_) => "memory",
                        config::EngineSettings::Nats(_) => "nats",
                        config::EngineSettings::Kafka(_) => "kafka",
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
        Command::Serve { config } => {
            let settings = match load(config.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            imbridge::telemetry::init(&settings.log);
            let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
            match runtime.block_on(serve(settings)) {
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
