//! `taper-operator`: flags, logging, endpoints, leader election, then the controllers.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use clap::Parser;
use taper_operator::{config::Config, http, metrics::Metrics, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // kube's rustls client needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match operate(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn operate(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let health = http::Health {
        ready: ready.clone(),
        metrics: metrics.clone(),
    };
    let (health_addr, _h) = http::serve(cfg.health_addr, health.clone()).await?;
    let metrics_addr = if cfg.metrics_addr == cfg.health_addr {
        health_addr
    } else {
        http::serve(cfg.metrics_addr, health).await?.0
    };
    tracing::info!(%health_addr, %metrics_addr, "serving /healthz, /readyz and /metrics");
    let client = kube::Client::try_default().await?;
    client.apiserver_version().await?;
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    if cfg.leader_election {
        tracing::info!(lease = %cfg.lease_name, "waiting to lead");
        let mut leading = run::lead(client.clone(), &cfg).await?;
        tracing::info!("leading: starting the controllers");
        tokio::select! {
            () = run::controllers(client, cfg, metrics) => {}
            _ = async {
                while leading.changed().await.is_ok() {
                    if !*leading.borrow() {
                        break;
                    }
                }
            } => {
                return Err("lost the leader lease; exiting so that a fresh process campaigns again".into());
            }
        }
    } else {
        run::controllers(client, cfg, metrics).await;
    }
    tracing::info!("stopped");
    Ok(())
}
