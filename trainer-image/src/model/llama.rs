//! Llama (`LlamaForCausalLM`: TinyLlama, Llama 2 and 3, lit-llama in HF layout): token
//! embedding, blocks of RMSNorm → grouped-query causal attention with rotary position
//! embeddings → RMSNorm → SwiGLU MLP, a final RMSNorm and an LM head (tied to the
//! embedding or not). Names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`);
//! Linear weights, stored `[out, in]` there, are held transposed (`[in, out]`) so that the
//! layers and their LoRA adapters are GPT-2's ([`super::linear`]), and transposed back on
//! export. Only differentiable ops: RMSNorm and the rotation are composed (candle's fused
//! `rms_norm` and `rope` have no backward), SiLU is `x / (1 + e^-x)`.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use taper_crds::{finetune::Lora, model::GptConfig};

use super::{
    ModelError,
    causal::attention_probs,
    gpt::ForwardCtx,
    linear::{Lin, param},
    lora::{self, Linear},
    ops::frozen_linear,
    params::ParamStore,
};

/// A Llama's architecture, from its `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LlamaConfig {
    /// Blocks (`num_hidden_layers`).
    pub n_layer: usize,
    /// Query heads (`num_attention_heads`).
    pub n_head: usize,
    /// Key/value heads (`num_key_value_heads`; fewer than `n_head` is grouped-query).
    pub n_kv_head: usize,
    /// Width (`hidden_size`).
    pub n_embd: usize,
    /// MLP width (`intermediate_size`).
    pub intermediate: usize,
    /// Vocabulary.
    pub vocab_size: usize,
    /// Context (`max_position_embeddings`).
    pub block_size: usize,
    /// Rotary base (`rope_theta`).
    pub rope_theta: f64,
    /// RMSNorm epsilon (`rms_norm_eps`).
    pub rms_eps: f64,
    /// LM head tied to the embedding (`tie_word_embeddings`).
    pub tie_embeddings: bool,
}

const PROJ: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl LlamaConfig {
    /// The architecture of a Hugging Face `config.json` of a Llama.
    pub fn from_hf(c: &serde_json::Value) -> Result<Self, String> {
        let int = |key: &str| -> Result<usize, String> {
            c.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| format!("config.json lacks the integer {key:?}"))
        };
        if let Some(act) = c.get("hidden_act").and_then(|v| v.as_str())
            && act != "silu"
        {
            return Err(format!(
                "hidden_act {act:?}: only silu (SwiGLU) is supported"
            ));
        }
        // transformers 4 writes `rope_theta` and `rope_scaling`; 5 writes `rope_parameters`.
        let rope = c.get("rope_parameters");
        let rope_type = rope
            .and_then(|r| r.get("rope_type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if c.get("rope_scaling").is_some_and(|v| !v.is_null()) || rope_type != "default" {
            return Err("rope scaling is not supported (Llama 3.1's long-context scaling)".into());
        }
        if c.get("attention_bias").and_then(|v| v.as_bool()) == Some(true)
            || c.get("mlp_bias").and_then(|v| v.as_bool()) == Some(true)
        {
            return Err("attention_bias/mlp_bias are not supported".into());
        }
        let n_head = int("num_attention_heads")?;
        let cfg = Self {
            n_layer: int("num_hidden_layers")?,
            n_head,
            n_kv_head: int("num_key_value_heads").unwrap_or(n_head),
            n_embd: int("hidden_size")?,
            intermediate: int("intermediate_size")?,
            vocab_size: int("vocab_size")?,
            block_size: int("max_position_embeddings")?,
            rope_theta: c
                .get("rope_theta")
                .or_else(|| rope.and_then(|r| r.get("rope_theta")))
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0),
            rms_eps: c
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            tie_embeddings: c
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        let head_dim = c.get("head_dim").and_then(|v| v.as_u64());
        if n_head == 0
            || cfg.n_kv_head == 0
            || !cfg.n_embd.is_multiple_of(n_head)
            || !n_head.is_multiple_of(cfg.n_kv_head)
            || head_dim.is_some_and(|d| d as usize * n_head != cfg.n_embd)
        {
            return Err(format!(
                "heads: {n_head} query and {} key/value heads for width {}",
                cfg.n_kv_head, cfg.n_embd
            ));
        }
        Ok(cfg)
    }

    /// Hugging Face's `config.json` for this architecture.
    pub fn to_hf(&self, eot: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "eos_token_id": eot,
            "torch_dtype": "float32",
        })
    }

    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The GPT-shaped summary the training loop reports and checks (layers, heads, width,
    /// context, vocabulary).
    pub fn summary(&self) -> GptConfig {
        GptConfig {
            n_layer: self.n_layer as i64,
            n_head: self.n_head as i64,
            n_embd: self.n_embd as i64,
            block_size: self.block_size as i64,
            vocab_size: self.vocab_size as i64,
            dropout: 0.0,
            bias: false,
        }
    }

    /// The Linear layers of the blocks (LoRA's candidates).
    pub fn linears(&self) -> Vec<Linear> {
        let (c, kv, m) = (
            self.n_embd,
            self.n_kv_head * self.head_dim(),
            self.intermediate,
        );
        (0..self.n_layer)
            .flat_map(|i| {
                PROJ.iter().map(move |p| {
                    let (fan_in, fan_out) = match *p {
                        "self_attn.k_proj" | "self_attn.v_proj" => (c, kv),
                        "mlp.gate_proj" | "mlp.up_proj" => (c, m),
                        "mlp.down_proj" => (m, c),
                        _ => (c, c),
                    };
                    Linear {
                        path: format!("model.layers.{i}.{p}"),
                        fan_in,
                        fan_out,
                    }
                })
            })
            .collect()
    }

    /// Every tensor of the model with the shape it is held in (Linear weights `[in, out]`).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.n_embd;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, c],
        )];
        for i in 0..self.n_layer {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                out.push((format!("model.layers.{i}.{norm}.weight"), vec![c]));
            }
        }
        out.extend(
            self.linears()
                .into_iter()
                .map(|l| (format!("{}.weight", l.path), vec![l.fan_in, l.fan_out])),
        );
        out.push(("model.norm.weight".to_string(), vec![c]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![c, self.vocab_size]));
        }
        out
    }
}

/// Whether `name` is a Linear weight (stored `[out, in]` by Hugging Face).
fn is_linear(name: &str) -> bool {
    name.ends_with("_proj.weight") || name == "lm_head.weight"
}

/// The parameters of `cfg` from Hugging Face tensors: every one must be there with its
/// shape (extra ones, such as rotary buffers, are ignored).
pub fn params_from_hf(
    cfg: &LlamaConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<ParamStore, ModelError> {
    let mut params = ParamStore::new();
    for (name, shape) in cfg.tensor_shapes() {
        let t = tensors
            .get(&name)
            .ok_or_else(|| ModelError::MissingParameter(name.clone()))?;
        let t = if is_linear(&name) { t.t()? } else { t.clone() };
        if t.dims() != shape.as_slice() {
            let hf = |s: &[usize]| {
                if is_linear(&name) {
                    s.iter().rev().copied().collect()
                } else {
                    s.to_vec()
                }
            };
            return Err(ModelError::ShapeMismatch {
                expected: hf(&shape),
                found: hf(t.dims()),
                name,
            });
        }
        params.insert_tensor(&name, &t.to_dtype(DType::F32)?.contiguous()?)?;
    }
    Ok(params)
}

/// The model's tensors in Hugging Face's layout (Linear weights back to `[out, in]`),
/// adapters left out.
pub fn hf_tensors(
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        if lora::is_adapter(name) {
            continue;
        }
        let t = if is_linear(name) {
            t.t()?.contiguous()?
        } else {
            t.clone()
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

#[derive(Debug)]
struct Layer {
    in_norm: Tensor,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    post_norm: Tensor,
    gate: Lin,
    up: Lin,
    down: Lin,
}

/// A Llama over parameters held in a [`ParamStore`].
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    compute: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The untied LM head (`[C, V]`); `None` when tied to the embedding.
    head: Option<Lin>,
    frozen: bool,
}

/// RMSNorm in f32: `x / √(mean(x²) + eps) · w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// `(cos, sin)` `[T, head_dim]` of Hugging Face's rotary embedding (halves, not pairs).
fn rope_tables(
    t: usize,
    hd: usize,
    theta: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * hd);
    let mut sin = Vec::with_capacity(t * hd);
    for pos in 0..t {
        let angles: Vec<f64> = (0..half)
            .map(|i| pos as f64 / theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos() as f32));
            sin.extend(angles.iter().map(|a| a.sin() as f32));
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, hd), device)?,
        Tensor::from_vec(sin, (t, hd), device)?,
    ))
}

/// `x·cos + rotate_half(x)·sin` for `x` `[B, H, T, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[B, KV, T, hd]` → `[B, KV·rep, T, hd]`, each key/value head repeated for its queries.
fn repeat_kv(x: Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, hd))?
        .reshape((b, kv * rep, t, hd))
}

impl Llama {
    /// The model over `params` (from [`params_from_hf`]); with `lora`, `params` also hold
    /// the adapters and the base is frozen.
    pub fn new(
        cfg: LlamaConfig,
        params: &ParamStore,
        lora: Option<&Lora>,
    ) -> Result<Self, ModelError> {
        let frozen = lora.is_some();
        let get = |name: &str| param(params, name, frozen);
        let linears = cfg.linears();
        let adapted: Vec<String> = match lora {
            Some(l) => lora::adapted(&linears, l)?
                .into_iter()
                .map(|l| l.path.clone())
                .collect(),
            None => Vec::new(),
        };
        let lin = |p: &str| Lin::from_params(params, p, false, lora, &adapted);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                in_norm: get(&format!("{p}.input_layernorm.weight"))?,
                q: lin(&format!("{p}.self_attn.q_proj"))?,
                k: lin(&format!("{p}.self_attn.k_proj"))?,
                v: lin(&format!("{p}.self_attn.v_proj"))?,
                o: lin(&format!("{p}.self_attn.o_proj"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: lin(&format!("{p}.mlp.gate_proj"))?,
                up: lin(&format!("{p}.mlp.up_proj"))?,
                down: lin(&format!("{p}.mlp.down_proj"))?,
            });
        }
        let head = if cfg.tie_embeddings {
            None
        } else {
            Some(lin("lm_head")?)
        };
        let embed = get("model.embed_tokens.weight")?;
        Ok(Self {
            cfg,
            compute: embed.dtype(),
            embed,
            layers,
            norm: get("model.norm.weight")?,
            head,
            frozen,
        })
    }

    /// The same model computing its matmuls in `dtype` (bf16 for mixed precision).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = dtype;
        self
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The same model over detached views of its parameters (no gradient graph).
    pub fn detached(&self) -> Self {
        Self {
            cfg: self.cfg,
            compute: self.compute,
            embed: self.embed.detach(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    in_norm: l.in_norm.detach(),
                    q: l.q.detached(),
                    k: l.k.detached(),
                    v: l.v.detached(),
                    o: l.o.detached(),
                    post_norm: l.post_norm.detach(),
                    gate: l.gate.detached(),
                    up: l.up.detached(),
                    down: l.down.detached(),
                })
                .collect(),
            norm: self.norm.detach(),
            head: self.head.as_ref().map(Lin::detached),
            frozen: self.frozen,
        }
    }

    /// Logits `[B, T, vocab]` for token ids `idx` `[B, T]` (u32).
    pub fn forward(&self, idx: &Tensor, ctx: &mut ForwardCtx<'_>) -> Result<Tensor, ModelError> {
        let (b, t) = idx.dims2()?;
        let cfg = &self.cfg;
        if t > cfg.block_size {
            return Err(ModelError::Config(format!(
                "sequence of {t} tokens is longer than the context ({})",
                cfg.block_size
            )));
        }
        let (h, kv, hd, c) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim(), cfg.n_embd);
        let dt = self.compute;
        let dev = idx.device();
        let (cos, sin) = rope_tables(t, hd, cfg.rope_theta, dev)?;
        let (cos, sin) = (cos.to_dtype(dt)?, sin.to_dtype(dt)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&idx.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        for l in &self.layers {
            let n = rms_norm(&x, &l.in_norm, cfg.rms_eps)?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = heads(l.q.forward(&n, dt, ctx.dropout_rng.as_deref_mut())?, h)?;
            let k = heads(l.k.forward(&n, dt, ctx.dropout_rng.as_deref_mut())?, kv)?;
            let v = heads(l.v.forward(&n, dt, ctx.dropout_rng.as_deref_mut())?, kv)?;
            let q = rope(&q, &cos, &sin)?;
            let k = repeat_kv(rope(&k, &cos, &sin)?, h / kv)?.contiguous()?;
            let v = repeat_kv(v, h / kv)?.contiguous()?;
            let att = attention_probs(&q.matmul(&k.t()?)?, scale)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
            let y = l.o.forward(&y, dt, ctx.dropout_rng.as_deref_mut())?;
            x = (x + y.to_dtype(DType::F32)?)?;
            let n = rms_norm(&x, &l.post_norm, cfg.rms_eps)?;
            let g = l.gate.forward(&n, dt, ctx.dropout_rng.as_deref_mut())?;
            let u = l.up.forward(&n, dt, ctx.dropout_rng.as_deref_mut())?;
            let silu = g.broadcast_div(&(g.neg()?.exp()? + 1.0)?)?;
            let m = l
                .down
                .forward(&(silu * u)?, dt, ctx.dropout_rng.as_deref_mut())?;
            x = (x + m.to_dtype(DType::F32)?)?;
        }
        let x = rms_norm(&x, &self.norm, cfg.rms_eps)?.reshape((b * t, c))?;
        let logits = match &self.head {
            Some(head) => head.forward(&x, dt, ctx.dropout_rng.as_deref_mut())?,
            None => {
                let w = self.embed.to_dtype(dt)?.t()?;
                let x = x.to_dtype(dt)?;
                if self.frozen {
                    frozen_linear(&x, &w, None)?
                } else {
                    x.matmul(&w)?
                }
            }
        };
        Ok(logits.reshape((b, t, cfg.vocab_size))?)
    }
}
