//! Models to start from and to talk to: a Taper checkpoint (a PretrainJob's), or a model
//! folder in Hugging Face layout, GPT-2 or Llama (`config.json`, `model.safetensors` or
//! sharded `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, and
//! optionally `tokenizer.json`) — a public model copied to a bucket, or a model `taper
//! finetune` exported.

use std::{collections::BTreeMap, path::Path};

use candle_core::{Device, Tensor};
use sha2::Digest;
use taper_crds::{finetune::CheckpointChoice, model::GptConfig, store::StoreAccess};

use crate::{
    job::JobError,
    model::{
        Arch,
        gpt::init_params,
        llama::{self, LlamaConfig},
        params::ParamStore,
    },
    store::{self, ObjectStore, StoreError, join},
    train::checkpoint::{Checkpointer, Loaded},
};

/// A model loaded for finetuning or generation.
#[derive(Debug)]
pub struct LoadedModel {
    /// Architecture: GPT-2's shape, or a Llama's summary (see `arch`).
    pub cfg: GptConfig,
    /// GPT-2 or Llama.
    pub arch: Arch,
    /// Weights.
    pub params: ParamStore,
    /// Its tokenizer as manifests name it (`gpt2`, or a `tokenizer.json` URI); empty for
    /// a Llama folder without `tokenizer.json`.
    pub tokenizer: String,
    /// What it is, for checkpoints: the URI of the checkpoint or folder it came from and a
    /// sha256 of its contents (a checkpoint's manifest; a folder's `config.json` and
    /// weight files).
    pub identity: String,
}

fn spec(message: String) -> JobError {
    JobError::Spec(message)
}

fn data(message: String) -> JobError {
    JobError::Data(message)
}

/// Whether `key` exists (listed, not downloaded: it may be a model of gigabytes).
async fn exists(store: &dyn ObjectStore, key: &str) -> Result<bool, StoreError> {
    Ok(store.list(key).await?.iter().any(|o| o.key == key))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Load the model at `uri`: a Taper checkpoint folder (`manifest.json` and `state.json`),
/// a job's checkpoint prefix (its `choice` checkpoint), or a Hugging Face GPT-2 folder.
pub fn load(
    rt: &tokio::runtime::Runtime,
    uri: &str,
    access: Option<&StoreAccess>,
    choice: CheckpointChoice,
    device: &Device,
    staging: &Path,
) -> Result<LoadedModel, JobError> {
    let store = rt.block_on(store::open(uri, access))?;
    let store = store.as_ref();
    let ckpt = Checkpointer::new(store, staging.join("base"));
    let corrupt = |e: crate::train::checkpoint::CheckpointError| data(format!("{uri}: {e}"));
    if rt.block_on(exists(store, "state.json"))? {
        let loaded = rt
            .block_on(ckpt.load_root(device))
            .map_err(corrupt)?
            .ok_or_else(|| data(format!("{uri}: the checkpoint has no manifest.json")))?;
        let manifest = rt.block_on(store.get(crate::train::checkpoint::MANIFEST))?;
        return from_checkpoint(uri.trim_end_matches('/').to_string(), &manifest, loaded);
    }
    if rt.block_on(exists(store, "config.json"))? {
        return hugging_face(rt, store, uri, device, staging);
    }
    let listed = rt.block_on(ckpt.list()).map_err(corrupt)?;
    let chosen = match choice {
        CheckpointChoice::Best => rt.block_on(ckpt.best()).map_err(corrupt)?,
        CheckpointChoice::Latest => None,
    }
    .or_else(|| listed.last().cloned())
    .ok_or_else(|| {
        data(format!(
            "{uri} holds neither a model folder (config.json) nor a Taper checkpoint"
        ))
    })?;
    let loaded = rt.block_on(ckpt.load(&chosen, device)).map_err(corrupt)?;
    let manifest =
        rt.block_on(store.get(&join(&chosen.dir, crate::train::checkpoint::MANIFEST)))?;
    from_checkpoint(ckpt.uri_of(&chosen.dir), &manifest, loaded)
}

/// A checkpoint's model; its identity is its URI and the sha256 of its manifest (which
/// holds every file's sha256), so a base replaced under the same URI is another base.
fn from_checkpoint(uri: String, manifest: &[u8], loaded: Loaded) -> Result<LoadedModel, JobError> {
    if loaded.state.lora.is_some() {
        return Err(spec(format!(
            "{uri} is a LoRA finetuning checkpoint (adapters only); use the model its FinetuneJob exported (output.merge)"
        )));
    }
    let mut params = ParamStore::new();
    for (name, t) in &loaded.model {
        params
            .insert_tensor(name, t)
            .map_err(|e| JobError::Internal(e.to_string()))?;
    }
    Ok(LoadedModel {
        cfg: loaded.state.model,
        arch: loaded.state.llama.map_or(Arch::Gpt2, Arch::Llama),
        params,
        tokenizer: loaded.state.tokenizer,
        identity: format!("{uri} sha256:{}", sha256_hex(manifest)),
    })
}

/// The GPT-2 architecture of a Hugging Face `config.json`.
pub fn gpt2_config(config: &serde_json::Value) -> Result<GptConfig, String> {
    if let Some(t) = config.get("model_type").and_then(|v| v.as_str())
        && t != "gpt2"
    {
        return Err(format!(
            "model_type {t:?}: GPT-2 (gpt2) and Llama (llama) models load"
        ));
    }
    let int = |key: &str| -> Result<i64, String> {
        config
            .get(key)
            .and_then(|v| v.as_i64())
            .ok_or_else(|| format!("config.json lacks the integer {key:?}"))
    };
    if let Some(act) = config.get("activation_function").and_then(|v| v.as_str())
        && act != "gelu"
    {
        tracing::warn!(
            "config.json: activation_function {act:?}; Taper's GPT-2 uses the exact (erf) GELU, which differs from the tanh approximation by less than 1e-3"
        );
    }
    let cfg = GptConfig {
        n_layer: int("n_layer")?,
        n_head: int("n_head")?,
        n_embd: int("n_embd")?,
        block_size: int("n_positions")?,
        vocab_size: int("vocab_size")?,
        dropout: 0.0,
        bias: true,
    };
    if [
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        cfg.vocab_size,
    ]
    .iter()
    .any(|v| *v <= 0)
        || cfg.n_embd % cfg.n_head != 0
    {
        return Err(format!(
            "n_layer, n_head, n_embd, n_positions and vocab_size must be positive and n_head must divide n_embd: {cfg:?}"
        ));
    }
    Ok(cfg)
}

fn hugging_face(
    rt: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    uri: &str,
    device: &Device,
    staging: &Path,
) -> Result<LoadedModel, JobError> {
    let bad = |m: String| data(format!("{uri}: {m}"));
    let config_bytes = rt.block_on(store.get("config.json"))?;
    let config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config.json: {e}")))?;
    let mut identity = sha2::Sha256::new();
    identity.update(&config_bytes);
    let llama = match config.get("model_type").and_then(|v| v.as_str()) {
        Some("llama") => Some(LlamaConfig::from_hf(&config).map_err(bad)?),
        _ => None,
    };
    let cfg = match &llama {
        Some(l) => l.summary(),
        None => gpt2_config(&config).map_err(bad)?,
    };
    // One file, or shards named by the index's weight map.
    let files: Vec<String> = if rt.block_on(exists(store, "model.safetensors"))? {
        vec!["model.safetensors".into()]
    } else if rt.block_on(exists(store, "model.safetensors.index.json"))? {
        let index: serde_json::Value =
            serde_json::from_slice(&rt.block_on(store.get("model.safetensors.index.json"))?)
                .map_err(|e| bad(format!("model.safetensors.index.json: {e}")))?;
        let mut files: Vec<String> = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("model.safetensors.index.json has no weight_map".into()))?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        files
    } else {
        return Err(bad(
            "no model.safetensors or model.safetensors.index.json (only safetensors weights load)"
                .into(),
        ));
    };
    let local = staging.join("base-hf");
    std::fs::create_dir_all(&local).map_err(|e| JobError::Internal(e.to_string()))?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for file in &files {
        let path = local.join(file.replace('/', "_"));
        rt.block_on(store.get_file(file, &path))?;
        let (_, sha) = store::sha256_file(&path).map_err(|e| JobError::Internal(e.to_string()))?;
        identity.update(sha.as_bytes());
        let loaded = candle_core::safetensors::load(&path, device)
            .map_err(|e| bad(format!("{file}: {e}")))?;
        tensors.extend(loaded);
        let _ = std::fs::remove_file(&path);
    }
    let unfit =
        |e: crate::model::ModelError| bad(format!("the weights do not fit config.json: {e}"));
    let params = match &llama {
        Some(l) => llama::params_from_hf(l, &tensors).map_err(unfit)?,
        None => {
            let params =
                init_params(&cfg, 0, device).map_err(|e| JobError::Internal(e.to_string()))?;
            params.load_from(&tensors).map_err(unfit)?;
            params
        }
    };
    // Tensors the model does not use: buffers a checkpoint may carry (GPT-2's causal
    // masks, Llama's rotary frequencies, a tied head's copy) are expected; anything else
    // is reported, since it may mean a different architecture than config.json says.
    let extra: Vec<&String> = tensors
        .keys()
        .filter(|n| {
            let used = params.contains(n) || params.contains(n.trim_start_matches("transformer."));
            let buffer = n.ends_with(".attn.bias")
                || n.ends_with(".attn.masked_bias")
                || n.ends_with("rotary_emb.inv_freq")
                || *n == "lm_head.weight";
            !(used || buffer)
        })
        .collect();
    if !extra.is_empty() {
        tracing::warn!(
            "{uri}: {} tensors the model does not use, e.g. {:?}",
            extra.len(),
            &extra[..extra.len().min(5)]
        );
    }
    // GPT-2 folders often come without one (the BPE is built in); a Llama needs its own.
    let tokenizer = if rt.block_on(exists(store, "tokenizer.json"))? {
        join(uri, "tokenizer.json")
    } else if llama.is_some() {
        String::new()
    } else {
        "gpt2".to_string()
    };
    Ok(LoadedModel {
        cfg,
        arch: llama.map_or(Arch::Gpt2, Arch::Llama),
        params,
        tokenizer,
        identity: format!(
            "{} sha256:{}",
            uri.trim_end_matches('/'),
            hex::encode(identity.finalize())
        ),
    })
}
