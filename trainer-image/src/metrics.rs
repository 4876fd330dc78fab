//! Prometheus metrics of a training run, labelled by job kind, namespace and name only
//! (bounded cardinality), served as text on `/metrics`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder,
};
use taper_crds::pod::metric;

/// The metrics of one training run.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `taper_train_loss`: latest training loss.
    pub train_loss: Gauge,
    /// `taper_val_loss`: latest validation loss.
    pub val_loss: Gauge,
    /// `taper_learning_rate`: current learning rate.
    pub learning_rate: Gauge,
    /// `taper_train_step`: optimizer steps taken.
    pub step: IntGauge,
    /// `taper_train_tokens_total`: training tokens consumed.
    pub tokens: IntCounter,
    /// `taper_step_duration_seconds`: wall time per optimizer step.
    pub step_duration: Histogram,
    /// `taper_mfu_ratio`: model FLOPs utilisation (0–1).
    pub mfu: Gauge,
    /// `taper_checkpoint_save_duration_seconds`: time to write a checkpoint.
    pub checkpoint_save: Histogram,
}

impl Metrics {
    /// Metrics labelled `kind`, `namespace`, `name`.
    pub fn new(kind: &str, namespace: &str, name: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |n: &str, help: &str| {
            Opts::new(n, help)
                .const_label(metric::LABELS[0], kind)
                .const_label(metric::LABELS[1], namespace)
                .const_label(metric::LABELS[2], name)
        };
        let hist = |n: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(n, help)
                .const_label(metric::LABELS[0], kind)
                .const_label(metric::LABELS[1], namespace)
                .const_label(metric::LABELS[2], name)
                .buckets(buckets)
        };
        let m = Self {
            train_loss: Gauge::with_opts(opts(
                metric::TRAIN_LOSS,
                "Latest training loss (nats per token).",
            ))?,
            val_loss: Gauge::with_opts(opts(
                metric::VAL_LOSS,
                "Latest validation loss (nats per token).",
            ))?,
            learning_rate: Gauge::with_opts(opts(metric::LEARNING_RATE, "Current learning rate."))?,
            step: IntGauge::with_opts(opts(metric::TRAIN_STEP, "Optimizer steps taken."))?,
            tokens: IntCounter::with_opts(opts(metric::TRAIN_TOKENS, "Training tokens consumed."))?,
            step_duration: Histogram::with_opts(hist(
                metric::STEP_DURATION,
                "Wall time of one optimizer step.",
                prometheus::exponential_buckets(0.01, 2.0, 16)?,
            ))?,
            mfu: Gauge::with_opts(opts(
                metric::MFU,
                "Model FLOPs utilisation, as a fraction of the configured peak.",
            ))?,
            checkpoint_save: Histogram::with_opts(hist(
                metric::CHECKPOINT_SAVE_DURATION,
                "Time to write one checkpoint to the store.",
                prometheus::exponential_buckets(0.1, 2.0, 14)?,
            ))?,
            registry,
        };
        m.registry.register(Box::new(m.train_loss.clone()))?;
        m.registry.register(Box::new(m.val_loss.clone()))?;
        m.registry.register(Box::new(m.learning_rate.clone()))?;
        m.registry.register(Box::new(m.step.clone()))?;
        m.registry.register(Box::new(m.tokens.clone()))?;
        m.registry.register(Box::new(m.step_duration.clone()))?;
        m.registry.register(Box::new(m.mfu.clone()))?;
        m.registry.register(Box::new(m.checkpoint_save.clone()))?;
        Ok(m)
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered metric families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Serve `/metrics` on `addr` from a background thread. Returns the bound address
    /// (useful with port 0).
    pub fn serve(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let metrics = self.clone();
        std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if path == "/metrics" {
                    ("200 OK", metrics.render())
                } else {
                    ("404 Not Found", "not found; metrics are at /metrics\n".to_string())
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
        Ok(bound)
    }
}
