//! Publishing: the staged shards are uploaded to the Dataset's output, then `stats.json`
//! and — last, so that a reader never sees a manifest whose shards are missing —
//! `manifest.json`. A previous manifest is removed before any shard is replaced.

use std::path::Path;

use sha2::{Digest, Sha256};
use taper_crds::{
    report::{DatasetManifest, PrepareReport},
    store::ObjectLocation,
};

use super::{PrepareError, encode::Shards};
use crate::{store, tokenizer::Tokenizer};

/// sha256 over the shard checksums, in order: identifies the dataset's content.
pub(crate) fn digest(shards: &Shards) -> String {
    hex::encode(Sha256::digest(
        shards
            .train
            .iter()
            .chain(&shards.test)
            .map(|s| s.sha256.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    ))
}

/// Upload `shards` from `staging` to `output`, then the report and the manifest. Sets the
/// report's `manifest` and `digest` to what was published.
pub(crate) fn publish(
    rt: &tokio::runtime::Runtime,
    output: &ObjectLocation,
    staging: &Path,
    shards: Shards,
    tokenizer: &Tokenizer,
    report: &mut PrepareReport,
) -> Result<DatasetManifest, PrepareError> {
    let store = rt.block_on(store::open(&output.uri, output.access.as_ref()))?;
    rt.block_on(store.delete("manifest.json"))?;
    for shard in shards.train.iter().chain(&shards.test) {
        rt.block_on(store.put_file(&shard.file, &staging.join(&shard.file)))?;
        if let Some(m) = &shard.mask {
            rt.block_on(store.put_file(&m.file, &staging.join(&m.file)))?;
        }
    }
    let digest = digest(&shards);
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: tokenizer.name(),
        vocab_size: tokenizer.vocab_size(),
        eot_token: tokenizer.eot(),
        dtype: tokenizer.dtype(),
        train: shards.train,
        test: shards.test,
        digest: digest.clone(),
    };
    report.manifest = Some(format!(
        "{}/manifest.json",
        store.uri().trim_end_matches('/')
    ));
    report.digest = Some(digest);
    let stats_json = serde_json::to_vec_pretty(&report)
        .map_err(|e| PrepareError::Internal(format!("stats.json: {e}")))?;
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| PrepareError::Internal(format!("manifest.json: {e}")))?;
    rt.block_on(store.put("stats.json", stats_json))?;
    rt.block_on(store.put("manifest.json", manifest_json))?;
    Ok(manifest)
}
