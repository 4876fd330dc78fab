//! The operator's HTTP endpoints: `/healthz` (the process is alive), `/readyz` (it
//! reached the API server) and `/metrics`. One tiny HTTP/1.1 responder; nothing else is
//! served.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone, Debug)]
pub struct Health {
    /// Set once the API server answered.
    pub ready: Arc<AtomicBool>,
    /// The metrics to render.
    pub metrics: Metrics,
}

fn respond(health: &Health, path: &str) -> (&'static str, String) {
    match path {
        "/healthz" => ("200 OK", "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::SeqCst) => ("200 OK", "ok\n".into()),
        "/readyz" => ("503 Service Unavailable", "not ready\n".into()),
        "/metrics" => ("200 OK", health.metrics.render()),
        _ => ("404 Not Found", "not found\n".into()),
    }
}

/// Serve the endpoints on `addr` until the task is dropped; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = respond(&health, path);
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = write.write_all(head.as_bytes()).await;
                let _ = write.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok((bound, task))
}
