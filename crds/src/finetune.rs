//! `FinetuneJob`: instruction-finetune a pretrained model, by LoRA or in full.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{
    dataset::PromptTemplate,
    job::{JobStatus, LocalRef, RunPolicy},
    resources::Resources,
    store::{ObjectLocation, StoreAccess, URI_SCHEME_MESSAGE, URI_SCHEME_RULE},
    training::{
        Checkpoints, Evaluation, FINETUNE_DEFAULTS, Overfitting, ResolvedTraining, Training,
        learning_rate_order_rule, warmup_rule,
    },
};

/// Which checkpoint of a PretrainJob to start from.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointChoice {
    /// The checkpoint with the lowest validation loss.
    #[default]
    Best,
    /// The newest complete checkpoint.
    Latest,
}

/// Architecture of a public model given by URI.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Architecture {
    /// OpenAI GPT-2 (Hugging Face `gpt2*` safetensors).
    #[default]
    Gpt2,
    /// Llama family (Hugging Face `LlamaForCausalLM` safetensors).
    Llama,
}

/// A PretrainJob in the same namespace to finetune.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PretrainJobRef {
    /// Name of the PretrainJob.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Which of its checkpoints. Default: `best`.
    #[serde(default)]
    pub checkpoint: CheckpointChoice,
}

/// The model to finetune: exactly one of `pretrainJobRef` and `uri`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.pretrainJobRef) != has(self.uri)").message("baseModel must set exactly one of pretrainJobRef and uri"))]
pub struct BaseModel {
    /// A PretrainJob of this namespace and which of its checkpoints to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain_job_ref: Option<PretrainJobRef>,
    /// Prefix of a public model in safetensors with its `config.json` and tokenizer
    /// (for example a copy of Hugging Face `gpt2` in your bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(URI_SCHEME_RULE).message(URI_SCHEME_MESSAGE))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: Option<String>,
    /// Architecture of the model at `uri`. Default: `gpt2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
    /// Object-store access for `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoreAccess>,
}

/// Finetuning method.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MethodType {
    /// Low-rank adapters on the target layers; the base weights stay frozen.
    #[default]
    Lora,
    /// Every weight is trained.
    Full,
}

fn default_r() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lora_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<String> {
    vec!["c_attn".into()]
}

/// LoRA hyper-parameters (defaults: lit-gpt's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lora {
    /// Rank of the adapters (> 0). Default: 8.
    #[serde(default = "default_r")]
    #[x_kube(validation = Rule::new("self > 0").message("method.lora.r must be greater than 0"))]
    #[schemars(range(max = 4096))]
    pub r: i64,
    /// Scaling numerator: updates are scaled by `alpha / r` (> 0). Default: 16.
    #[serde(default = "default_alpha")]
    #[x_kube(validation = Rule::new("double(self) > 0.0").message("method.lora.alpha must be greater than 0"))]
    pub alpha: f64,
    /// Dropout on the adapter input, in [0, 1). Default: 0.05.
    #[serde(default = "default_lora_dropout")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0 && double(self) < 1.0").message("method.lora.dropout must be in [0, 1)"))]
    pub dropout: f64,
    /// Names of the Linear layers to adapt (GPT-2: `c_attn`, `c_proj`, `c_fc`, `mlp.c_proj`;
    /// Llama: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    /// Default: `[c_attn]` (queries, keys and values).
    #[serde(default = "default_targets")]
    #[schemars(length(min = 1, max = 16))]
    pub targets: Vec<String>,
}

impl Default for Lora {
    fn default() -> Self {
        Self {
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_lora_dropout(),
            targets: default_targets(),
        }
    }
}

/// How the model is finetuned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Method {
    /// `lora` or `full`. Default: `lora`.
    #[serde(default, rename = "type")]
    pub type_: MethodType,
    /// LoRA settings (used when `type` is `lora`).
    #[serde(default)]
    pub lora: Lora,
}

/// Where the results go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FinetuneOutput {
    /// Prefix for the adapter (and the merged model). Default: the operator's bucket,
    /// `<bucket>/<namespace>/finetunejobs/<name>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<ObjectLocation>,
    /// Also export a merged model (base + adapter) in safetensors, ready for `taper chat`. Default: false.
    #[serde(default)]
    pub merge: bool,
}

/// Instruction-finetune a pretrained GPT (or a public GPT-2/Llama model) on an
/// `instruction` Dataset, by LoRA or in full, and export a chat model.
// clippy mistakes the repeated `printcolumn(type_ = ...)` arguments for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "taper.dev",
    version = "v1alpha1",
    kind = "FinetuneJob",
    namespaced,
    doc = "A FinetuneJob instruction-finetunes a pretrained model, by LoRA or in full.",
    status = "FinetuneJobStatus",
    shortname = "fj",
    category = "taper",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.step"),
    printcolumn(name = "Train Loss", type_ = "number", json_path = ".status.trainLoss"),
    printcolumn(name = "Val Loss", type_ = "number", json_path = ".status.valLoss"),
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
pub struct FinetuneJobSpec {
    /// The model to start from. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("baseModel is immutable"))]
    pub base_model: BaseModel,
    /// The `instruction` Dataset to train on, in the same namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("datasetRef is immutable"))]
    pub dataset_ref: LocalRef,
    /// Prompt template used at inference (must match the Dataset's). Default: `alpaca`.
    #[serde(default)]
    pub prompt_template: PromptTemplate,
    /// LoRA or full finetuning. Default: LoRA with r=8, alpha=16, dropout 0.05 on `c_attn`.
    #[serde(default)]
    pub method: Method,
    /// Optimizer, schedule and batch. Defaults follow lit-gpt's LoRA recipe.
    #[serde(default)]
    #[x_kube(validation = learning_rate_order_rule(&FINETUNE_DEFAULTS))]
    #[x_kube(validation = warmup_rule(&FINETUNE_DEFAULTS))]
    pub training: Training,
    /// Evaluation interval and length. Default: every 100 steps, 100 batches.
    #[serde(default)]
    pub evaluation: Evaluation,
    /// What to do when validation loss stops improving.
    #[serde(default)]
    pub overfitting: Overfitting,
    /// Checkpoint interval, retention and location.
    #[serde(default)]
    pub checkpoints: Checkpoints,
    /// Where the adapter and merged model go.
    #[serde(default)]
    pub output: FinetuneOutput,
    /// GPUs, CPU, memory and placement of the trainer pod. Default: 1 GPU.
    #[serde(default)]
    pub resources: Resources,
    /// Image, suspension, restarts and clean-up.
    #[serde(flatten)]
    pub run: RunPolicy,
}

impl FinetuneJobSpec {
    /// Training settings with lit-gpt's LoRA defaults filled in.
    pub fn resolved_training(&self) -> ResolvedTraining {
        self.training.resolve(&self.evaluation, &FINETUNE_DEFAULTS)
    }
}

/// Observed state of a FinetuneJob: the training status plus the exported artefacts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FinetuneJobStatus {
    /// Progress, losses and checkpoints, as for a PretrainJob.
    #[serde(flatten)]
    pub job: JobStatus,
    /// URI of the exported adapter (LoRA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_uri: Option<String>,
    /// URI of the exported model (merged, or fully finetuned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_uri: Option<String>,
}
