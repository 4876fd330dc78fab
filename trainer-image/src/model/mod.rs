//! Models: GPT-2, and LoRA adapters on it.

pub(crate) mod attention;
pub mod causal;
pub mod check;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod dense;
pub(crate) mod fastmath;
pub(crate) mod fused;
pub(crate) mod gemm;
pub mod gpt;
pub(crate) mod linear;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod params;
pub(crate) mod xent;

/// Why a model could not be built, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// The architecture is inconsistent.
    #[error("model config: {0}")]
    Config(String),
    /// A checkpoint lacks a parameter.
    #[error("parameter {0} is missing")]
    MissingParameter(String),
    /// A checkpoint's parameter has another shape.
    #[error("parameter {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Parameter name.
        name: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        found: Vec<usize>,
    },
}

/// The architecture of a model to train or run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Arch {
    /// GPT-2, described by the run's [`taper_crds::model::GptConfig`].
    #[default]
    Gpt2,
    /// Llama, with its own configuration.
    Llama(llama::LlamaConfig),
}

impl Arch {
    /// The Linear layers a LoRA can adapt.
    pub fn linears(&self, gpt: &taper_crds::model::GptConfig) -> Vec<lora::Linear> {
        match self {
            Self::Gpt2 => lora::gpt2_linears(gpt),
            Self::Llama(l) => l.linears(),
        }
    }
}

/// A GPT-2 or a Llama.
#[derive(Debug)]
pub enum Model {
    /// GPT-2.
    Gpt(gpt::Gpt),
    /// Llama.
    Llama(llama::Llama),
}

impl Model {
    /// The model of `arch` over `params` (GPT-2's shape from `cfg`), with adapters and a
    /// frozen base when `lora` is given.
    pub fn build(
        arch: &Arch,
        cfg: taper_crds::model::GptConfig,
        params: &params::ParamStore,
        lora: Option<&taper_crds::finetune::Lora>,
    ) -> Result<Self, ModelError> {
        Ok(match (arch, lora) {
            (Arch::Gpt2, None) => Self::Gpt(gpt::Gpt::new(cfg, params)?),
            (Arch::Gpt2, Some(l)) => Self::Gpt(gpt::Gpt::with_lora(cfg, params, l)?),
            (Arch::Llama(l), lora) => Self::Llama(llama::Llama::new(*l, params, lora)?),
        })
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]`.
    pub fn forward(
        &self,
        idx: &candle_core::Tensor,
        ctx: &mut gpt::ForwardCtx<'_>,
    ) -> Result<candle_core::Tensor, ModelError> {
        match self {
            Self::Gpt(m) => m.forward(idx, ctx),
            Self::Llama(m) => m.forward(idx, ctx),
        }
    }

    /// The context length.
    pub fn block_size(&self) -> usize {
        match self {
            Self::Gpt(m) => m.config().block_size as usize,
            Self::Llama(m) => m.config().block_size,
        }
    }

    /// The same model without a gradient graph.
    pub fn detached(&self) -> Self {
        match self {
            Self::Gpt(m) => Self::Gpt(m.detached()),
            Self::Llama(m) => Self::Llama(m.detached()),
        }
    }

    /// The same model computing its matmuls in `dtype`.
    pub fn with_compute_dtype(self, dtype: candle_core::DType) -> Self {
        match self {
            Self::Gpt(m) => Self::Gpt(m.with_compute_dtype(dtype)),
            Self::Llama(m) => Self::Llama(m.with_compute_dtype(dtype)),
        }
    }
}
