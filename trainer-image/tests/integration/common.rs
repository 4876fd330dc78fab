//! Helpers shared by the trainer's integration tests (and the MinIO ones, which use only
//! some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use std::sync::{Arc, atomic::AtomicBool};
use taper_crds::{
    model::GptConfig,
    training::{Precision, ResolvedTraining},
};

use candle_core::Device;
use taper_trainer::{
    store::ObjectStore,
    train::{
        data::{DatasetManifest, ShardInfo, TokenDtype, TokenSplit, write_u16_shard},
        pretrain::PretrainRun,
    },
};

/// A fresh temporary folder, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("taper-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A byte-level dataset of a synthetic corpus (no shared data needed): train and test
/// shards plus a manifest with real checksums.
pub fn byte_dataset(dir: &Path) -> DatasetManifest {
    let text: String = (0..4000)
        .map(|i| {
            format!(
                "line {i}: the quick brown fox jumps over the lazy dog {}.\n",
                i % 17
            )
        })
        .collect();
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    let cut = tokens.len() * 9 / 10;
    let shard = |name: &str, toks: &[u32]| {
        let path = dir.join(name);
        write_u16_shard(&path, toks).expect("write shard");
        let (_, sha) = taper_trainer::store::sha256_file(&path).expect("hash");
        ShardInfo {
            mask: None,
            file: name.into(),
            tokens: toks.len() as u64,
            sha256: sha,
        }
    };
    let train = vec![shard("train-00000.bin", &tokens[..cut])];
    let test = vec![shard("test-00000.bin", &tokens[cut..])];
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: "bytes".into(),
        vocab_size: 256,
        eot_token: 10,
        dtype: TokenDtype::Uint16,
        digest: format!("{}{}", train[0].sha256, test[0].sha256),
        train,
        test,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("manifest");
    manifest
}

/// A byte-level instruction dataset (no shared data needed): examples `Q: a+b?\nA: ` →
/// `{a+b}` then the end-of-text byte 0, with loss masks on the answer and the end-of-text,
/// 400 for training and 40 for testing, in shards and a manifest as `taper prepare`
/// writes them.
pub fn byte_instruction_dataset(dir: &Path) -> DatasetManifest {
    let split = |name: &str, range: std::ops::Range<u32>| {
        let (mut tokens, mut mask) = (Vec::new(), Vec::new());
        for i in range {
            let (a, b) = (i % 37, i / 37 % 23);
            let prompt = format!("Q: {a}+{b}?\nA: ");
            let answer = format!("{}", a + b);
            tokens.extend(prompt.bytes().map(u32::from));
            mask.extend(std::iter::repeat_n(0u8, prompt.len()));
            tokens.extend(answer.bytes().map(u32::from));
            tokens.push(0);
            mask.extend(std::iter::repeat_n(1u8, answer.len() + 1));
        }
        let path = dir.join(format!("{name}-00000.bin"));
        write_u16_shard(&path, &tokens).expect("write shard");
        let mask_file = format!("{name}-00000.mask.bin");
        std::fs::write(dir.join(&mask_file), &mask).expect("write mask");
        let sha = |p: &Path| taper_trainer::store::sha256_file(p).expect("hash").1;
        ShardInfo {
            mask: Some(taper_crds::report::MaskInfo {
                sha256: sha(&dir.join(&mask_file)),
                file: mask_file,
            }),
            file: format!("{name}-00000.bin"),
            tokens: tokens.len() as u64,
            sha256: sha(&path),
        }
    };
    let train = vec![split("train", 0..400)];
    let test = vec![split("test", 400..440)];
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: "bytes".into(),
        vocab_size: 256,
        eot_token: 0,
        dtype: TokenDtype::Uint16,
        digest: format!("{}{}", train[0].sha256, test[0].sha256),
        train,
        test,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("manifest");
    manifest
}

/// A `data/` folder in `tmp` holding a [`byte_dataset`].
pub fn byte_dataset_dir(tmp: &TempDir) -> PathBuf {
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    byte_dataset(&dir);
    dir
}

pub fn tiny_model() -> GptConfig {
    GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        block_size: 32,
        vocab_size: 256,
        dropout: 0.0,
        bias: true,
    }
}

pub fn quick_training(max_steps: i64) -> ResolvedTraining {
    ResolvedTraining {
        batch_size: 4,
        gradient_accumulation_steps: 2,
        max_steps,
        learning_rate: 3e-3,
        min_learning_rate: 3e-4,
        warmup_steps: 2,
        decay_steps: max_steps,
        weight_decay: 0.1,
        betas: [0.9, 0.95],
        grad_clip: 1.0,
        precision: Precision::F32,
        seed: 7,
        eval_interval: 4,
        eval_iterations: 2,
    }
}

/// A CPU run of [`tiny_model`] on a [`byte_dataset`]: no overfitting action, checkpoints
/// every 4 steps keeping 2, no metrics. Tests override fields with struct update syntax.
pub fn tiny_run<'a>(
    manifest: &DatasetManifest,
    train: &'a TokenSplit,
    test: &'a TokenSplit,
    store: &'a dyn ObjectStore,
    staging: PathBuf,
    max_steps: i64,
) -> PretrainRun<'a> {
    PretrainRun {
        model: tiny_model(),
        init: Default::default(),
        export: None,
        training: quick_training(max_steps),
        overfitting: taper_crds::training::Overfitting {
            action: taper_crds::training::OverfittingAction::None,
            ..Default::default()
        },
        checkpoint_interval: 4,
        keep: 2,
        train,
        test,
        dataset_digest: manifest.digest.clone(),
        tokenizer: manifest.tokenizer.clone(),
        store,
        staging,
        device: Device::Cpu,
        peak_flops: None,
        stop: Arc::new(AtomicBool::new(false)),
        metrics: None,
        stop_after: None,
        events: None,
    }
}

/// A Dataset with `spec`.
pub fn dataset(spec: serde_json::Value) -> taper_crds::Dataset {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "t"}, "spec": spec,
    }))
    .expect("dataset")
}

/// `../shared/data`, or `None` when it is absent (a user's fresh clone), the running test
/// then recorded as skipped (see [`taper_e2e::skip`]).
pub fn shared() -> Option<PathBuf> {
    taper_e2e::shared_data_or_skip()
}

/// A Dataset `cleaning` block with every switchable cleaning step and quality rule off.
pub fn all_rules_off() -> serde_json::Value {
    serde_json::json!({"stripHtml": false, "normalizeUnicode": false, "removeBoilerplate": false,
        "disable": ["gopherWordCount", "gopherMeanWordLength", "gopherSymbolRatio",
            "gopherBulletsEllipsis", "gopherAlphabetic", "gopherStopWords", "c4TerminalPunctuation",
            "c4ShortLines", "c4LoremIpsum", "c4CurlyBraces", "c4Javascript", "c4Policy"]})
}

/// A current-thread Tokio runtime (for the store calls of a test).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
