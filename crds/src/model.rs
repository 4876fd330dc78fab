//! The GPT architecture a PretrainJob trains: a preset, optionally with overrides.

use kube::{KubeSchema, core::Rule};
use serde::{Deserialize, Serialize};

/// Named model sizes. The `gpt2-*` presets are OpenAI's GPT-2 family; the small ones fit a CPU.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Preset {
    /// 2 layers, 2 heads, 64 wide, block 64 (about 3.3M parameters with the GPT-2 vocabulary); for tests.
    #[serde(rename = "tiny")]
    Tiny,
    /// 4 layers, 4 heads, 128 wide, block 128 (about 7M parameters); the CPU quickstart.
    #[serde(rename = "mini")]
    Mini,
    /// 6 layers, 6 heads, 384 wide, block 256 (about 30M parameters); nanoGPT's "baby GPT".
    #[serde(rename = "baby")]
    Baby,
    /// 12 layers, 12 heads, 768 wide, block 1024 (124M parameters).
    #[default]
    #[serde(rename = "gpt2-small")]
    Gpt2Small,
    /// 24 layers, 16 heads, 1024 wide, block 1024 (350M parameters).
    #[serde(rename = "gpt2-medium")]
    Gpt2Medium,
    /// 36 layers, 20 heads, 1280 wide, block 1024 (774M parameters).
    #[serde(rename = "gpt2-large")]
    Gpt2Large,
    /// 48 layers, 25 heads, 1600 wide, block 1024 (1558M parameters).
    #[serde(rename = "gpt2-xl")]
    Gpt2Xl,
}

/// GPT-2's vocabulary (50,257 tokens) padded to a multiple of 64, as nanoGPT does for speed.
pub const PADDED_GPT2_VOCAB: i64 = 50304;

impl Preset {
    /// Every preset, smallest first.
    pub const ALL: [Preset; 7] = [
        Self::Tiny,
        Self::Mini,
        Self::Baby,
        Self::Gpt2Small,
        Self::Gpt2Medium,
        Self::Gpt2Large,
        Self::Gpt2Xl,
    ];

    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Mini => "mini",
            Self::Baby => "baby",
            Self::Gpt2Small => "gpt2-small",
            Self::Gpt2Medium => "gpt2-medium",
            Self::Gpt2Large => "gpt2-large",
            Self::Gpt2Xl => "gpt2-xl",
        }
    }

    /// The architecture of the preset.
    pub fn config(self) -> GptConfig {
        let (n_layer, n_head, n_embd, block_size) = match self {
            Self::Tiny => (2, 2, 64, 64),
            Self::Mini => (4, 4, 128, 128),
            Self::Baby => (6, 6, 384, 256),
            Self::Gpt2Small => (12, 12, 768, 1024),
            Self::Gpt2Medium => (24, 16, 1024, 1024),
            Self::Gpt2Large => (36, 20, 1280, 1024),
            Self::Gpt2Xl => (48, 25, 1600, 1024),
        };
        GptConfig {
            n_layer,
            n_head,
            n_embd,
            block_size,
            vocab_size: PADDED_GPT2_VOCAB,
            dropout: 0.0,
            bias: true,
        }
    }
}

/// A concrete GPT architecture.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GptConfig {
    /// Transformer blocks.
    pub n_layer: i64,
    /// Attention heads per block.
    pub n_head: i64,
    /// Embedding width.
    pub n_embd: i64,
    /// Context length in tokens.
    pub block_size: i64,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Dropout probability.
    pub dropout: f64,
    /// Biases in Linear and LayerNorm layers.
    pub bias: bool,
}

/// The model of a PretrainJob: a preset, with any field overridden.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Starting architecture. Default: `gpt2-small`.
    #[serde(default)]
    pub preset: Preset,
    /// Transformer blocks. Default: the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub n_layer: Option<i64>,
    /// Attention heads; must divide `nEmbd`. Default: the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub n_head: Option<i64>,
    /// Embedding width. Default: the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub n_embd: Option<i64>,
    /// Context length in tokens. Default: the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub block_size: Option<i64>,
    /// Vocabulary size; at least the tokenizer's. Default: 50304 (GPT-2's 50257 padded to a multiple of 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4194304))]
    pub vocab_size: Option<i64>,
    /// Dropout probability in [0, 1). Default: 0.0 (nanoGPT's for pretraining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("double(self) >= 0.0 && double(self) < 1.0").message("dropout must be in [0, 1)"))]
    pub dropout: Option<f64>,
    /// Biases in Linear and LayerNorm layers, as GPT-2. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<bool>,
}

impl ModelSpec {
    /// The preset with overrides applied.
    pub fn resolve(&self) -> GptConfig {
        let p = self.preset.config();
        GptConfig {
            n_layer: self.n_layer.unwrap_or(p.n_layer),
            n_head: self.n_head.unwrap_or(p.n_head),
            n_embd: self.n_embd.unwrap_or(p.n_embd),
            block_size: self.block_size.unwrap_or(p.block_size),
            vocab_size: self.vocab_size.unwrap_or(p.vocab_size),
            dropout: self.dropout.unwrap_or(p.dropout),
            bias: self.bias.unwrap_or(p.bias),
        }
    }
}

/// A CEL map literal from preset name to one of its fields.
fn preset_map(field: impl Fn(GptConfig) -> i64) -> String {
    let entries: Vec<String> = Preset::ALL
        .iter()
        .map(|p| format!("'{}': {}", p.name(), field(p.config())))
        .collect();
    format!("{{{}}}", entries.join(", "))
}

/// Rule on a `model` field: the effective `nHead` divides the effective `nEmbd`, with the
/// preset filling whichever is unset. The preset table is generated from [`Preset::config`].
pub fn n_head_divides_n_embd_rule() -> Rule {
    Rule::new(format!(
        "(has(self.nEmbd) ? self.nEmbd : {embd}[self.preset]) % \
         (has(self.nHead) ? self.nHead : {head}[self.preset]) == 0",
        embd = preset_map(|c| c.n_embd),
        head = preset_map(|c| c.n_head),
    ))
    .message("nHead must divide nEmbd (the preset supplies whichever is unset)")
    .field_path(".nHead")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_consistent() {
        for p in Preset::ALL {
            let c = p.config();
            assert_eq!(c.n_embd % c.n_head, 0, "{}", p.name());
            let json = serde_json::to_value(p).expect("serialize preset");
            assert_eq!(json, p.name());
        }
    }

    #[test]
    fn overrides_apply_on_top_of_the_preset() {
        let m = ModelSpec {
            preset: Preset::Baby,
            n_layer: Some(8),
            ..ModelSpec::default()
        };
        let c = m.resolve();
        assert_eq!(
            (c.n_layer, c.n_head, c.n_embd, c.block_size),
            (8, 6, 384, 256)
        );
        assert_eq!(c.vocab_size, PADDED_GPT2_VOCAB);
    }
}
