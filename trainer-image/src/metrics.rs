//! Prometheus metrics of a training run, labelled by job kind, namespace and name only
//! (bounded cardinality), served as text on `/metrics`.
//!
//! `taper_val_loss` is exposed only once the first evaluation has set it: a gauge that
//! read 0 before then would look like a perfect model to dashboards and alerts.

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
    /// `taper_train_loss`: latest training loss; set with [`Metrics::set_step`], absent
    /// before the first step (a 0 would be a loss never reached).
    train_loss: Gauge,
    /// `taper_val_loss`: latest validation loss; set it with [`Metrics::set_val_loss`],
    /// which registers it on first use.
    val_loss: Gauge,
    /// `taper_learning_rate`: current learning rate; absent before the first step.
    learning_rate: Gauge,
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
    /// `taper_train_max_steps`: the run's `maxSteps`.
    pub max_steps: IntGauge,
    /// `taper_nonfinite_losses_total`: steps skipped for a NaN or infinite loss.
    pub nonfinite_losses: IntCounter,
    /// `taper_rising_val_losses`: evaluations in a row whose validation loss
    /// rose above the one before (0 after one that did not).
    pub val_loss_rises: IntGauge,
    /// `taper_checkpoint_failures_total`: checkpoint saves that failed.
    pub checkpoint_failures: IntCounter,
    /// `taper_checkpoint_size_bytes`: bytes of the latest checkpoint's files; absent
    /// before the first checkpoint. Set with [`Metrics::set_checkpoint_size`].
    checkpoint_size: IntGauge,
    /// When `/metrics` was scraped: the count and the last two times.
    scrapes: std::sync::Arc<std::sync::Mutex<Scrapes>>,
}

/// What the metrics server saw of its scraper.
#[derive(Debug, Default)]
struct Scrapes {
    count: u64,
    last: Option<std::time::Instant>,
    interval: Option<std::time::Duration>,
}

/// The longest [`Metrics::await_final_scrape`] waits, whatever the scrape interval.
pub const FINAL_SCRAPE_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Metrics {
    /// Wait for the next scrape of `/metrics`, so that the run's last figures (the final
    /// checkpoint's save time, the last loss) reach Prometheus before the process exits:
    /// at most 1.5 scrape intervals as measured between the last two scrapes, and not at
    /// all when nothing has scraped twice (no Prometheus, or a local run). Returns whether
    /// a scrape came.
    pub fn await_final_scrape(&self) -> bool {
        let (start, interval) = match self.scrapes.lock() {
            Ok(s) => (s.count, s.interval),
            Err(_) => return false,
        };
        let Some(interval) = interval else {
            return false;
        };
        let deadline = std::time::Instant::now() + (interval * 3 / 2).min(FINAL_SCRAPE_MAX_WAIT);
        while std::time::Instant::now() < deadline {
            if self.scrapes.lock().is_ok_and(|s| s.count > start) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

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
            max_steps: IntGauge::with_opts(opts(metric::MAX_STEPS, "The run's maxSteps."))?,
            nonfinite_losses: IntCounter::with_opts(opts(
                metric::NONFINITE_LOSSES,
                "Steps skipped because their loss was NaN or infinite.",
            ))?,
            val_loss_rises: IntGauge::with_opts(opts(
                metric::VAL_LOSS_RISES,
                "Evaluations in a row whose validation loss rose above the one before.",
            ))?,
            checkpoint_failures: IntCounter::with_opts(opts(
                metric::CHECKPOINT_FAILURES,
                "Checkpoint saves that failed.",
            ))?,
            checkpoint_size: IntGauge::with_opts(opts(
                metric::CHECKPOINT_SIZE,
                "Bytes of the files of the latest saved checkpoint.",
            ))?,
            scrapes: Default::default(),
            registry,
        };
        m.registry.register(Box::new(m.step.clone()))?;
        m.registry.register(Box::new(m.tokens.clone()))?;
        m.registry.register(Box::new(m.step_duration.clone()))?;
        m.registry.register(Box::new(m.mfu.clone()))?;
        m.registry.register(Box::new(m.checkpoint_save.clone()))?;
        m.registry.register(Box::new(m.max_steps.clone()))?;
        m.registry.register(Box::new(m.nonfinite_losses.clone()))?;
        m.registry.register(Box::new(m.val_loss_rises.clone()))?;
        m.registry
            .register(Box::new(m.checkpoint_failures.clone()))?;
        Ok(m)
    }

    /// Register `collector` unless it already is (its series appears with its first value).
    fn expose(&self, collector: Box<dyn prometheus::core::Collector>) {
        // AlreadyReg after the first call: the metric is already exposed.
        let _ = self.registry.register(collector);
    }

    /// Set `taper_train_loss` and `taper_learning_rate` after a step (they are absent
    /// before the first).
    pub fn set_step(&self, loss: f64, lr: f64) {
        self.train_loss.set(loss);
        self.learning_rate.set(lr);
        self.expose(Box::new(self.train_loss.clone()));
        self.expose(Box::new(self.learning_rate.clone()));
    }

    /// Set `taper_checkpoint_size_bytes` after a save (absent before the first).
    pub fn set_checkpoint_size(&self, bytes: i64) {
        self.checkpoint_size.set(bytes);
        self.expose(Box::new(self.checkpoint_size.clone()));
    }

    /// Set `taper_val_loss`, registering it the first time (it is absent before).
    pub fn set_val_loss(&self, loss: f64) {
        self.val_loss.set(loss);
        // AlreadyReg after the first call: the gauge is already exposed.
        let _ = self.registry.register(Box::new(self.val_loss.clone()));
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
                    let body = metrics.render();
                    if let Ok(mut s) = metrics.scrapes.lock() {
                        let now = std::time::Instant::now();
                        s.interval = s.last.map(|l| now - l);
                        s.last = Some(now);
                        s.count += 1;
                    }
                    ("200 OK", body)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(addr: SocketAddr) {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let _ = write!(s, "GET /metrics HTTP/1.1\r\n\r\n");
        let _ = s.read_to_string(&mut String::new());
    }

    #[test]
    fn the_end_waits_for_one_more_scrape_only_when_something_scrapes() {
        let m = Metrics::new("PretrainJob", "ml", "gpt").expect("metrics");
        let addr = m
            .serve("127.0.0.1:0".parse().expect("addr"))
            .expect("serve");
        let t = std::time::Instant::now();
        assert!(!m.await_final_scrape(), "never scraped: no wait");
        scrape(addr);
        std::thread::sleep(std::time::Duration::from_millis(200));
        scrape(addr);
        // Scraped every ~200 ms: the next scrape is waited for (up to ~300 ms).
        let next = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            scrape(addr);
        });
        assert!(m.await_final_scrape(), "the scrape after the end came");
        let _ = next.join();
        assert!(!m.await_final_scrape(), "no scrape came in 1.5 intervals");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn values_not_yet_known_are_absent_and_labels_are_bounded() {
        let m = Metrics::new("PretrainJob", "ml", "gpt").expect("metrics");
        let before = m.render();
        // No loss, learning rate or checkpoint before the first step and save: a 0 there
        // would draw a loss never reached.
        let later = [
            metric::VAL_LOSS,
            metric::TRAIN_LOSS,
            metric::LEARNING_RATE,
            metric::CHECKPOINT_SIZE,
        ];
        for name in later {
            assert!(!before.contains(&format!("{name}{{")), "{name}:\n{before}");
        }
        for name in metric::ALL.iter().filter(|n| !later.contains(n)) {
            assert!(before.contains(name), "{name} missing:\n{before}");
        }
        m.set_val_loss(3.25);
        m.set_val_loss(3.5);
        m.set_step(4.0, 6e-4);
        m.set_step(3.75, 5e-4);
        m.set_checkpoint_size(1024);
        let after = m.render();
        let labels = "{kind=\"PretrainJob\",name=\"gpt\",namespace=\"ml\"}";
        for (name, value) in [
            (metric::VAL_LOSS, "3.5"),
            (metric::TRAIN_LOSS, "3.75"),
            (metric::LEARNING_RATE, "0.0005"),
            (metric::CHECKPOINT_SIZE, "1024"),
        ] {
            let line = format!("{name}{labels} {value}");
            assert!(after.contains(&line), "{line}:\n{after}");
            assert_eq!(
                after.matches(&format!("# TYPE {name} gauge")).count(),
                1,
                "{name}"
            );
        }
    }
}
