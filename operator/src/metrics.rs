//! The operator's own metrics: reconciliations, errors by bounded category, reconcile
//! duration, and resources per kind and phase. No per-job series: the trainer pods
//! export those, so nothing lingers when jobs are deleted.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The operator's metrics, registered in their own registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `taper_operator_reconciliations_total{kind}`.
    pub reconciliations: IntCounterVec,
    /// `taper_operator_reconcile_errors_total{kind,category}`.
    pub errors: IntCounterVec,
    /// `taper_operator_reconcile_duration_seconds{kind}`.
    pub duration: HistogramVec,
    /// `taper_jobs{kind,phase}`.
    pub jobs: IntGaugeVec,
}

impl Metrics {
    /// New metrics in a new registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "taper_operator_reconciliations_total",
                "Reconciliations run, per kind.",
            ),
            &["kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "taper_operator_reconcile_errors_total",
                "Reconciliations that failed, per kind and error category.",
            ),
            &["kind", "category"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "taper_operator_reconcile_duration_seconds",
                "Time one reconciliation took.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["kind"],
        )?;
        let jobs = IntGaugeVec::new(
            Opts::new("taper_jobs", "Taper resources per kind and phase."),
            &["kind", "phase"],
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        Ok(Self {
            registry,
            reconciliations,
            errors,
            duration,
            jobs,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder
            .encode_utf8(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}
