//! Dataset download: a tokenized dataset named by URI made available on local disk — a
//! `file://` folder in place, an object-store prefix downloaded once into the work folder
//! and verified against its manifest's sha256 checksums (shards, and an instruction
//! dataset's loss masks).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use taper_crds::{report::DatasetManifest, store::StoreAccess};

use crate::{
    job::JobError,
    store::{self, ObjectStore},
};

/// Make the dataset at `uri` available locally: a `file://` folder is used in place; an
/// object-store prefix is downloaded (once, verified against the manifest's sha256).
pub fn local_dataset(
    rt: &tokio::runtime::Runtime,
    uri: &str,
    access: Option<&StoreAccess>,
    cache: &Path,
) -> Result<PathBuf, JobError> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    let store: Arc<dyn ObjectStore> = rt.block_on(store::open(uri, access))?;
    let manifest_bytes = rt.block_on(store.get("manifest.json"))?;
    let manifest: DatasetManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| JobError::Data(format!("{uri}/manifest.json: {e}")))?;
    let dir = cache.join("datasets").join(&manifest.digest);
    // Every shard, and an instruction dataset's loss mask beside each.
    let files = manifest
        .train
        .iter()
        .chain(&manifest.test)
        .flat_map(|shard| {
            std::iter::once((&shard.file, &shard.sha256))
                .chain(shard.mask.as_ref().map(|m| (&m.file, &m.sha256)))
        });
    for (file, sha256) in files {
        let path = dir.join(file);
        if crate::train::data::verify_sha256(&path, sha256).unwrap_or(false) {
            continue;
        }
        rt.block_on(store.get_file(file, &path))?;
        if !crate::train::data::verify_sha256(&path, sha256)
            .map_err(|e| JobError::Data(e.to_string()))?
        {
            return Err(JobError::Data(format!(
                "{uri}/{file}: sha256 does not match the manifest"
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| JobError::Data(format!("{}: {e}", dir.display())))?;
    std::fs::write(dir.join("manifest.json"), &manifest_bytes)
        .map_err(|e| JobError::Data(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
