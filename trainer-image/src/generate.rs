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
    tokenizer::Tokenizer,
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

/// `prompt` followed by the text of `out`, the ids sampled after `prompt_ids`. The
/// continuation is decoded together with the prompt, so that tokenizers whose decoder
/// joins tokens (with spaces, say) put the seam where it belongs.
pub fn continuation(tok: &Tokenizer, prompt: &str, prompt_ids: &[u32], out: &[u32]) -> String {
    let head = tok.decode(prompt_ids);
    let all: Vec<u32> = prompt_ids.iter().chain(out).copied().collect();
    let full = tok.decode(&all);
    match full.strip_prefix(head.as_str()) {
        Some(rest) => format!("{prompt}{rest}"),
        None => format!("{prompt}{}", tok.decode(out)),
    }
}

/// Continue `prompt` by `opts.max_tokens` tokens.
///
/// Only ids below `vocab` are sampled: a model's vocabulary is padded (GPT-2's 50,257 to
/// 50,304), and the padding ids are no token of the tokenizer.
pub fn sample(
    model: &Gpt,
    prompt: &[u32],
    vocab: usize,
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
        let mut scores: Vec<(usize, f32)> = last
            .to_vec1::<f32>()?
            .into_iter()
            .enumerate()
            .take(vocab.max(1))
            .collect();
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
    let device = crate::device::default_device();
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
    let tok = Tokenizer::load(rt, &loaded.state.tokenizer, None)?;
    let mut ids = tok.encode_prompt(prompt)?;
    if ids.is_empty() {
        ids.push(0);
    }
    let out = sample(&model, &ids, tok.vocab_size() as usize, opts, &device)
        .map_err(|e| JobError::Internal(e.to_string()))?;
    Ok(continuation(&tok, prompt, &ids, &out))
}
