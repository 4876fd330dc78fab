//! `taper-e2e`: start the suite's real components by hand.
//!
//!   cargo run -p taper-e2e -- up                # control plane + pod runner until Ctrl-C
//!   cargo run -p taper-e2e -- up --no-runner    # control plane only: pods stay Pending

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use taper_e2e::{
    cluster::{self, ClusterOptions, ControlPlane},
    runner::{PodRunner, RunnerOptions},
};

/// Taper's end-to-end harness.
#[derive(Debug, Parser)]
#[command(name = "taper-e2e", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start etcd, kube-apiserver, kube-controller-manager and the pod runner; print the
    /// kubeconfig; stop everything on Ctrl-C or SIGTERM.
    Up {
        /// Folder for certificates, kubeconfigs, logs and pods (default: a temporary one,
        /// removed on exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The `taper` binary that stands for the trainer image.
        #[arg(long)]
        taper_bin: Option<PathBuf>,
        /// Start no pod runner: no node registers and nothing schedules or runs pods, so
        /// every pod stays Pending (what `scripts/bench/operator_scale.py` measures on).
        #[arg(long, conflicts_with = "taper_bin")]
        no_runner: bool,
    },
}

async fn up(
    dir: Option<PathBuf>,
    taper_bin: Option<PathBuf>,
    no_runner: bool,
) -> anyhow::Result<()> {
    let keep = dir.is_some();
    let plane = ControlPlane::start(ClusterOptions {
        dir: dir.clone(),
        keep_dir: keep,
        ..Default::default()
    })
    .await?;
    let work = plane.dir().join("runner");
    let runner = if no_runner {
        None
    } else {
        let bin = taper_bin.unwrap_or_else(taper_e2e::taper_bin);
        Some(
            PodRunner::start(
                plane
                    .client(&cluster::node_user(cluster::NODE_NAME))
                    .await?,
                plane.client("system:kube-scheduler").await?,
                RunnerOptions::new(cluster::NODE_NAME, bin, work.clone()),
            )
            .await?,
        )
    };
    println!("control plane up at {}", plane.server());
    println!("  export KUBECONFIG={}", plane.kubeconfig().display());
    println!("  component logs: {}", plane.dir().join("logs").display());
    if runner.is_some() {
        println!("  pod logs:       {}", work.join("logs").display());
    } else {
        println!("  no pod runner: pods stay Pending");
    }
    println!("Ctrl-C stops everything.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
    if let Some(runner) = runner {
        runner.shutdown().await;
    }
    drop(plane);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Readiness polling makes the client log every refused connection.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube_client::client::builder=off".into()),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taper-e2e: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up {
            dir,
            taper_bin,
            no_runner,
        } => rt.block_on(up(dir, taper_bin, no_runner)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taper-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}
