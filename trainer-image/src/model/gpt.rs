//! GPT-2: token and position embeddings, pre-LayerNorm blocks of causal multi-head
//! attention and a GELU MLP (×4), a final LayerNorm and an LM head tied to the token
//! embedding. Parameter names and layouts are Hugging Face GPT-2's (`h.{i}.attn.c_attn.weight`
//! `[n_embd, 3·n_embd]`, Conv1D `[in, out]`), so the public checkpoints load as they are.
//!
//! Mixed precision ([`Gpt::with_compute_dtype`] with bf16) follows PyTorch's autocast, as
//! nanoGPT and lit-gpt train: the parameters stay f32 (the optimizer's master weights) and
//! are cast to bf16 where they are used, so the cast's backward hands f32 gradients to the
//! optimizer; matmuls (the linear layers, attention scores, attention × values, the LM
//! head), GELU and their backward run in bf16; the residual stream, LayerNorm and the loss
//! stay f32, and the softmax (with its scale and causal mask) computes in f32 and hands
//! bf16 probabilities to the attention × values matmul ([`super::causal`], fused on a GPU).

use candle_core::{D, DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use taper_crds::model::GptConfig;

use super::{
    ModelError,
    attention::causal_attention,
    causal::attention_probs,
    cpu::fusable,
    fused::{add_tiled, gelu, layer_norm},
    linear::{Lin, param},
    lora,
    ops::frozen_linear,
    params::{Init, ParamStore, init_rng},
};

/// LayerNorm epsilon of GPT-2.
pub const LN_EPS: f64 = 1e-5;

/// Per-forward options.
#[derive(Debug, Default)]
pub struct ForwardCtx<'a> {
    /// Seeded RNG for dropout masks; `None` disables dropout (evaluation, inference).
    pub dropout_rng: Option<&'a mut ChaCha8Rng>,
}

#[derive(Debug)]
struct Ln {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Ln {
    fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, &self.weight, self.bias.as_ref(), LN_EPS)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: Ln,
    c_attn: Lin,
    attn_proj: Lin,
    ln_2: Ln,
    c_fc: Lin,
    mlp_proj: Lin,
}

/// A GPT-2 model over parameters held in a [`ParamStore`].
#[derive(Debug)]
pub struct Gpt {
    cfg: GptConfig,
    /// The dtype of matmuls and GELU: f32, or bf16 for mixed precision.
    compute: DType,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Ln,
    /// The embeddings are frozen (a LoRA base): the LM head passes no gradient to them.
    frozen_wte: bool,
}

/// The parameters of a GPT-2 of this shape: (name, shape, initialisation), in GPT-2's
/// scheme — normal(0, 0.02) for weights and embeddings, normal(0, 0.02/√(2·n_layer)) for
/// the residual projections, zero biases, unit LayerNorm weights.
pub fn parameter_specs(cfg: &GptConfig) -> Vec<(String, Vec<usize>, Init)> {
    let c = cfg.n_embd as usize;
    let mut specs = vec![
        (
            "wte.weight".to_string(),
            vec![cfg.vocab_size as usize, c],
            Init::Normal(0.02),
        ),
        (
            "wpe.weight".to_string(),
            vec![cfg.block_size as usize, c],
            Init::Normal(0.02),
        ),
    ];
    let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let mut push = |name: String, shape: Vec<usize>, init: Init, is_bias: bool| {
        if !is_bias || cfg.bias {
            specs.push((name, shape, init));
        }
    };
    for i in 0..cfg.n_layer {
        let p = format!("h.{i}");
        push(format!("{p}.ln_1.weight"), vec![c], Init::Const(1.0), false);
        push(format!("{p}.ln_1.bias"), vec![c], Init::Const(0.0), true);
        push(
            format!("{p}.attn.c_attn.weight"),
            vec![c, 3 * c],
            Init::Normal(0.02),
            false,
        );
        push(
            format!("{p}.attn.c_attn.bias"),
            vec![3 * c],
            Init::Const(0.0),
            true,
        );
        push(
            format!("{p}.attn.c_proj.weight"),
            vec![c, c],
            Init::Normal(proj_std),
            false,
        );
        push(
            format!("{p}.attn.c_proj.bias"),
            vec![c],
            Init::Const(0.0),
            true,
        );
        push(format!("{p}.ln_2.weight"), vec![c], Init::Const(1.0), false);
        push(format!("{p}.ln_2.bias"), vec![c], Init::Const(0.0), true);
        push(
            format!("{p}.mlp.c_fc.weight"),
            vec![c, 4 * c],
            Init::Normal(0.02),
            false,
        );
        push(
            format!("{p}.mlp.c_fc.bias"),
            vec![4 * c],
            Init::Const(0.0),
            true,
        );
        push(
            format!("{p}.mlp.c_proj.weight"),
            vec![4 * c, c],
            Init::Normal(proj_std),
            false,
        );
        push(
            format!("{p}.mlp.c_proj.bias"),
            vec![c],
            Init::Const(0.0),
            true,
        );
    }
    push("ln_f.weight".to_string(), vec![c], Init::Const(1.0), false);
    push("ln_f.bias".to_string(), vec![c], Init::Const(0.0), true);
    specs
}

/// Fresh parameters for `cfg`, initialised from `seed` (identical on every device).
pub fn init_params(cfg: &GptConfig, seed: u64, device: &Device) -> Result<ParamStore, ModelError> {
    let mut rng = init_rng(seed);
    let mut store = ParamStore::new();
    for (name, shape, init) in parameter_specs(cfg) {
        store.insert_init(&name, &shape, init, &mut rng, device)?;
    }
    Ok(store)
}

/// Inverted dropout: each element is zeroed with probability `p` and the rest scaled by
/// `1 / (1 - p)`, so the expectation is unchanged. No RNG (evaluation, generation) or
/// `p == 0` is the identity. One 32-bit draw per element.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut ChaCha8Rng>) -> candle_core::Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    use rand::RngCore;
    // Drop when the draw falls below p·2³².
    let threshold = (p.min(1.0) * 4_294_967_296.0) as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let keep: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if u64::from(rng.next_u32()) < threshold {
                0.0
            } else {
                scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

impl Gpt {
    /// The model over `params`, which must hold every tensor of [`parameter_specs`]; every
    /// parameter trainable (pretraining, full finetuning).
    pub fn new(cfg: GptConfig, params: &ParamStore) -> Result<Self, ModelError> {
        Self::build(cfg, params, None)
    }

    /// The model with LoRA adapters: `params` also hold the adapters of `lora` (see
    /// [`lora::add_adapters`]); the base is frozen, only the adapters get gradients.
    pub fn with_lora(
        cfg: GptConfig,
        params: &ParamStore,
        lora: &taper_crds::finetune::Lora,
    ) -> Result<Self, ModelError> {
        Self::build(cfg, params, Some(lora))
    }

    fn build(
        cfg: GptConfig,
        params: &ParamStore,
        lora: Option<&taper_crds::finetune::Lora>,
    ) -> Result<Self, ModelError> {
        if cfg.n_head <= 0 || cfg.n_embd % cfg.n_head != 0 {
            return Err(ModelError::Config(format!(
                "nHead ({}) must divide nEmbd ({})",
                cfg.n_head, cfg.n_embd
            )));
        }
        let frozen = lora.is_some();
        let get = |name: &str| param(params, name, frozen);
        let opt = |name: String| -> Result<Option<Tensor>, ModelError> {
            if cfg.bias {
                get(&name).map(Some)
            } else {
                Ok(None)
            }
        };
        let ln = |p: &str| -> Result<Ln, ModelError> {
            Ok(Ln {
                weight: get(&format!("{p}.weight"))?,
                bias: opt(format!("{p}.bias"))?,
            })
        };
        let adapted = match lora {
            Some(l) => lora::adapted_layers(&cfg, l)?,
            None => Vec::new(),
        };
        let lin = |p: &str| Lin::from_params(params, p, cfg.bias, lora, &adapted);
        let mut blocks = Vec::with_capacity(cfg.n_layer as usize);
        for i in 0..cfg.n_layer {
            let p = format!("h.{i}");
            blocks.push(Block {
                ln_1: ln(&format!("{p}.ln_1"))?,
                c_attn: lin(&format!("{p}.attn.c_attn"))?,
                attn_proj: lin(&format!("{p}.attn.c_proj"))?,
                ln_2: ln(&format!("{p}.ln_2"))?,
                c_fc: lin(&format!("{p}.mlp.c_fc"))?,
                mlp_proj: lin(&format!("{p}.mlp.c_proj"))?,
            });
        }
        let wte = get("wte.weight")?;
        Ok(Self {
            cfg,
            // By default the model computes in its parameters' dtype.
            compute: wte.dtype(),
            wte,
            wpe: get("wpe.weight")?,
            blocks,
            ln_f: ln("ln_f")?,
            frozen_wte: frozen,
        })
    }

    /// The same model computing its matmuls and GELU in `dtype` (bf16 for mixed precision;
    /// by default the parameters' dtype); the parameters keep their own. See the module's
    /// comment.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The dtype of matmuls and GELU.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// The same model over detached views of its parameters: they share storage (and so
    /// follow optimizer updates) but build no gradient graph, for evaluation and sampling.
    pub fn detached(&self) -> Self {
        Self {
            cfg: self.cfg,
            compute: self.compute,
            wte: self.wte.detach(),
            wpe: self.wpe.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln_1: b.ln_1.detached(),
                    c_attn: b.c_attn.detached(),
                    attn_proj: b.attn_proj.detached(),
                    ln_2: b.ln_2.detached(),
                    c_fc: b.c_fc.detached(),
                    mlp_proj: b.mlp_proj.detached(),
                })
                .collect(),
            ln_f: self.ln_f.detached(),
            frozen_wte: self.frozen_wte,
        }
    }

    /// The architecture.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits `[B, T, vocab]` for token ids `idx` `[B, T]` (u32), `T <= blockSize`.
    pub fn forward(&self, idx: &Tensor, ctx: &mut ForwardCtx<'_>) -> Result<Tensor, ModelError> {
        let (b, t) = idx.dims2()?;
        if t > self.cfg.block_size as usize {
            return Err(ModelError::Config(format!(
                "sequence of {t} tokens is longer than blockSize {}",
                self.cfg.block_size
            )));
        }
        let c = self.cfg.n_embd as usize;
        let h = self.cfg.n_head as usize;
        let hd = c / h;
        let p = self.cfg.dropout;
        let dt = self.compute;
        // The residual stream, LayerNorm and softmax in the parameters' dtype (f32).
        let master = self.wte.dtype();
        let tok = self
            .wte
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        let pos = self.wpe.narrow(0, 0, t)?;
        // The residual stream is [batch·t, c]: the linear layers take it without a reshape
        // (each one a graph node, a zeroed gradient and an add in the backward).
        let x = add_tiled(&tok, &pos)?.reshape((b * t, c))?;
        let mut x = dropout(&x, p, ctx.dropout_rng.as_deref_mut())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for blk in &self.blocks {
            // Attention.
            let qkv =
                blk.c_attn
                    .forward(&blk.ln_1.forward(&x)?, dt, ctx.dropout_rng.as_deref_mut())?;
            let y = if fusable(&qkv) && (p <= 0.0 || ctx.dropout_rng.is_none()) {
                causal_attention(&qkv, t, h, scale)?
            } else {
                let qkv = qkv.reshape((b, t, 3 * c))?;
                attention_composed(&qkv, h, scale, p, ctx.dropout_rng.as_deref_mut())?
                    .reshape((b * t, c))?
            };
            let y = dropout(
                &blk.attn_proj
                    .forward(&y, dt, ctx.dropout_rng.as_deref_mut())?,
                p,
                ctx.dropout_rng.as_deref_mut(),
            )?;
            x = (x + y.to_dtype(master)?)?;
            // MLP.
            let m = gelu(&blk.c_fc.forward(
                &blk.ln_2.forward(&x)?,
                dt,
                ctx.dropout_rng.as_deref_mut(),
            )?)?;
            let m = dropout(
                &blk.mlp_proj
                    .forward(&m, dt, ctx.dropout_rng.as_deref_mut())?,
                p,
                ctx.dropout_rng.as_deref_mut(),
            )?;
            x = (x + m.to_dtype(master)?)?;
        }
        let x = self.ln_f.forward(&x)?.to_dtype(dt)?;
        let head = self.wte.to_dtype(dt)?.t()?;
        let logits = if self.frozen_wte {
            frozen_linear(&x, &head, None)?
        } else {
            x.matmul(&head)?
        };
        Ok(logits.reshape((b, t, self.cfg.vocab_size as usize))?)
    }
}

/// Causal self-attention from `qkv` `[batch, t, 3·c]` composed of candle's ops, with
/// dropout on the probabilities: the path off the CPU and with attention dropout, and the
/// reference for the fused CPU op ([`causal_attention`]).
pub(crate) fn attention_composed(
    qkv: &Tensor,
    h: usize,
    scale: f64,
    p: f64,
    rng: Option<&mut ChaCha8Rng>,
) -> candle_core::Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let (c, hd) = (c3 / 3, c3 / 3 / h);
    let heads = |i: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(D::Minus1, i * c, c)?
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
    let att = dropout(&attention_probs(&q.matmul(&k.t()?)?, scale)?, p, rng)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))
}

/// FLOPs per token of a training step (forward and backward), nanoGPT's estimate:
/// `6·N + 12·L·H·Q·T` with N the non-embedding-corrected parameter count.
pub fn flops_per_token(cfg: &GptConfig, n_params: usize) -> f64 {
    let head_dim = (cfg.n_embd / cfg.n_head) as f64;
    6.0 * n_params as f64
        + 12.0 * cfg.n_layer as f64 * cfg.n_head as f64 * head_dim * cfg.block_size as f64
}
