//! LoRA (Hu et al., 2021) on GPT-2's Linear layers: `y = x·W + b + dropout(x)·Aᵀ·Bᵀ·(alpha/r)`
//! with `A` `[r, in]` Kaiming-uniform and `B` `[out, r]` zero, so that training starts
//! exactly from the base model. Only `A` and `B` are trained; the base is frozen.
//!
//! Names follow PEFT's: the adapter of `h.0.attn.c_attn` is `h.0.attn.c_attn.lora_A.weight`
//! and `…lora_B.weight`; [`peft_tensors`] adds the `base_model.model.transformer.` prefix
//! under which PEFT saves a GPT-2 adapter (`adapter_model.safetensors`), and
//! [`peft_config`] writes its `adapter_config.json` (`fan_in_fan_out: true`: GPT-2's
//! Conv1D stores `W` as `[in, out]`).
//!
//! A target names Linear layers as PEFT's `target_modules` does: a layer matches when its
//! path equals the target or ends with `.` and the target. So `c_attn` adapts the fused
//! query/key/value projection of every block, `c_proj` both output projections (attention
//! and MLP), `attn.c_proj` only the attention's, `c_fc` and `mlp.c_proj` the MLP's.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use taper_crds::{finetune::Lora, model::GptConfig};

use super::{
    ModelError,
    params::{Init, ParamStore, init_rng},
};

/// The Linear layers of a GPT-2 block, by path under `h.{i}`.
pub const LINEAR_LAYERS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// The prefix PEFT gives the tensors of a GPT-2 (`GPT2LMHeadModel`) adapter.
pub const PEFT_PREFIX: &str = "base_model.model.transformer.";

/// Whether `name` is a LoRA tensor (trainable in a LoRA run).
pub fn is_adapter(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

/// The multiplier of the adapters' output, `alpha / r`.
pub fn scale(lora: &Lora) -> f64 {
    lora.alpha / lora.r.max(1) as f64
}

/// `(in, out)` of a block's Linear layer.
fn in_out(cfg: &GptConfig, layer: &str) -> (usize, usize) {
    let c = cfg.n_embd as usize;
    match layer {
        "attn.c_attn" => (c, 3 * c),
        "mlp.c_fc" => (c, 4 * c),
        "mlp.c_proj" => (4 * c, c),
        _ => (c, c),
    }
}

/// The paths (`h.{i}.attn.c_attn`) of the layers `lora.targets` adapt, in block order.
/// A target that matches no layer is an error naming the valid ones.
pub fn adapted_layers(cfg: &GptConfig, lora: &Lora) -> Result<Vec<String>, ModelError> {
    let matches =
        |layer: &str, target: &str| layer == target || layer.ends_with(&format!(".{target}"));
    if let Some(bad) = lora
        .targets
        .iter()
        .find(|t| !LINEAR_LAYERS.iter().any(|l| matches(l, t)))
    {
        return Err(ModelError::Config(format!(
            "method.lora.targets: {bad:?} matches no Linear layer of GPT-2; use c_attn, c_proj, attn.c_proj, c_fc or mlp.c_proj"
        )));
    }
    Ok((0..cfg.n_layer)
        .flat_map(|i| {
            LINEAR_LAYERS
                .iter()
                .filter(|l| lora.targets.iter().any(|t| matches(l, t)))
                .map(move |l| format!("h.{i}.{l}"))
        })
        .collect())
}

/// The adapter tensors for `cfg` and `lora`: (name, shape, initialisation).
pub fn adapter_specs(
    cfg: &GptConfig,
    lora: &Lora,
) -> Result<Vec<(String, Vec<usize>, Init)>, ModelError> {
    if lora.r <= 0 {
        return Err(ModelError::Config("method.lora.r must be positive".into()));
    }
    let r = lora.r as usize;
    let mut specs = Vec::new();
    for path in adapted_layers(cfg, lora)? {
        let layer = path.splitn(3, '.').nth(2).unwrap_or_default();
        let (fan_in, fan_out) = in_out(cfg, layer);
        specs.push((
            format!("{path}.lora_A.weight"),
            vec![r, fan_in],
            Init::Uniform(1.0 / (fan_in as f64).sqrt()),
        ));
        specs.push((
            format!("{path}.lora_B.weight"),
            vec![fan_out, r],
            Init::Const(0.0),
        ));
    }
    Ok(specs)
}

/// Add freshly initialised adapters to `params` (which hold the base), from `seed`.
pub fn add_adapters(
    params: &mut ParamStore,
    cfg: &GptConfig,
    lora: &Lora,
    seed: u64,
    device: &Device,
) -> Result<(), ModelError> {
    let mut rng = init_rng(seed);
    for (name, shape, init) in adapter_specs(cfg, lora)? {
        params.insert_init(&name, &shape, init, &mut rng, device)?;
    }
    Ok(())
}

/// The base weights with the adapters folded in: `W + (alpha/r)·(B·A)ᵀ` for every adapted
/// layer (`W` is `[in, out]`), every other tensor as it is. Adapter tensors are not copied.
pub fn merge(
    base: &BTreeMap<String, Tensor>,
    adapters: &BTreeMap<String, Tensor>,
    lora: &Lora,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    let s = scale(lora);
    let mut out = BTreeMap::new();
    for (name, w) in base {
        if is_adapter(name) {
            continue;
        }
        let Some(layer) = name.strip_suffix(".weight") else {
            out.insert(name.clone(), w.clone());
            continue;
        };
        let merged = match (
            adapters.get(&format!("{layer}.lora_A.weight")),
            adapters.get(&format!("{layer}.lora_B.weight")),
        ) {
            (Some(a), Some(b)) => {
                let delta = (b.matmul(a)?.t()? * s)?.to_dtype(w.dtype())?;
                (w + delta)?
            }
            _ => w.clone(),
        };
        out.insert(name.clone(), merged);
    }
    Ok(out)
}

/// The adapters under PEFT's names (see the module's comment).
pub fn peft_tensors(adapters: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    adapters
        .iter()
        .filter(|(name, _)| is_adapter(name))
        .map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t.clone()))
        .collect()
}

/// PEFT's `adapter_config.json` for these adapters of the model at `base`.
pub fn peft_config(lora: &Lora, base: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "fan_in_fan_out": true,
        "bias": "none",
        "inference_mode": true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 16,
            vocab_size: 32,
            dropout: 0.0,
            bias: true,
        }
    }

    fn lora(targets: &[&str]) -> Lora {
        Lora {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Lora::default()
        }
    }

    #[test]
    fn targets_match_as_peft_target_modules_do() {
        let layers = |t: &[&str]| adapted_layers(&cfg(), &lora(t)).expect("valid");
        assert_eq!(layers(&["c_attn"]), ["h.0.attn.c_attn", "h.1.attn.c_attn"]);
        assert_eq!(
            layers(&["c_proj"]),
            [
                "h.0.attn.c_proj",
                "h.0.mlp.c_proj",
                "h.1.attn.c_proj",
                "h.1.mlp.c_proj"
            ]
        );
        assert_eq!(
            layers(&["mlp.c_proj"]),
            ["h.0.mlp.c_proj", "h.1.mlp.c_proj"]
        );
        let err = adapted_layers(&cfg(), &lora(&["q_proj"])).expect_err("no such layer");
        assert!(err.to_string().contains("\"q_proj\""), "{err}");
    }

    #[test]
    fn shapes_and_initialisation() {
        let specs = adapter_specs(&cfg(), &lora(&["c_fc"])).expect("specs");
        let (name, shape, init) = &specs[0];
        assert_eq!(name, "h.0.mlp.c_fc.lora_A.weight");
        assert_eq!(shape, &[8, 8]);
        assert_eq!(*init, Init::Uniform(1.0 / 8f64.sqrt()));
        assert_eq!(specs[1].1, [32, 8], "B is [out, r]");
        assert_eq!(specs[1].2, Init::Const(0.0), "B starts at zero");
    }
}
