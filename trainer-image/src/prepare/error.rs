//! Why a prepare run failed, and what kind of failure that is for the exit code.

use taper_crds::exit::Category;

use crate::{store::StoreError, tokenizer::TokenizerError};

/// Why a prepare run failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The Dataset's spec is wrong in a way the CRD rules could not catch.
    #[error("invalid spec: {0}")]
    Spec(String),
    /// A source is unusable (unreadable, not the format it claims, nothing left).
    #[error("invalid data: {0}")]
    Data(String),
    /// The object store or a local working file failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Anything else.
    #[error("internal: {0}")]
    Internal(String),
}

impl PrepareError {
    /// The kind of failure: decides the exit code, bounded for metric labels.
    pub fn category(&self) -> Category {
        match self {
            Self::Spec(_) => Category::InvalidSpec,
            Self::Data(_) => Category::InvalidData,
            Self::Store(e) => e.category(),
            Self::Tokenizer(e) => e.category(),
            Self::Internal(_) => Category::Internal,
        }
    }

    /// The process exit code of this failure.
    pub fn exit_code(&self) -> u8 {
        self.category().exit_code()
    }

    /// The same failure, with `context` in front of its message (spec and data errors).
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            Self::Spec(m) => Self::Spec(format!("{context}: {m}")),
            Self::Data(m) => Self::Data(format!("{context}: {m}")),
            other => other,
        }
    }
}

/// A local working file's I/O error.
pub(crate) fn io_err(path: &std::path::Path, e: std::io::Error) -> PrepareError {
    PrepareError::Store(StoreError::Io {
        path: path.display().to_string(),
        source: e,
    })
}
