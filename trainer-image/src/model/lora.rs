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

/// A Linear layer a LoRA can adapt: its path (`h.0.attn.c_attn`) and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linear {
    /// Path of the layer; its weight is `{path}.weight`.
    pub path: String,
    /// Input features.
    pub fan_in: usize,
    /// Output features.
    pub fan_out: usize,
}

/// The Linear layers of a GPT-2, in block order.
pub fn gpt2_linears(cfg: &GptConfig) -> Vec<Linear> {
    let c = cfg.n_embd as usize;
    (0..cfg.n_layer)
        .flat_map(|i| {
            LINEAR_LAYERS.iter().map(move |l| {
                let (fan_in, fan_out) = match *l {
                    "attn.c_attn" => (c, 3 * c),
                    "mlp.c_fc" => (c, 4 * c),
                    "mlp.c_proj" => (4 * c, c),
                    _ => (c, c),
                };
                Linear {
                    path: format!("h.{i}.{l}"),
                    fan_in,
                    fan_out,
                }
            })
        })
        .collect()
}

/// The layers of `linears` that `lora.targets` adapt (see the module's comment). On a
/// model without `c_attn` (Llama), `c_attn` means what it means on GPT-2: the query, key
/// and value projections (`q_proj`, `k_proj`, `v_proj`). A target that matches no layer
/// is an error naming the valid ones.
pub fn adapted<'a>(linears: &'a [Linear], lora: &Lora) -> Result<Vec<&'a Linear>, ModelError> {
    let matches =
        |path: &str, target: &str| path == target || path.ends_with(&format!(".{target}"));
    let has = |t: &str| linears.iter().any(|l| matches(&l.path, t));
    let mut targets: Vec<&str> = Vec::new();
    for t in &lora.targets {
        if t == "c_attn" && !has("c_attn") {
            targets.extend(["q_proj", "k_proj", "v_proj"]);
        } else {
            targets.push(t);
        }
    }
    if let Some(bad) = targets.iter().find(|t| !has(t)) {
        let mut names: Vec<&str> = linears
            .iter()
            .filter_map(|l| l.path.rsplit('.').next())
            .collect();
        names.sort_unstable();
        names.dedup();
        return Err(ModelError::Config(format!(
            "method.lora.targets: {bad:?} matches no Linear layer of this model; its layers are {}",
            names.join(", ")
        )));
    }
    Ok(linears
        .iter()
        .filter(|l| targets.iter().any(|t| matches(&l.path, t)))
        .collect())
}

/// The paths (`h.{i}.attn.c_attn`) of the GPT-2 layers `lora.targets` adapt.
pub fn adapted_layers(cfg: &GptConfig, lora: &Lora) -> Result<Vec<String>, ModelError> {
    Ok(adapted(&gpt2_linears(cfg), lora)?
        .into_iter()
        .map(|l| l.path.clone())
        .collect())
}

/// The adapter tensors of the layers of `linears` that `lora` adapts: (name, shape,
/// initialisation).
pub fn adapter_specs_for(
    linears: &[Linear],
    lora: &Lora,
) -> Result<Vec<(String, Vec<usize>, Init)>, ModelError> {
    if lora.r <= 0 {
        return Err(ModelError::Config("method.lora.r must be positive".into()));
    }
    let r = lora.r as usize;
    let mut specs = Vec::new();
    for l in adapted(linears, lora)? {
        specs.push((
            format!("{}.lora_A.weight", l.path),
            vec![r, l.fan_in],
            Init::Uniform(1.0 / (l.fan_in as f64).sqrt()),
        ));
        specs.push((
            format!("{}.lora_B.weight", l.path),
            vec![l.fan_out, r],
            Init::Const(0.0),
        ));
    }
    Ok(specs)
}

/// Add freshly initialised adapters for the layers of `linears` to `params`, from `seed`.
pub fn add_adapters_to(
    params: &mut ParamStore,
    linears: &[Linear],
    lora: &Lora,
    seed: u64,
    device: &Device,
) -> Result<(), ModelError> {
    let mut rng = init_rng(seed);
    for (name, shape, init) in adapter_specs_for(linears, lora)? {
        params.insert_init(&name, &shape, init, &mut rng, device)?;
    }
    Ok(())
}

/// Add freshly initialised adapters to `params` (which hold the base), from `seed`.
pub fn add_adapters(
    params: &mut ParamStore,
    cfg: &GptConfig,
    lora: &Lora,
    seed: u64,
    device: &Device,
) -> Result<(), ModelError> {
    add_adapters_to(params, &gpt2_linears(cfg), lora, seed, device)
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

/// The adapters under PEFT's names, `prefix` ([`PEFT_PREFIX`] for GPT-2) before ours.
pub fn peft_tensors(adapters: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    adapters
        .iter()
        .filter(|(name, _)| is_adapter(name))
        .map(|(name, t)| (format!("{prefix}{name}"), t.clone()))
        .collect()
}

/// PEFT's `adapter_config.json` for these adapters of the model at `base`;
/// `fan_in_fan_out` is true for GPT-2's Conv1D layers.
pub fn peft_config(lora: &Lora, base: &str, fan_in_fan_out: bool) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "fan_in_fan_out": fan_in_fan_out,
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
        assert!(
            err.to_string().contains("\"q_proj\"") && err.to_string().contains("c_attn, c_fc"),
            "{err}"
        );
    }

    #[test]
    fn shapes_and_initialisation() {
        let specs = adapter_specs_for(&gpt2_linears(&cfg()), &lora(&["c_fc"])).expect("specs");
        let (name, shape, init) = &specs[0];
        assert_eq!(name, "h.0.mlp.c_fc.lora_A.weight");
        assert_eq!(shape, &[8, 8]);
        assert_eq!(*init, Init::Uniform(1.0 / 8f64.sqrt()));
        assert_eq!(specs[1].1, [32, 8], "B is [out, r]");
        assert_eq!(specs[1].2, Init::Const(0.0), "B starts at zero");
    }
}
