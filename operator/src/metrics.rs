//! The operator's own metrics: reconciliations, errors by bounded category, reconcile
//! duration, resources per kind and phase, and each resource's phase
//! (`taper_job_phase{kind,namespace,name,phase} 1`, one series per existing resource,
//! removed with it, as kube-state-metrics does for pods): what the "job Failed" and
//! "stalled while Running" alerts read. Training figures come from the trainer pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The kinds the operator reconciles.
pub const KINDS: [&str; 3] = ["Dataset", "PretrainJob", "FinetuneJob"];
/// Every reconcile error category (`controller::Error::category`).
pub const ERROR_CATEGORIES: [&str; 6] = [
    "conflict",
    "forbidden",
    "invalid",
    "api",
    "transport",
    "serialization",
];

/// (namespace, name, phase) of one resource.
pub type JobPhase = (String, String, String);

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
    /// `taper_job_phase{kind,namespace,name,phase}`: 1 for each resource's current phase.
    job_phase: IntGaugeVec,
    /// The series of `job_phase` set last, per kind, so stale ones can be removed.
    phases_set: Arc<Mutex<BTreeMap<String, BTreeSet<JobPhase>>>>,
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
        let job_phase = IntGaugeVec::new(
            Opts::new(
                "taper_job_phase",
                "1 for the current phase of each Taper resource.",
            ),
            &["kind", "namespace", "name", "phase"],
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(job_phase.clone()))?;
        // Every series at 0 from the start, so that rate() and increase() see the first
        // reconciliation and the first error of each kind and category.
        for kind in KINDS {
            reconciliations.with_label_values(&[kind]);
            for category in ERROR_CATEGORIES {
                errors.with_label_values(&[kind, category]);
            }
        }
        Ok(Self {
            registry,
            reconciliations,
            errors,
            duration,
            jobs,
            job_phase,
            phases_set: Arc::default(),
        })
    }

    /// Set `taper_job_phase` for every resource of `kind` now known, and remove the series
    /// of resources gone or moved to another phase (no series is ever briefly absent).
    pub fn set_job_phases(&self, kind: &str, current: BTreeSet<JobPhase>) {
        let mut set = self.phases_set.lock().unwrap_or_else(|e| e.into_inner());
        for (ns, name, phase) in &current {
            self.job_phase
                .with_label_values(&[kind, ns, name, phase])
                .set(1);
        }
        if let Some(before) = set.get(kind) {
            for (ns, name, phase) in before.difference(&current) {
                let _ = self.job_phase.remove_label_values(&[kind, ns, name, phase]);
            }
        }
        set.insert(kind.to_string(), current);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(ns: &str, name: &str, phase: &str) -> JobPhase {
        (ns.into(), name.into(), phase.into())
    }

    #[test]
    fn job_phase_follows_the_resources_and_drops_the_gone() {
        let m = Metrics::new().expect("metrics");
        m.set_job_phases(
            "PretrainJob",
            BTreeSet::from([phase("ml", "a", "Running"), phase("ml", "b", "Pending")]),
        );
        m.set_job_phases("Dataset", BTreeSet::from([phase("ml", "d", "Ready")]));
        m.set_job_phases("PretrainJob", BTreeSet::from([phase("ml", "a", "Failed")]));
        let text = m.render();
        for category in ERROR_CATEGORIES {
            let zero = format!(
                "taper_operator_reconcile_errors_total{{category=\"{category}\",kind=\"Dataset\"}} 0"
            );
            assert!(text.contains(&zero), "{zero}");
        }
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("taper_job_phase{"))
            .collect();
        assert_eq!(
            series,
            [
                r#"taper_job_phase{kind="Dataset",name="d",namespace="ml",phase="Ready"} 1"#,
                r#"taper_job_phase{kind="PretrainJob",name="a",namespace="ml",phase="Failed"} 1"#,
            ],
            "{text}"
        );
    }
}
