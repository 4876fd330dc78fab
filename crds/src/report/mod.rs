//! The trainer's reports, typed: what `taper` prints and publishes, and the pure
//! functions that turn those reports into resource statuses.
//!
//! - [`progress`]: the JSON lines of a training run ([`ProgressEvent`]) and
//!   [`JobStatus::observe`](crate::JobStatus::observe).
//! - [`prepare`]: a prepare run's [`PrepareReport`] with its closed [`DropReason`], and
//!   [`DatasetStatus::record_published`](crate::DatasetStatus::record_published).
//! - [`shards`]: the published dataset's `manifest.json` and shards.
//!
//! The trainer serialises these types and nothing else; the operator parses them.

pub mod prepare;
pub mod progress;
pub mod shards;

pub use prepare::{
    DropReason, Example, Normalization, PrepareReport, SourceStats, Stage, StageStats,
    SubstringStats,
};
pub use progress::{
    CheckpointSaved, Done, EvalAction, EvalReport, Exported, NonFiniteLoss, Outcome, ProgressEvent,
    Started, StepReport,
};
pub use shards::{DatasetManifest, MaskInfo, ShardInfo, TokenDtype};
