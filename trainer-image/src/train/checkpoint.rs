//! Checkpoints in an object store, written so that a crash at any moment leaves either a
//! complete checkpoint or one that resume ignores.
//!
//! Layout under the checkpoint prefix:
//!
//! ```text
//! step-000001000/model.safetensors      weights (Hugging Face GPT-2 names)
//! step-000001000/optimizer.safetensors  AdamW moments (m.<name>, v.<name>)
//! step-000001000/state.json             step, tokens, sampler position, best loss, config
//! step-000001000/manifest.json          size and sha256 of the three files — written LAST
//! latest.json                           {"step": 1000, "dir": "step-000001000"} — after the manifest
//! ```
//!
//! Resume takes the newest checkpoint whose manifest exists and whose files all match
//! their checksums, falling back to older ones. Retention keeps the newest `keep` and the
//! best (lowest validation loss); deletion removes the manifest first.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use taper_crds::{model::GptConfig, training::ResolvedTraining};

use super::data::SamplerState;
use crate::store::{ObjectStore, StoreError, join};

/// Files of a checkpoint, in the order they are written (the manifest comes after).
pub const FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "state.json"];
/// The commit marker of a checkpoint.
pub const MANIFEST: &str = "manifest.json";
/// The pointer to the newest checkpoint.
pub const LATEST: &str = "latest.json";

/// Everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Position of the training-batch sampler.
    pub sampler: SamplerState,
    /// Position of the dropout-mask stream (absent in checkpoints written before dropout
    /// was applied: those resume it from its seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<SamplerState>,
    /// Lowest validation loss so far.
    pub best_val_loss: Option<f32>,
    /// Step of the lowest validation loss.
    pub best_step: Option<u64>,
    /// Validation loss at this step, if evaluated here.
    pub val_loss: Option<f32>,
    /// Evaluations since the last improvement.
    pub evals_without_improvement: u32,
    /// Multiplier on the scheduled learning rate (lowered by the overfitting policy).
    pub lr_scale: f64,
    /// The model's architecture.
    pub model: GptConfig,
    /// The training settings in force.
    pub training: ResolvedTraining,
    /// Digest of the dataset trained on.
    pub dataset_digest: String,
    /// Tokenizer of the dataset (`gpt2`, `bytes`, or a `tokenizer.json` URI).
    pub tokenizer: String,
    /// Finetuning: the base model (its URI and, for a Taper checkpoint, the sha256 of
    /// its manifest). The checkpoint then holds only the trained tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// LoRA finetuning: the adapters' settings (the checkpoint holds only the adapters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<taper_crds::finetune::Lora>,
    /// A Llama's architecture (`model` then holds its summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama: Option<crate::model::llama::LlamaConfig>,
}

/// One file of a checkpoint as recorded in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name within the checkpoint folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, lower-case hex.
    pub sha256: String,
}

/// `manifest.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointManifest {
    /// Optimizer step.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Validation loss at this step, if evaluated here.
    pub val_loss: Option<f32>,
    /// The files and their checksums.
    pub files: Vec<FileEntry>,
}

/// A checkpoint just written.
#[derive(Clone, Debug, PartialEq)]
pub struct Saved {
    /// Its manifest.
    pub manifest: CheckpointManifest,
    /// sha256 (lower-case hex) of `manifest.json` as stored: the checkpoint's identity.
    pub sha256: String,
    /// The checkpoint's folder URI.
    pub uri: String,
}

/// A checkpoint loaded back.
#[derive(Debug)]
pub struct Loaded {
    /// Its folder name, e.g. `step-000001000`.
    pub dir: String,
    /// Trainer state.
    pub state: TrainerState,
    /// Model weights by name.
    pub model: BTreeMap<String, Tensor>,
    /// Optimizer moments by name.
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local staging file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Tensors could not be serialised or read.
    #[error("tensors: {0}")]
    Candle(#[from] candle_core::Error),
    /// JSON could not be read.
    #[error("{what}: {source}")]
    Json {
        /// Which file.
        what: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A file does not match its manifest.
    #[error("{0}")]
    Corrupt(String),
}

/// A checkpoint's contents copied to host memory, so that training can go on changing the
/// live tensors (the optimizer writes parameters in place) while this copy is written out.
/// Taking it is all that a training step waits for.
#[derive(Debug)]
pub struct Snapshot {
    /// Trainer state.
    pub state: TrainerState,
    /// Model weights by name, on the CPU.
    pub model: BTreeMap<String, Tensor>,
    /// Optimizer moments by name, on the CPU.
    pub optimizer: BTreeMap<String, Tensor>,
}

impl Snapshot {
    /// Copy `model` and `optimizer` to host memory: from a GPU, a device-to-host transfer;
    /// on the CPU, a deep copy (a clone of a tensor would share the parameter's storage).
    pub fn take(
        state: TrainerState,
        model: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
    ) -> Result<Self, CheckpointError> {
        let host =
            |m: &BTreeMap<String, Tensor>| -> Result<BTreeMap<String, Tensor>, CheckpointError> {
                m.iter()
                    .map(|(name, t)| {
                        let copy = if t.device().is_cpu() {
                            t.copy()?
                        } else {
                            t.to_device(&Device::Cpu)?
                        };
                        Ok((name.clone(), copy))
                    })
                    .collect()
            };
        Ok(Self {
            state,
            model: host(model)?,
            optimizer: host(optimizer)?,
        })
    }
}

/// What one checkpoint file holds, written by [`FileContent::write`].
enum FileContent {
    /// Named tensors, as safetensors.
    Tensors(BTreeMap<String, Tensor>),
    /// Bytes as they are (`state.json`).
    Bytes(Vec<u8>),
}

impl FileContent {
    fn write(self, path: &Path) -> Result<(), CheckpointError> {
        match self {
            Self::Tensors(tensors) => {
                let tensors: std::collections::HashMap<String, Tensor> =
                    tensors.into_iter().collect();
                candle_core::safetensors::save(&tensors, path)?;
                Ok(())
            }
            Self::Bytes(bytes) => std::fs::write(path, bytes).map_err(io_err(path)),
        }
    }
}

/// Turn an I/O error on `path` into a [`CheckpointError`].
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + use<> {
    let path = path.display().to_string();
    move |source| CheckpointError::Io { path, source }
}

/// The folder name of step `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

fn step_of(dir: &str) -> Option<u64> {
    dir.strip_prefix("step-")?.parse().ok()
}

fn sha256_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    crate::store::sha256_file(path).map_err(io_err(path))
}

/// Checkpoints of one job in one store, with a local staging folder.
#[derive(Debug)]
pub struct Checkpointer<'a> {
    store: &'a dyn ObjectStore,
    staging: PathBuf,
}

/// A complete checkpoint as listed in the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    /// Folder name.
    pub dir: String,
    /// Its manifest.
    pub manifest: CheckpointManifest,
}

impl<'a> Checkpointer<'a> {
    /// Checkpoints in `store`, staged through the local folder `staging`.
    pub fn new(store: &'a dyn ObjectStore, staging: impl Into<PathBuf>) -> Self {
        Self {
            store,
            staging: staging.into(),
        }
    }

    /// Write a checkpoint: the three files, then the manifest, then `latest.json`.
    /// Returns the manifest, the sha256 of its bytes as stored (which identifies the
    /// checkpoint: it covers every file's checksum) and the checkpoint's folder URI.
    ///
    /// The files are a pipeline: all are serialised to the staging folder at once, on
    /// blocking threads, and each is uploaded as soon as it is written, its hash computed
    /// beside its upload, so the store sees bytes for nearly all of the save.
    pub async fn save(
        &self,
        state: &TrainerState,
        model: &BTreeMap<String, Tensor>,
        optimizer: &BTreeMap<String, Tensor>,
    ) -> Result<Saved, CheckpointError> {
        let dir = dir_name(state.step);
        let local = self.staging.join(&dir);
        std::fs::create_dir_all(&local).map_err(io_err(&local))?;
        let state_json =
            serde_json::to_vec_pretty(state).map_err(|source| CheckpointError::Json {
                what: "state.json".into(),
                source,
            })?;
        let contents = [
            FileContent::Tensors(model.clone()),
            FileContent::Tensors(optimizer.clone()),
            FileContent::Bytes(state_json),
        ];

        // A folder for this step may exist: a previous attempt that died before its
        // manifest (never a checkpoint), or a checkpoint that resume found corrupt and
        // training has now passed again. Its manifest goes first, so that no manifest ever
        // describes files that are being replaced.
        self.store.delete(&join(&dir, MANIFEST)).await?;

        // Every file is serialised at once on its own blocking thread; each is hashed and
        // uploaded, in order, as soon as it is on disk.
        let writes: Vec<_> = FILES
            .iter()
            .zip(contents)
            .map(|(name, content)| {
                let path = local.join(name);
                let target = path.clone();
                (
                    path,
                    tokio::task::spawn_blocking(move || content.write(&target)),
                )
            })
            .collect();
        let joined = |path: &Path| {
            let path = path.display().to_string();
            move |e: tokio::task::JoinError| CheckpointError::Io {
                path,
                source: std::io::Error::other(e),
            }
        };
        let mut files = Vec::new();
        for (name, (path, write)) in FILES.iter().zip(writes) {
            write.await.map_err(joined(&path))??;
            let hashed = path.clone();
            let hash = async {
                tokio::task::spawn_blocking(move || sha256_file(&hashed))
                    .await
                    .map_err(joined(&path))?
            };
            let put = async {
                self.store
                    .put_file(&join(&dir, name), &path)
                    .await
                    .map_err(CheckpointError::from)
            };
            let ((size, sha256), ()) = tokio::try_join!(hash, put)?;
            files.push(FileEntry {
                name: name.to_string(),
                size,
                sha256,
            });
        }

        let manifest = CheckpointManifest {
            step: state.step,
            tokens: state.tokens,
            val_loss: state.val_loss,
            files,
        };
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| CheckpointError::Json {
                what: "manifest.json".into(),
                source,
            })?;
        let sha256 = {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(&bytes))
        };
        self.store.put(&join(&dir, MANIFEST), bytes).await?;
        let latest = serde_json::json!({ "step": state.step, "dir": dir });
        self.store
            .put(LATEST, latest.to_string().into_bytes())
            .await?;
        std::fs::remove_dir_all(&local).map_err(io_err(&local))?;
        Ok(Saved {
            manifest,
            sha256,
            uri: self.uri_of(&dir),
        })
    }

    /// Every checkpoint whose manifest exists, oldest first (files not yet verified).
    pub async fn list(&self) -> Result<Vec<Listed>, CheckpointError> {
        let mut out = Vec::new();
        for obj in self.store.list("step-").await? {
            let Some((dir, file)) = obj.key.split_once('/') else {
                continue;
            };
            if file != MANIFEST || step_of(dir).is_none() {
                continue;
            }
            let bytes = self.store.get(&obj.key).await?;
            match serde_json::from_slice::<CheckpointManifest>(&bytes) {
                Ok(manifest) => out.push(Listed {
                    dir: dir.to_string(),
                    manifest,
                }),
                Err(e) => {
                    tracing::warn!(checkpoint = %dir, "ignoring a checkpoint with an unreadable manifest: {e}")
                }
            }
        }
        out.sort_by_key(|l| l.manifest.step);
        Ok(out)
    }

    async fn fetch_verified_in(
        &self,
        local: &Path,
        listed: &Listed,
        device: &Device,
    ) -> Result<Loaded, CheckpointError> {
        let mut paths = BTreeMap::new();
        for entry in &listed.manifest.files {
            let path = local.join(&entry.name);
            self.store
                .get_file(&join(&listed.dir, &entry.name), &path)
                .await?;
            let (size, sha) = sha256_file(&path)?;
            if size != entry.size || sha != entry.sha256 {
                return Err(CheckpointError::Corrupt(format!(
                    "{}/{}: sha256 {sha} ({size} bytes) does not match the manifest's {} ({} bytes)",
                    listed.dir, entry.name, entry.sha256, entry.size
                )));
            }
            paths.insert(entry.name.clone(), path);
        }
        let path = |name: &str| {
            paths.get(name).cloned().ok_or_else(|| {
                CheckpointError::Corrupt(format!("{}: manifest lacks {name}", listed.dir))
            })
        };
        let model = candle_core::safetensors::load(path(FILES[0])?, device)?
            .into_iter()
            .collect();
        let optimizer = candle_core::safetensors::load(path(FILES[1])?, device)?
            .into_iter()
            .collect();
        let state_path = path(FILES[2])?;
        let text = std::fs::read(&state_path).map_err(io_err(&state_path))?;
        let state = serde_json::from_slice(&text).map_err(|source| CheckpointError::Json {
            what: format!("{}/state.json", listed.dir),
            source,
        })?;
        Ok(Loaded {
            dir: listed.dir.clone(),
            state,
            model,
            optimizer,
        })
    }

    /// Download and verify `listed`; the local copies are removed whatever the outcome.
    async fn fetch_verified(
        &self,
        listed: &Listed,
        device: &Device,
    ) -> Result<Loaded, CheckpointError> {
        let local = self.staging.join(format!("restore-{}", listed.dir));
        let result = self.fetch_verified_in(&local, listed, device).await;
        let _ = std::fs::remove_dir_all(&local);
        result
    }

    /// The newest complete and intact checkpoint, or `None` when there is none. A
    /// checkpoint with a missing or corrupt file is reported and skipped.
    pub async fn resume(&self, device: &Device) -> Result<Option<Loaded>, CheckpointError> {
        for listed in self.list().await?.iter().rev() {
            match self.fetch_verified(listed, device).await {
                Ok(loaded) => return Ok(Some(loaded)),
                Err(e) => {
                    tracing::warn!(checkpoint = %listed.dir, "skipping a damaged checkpoint: {e}")
                }
            }
        }
        Ok(None)
    }

    /// The checkpoint whose folder is the store's root (a URI such as a PretrainJob's
    /// `status.bestCheckpoint`), verified against its manifest; `None` when the root holds
    /// no `manifest.json`.
    pub async fn load_root(&self, device: &Device) -> Result<Option<Loaded>, CheckpointError> {
        let bytes = match self.store.get(MANIFEST).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let manifest = serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Json {
            what: self.store.uri(),
            source,
        })?;
        let listed = Listed {
            dir: String::new(),
            manifest,
        };
        self.fetch_verified(&listed, device).await.map(Some)
    }

    /// Download and verify the checkpoint `listed`.
    pub async fn load(&self, listed: &Listed, device: &Device) -> Result<Loaded, CheckpointError> {
        self.fetch_verified(listed, device).await
    }

    /// The folder URI of the checkpoint in folder `dir` (as [`Saved::uri`] spells it).
    pub fn uri_of(&self, dir: &str) -> String {
        join(&self.store.uri(), dir)
    }

    /// Delete every checkpoint but the newest `keep` and the one with the lowest
    /// validation loss. Returns the folders deleted.
    pub async fn retain(&self, keep: usize) -> Result<Vec<String>, CheckpointError> {
        let listed = self.list().await?;
        let best = listed
            .iter()
            .filter_map(|l| l.manifest.val_loss.map(|v| (v, l.manifest.step)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, step)| step);
        let newest: Vec<u64> = listed
            .iter()
            .rev()
            .take(keep.max(1))
            .map(|l| l.manifest.step)
            .collect();
        let mut deleted = Vec::new();
        for l in &listed {
            let step = l.manifest.step;
            if newest.contains(&step) || Some(step) == best {
                continue;
            }
            self.store.delete(&join(&l.dir, MANIFEST)).await?;
            for f in &l.manifest.files {
                self.store.delete(&join(&l.dir, &f.name)).await?;
            }
            deleted.push(l.dir.clone());
        }
        Ok(deleted)
    }

    /// The folder URI of the checkpoint with the lowest validation loss.
    pub async fn best(&self) -> Result<Option<Listed>, CheckpointError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|l| l.manifest.val_loss.is_some())
            .min_by(|a, b| {
                a.manifest
                    .val_loss
                    .unwrap_or(f32::INFINITY)
                    .total_cmp(&b.manifest.val_loss.unwrap_or(f32::INFINITY))
            }))
    }
}
