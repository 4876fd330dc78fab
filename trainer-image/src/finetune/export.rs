//! What a finetuning run publishes under `output.location`:
//!
//! ```text
//! adapter/adapter_model.safetensors   LoRA tensors under PEFT's names
//! adapter/adapter_config.json         PEFT's LoraConfig
//! adapter/manifest.json               size and sha256 of each file — written LAST
//! model/model.safetensors             the whole model (base + adapters merged), GPT-2 names
//! model/config.json                   Hugging Face GPT2Config
//! model/tokenizer.json                the tokenizer, when it is a tokenizer.json
//! model/manifest.json                 written LAST
//! ```
//!
//! PEFT loads the adapter onto the base (`PeftModel.from_pretrained`), and `transformers`
//! loads the model folder (`GPT2LMHeadModel.from_pretrained`), as do `taper generate` and
//! `taper chat`.

use std::{collections::BTreeMap, path::Path};

use candle_core::Tensor;
use taper_crds::{finetune::Lora, model::GptConfig};

use crate::{
    model::{Arch, llama, lora},
    store::{ObjectStore, join, sha256_file},
};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A local file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Tensors could not be written.
    #[error("tensors: {0}")]
    Candle(#[from] candle_core::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The tokenizer to ship with the model could not be read.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::prepare::PrepareError),
}

impl ExportError {
    /// The failure's category: a store outage is retryable, the rest is not.
    pub fn category(&self) -> taper_crds::exit::Category {
        match self {
            Self::Store(e) => e.category(),
            Self::Tokenizer(e) => e.category(),
            _ => taper_crds::exit::Category::Internal,
        }
    }
}

/// One file of a folder to publish.
#[derive(Debug)]
pub enum File {
    /// Named tensors, as safetensors.
    Tensors(BTreeMap<String, Tensor>),
    /// Bytes as they are.
    Bytes(Vec<u8>),
    /// A local file, copied.
    Copy(std::path::PathBuf),
}

/// Write `files` to `prefix` of `store` through `staging`, then `manifest.json` listing
/// their sizes and sha256. Returns the folder's URI and the sha256 of the first file.
pub async fn publish(
    store: &dyn ObjectStore,
    prefix: &str,
    files: Vec<(&str, File)>,
    staging: &Path,
) -> Result<(String, String), ExportError> {
    std::fs::create_dir_all(staging)?;
    let mut entries = Vec::new();
    for (name, content) in files {
        let path = staging.join(name);
        match content {
            File::Tensors(t) => {
                let t: std::collections::HashMap<String, Tensor> = t.into_iter().collect();
                candle_core::safetensors::save(&t, &path)?;
            }
            File::Bytes(b) => std::fs::write(&path, b)?,
            File::Copy(from) => {
                std::fs::copy(from, &path)?;
            }
        }
        let (size, sha256) = sha256_file(&path)?;
        store.put_file(&join(prefix, name), &path).await?;
        std::fs::remove_file(&path)?;
        entries.push(serde_json::json!({"name": name, "size": size, "sha256": sha256}));
    }
    let first = entries
        .first()
        .and_then(|e| e["sha256"].as_str())
        .unwrap_or_default()
        .to_string();
    let manifest = serde_json::json!({ "files": entries });
    store
        .put(
            &join(prefix, "manifest.json"),
            serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
        )
        .await?;
    Ok((join(&store.uri(), prefix), first))
}

/// Hugging Face's `config.json` of a GPT-2 with this architecture.
pub fn gpt2_config_json(cfg: &GptConfig, eot: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": crate::model::gpt::LN_EPS,
        "activation_function": "gelu",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    })
}

/// The model's tensors as Hugging Face GPT-2 stores them: without biases in the model
/// (`bias: false`), zero biases are written, which is the same function.
pub fn hf_tensors(
    cfg: &GptConfig,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, ExportError> {
    let mut out: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter(|(n, _)| !lora::is_adapter(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    if !cfg.bias {
        let device = tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        for (name, shape, _) in
            crate::model::gpt::parameter_specs(&GptConfig { bias: true, ..*cfg })
        {
            if name.ends_with(".bias") {
                out.insert(
                    name,
                    Tensor::zeros(shape, candle_core::DType::F32, &device)?,
                );
            }
        }
    }
    Ok(out)
}

/// The files of an adapter folder: PEFT names its GPT-2 adapters under
/// `base_model.model.transformer.` (Conv1D: `fan_in_fan_out`), its Llama ones under
/// `base_model.model.`.
pub fn adapter_files(
    adapters: &BTreeMap<String, Tensor>,
    settings: &Lora,
    base: &str,
    arch: &Arch,
    cfg: &GptConfig,
) -> Result<Vec<(&'static str, File)>, ExportError> {
    let (prefix, fan_in_fan_out) = match arch {
        Arch::Gpt2 => (lora::PEFT_PREFIX, true),
        Arch::Llama(_) => ("base_model.model.", false),
    };
    // PEFT's target_modules as resolved (Llama's `c_attn` is q, k and v_proj).
    let linears = arch.linears(cfg);
    let mut modules: Vec<String> = lora::adapted(&linears, settings)?
        .into_iter()
        .filter_map(|l| l.path.rsplit('.').next().map(str::to_string))
        .collect();
    modules.sort();
    modules.dedup();
    let settings = Lora {
        targets: modules,
        ..settings.clone()
    };
    let settings = &settings;
    Ok(vec![
        (
            "adapter_model.safetensors",
            File::Tensors(lora::peft_tensors(adapters, prefix)),
        ),
        (
            "adapter_config.json",
            File::Bytes(
                serde_json::to_vec_pretty(&lora::peft_config(settings, base, fan_in_fan_out))
                    .unwrap_or_default(),
            ),
        ),
    ])
}

/// The weights and `config.json` of a model folder in the base's own layout.
pub fn model_files(
    arch: &Arch,
    cfg: &GptConfig,
    weights: &BTreeMap<String, Tensor>,
    eot: u32,
) -> Result<Vec<(&'static str, File)>, ExportError> {
    let (tensors, config) = match arch {
        Arch::Gpt2 => (hf_tensors(cfg, weights)?, gpt2_config_json(cfg, eot)),
        Arch::Llama(l) => (llama::hf_tensors(weights)?, l.to_hf(eot)),
    };
    Ok(vec![
        ("model.safetensors", File::Tensors(tensors)),
        (
            "config.json",
            File::Bytes(serde_json::to_vec_pretty(&config).unwrap_or_default()),
        ),
    ])
}
