//! Pieces shared by the two training kinds: references, run policy and status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::{Condition, JobPhase};

/// A reference to another Taper resource in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRef {
    /// Name of the referenced resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_max_restarts() -> i32 {
    3
}

/// How the operator runs the trainer pod. Flattened into the job spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Trainer image. Default: the operator's configured image (the one it was released with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Stop the running pod (after a checkpoint) and start none while true. Default: false.
    #[serde(default)]
    pub suspend: bool,
    /// Pod failures tolerated before the job is marked Failed. Preemptions and evictions
    /// do not count. Default: 3.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: i32,
    /// Delete the job's pods (not its checkpoints) this many seconds after it finishes.
    /// Default: unset, keep them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Fail the job once its Job has been active this long, in seconds (the Job's
    /// `activeDeadlineSeconds`: counted from its start, through restarts; the clock
    /// starts again when the job resumes after a suspension). The running pod gets
    /// SIGTERM and saves a checkpoint; the job fails with `DeadlineExceeded`. Default:
    /// unset, no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// What deleting the resource does to what it wrote to the store (checkpoints and
    /// outputs, everything under the job's prefix): `Retain` (default) keeps it; `Delete`
    /// removes it with a short cleanup Job before the resource goes (a finalizer holds the
    /// deletion until then, and the operator never holds storage credentials).
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

/// What happens to a job's stored data when the job is deleted.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum ReclaimPolicy {
    /// Keep everything the job wrote.
    #[default]
    Retain,
    /// Delete everything under the job's store prefix.
    Delete,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            image: None,
            suspend: false,
            max_restarts: default_max_restarts(),
            ttl_seconds_after_finished: None,
            active_deadline_seconds: None,
            reclaim_policy: ReclaimPolicy::Retain,
        }
    }
}

/// One published checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    /// Optimizer step at which it was taken.
    pub step: i64,
    /// Training tokens seen up to that step.
    #[serde(default)]
    pub tokens: i64,
    /// Validation loss at that step, if an evaluation ran there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// URI of the checkpoint's manifest prefix.
    pub uri: String,
    /// sha256 of the checkpoint's manifest, which lists the sha256 of every file in it.
    #[serde(default)]
    pub sha256: String,
}

/// Observed state of a PretrainJob or FinetuneJob.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: JobPhase,
    /// Conditions (`InputsReady`, `Progressing`, `Suspended`, `Ready`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the current (or last) trainer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Last optimizer step reported by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// Training tokens processed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<i64>,
    /// The step the run ends at (`maxSteps`), as the trainer reported it at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<i64>,
    /// Estimated completion time: the remaining steps at the current throughput. Absent
    /// before the first step and once the run ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Time>,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Latest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Lowest validation loss so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_loss: Option<f64>,
    /// Training throughput over the last reporting window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Model FLOPs utilisation over the last reporting window, as a fraction of peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Current learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// URI of the newest complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// URI of the checkpoint with the lowest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_checkpoint: Option<String>,
    /// Retained checkpoints, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Pod failures so far (preemptions and evictions excluded).
    #[serde(default)]
    pub restarts: i32,
    /// When the first trainer pod started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
