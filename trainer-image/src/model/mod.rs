//! Models: GPT-2, and LoRA adapters on it.

pub mod check;
pub mod gpt;
pub mod lora;
pub mod ops;
pub mod params;

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
