//! imbridge's benchmarks: `bench/run` builds in release mode and runs `imbridge-bench all`,
//! which measures the ingress and the notify pipeline against baselines taken in the same run
//! on the same machine, and writes `bench/REPORT.md` and `bench/chart.svg`. See
//! bench/README.md.

mod api;
mod callbacks;
mod ingress;
mod load;
mod notify;
mod procs;
mod report;
mod stream;
mod webhook;
mod wire;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything, then the report.
    All {
        /// Where results/*.json, REPORT.md and chart.svg go.
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        /// Measured seconds per load point.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Ingress and baselines only (results/ingress.json, results/memory.json).
    Ingress {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The memory scenario only (results/memory.json): quick to repeat while profiling.
    Memory {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
    /// The API gateway against direct calls only (results/api.json).
    Api {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Webhook forwarding against a raw client only (results/webhook.json).
    Webhook {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// DingTalk Stream events against the raw publish only (results/stream.json).
    Stream {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The notify pipeline only (results/notify.json).
    Notify {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
    /// Rewrite REPORT.md and chart.svg from results/*.json.
    Report {
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
    /// Baseline (a): a trivial hyper server answering 200 to everything.
    OkServer {
        #[arg(long)]
        port: u16,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Cmd::OkServer { port } => runtime.block_on(ingress::ok_server(port)),
        Cmd::All { out, seconds } => runtime.block_on(async {
            let d = Duration::from_secs(seconds);
            ingress::run(&out, d).await?;
            api::run(&out, d).await?;
            webhook::run(&out, d).await?;
            stream::run(&out, d).await?;
            notify::run(&out).await?;
            report::write(&out)
        }),
        Cmd::Ingress { out, seconds } => {
            runtime.block_on(ingress::run(&out, Duration::from_secs(seconds)))?;
            report::write(&out)
        }
        Cmd::Memory { out } => {
            runtime.block_on(ingress::run_memory(&out))?;
            report::write(&out)
        }
        Cmd::Api { out, seconds } => {
            runtime.block_on(api::run(&out, Duration::from_secs(seconds)))?;
            report::write(&out)
        }
        Cmd::Webhook { out, seconds } => {
            runtime.block_on(webhook::run(&out, Duration::from_secs(seconds)))?;
            report::write(&out)
        }
        Cmd::Stream { out, seconds } => {
            runtime.block_on(stream::run(&out, Duration::from_secs(seconds)))?;
            report::write(&out)
        }
        Cmd::Notify { out } => {
            runtime.block_on(notify::run(&out))?;
            report::write(&out)
        }
        Cmd::Report { out } => report::write(&out),
    }
}

/// Writes one scenario's results as `out/results/<name>.json`.
pub fn save<T: serde::Serialize>(
    out: &std::path::Path,
    name: &str,
    value: &T,
) -> anyhow::Result<()> {
    let dir = out.join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_vec_pretty(value)?,
    )?;
    Ok(())
}
