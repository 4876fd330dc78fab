//! Statistics: the per-stage accounting of a run, as it is collected, and the progress
//! bars people see on a terminal. The report itself is [`PrepareReport`], a type of the
//! trainer-operator contract in `taper_crds::report`.

use std::time::Instant;

pub use taper_crds::report::{PrepareReport, Stage, StageStats};

/// Documents in, documents out and seconds of one stage, summed over batches.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StageAcc {
    pub documents_in: u64,
    pub documents_out: u64,
    pub seconds: f64,
}

impl StageAcc {
    /// Add a batch that entered with `documents_in`, left with `documents_out`, and
    /// started at `started`.
    pub fn add(&mut self, documents_in: usize, documents_out: usize, started: Instant) {
        self.documents_in += documents_in as u64;
        self.documents_out += documents_out as u64;
        self.seconds += started.elapsed().as_secs_f64();
    }

    /// The accumulated counts as the report's entry for `name`.
    pub fn stats(&self, name: Stage) -> StageStats {
        StageStats {
            name,
            documents_in: self.documents_in,
            documents_out: self.documents_out,
            seconds: self.seconds,
        }
    }
}

/// Record a whole stage that started at `started`.
pub(crate) fn record_stage(
    report: &mut PrepareReport,
    name: Stage,
    documents_in: usize,
    documents_out: usize,
    started: Instant,
) {
    let mut acc = StageAcc::default();
    acc.add(documents_in, documents_out, started);
    report.stages.push(acc.stats(name));
}

/// A progress bar for one stage over `len` items (drawn only when stderr is a terminal).
pub(crate) fn stage_bar(stage: &str, len: usize, unit: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{prefix:>14}} {{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  {{elapsed}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(stage.to_string());
    bar
}
