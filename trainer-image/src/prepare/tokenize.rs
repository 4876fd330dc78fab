//! The tokenizer a Dataset names: GPT-2's byte-level BPE (tiktoken's `r50k_base`), or a
//! Hugging Face `tokenizer.json` (Llama-family and other models) through the `tokenizers`
//! crate. Either way documents are encoded without special tokens, and an end-of-text
//! token follows every document.

use std::path::Path;

use crate::{job::JobError, train::data::TokenDtype};

use super::{GPT2_EOT, GPT2_VOCAB};

/// Special tokens taken as the end-of-text token of a Hugging Face tokenizer, in order of
/// preference: GPT-2/NeoX/Qwen, Llama 3, Llama 1–2/Mistral, Gemma, ChatML.
pub const EOT_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
];

/// A loaded tokenizer.
pub enum Tokenizer {
    /// GPT-2's BPE.
    Gpt2(tiktoken_rs::CoreBPE),
    /// A Hugging Face tokenizer.
    HuggingFace {
        /// The tokenizer.
        inner: Box<tokenizers::Tokenizer>,
        /// Its end-of-text token.
        eot: u32,
        /// Its vocabulary size, added tokens included.
        vocab: u32,
        /// Where it came from (the manifest's `tokenizer`).
        uri: String,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Tokenizer {
    /// GPT-2's BPE.
    pub fn gpt2() -> Result<Self, JobError> {
        tiktoken_rs::r50k_base()
            .map(Self::Gpt2)
            .map_err(|e| JobError::Internal(format!("GPT-2 tokenizer: {e}")))
    }

    /// The Hugging Face `tokenizer.json` at `path` (read from `uri`).
    pub fn hugging_face(path: &Path, uri: &str) -> Result<Self, JobError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| JobError::Data(format!("tokenizer {uri}: not a tokenizer.json: {e}")))?;
        let eot = EOT_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                JobError::Data(format!(
                    "tokenizer {uri}: none of the end-of-text tokens {EOT_CANDIDATES:?} is in its vocabulary"
                ))
            })?;
        let vocab = u32::try_from(inner.get_vocab_size(true))
            .map_err(|_| JobError::Data(format!("tokenizer {uri}: vocabulary too large")))?;
        Ok(Self::HuggingFace {
            inner: Box::new(inner),
            eot,
            vocab,
            uri: uri.to_string(),
        })
    }

    /// The ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Self::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Self::HuggingFace { inner, .. } => inner
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string()),
        }
    }

    /// The end-of-text token placed after every document.
    pub fn eot(&self) -> u32 {
        match self {
            Self::Gpt2(_) => GPT2_EOT,
            Self::HuggingFace { eot, .. } => *eot,
        }
    }

    /// The vocabulary size (ids are below it).
    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::Gpt2(_) => GPT2_VOCAB,
            Self::HuggingFace { vocab, .. } => *vocab,
        }
    }

    /// `gpt2`, or the URI of the `tokenizer.json`.
    pub fn name(&self) -> String {
        match self {
            Self::Gpt2(_) => "gpt2".into(),
            Self::HuggingFace { uri, .. } => uri.clone(),
        }
    }

    /// `uint16` when every id fits, else `uint32`.
    pub fn dtype(&self) -> TokenDtype {
        if self.vocab_size() <= 1 << 16 {
            TokenDtype::Uint16
        } else {
            TokenDtype::Uint32
        }
    }
}

/// `tokens` as little-endian bytes of `dtype`.
pub fn to_bytes(tokens: &[u32], dtype: TokenDtype) -> Vec<u8> {
    match dtype {
        TokenDtype::Uint16 => tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect(),
        TokenDtype::Uint32 => tokens.iter().flat_map(|&t| t.to_le_bytes()).collect(),
    }
}
