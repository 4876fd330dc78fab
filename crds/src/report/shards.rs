//! A tokenized dataset as published: `manifest.json` and the shards it lists.
//!
//! `taper prepare` writes these types, `taper pretrain` and `taper finetune` read them,
//! and the operator copies the manifest's URI and digest into the Dataset's status.

use serde::{Deserialize, Serialize};

/// Element type of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian u16 (vocabularies up to 65,536 tokens, GPT-2's included).
    Uint16,
    /// Little-endian u32.
    Uint32,
}

impl TokenDtype {
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Self::Uint16 => 2,
            Self::Uint32 => 4,
        }
    }

    /// The narrowest element type that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            Self::Uint16
        } else {
            Self::Uint32
        }
    }
}

/// One shard file of a split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardInfo {
    /// File name relative to the manifest.
    pub file: String,
    /// Tokens in the file.
    pub tokens: u64,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
    /// Instruction datasets: the loss mask of this shard, one byte per token (1: the
    /// token is a response token whose prediction counts in the loss, 0: prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskInfo>,
}

/// The loss-mask file of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MaskInfo {
    /// File name relative to the manifest (`train-NNNNN.mask.bin`).
    pub file: String,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
}

/// `manifest.json` of a tokenized dataset, written after every shard it lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatasetManifest {
    /// Format version of this manifest.
    pub version: u32,
    /// Tokenizer name (`gpt2`) or the URI of its `tokenizer.json`.
    pub tokenizer: String,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: u32,
    /// The end-of-text token placed between documents.
    pub eot_token: u32,
    /// Element type of every shard.
    pub dtype: TokenDtype,
    /// Train shards, in order.
    pub train: Vec<ShardInfo>,
    /// Test shards, in order.
    pub test: Vec<ShardInfo>,
    /// sha256 over the shard checksums: identifies the dataset's content.
    pub digest: String,
}

impl DatasetManifest {
    /// Tokens in the train split.
    pub fn train_tokens(&self) -> u64 {
        self.train.iter().map(|s| s.tokens).sum()
    }

    /// Tokens in the test split.
    pub fn test_tokens(&self) -> u64 {
        self.test.iter().map(|s| s.tokens).sum()
    }
}
