//! Training hyper-parameters, evaluation, overfitting policy and checkpointing, shared by
//! PretrainJob and FinetuneJob.
//!
//! Every hyper-parameter is optional in the manifest; the kind supplies its defaults
//! ([`PRETRAIN_DEFAULTS`] follow nanoGPT's GPT-2 recipe, [`FINETUNE_DEFAULTS`] follow
//! lit-gpt's LoRA recipe) and [`Training::resolve`] turns the two into concrete numbers.
//! Rules that compare two fields are generated from the same defaults
//! ([`learning_rate_order_rule`], [`warmup_rule`]), so the API server checks the effective
//! values, not only the ones a user happened to write.

use kube::{
    KubeSchema,
    core::{Message, Rule},
};
use serde::{Deserialize, Serialize};

use crate::store::{StoreAccess, URI_SCHEME_MESSAGE, URI_SCHEME_RULE};

/// Numeric precision of training.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Precision {
    /// bfloat16 compute with fp32 master weights and optimizer state.
    #[default]
    #[serde(rename = "bf16")]
    Bf16,
    /// Plain fp32.
    #[serde(rename = "f32")]
    F32,
}

/// Optimizer, schedule and batch settings. Unset fields take the job kind's defaults,
/// stated per field as `pretraining / finetuning`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Training {
    /// Sequences per micro-batch per GPU. Default: 12 / 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: Option<i64>,
    /// Micro-batches accumulated before each optimizer step. Default: 40 / 32 (nanoGPT's
    /// 5 × 8 GPUs, lit-gpt's 128 / 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub gradient_accumulation_steps: Option<i64>,
    /// Optimizer steps to train for. Default: 600000 / 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,
    /// Peak learning rate, reached at the end of warmup. Default: 6e-4 / 3e-4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("learningRate must be greater than 0"))]
    pub learning_rate: Option<f64>,
    /// Learning rate at the end of the cosine decay. Default: 6e-5 / 6e-5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("minLearningRate must not be negative"))]
    pub min_learning_rate: Option<f64>,
    /// Steps of linear warmup from 0 to `learningRate`. Default: 2000 / 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub warmup_steps: Option<i64>,
    /// Steps over which the rate decays (cosine) to `minLearningRate`. Default: `maxSteps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub decay_steps: Option<i64>,
    /// Decoupled AdamW weight decay, applied to weight matrices and embeddings only (never
    /// to biases or LayerNorm parameters). Default: 0.1 / 0.01.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("weightDecay must not be negative"))]
    pub weight_decay: Option<f64>,
    /// AdamW `[beta1, beta2]`. Default: `[0.9, 0.95]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) == 2 && self.all(b, double(b) >= 0.0 && double(b) < 1.0)").message("betas must be two numbers in [0, 1)"))]
    #[schemars(length(min = 2, max = 2))]
    pub betas: Option<Vec<f64>>,
    /// Clip the global gradient norm to this value; 0 disables clipping. Default: 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("gradClip must not be negative (0 disables clipping)"))]
    pub grad_clip: Option<f64>,
    /// Numeric precision. Default: `bf16` on GPUs and `f32` on CPUs (which emulate bf16
    /// arithmetic, slowly); a precision set here is used on either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Seed of weight initialisation, dropout and batch sampling. Default: 1337.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
}

/// How often and how long to evaluate. Unset fields take the kind's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// Evaluate every this many optimizer steps. Default: 2000 / 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub interval: Option<i64>,
    /// Batches averaged for each of the train and test losses. Default: 200 / 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub iterations: Option<i64>,
}

/// What to do when validation loss stops improving.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum OverfittingAction {
    /// Keep training on schedule (the best checkpoint is still kept).
    None,
    /// Multiply the learning rate (and the rest of its schedule) by `factor`.
    ReduceLearningRate,
    /// Stop training; the job succeeds with the best checkpoint as its result.
    #[default]
    StopEarly,
}

fn default_patience() -> i64 {
    5
}
fn default_factor() -> f64 {
    0.5
}

/// Policy applied when validation loss has not improved for `patience` evaluations. The
/// best checkpoint (lowest validation loss) is always kept, whatever the action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Overfitting {
    /// What to do. Default: `StopEarly`.
    #[serde(default)]
    pub action: OverfittingAction,
    /// Evaluations without improvement before acting. Default: 5.
    #[serde(default = "default_patience")]
    #[schemars(range(min = 1, max = 1000))]
    pub patience: i64,
    /// Multiplier of the learning rate for `ReduceLearningRate`, in (0, 1). Default: 0.5.
    #[serde(default = "default_factor")]
    #[x_kube(validation = Rule::new("double(self) > 0.0 && double(self) < 1.0").message("overfitting.factor must be in (0, 1)"))]
    pub factor: f64,
    /// An improvement smaller than this does not count. Default: 0.
    #[serde(default)]
    #[x_kube(validation = Rule::new("double(self) >= 0.0").message("overfitting.minDelta must not be negative"))]
    pub min_delta: f64,
}

impl Default for Overfitting {
    fn default() -> Self {
        Self {
            action: OverfittingAction::default(),
            patience: default_patience(),
            factor: default_factor(),
            min_delta: 0.0,
        }
    }
}

fn default_keep() -> i64 {
    3
}

/// Where and how often to checkpoint. A checkpoint holds weights, optimizer state, data
/// position and RNG state, so a resumed run continues exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoints {
    /// Save every this many optimizer steps (and on SIGTERM). Default: the evaluation interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub interval: Option<i64>,
    /// Newest checkpoints to keep; the best one is kept in addition. Default: 3.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i64,
    /// Prefix under which checkpoints are written. Default: the operator's bucket,
    /// `<bucket>/<namespace>/<kind>/<name>/checkpoints/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(URI_SCHEME_RULE).message(URI_SCHEME_MESSAGE))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// Object-store access for `uri`. Unset: the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoreAccess>,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            interval: None,
            keep: default_keep(),
            uri: None,
            access: None,
        }
    }
}

/// A kind's defaults for every optional field of [`Training`] and [`Evaluation`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainingDefaults {
    /// Micro-batch size.
    pub batch_size: i64,
    /// Gradient accumulation steps.
    pub gradient_accumulation_steps: i64,
    /// Optimizer steps.
    pub max_steps: i64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Final learning rate.
    pub min_learning_rate: f64,
    /// Warmup steps.
    pub warmup_steps: i64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// Gradient clipping norm.
    pub grad_clip: f64,
    /// Evaluation interval in steps.
    pub eval_interval: i64,
    /// Batches per evaluation.
    pub eval_iterations: i64,
}

/// nanoGPT's GPT-2 (124M) recipe on 8 GPUs: about 0.5M tokens per step at block size 1024.
pub const PRETRAIN_DEFAULTS: TrainingDefaults = TrainingDefaults {
    batch_size: 12,
    gradient_accumulation_steps: 40,
    max_steps: 600_000,
    learning_rate: 6e-4,
    min_learning_rate: 6e-5,
    warmup_steps: 2000,
    weight_decay: 0.1,
    betas: [0.9, 0.95],
    grad_clip: 1.0,
    eval_interval: 2000,
    eval_iterations: 200,
};

/// lit-gpt's LoRA finetuning recipe (Alpaca): 128 sequences per step as 32 × 4.
pub const FINETUNE_DEFAULTS: TrainingDefaults = TrainingDefaults {
    batch_size: 4,
    gradient_accumulation_steps: 32,
    max_steps: 1000,
    learning_rate: 3e-4,
    min_learning_rate: 6e-5,
    warmup_steps: 100,
    weight_decay: 0.01,
    betas: [0.9, 0.95],
    grad_clip: 1.0,
    eval_interval: 100,
    eval_iterations: 100,
};

/// Default seed (nanoGPT's).
pub const DEFAULT_SEED: i64 = 1337;

/// Concrete training settings: the spec with the kind's defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedTraining {
    /// Micro-batch size.
    pub batch_size: i64,
    /// Gradient accumulation steps.
    pub gradient_accumulation_steps: i64,
    /// Optimizer steps.
    pub max_steps: i64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Final learning rate.
    pub min_learning_rate: f64,
    /// Warmup steps.
    pub warmup_steps: i64,
    /// Steps of cosine decay.
    pub decay_steps: i64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// Gradient clipping norm (0: off).
    pub grad_clip: f64,
    /// Precision.
    pub precision: Precision,
    /// Seed.
    pub seed: i64,
    /// Evaluation interval in steps.
    pub eval_interval: i64,
    /// Batches per evaluation.
    pub eval_iterations: i64,
}

impl Training {
    /// Fill unset fields from `d`, and the evaluation settings from `eval`.
    pub fn resolve(&self, eval: &Evaluation, d: &TrainingDefaults) -> ResolvedTraining {
        let max_steps = self.max_steps.unwrap_or(d.max_steps);
        let betas = match self.betas.as_deref() {
            Some([b1, b2]) => [*b1, *b2],
            _ => d.betas,
        };
        ResolvedTraining {
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            gradient_accumulation_steps: self
                .gradient_accumulation_steps
                .unwrap_or(d.gradient_accumulation_steps),
            max_steps,
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            min_learning_rate: self.min_learning_rate.unwrap_or(d.min_learning_rate),
            warmup_steps: self.warmup_steps.unwrap_or(d.warmup_steps),
            decay_steps: self.decay_steps.unwrap_or(max_steps),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            betas,
            grad_clip: self.grad_clip.unwrap_or(d.grad_clip),
            precision: self.precision.unwrap_or_default(),
            seed: self.seed.unwrap_or(DEFAULT_SEED),
            eval_interval: eval.interval.unwrap_or(d.eval_interval),
            eval_iterations: eval.iterations.unwrap_or(d.eval_iterations),
        }
    }
}

/// A CEL literal for a double that CEL never reads as an int (`6e-4`, `1e0`).
fn cel_double(x: f64) -> String {
    format!("{x:e}")
}

/// Rule on a `training` field: the effective `minLearningRate` does not exceed the
/// effective `learningRate`, with `d` filling unset fields.
pub fn learning_rate_order_rule(d: &TrainingDefaults) -> Rule {
    Rule::new(format!(
        "(has(self.minLearningRate) ? double(self.minLearningRate) : {}) <= \
         (has(self.learningRate) ? double(self.learningRate) : {})",
        cel_double(d.min_learning_rate),
        cel_double(d.learning_rate),
    ))
    .message(Message::Message(format!(
        "minLearningRate must be <= learningRate (defaults for this kind: {} and {})",
        cel_double(d.min_learning_rate),
        cel_double(d.learning_rate)
    )))
    .field_path(".minLearningRate")
}

/// Rule on a `training` field: the effective `warmupSteps` does not exceed the effective
/// `maxSteps`, with `d` filling unset fields.
pub fn warmup_rule(d: &TrainingDefaults) -> Rule {
    Rule::new(format!(
        "(has(self.warmupSteps) ? self.warmupSteps : {}) <= (has(self.maxSteps) ? self.maxSteps : {})",
        d.warmup_steps, d.max_steps,
    ))
    .message(Message::Message(format!(
        "warmupSteps must be <= maxSteps (defaults for this kind: {} and {})",
        d.warmup_steps, d.max_steps
    )))
    .field_path(".warmupSteps")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_fills_defaults_and_keeps_overrides() {
        let t = Training {
            learning_rate: Some(1e-3),
            max_steps: Some(5000),
            ..Training::default()
        };
        let r = t.resolve(&Evaluation::default(), &PRETRAIN_DEFAULTS);
        assert_eq!(r.learning_rate, 1e-3);
        assert_eq!(r.max_steps, 5000);
        assert_eq!(r.decay_steps, 5000, "decay follows maxSteps as in nanoGPT");
        assert_eq!(r.min_learning_rate, 6e-5);
        assert_eq!(r.batch_size, 12);
        assert_eq!(r.seed, DEFAULT_SEED);
        assert_eq!(r.precision, Precision::Bf16);
        assert_eq!(r.eval_interval, 2000);

        let f = Training::default().resolve(&Evaluation::default(), &FINETUNE_DEFAULTS);
        assert_eq!(f.learning_rate, 3e-4);
        assert_eq!(f.eval_interval, 100);
    }

    #[test]
    fn cel_doubles_are_never_ints() {
        assert_eq!(cel_double(1.0), "1e0");
        assert_eq!(cel_double(6e-4), "6e-4");
    }
}
