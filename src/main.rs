//! The `vmkeep` binary: command-line parsing and wiring only.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use vmkeep::{api, operator, telemetry};

#[derive(Parser)]
#[command(
    name = "vmkeep",
    version,
    about = "VM disk images on Kubernetes, persistent or cloned per VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the usual kubeconfig rules.
    Run {
        /// Address of `/healthz`, `/readyz` and `/metrics`.
        #[arg(long, env = "VMKEEP_HTTP_ADDR", default_value = "0.0.0.0:8080")]
        http_addr: SocketAddr,
        /// Log format.
        #[arg(long, env = "VMKEEP_LOG_FORMAT", value_enum, default_value_t)]
        log_format: telemetry::LogFormat,
    },
    /// Print every CRD as YAML (or write one file per CRD into a folder).
    Crd {
        /// Write `<plural>.<group>.yaml` files into this folder instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            http_addr,
            log_format,
        } => {
            telemetry::init(log_format);
            operator::run(operator::RunOptions { http_addr }).await
        }
        Command::Crd { dir } => write_crds(dir),
    }
}

fn write_crds(dir: Option<PathBuf>) -> anyhow::Result<()> {
    for crd in api::crds() {
        let yaml = api::crd_yaml(&crd)?;
        match &dir {
            Some(dir) => {
                let path = dir.join(api::crd_file_name(&crd));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
