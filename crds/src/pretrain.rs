//! `PretrainJob`: pretrain a GPT from scratch on a pretraining Dataset.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    job::{JobStatus, LocalRef, RunPolicy},
    model::{ModelSpec, n_head_divides_n_embd_rule},
    resources::Resources,
    training::{
        Checkpoints, Evaluation, Overfitting, PRETRAIN_DEFAULTS, ResolvedTraining, Training,
        learning_rate_order_rule, warmup_rule,
    },
};

/// Pretrain a GPT from scratch on the tokenized shards of a `pretraining` Dataset, with
/// checkpoints in object storage and progress in status and Prometheus.
// clippy mistakes the repeated `printcolumn(type_ = ...)` arguments for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "taper.dev",
    version = "v1alpha1",
    kind = "PretrainJob",
    namespaced,
    doc = "A PretrainJob pretrains a GPT from scratch on a pretraining Dataset.",
    status = "JobStatus",
    shortname = "pj",
    category = "taper",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.step"),
    printcolumn(name = "Train Loss", type_ = "number", json_path = ".status.trainLoss"),
    printcolumn(name = "Val Loss", type_ = "number", json_path = ".status.valLoss"),
    printcolumn(
        name = "Tokens/s",
        type_ = "number",
        json_path = ".status.tokensPerSecond",
        priority = 1
    ),
    printcolumn(
        name = "ETA",
        type_ = "string",
        json_path = ".status.eta",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PretrainJobSpec {
    /// The `pretraining` Dataset to train on, in the same namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("datasetRef is immutable"))]
    pub dataset_ref: LocalRef,
    /// Architecture: a preset with optional overrides. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("model is immutable"))]
    #[x_kube(validation = n_head_divides_n_embd_rule())]
    pub model: ModelSpec,
    /// Optimizer, schedule and batch. Defaults follow nanoGPT's GPT-2 recipe.
    #[serde(default)]
    #[x_kube(validation = learning_rate_order_rule(&PRETRAIN_DEFAULTS))]
    #[x_kube(validation = warmup_rule(&PRETRAIN_DEFAULTS))]
    pub training: Training,
    /// Evaluation interval and length. Default: every 2000 steps, 200 batches.
    #[serde(default)]
    pub evaluation: Evaluation,
    /// What to do when validation loss stops improving. Default: stop after 5 evaluations
    /// without improvement; the best checkpoint is always kept.
    #[serde(default)]
    pub overfitting: Overfitting,
    /// Checkpoint interval, retention and location.
    #[serde(default)]
    pub checkpoints: Checkpoints,
    /// GPUs, CPU, memory and placement of the trainer pod. Default: 1 GPU.
    #[serde(default)]
    pub resources: Resources,
    /// Image, suspension, restarts and clean-up.
    #[serde(flatten)]
    pub run: RunPolicy,
}

impl PretrainJobSpec {
    /// Training settings with nanoGPT's defaults filled in.
    pub fn resolved_training(&self) -> ResolvedTraining {
        self.training.resolve(&self.evaluation, &PRETRAIN_DEFAULTS)
    }
}
