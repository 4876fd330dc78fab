//! Text generation from a checkpoint: temperature and top-k sampling.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    job::JobError,
    model::{
        ModelError,
        gpt::{ForwardCtx, Gpt},
        params::ParamStore,
    },
    store,
    train::checkpoint::Checkpointer,
};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_tokens: usize,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seed.
    pub seed: u64,
}

/// A tokenizer named in a checkpoint.
pub enum Tokenizer {
    /// GPT-2 BPE (tiktoken `r50k_base`).
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    /// One token per byte (tests and toy corpora).
    Bytes,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gpt2(_) => "Tokenizer::Gpt2",
            Self::Bytes => "Tokenizer::Bytes",
        })
    }
}

impl Tokenizer {
    /// The tokenizer called `name`.
    pub fn named(name: &str) -> Result<Self, JobError> {
        match name {
            "gpt2" | "r50k_base" => Ok(Self::Gpt2(Box::new(
                tiktoken_rs::r50k_base()
                    .map_err(|e| JobError::Internal(format!("GPT-2 tokenizer: {e}")))?,
            ))),
            "bytes" => Ok(Self::Bytes),
            other => Err(JobError::Spec(format!(
                "taper generate does not support the tokenizer {other:?} yet"
            ))),
        }
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Gpt2(bpe) => bpe.encode_with_special_tokens(text),
            Self::Bytes => text.bytes().map(u32::from).collect(),
        }
    }

    /// Text of `ids` (invalid UTF-8 replaced).
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
        }
    }
}

/// Continue `prompt` by `opts.max_tokens` tokens.
pub fn sample(
    model: &Gpt,
    prompt: &[u32],
    opts: &SampleOptions,
    device: &Device,
) -> Result<Vec<u32>, ModelError> {
    let block = model.config().block_size as usize;
    let mut ids = prompt.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for _ in 0..opts.max_tokens {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        let x = Tensor::new(ctx, device)?.unsqueeze(0)?;
        let logits = model.forward(&x, &mut ForwardCtx::default())?;
        let last = logits.squeeze(0)?.narrow(0, ctx.len() - 1, 1)?.squeeze(0)?;
        let last = (last.to_dtype(candle_core::DType::F32)? / opts.temperature.max(1e-6))?;
        let mut scores: Vec<(usize, f32)> =
            last.to_vec1::<f32>()?.into_iter().enumerate().collect();
        if opts.top_k > 0 && opts.top_k < scores.len() {
            scores.select_nth_unstable_by(opts.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            scores.truncate(opts.top_k);
        }
        let max = scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = scores.iter().map(|s| ((s.1 - max) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut r = rng.random::<f64>() * total;
        let mut chosen = scores[scores.len() - 1].0;
        for (s, w) in scores.iter().zip(&weights) {
            if r < *w {
                chosen = s.0;
                break;
            }
            r -= w;
        }
        ids.push(chosen as u32);
    }
    Ok(ids[prompt.len()..].to_vec())
}

/// Load the newest checkpoint under `uri` and continue `prompt`.
pub fn from_checkpoint(
    rt: &tokio::runtime::Runtime,
    uri: &str,
    prompt: &str,
    opts: &SampleOptions,
) -> Result<String, JobError> {
    let store = rt.block_on(store::open(uri, None))?;
    let staging = std::env::temp_dir().join(format!("taper-generate-{}", std::process::id()));
    let device = crate::job::default_device();
    let loaded = rt
        .block_on(Checkpointer::new(store.as_ref(), &staging).resume(&device))
        .map_err(|e| JobError::Data(e.to_string()))?
        .ok_or_else(|| JobError::Data(format!("no complete checkpoint under {uri}")))?;
    let cfg = loaded.state.model;
    let mut params = ParamStore::new();
    for (name, t) in &loaded.model {
        params
            .insert_tensor(name, t)
            .map_err(|e| JobError::Internal(e.to_string()))?;
    }
    let model = Gpt::new(cfg, &params)
        .map_err(|e| JobError::Internal(e.to_string()))?
        .detached();
    let tok = Tokenizer::named(&loaded.state.tokenizer)?;
    let mut ids = tok.encode(prompt);
    if ids.is_empty() {
        ids.push(0);
    }
    let out = sample(&model, &ids, opts, &device).map_err(|e| JobError::Internal(e.to_string()))?;
    Ok(format!("{prompt}{}", tok.decode(&out)))
}
