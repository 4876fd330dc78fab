//! The one tokenizer of the trainer, used by `taper prepare` to encode documents and by
//! `taper generate` to encode prompts and decode samples: GPT-2's byte-level BPE
//! (tiktoken's `r50k_base`), a Hugging Face `tokenizer.json` (Llama-family and other
//! models) through the `tokenizers` crate, or one token per byte (tests, toy corpora).
//!
//! A dataset's manifest and every checkpoint record the tokenizer by name: `gpt2`,
//! `bytes`, or the URI of the `tokenizer.json`; [`Tokenizer::load`] takes that name back.

use std::path::Path;

use taper_crds::{report::TokenDtype, store::StoreAccess};

/// GPT-2's end-of-text token, placed after every document.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's vocabulary size.
pub const GPT2_VOCAB: u32 = 50257;

/// Special tokens taken as the end-of-text token of a Hugging Face tokenizer, in order of
/// preference: GPT-2/NeoX/Qwen, Llama 3, Llama 1–2/Mistral, Gemma, ChatML.
pub const EOT_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
];

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The name is not one Taper knows, nor a URI.
    #[error(
        "tokenizer {0:?}: not gpt2, bytes, or an s3://, https:// or file:// URI of a tokenizer.json"
    )]
    Unknown(String),
    /// The file is not a usable `tokenizer.json`.
    #[error("tokenizer {uri}: {message}")]
    Invalid {
        /// Where it came from.
        uri: String,
        /// What is wrong with it.
        message: String,
    },
    /// A document could not be encoded.
    #[error("tokenizer {name}: cannot encode a document: {message}")]
    Encode {
        /// The tokenizer's name.
        name: String,
        /// The library's message.
        message: String,
    },
    /// The built-in GPT-2 tables could not be loaded.
    #[error("GPT-2 tokenizer: {0}")]
    Builtin(String),
}

impl TokenizerError {
    /// The kind of failure for the exit code: an unknown name is the spec's, a bad file
    /// or text the data's.
    pub fn category(&self) -> taper_crds::exit::Category {
        use taper_crds::exit::Category;
        match self {
            Self::Unknown(_) => Category::InvalidSpec,
            Self::Invalid { .. } | Self::Encode { .. } => Category::InvalidData,
            Self::Builtin(_) => Category::Internal,
        }
    }
}

/// A loaded tokenizer.
pub enum Tokenizer {
    /// GPT-2's BPE.
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    /// One token per byte; the end-of-text token is 0.
    Bytes,
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
        write!(f, "Tokenizer({})", self.name())
    }
}

impl Tokenizer {
    /// GPT-2's BPE.
    pub fn gpt2() -> Result<Self, TokenizerError> {
        tiktoken_rs::r50k_base()
            .map(|bpe| Self::Gpt2(Box::new(bpe)))
            .map_err(|e| TokenizerError::Builtin(e.to_string()))
    }

    /// The Hugging Face `tokenizer.json` at `path` (read from `uri`).
    pub fn hugging_face(path: &Path, uri: &str) -> Result<Self, TokenizerError> {
        let invalid = |message: String| TokenizerError::Invalid {
            uri: uri.to_string(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| invalid(format!("not a tokenizer.json: {e}")))?;
        let eot = EOT_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                invalid(format!(
                    "none of the end-of-text tokens {EOT_CANDIDATES:?} is in its vocabulary"
                ))
            })?;
        let vocab = u32::try_from(inner.get_vocab_size(true))
            .map_err(|_| invalid("vocabulary too large".into()))?;
        Ok(Self::HuggingFace {
            inner: Box::new(inner),
            eot,
            vocab,
            uri: uri.to_string(),
        })
    }

    /// The tokenizer a manifest or checkpoint names: `gpt2` (or `r50k_base`), `bytes`, or
    /// the URI of a `tokenizer.json`, fetched with `access`.
    pub fn load(
        rt: &tokio::runtime::Runtime,
        name: &str,
        access: Option<&StoreAccess>,
    ) -> Result<Self, crate::prepare::PrepareError> {
        match name {
            "gpt2" | "r50k_base" => Ok(Self::gpt2()?),
            "bytes" => Ok(Self::Bytes),
            uri if uri.contains("://") => {
                let spool = crate::prepare::sources::Spool::new();
                let file =
                    crate::prepare::sources::fetch_one(rt, &spool, "tokenizer", uri, access)?;
                Ok(Self::hugging_face(&file.path, uri)?)
            }
            other => Err(TokenizerError::Unknown(other.to_string()).into()),
        }
    }

    /// The ids of a document, without special tokens: text that looks like one
    /// (`<|endoftext|>`) is encoded as ordinary text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Self::HuggingFace { inner, .. } => inner
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode {
                    name: self.name(),
                    message: e.to_string(),
                }),
        }
    }

    /// The ids of a prompt typed by a person: special tokens written out
    /// (`<|endoftext|>`) become those tokens.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Gpt2(bpe) => Ok(bpe.encode_with_special_tokens(text)),
            _ => self.encode(text),
        }
    }

    /// The text of `ids`; bytes that are not UTF-8 are replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Gpt2(bpe) => bpe
                .decode_bytes(ids)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
            Self::Bytes => {
                String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>())
                    .into_owned()
            }
            Self::HuggingFace { inner, .. } => inner.decode(ids, false).unwrap_or_default(),
        }
    }

    /// The end-of-text token placed after every document.
    pub fn eot(&self) -> u32 {
        match self {
            Self::Gpt2(_) => GPT2_EOT,
            Self::Bytes => 0,
            Self::HuggingFace { eot, .. } => *eot,
        }
    }

    /// The vocabulary size (ids are below it).
    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::Gpt2(_) => GPT2_VOCAB,
            Self::Bytes => 256,
            Self::HuggingFace { vocab, .. } => *vocab,
        }
    }

    /// `gpt2`, `bytes`, or the URI of the `tokenizer.json`.
    pub fn name(&self) -> String {
        match self {
            Self::Gpt2(_) => "gpt2".into(),
            Self::Bytes => "bytes".into(),
            Self::HuggingFace { uri, .. } => uri.clone(),
        }
    }

    /// `uint16` when every id fits, else `uint32`.
    pub fn dtype(&self) -> TokenDtype {
        TokenDtype::for_vocab(self.vocab_size())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_documents_keep_special_looking_text_and_prompts_do_not() {
        let t = Tokenizer::gpt2().expect("gpt2");
        let doc = t.encode("a<|endoftext|>").expect("encode");
        assert!(!doc.contains(&GPT2_EOT), "{doc:?}");
        let prompt = t.encode_prompt("a<|endoftext|>").expect("encode");
        assert_eq!(prompt.last(), Some(&GPT2_EOT));
        assert_eq!(t.decode(&doc), "a<|endoftext|>");
        // "Hello world" is [15496, 995] in GPT-2's vocabulary (tiktoken, HF gpt2).
        assert_eq!(t.encode("Hello world").expect("encode"), [15496, 995]);
    }

    #[test]
    fn bytes_round_trip_and_unknown_names_are_refused() {
        let t = Tokenizer::Bytes;
        assert_eq!(t.encode("hé").expect("encode"), [104, 195, 169]);
        assert_eq!(t.decode(&[104, 195, 169]), "hé");
        assert_eq!(t.dtype(), TokenDtype::Uint16);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let err = Tokenizer::load(&rt, "llama", None).expect_err("unknown");
        assert!(err.to_string().contains("\"llama\""), "{err}");
    }
}
