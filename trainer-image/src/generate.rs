//! Text generation: greedy decoding or sampling with temperature, top-k and top-p, tokens
//! streamed as they are produced, stopping at the end-of-text token; and the models it
//! runs: a Taper checkpoint, a job's checkpoint prefix, or a model folder in Hugging Face
//! GPT-2 layout (what `taper finetune` exports).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use taper_crds::finetune::CheckpointChoice;

use crate::{
    job::JobError,
    model::{Model, ModelError, gpt::ForwardCtx},
    tokenizer::Tokenizer,
};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 decodes greedily (the most likely token each time).
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 keeps all.
    pub top_p: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            max_tokens: 200,
            temperature: 0.8,
            top_k: 200,
            top_p: 1.0,
            seed: 1,
        }
    }
}

/// The Alpaca prompt of an instruction without input (the template `taper prepare` uses).
pub fn instruction_prompt(instruction: &str) -> String {
    crate::prepare::instruction::alpaca_prompt(&crate::prepare::instruction::Record {
        instruction: instruction.trim().to_string(),
        input: String::new(),
        output: String::new(),
    })
}

/// A model ready to generate, with its tokenizer.
#[derive(Debug)]
pub struct Generator {
    /// The model, without a gradient graph.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it runs.
    pub device: Device,
}

impl Generator {
    /// Load the model at `uri`: a checkpoint folder, a job's checkpoint prefix (its newest
    /// checkpoint), or a model folder (`config.json`, `model.safetensors`).
    pub fn load(rt: &tokio::runtime::Runtime, uri: &str) -> Result<Self, JobError> {
        let device = crate::device::default_device();
        let staging = std::env::temp_dir().join(format!("taper-generate-{}", std::process::id()));
        let loaded =
            crate::finetune::base::load(rt, uri, None, CheckpointChoice::Latest, &device, &staging);
        let _ = std::fs::remove_dir_all(&staging);
        let loaded = loaded?;
        let model = Model::build(&loaded.arch, loaded.cfg, &loaded.params, None)
            .map_err(|e| JobError::Internal(e.to_string()))?
            .detached();
        let tokenizer = Tokenizer::load(rt, &loaded.tokenizer, None)?;
        Ok(Self {
            model,
            tokenizer,
            device,
        })
    }

    /// Continue `prompt`, calling `on_text` with each new piece of text as it is decoded;
    /// stops at the end-of-text token or after `opts.max_tokens`. Returns the whole
    /// continuation.
    pub fn stream(
        &self,
        prompt: &str,
        opts: &SampleOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<String, JobError> {
        let tok = &self.tokenizer;
        let mut ids = tok.encode_prompt(prompt)?;
        if ids.is_empty() {
            ids.push(tok.eot());
        }
        let mut out: Vec<u32> = Vec::new();
        let mut shown = String::new();
        sample_with(
            &self.model,
            &ids,
            tok.vocab_size() as usize,
            opts,
            &self.device,
            Some(tok.eot()),
            &mut |id| {
                if id == tok.eot() {
                    return;
                }
                out.push(id);
                let text = continuation(tok, "", &ids, &out);
                // A piece that ends inside a multi-byte character waits for the rest.
                if !text.ends_with('\u{fffd}')
                    && let Some(new) = text.strip_prefix(shown.as_str())
                {
                    on_text(new);
                    shown = text;
                }
            },
        )
        .map_err(|e| JobError::Internal(e.to_string()))?;
        Ok(continuation(tok, "", &ids, &out))
    }
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

/// Continue `prompt` by at most `opts.max_tokens` tokens, stopping after `stop` (which is
/// returned too); `on_token` sees each id as it is chosen.
///
/// Only ids below `vocab` are sampled: a model's vocabulary is padded (GPT-2's 50,257 to
/// 50,304), and the padding ids are no token of the tokenizer.
pub fn sample_with(
    model: &Model,
    prompt: &[u32],
    vocab: usize,
    opts: &SampleOptions,
    device: &Device,
    stop: Option<u32>,
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>, ModelError> {
    let block = model.block_size();
    if prompt.is_empty() || vocab == 0 {
        return Err(ModelError::Config(
            "generation needs a prompt and a vocabulary".into(),
        ));
    }
    let mut ids = prompt.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for _ in 0..opts.max_tokens {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        let x = Tensor::new(ctx, device)?.unsqueeze(0)?;
        let logits = model.forward(&x, &mut ForwardCtx::default())?;
        let last = logits.squeeze(0)?.narrow(0, ctx.len() - 1, 1)?.squeeze(0)?;
        let last = last.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let chosen = choose(&last[..vocab.min(last.len())], opts, &mut rng);
        ids.push(chosen);
        on_token(chosen);
        if Some(chosen) == stop {
            break;
        }
    }
    Ok(ids[prompt.len()..].to_vec())
}

/// The next id from `logits`: the argmax at temperature 0, else a draw from the softmax
/// at the temperature over the top-k, then top-p, most likely ids.
pub fn choose(logits: &[f32], opts: &SampleOptions, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let mut scores: Vec<(usize, f32)> = logits.iter().map(|&v| v / t).enumerate().collect();
    scores.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    if opts.top_k > 0 {
        scores.truncate(opts.top_k);
    }
    let max = scores.first().map_or(0.0, |s| s.1);
    let mut weights: Vec<f64> = scores.iter().map(|s| ((s.1 - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    if opts.top_p < 1.0 {
        // The smallest prefix (by probability) whose mass reaches top_p; at least one.
        let mut mass = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                mass += w / total;
                mass >= opts.top_p
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
        scores.truncate(keep);
    }
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (s, w) in scores.iter().zip(&weights) {
        if r < *w {
            return s.0 as u32;
        }
        r -= w;
    }
    scores.last().map_or_else(argmax, |s| s.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p_choose_from_the_right_sets() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let greedy = SampleOptions {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(choose(&logits, &greedy, &mut rng), 1);
        let top2 = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let drawn: std::collections::BTreeSet<u32> =
            (0..200).map(|_| choose(&logits, &top2, &mut rng)).collect();
        assert_eq!(drawn, [1, 2].into(), "top-k 2 draws from the two best");
        // p(1) ≈ 0.45, p(2) ≈ 0.41: top-p 0.5 needs both, top-p 0.4 only the first.
        for (p, want) in [(0.5, vec![1, 2]), (0.4, vec![1])] {
            let opts = SampleOptions {
                temperature: 1.0,
                top_k: 0,
                top_p: p,
                ..Default::default()
            };
            let drawn: Vec<u32> = (0..300)
                .map(|_| choose(&logits, &opts, &mut rng))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(drawn, want, "top-p {p}");
        }
    }
}
