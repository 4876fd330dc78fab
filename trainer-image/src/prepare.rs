//! `taper prepare`, first cut: read `file://` text and JSON-lines sources, split documents
//! into train and test by seed, tokenize with GPT-2 BPE and publish shards, `stats.json`
//! and — last — `manifest.json`.
//!
//! Not yet here (the dataset issue): cleaning and quality filters, deduplication,
//! `s3://`/`https://` sources, zstd/parquet/StackExchange formats, instruction datasets.
//! Sources, formats and tokenizers it cannot handle are refused with a message that says
//! so; the `cleaning` and `dedup` settings are not applied yet, and `stats.json` lists the
//! stages that did run.

use std::{collections::BTreeMap, io::BufRead, path::Path};

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use taper_crds::{
    Dataset,
    dataset::{DatasetFormat, SourceFormat, TokenizerKind},
};

use crate::{
    job::JobError,
    store,
    train::data::{DatasetManifest, ShardInfo, TokenDtype},
};

/// GPT-2's end-of-text token, placed after every document.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's vocabulary size.
pub const GPT2_VOCAB: u32 = 50257;
/// Tokens per shard at most (200 MB of `uint16`).
pub const SHARD_TOKENS: usize = 100_000_000;
/// Malformed records reported by name and line before the rest are only counted.
const REPORTED_MALFORMED: usize = 5;

/// What a prepare run did, per stage; written as `stats.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareStats {
    /// Documents read from all sources.
    pub documents_read: u64,
    /// Documents read per source.
    pub documents_per_source: BTreeMap<String, u64>,
    /// Documents dropped, per reason (`malformed`, `empty`).
    pub dropped: BTreeMap<String, u64>,
    /// Documents in the train split.
    pub train_documents: u64,
    /// Documents in the test split.
    pub test_documents: u64,
    /// Tokens in the train split.
    pub train_tokens: u64,
    /// Tokens in the test split.
    pub test_tokens: u64,
    /// Stages that ran, in order.
    pub stages: Vec<String>,
}

fn dotted<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn read_source(
    path: &Path,
    name: &str,
    format: SourceFormat,
    text_field: &str,
    stats: &mut PrepareStats,
    docs: &mut Vec<String>,
) -> Result<(), JobError> {
    let file = std::fs::File::open(path).map_err(|e| {
        JobError::Data(format!(
            "source {name}: cannot read {}: {e}",
            path.display()
        ))
    })?;
    let reader = std::io::BufReader::new(file);
    let mut read = 0u64;
    let mut push = |doc: String, stats: &mut PrepareStats| {
        read += 1;
        if doc.trim().is_empty() {
            *stats.dropped.entry("empty".into()).or_default() += 1;
        } else {
            docs.push(doc);
        }
    };
    match format {
        SourceFormat::Text => {
            let mut current = String::new();
            for line in reader.lines() {
                let line = line.map_err(|e| {
                    JobError::Data(format!("source {name}: {}: {e}", path.display()))
                })?;
                if line.trim().is_empty() {
                    if !current.is_empty() {
                        push(std::mem::take(&mut current), stats);
                    }
                } else {
                    current.push_str(&line);
                    current.push('\n');
                }
            }
            if !current.is_empty() {
                push(current, stats);
            }
        }
        SourceFormat::Jsonl => {
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(|e| {
                    JobError::Data(format!("source {name}: {}: {e}", path.display()))
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                let text = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| {
                        dotted(&v, text_field).and_then(|t| t.as_str().map(str::to_string))
                    });
                match text {
                    Some(t) => push(t, stats),
                    None => {
                        let n = stats.dropped.entry("malformed".into()).or_default();
                        *n += 1;
                        if *n as usize <= REPORTED_MALFORMED {
                            eprintln!(
                                "taper: source {name}: line {}: not JSON with a string at {text_field:?}; skipped",
                                i + 1
                            );
                        }
                    }
                }
            }
        }
        other => {
            return Err(JobError::Spec(format!(
                "source {name}: format {} is not supported by this version of taper prepare yet",
                serde_json::to_string(&other).unwrap_or_default()
            )));
        }
    }
    stats.documents_read += read;
    stats.documents_per_source.insert(name.to_string(), read);
    Ok(())
}

/// Prepare `ds` and publish it to its `spec.output`. Returns the stats it published.
pub fn prepare(rt: &tokio::runtime::Runtime, ds: &Dataset) -> Result<PrepareStats, JobError> {
    let spec = &ds.spec;
    if spec.format != DatasetFormat::Pretraining {
        return Err(JobError::Spec(
            "instruction datasets are not supported by this version of taper prepare yet".into(),
        ));
    }
    if spec.tokenizer.type_ != TokenizerKind::Gpt2 {
        return Err(JobError::Spec(
            "only the gpt2 tokenizer is supported by this version of taper prepare".into(),
        ));
    }
    let output = spec.output.as_ref().ok_or_else(|| {
        JobError::Spec("spec.output is unset (the operator fills it in a cluster)".into())
    })?;

    let mut stats = PrepareStats {
        stages: vec!["read".into()],
        ..PrepareStats::default()
    };
    let mut docs = Vec::new();
    for source in &spec.sources {
        let path = source.uri.strip_prefix("file://").ok_or_else(|| {
            JobError::Spec(format!(
                "source {}: only file:// sources are supported by this version of taper prepare",
                source.name
            ))
        })?;
        read_source(
            Path::new(path),
            &source.name,
            source.format,
            &source.text_field,
            &mut stats,
            &mut docs,
        )?;
    }
    if docs.is_empty() {
        return Err(JobError::Data(format!(
            "no document left to tokenize: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        )));
    }

    // Document-level split, deterministic in the seed.
    stats.stages.push("split".into());
    let n = docs.len();
    let test_size = spec.split.test_size;
    let n_test = if test_size < 1.0 {
        ((test_size * n as f64).round() as usize).max(1)
    } else {
        test_size as usize
    };
    let n_test = n_test.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.split.seed as u64));
    let mut is_test = vec![false; n];
    for &i in &order[..n_test] {
        is_test[i] = true;
    }

    stats.stages.push("tokenize".into());
    let bpe = tiktoken_rs::r50k_base()
        .map_err(|e| JobError::Internal(format!("GPT-2 tokenizer: {e}")))?;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (doc, &test_doc) in docs.iter().zip(&is_test) {
        let out = if test_doc { &mut test } else { &mut train };
        out.extend(bpe.encode_ordinary(doc));
        out.push(GPT2_EOT);
    }
    stats.train_documents = (n - n_test) as u64;
    stats.test_documents = n_test as u64;
    stats.train_tokens = train.len() as u64;
    stats.test_tokens = test.len() as u64;

    let store = rt.block_on(store::open(&output.uri, output.access.as_ref()))?;
    // A previous manifest is removed first: readers never see it next to new shards.
    rt.block_on(store.delete("manifest.json"))?;
    let shard_infos = |split: &str, tokens: &[u32]| -> Result<Vec<ShardInfo>, JobError> {
        let mut infos = Vec::new();
        for (i, chunk) in tokens.chunks(SHARD_TOKENS).enumerate() {
            let bytes: Vec<u8> = chunk
                .iter()
                .flat_map(|&t| (t as u16).to_le_bytes())
                .collect();
            let sha = hex::encode(Sha256::digest(&bytes));
            let file = format!("{split}-{i:05}.bin");
            rt.block_on(store.put(&file, bytes))?;
            infos.push(ShardInfo {
                file,
                tokens: chunk.len() as u64,
                sha256: sha,
            });
        }
        Ok(infos)
    };
    let train_shards = shard_infos("train", &train)?;
    let test_shards = shard_infos("test", &test)?;
    stats.stages.push("publish".into());
    let digest = hex::encode(Sha256::digest(
        train_shards
            .iter()
            .chain(&test_shards)
            .map(|s| s.sha256.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    ));
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: "gpt2".into(),
        vocab_size: GPT2_VOCAB,
        eot_token: GPT2_EOT,
        dtype: TokenDtype::Uint16,
        train: train_shards,
        test: test_shards,
        digest,
    };
    let stats_json = serde_json::to_vec_pretty(&stats)
        .map_err(|e| JobError::Internal(format!("stats.json: {e}")))?;
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| JobError::Internal(format!("manifest.json: {e}")))?;
    rt.block_on(store.put("stats.json", stats_json))?;
    rt.block_on(store.put("manifest.json", manifest_json))?;
    Ok(stats)
}
