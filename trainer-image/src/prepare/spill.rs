//! The documents that passed the per-document stages, kept on local disk in reading order
//! (one JSON line each), so that a prepare run holds only a few hashes per document in
//! memory: MinHash confirmation reads pairs back by offset, and the split,
//! decontamination and tokenization stages stream over the file.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use super::{PrepareError, instruction::Record, io_err};

/// One document on its way through the stages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Doc {
    /// Index of its source in `spec.sources`.
    pub source: usize,
    /// The text every stage sees; for an instruction record, its instruction, input and
    /// output (without the template).
    pub text: String,
    /// Its URL, when the source maps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The record of an instruction Dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Record>,
}

/// An append-only file of documents, then a read-only map of it.
pub(crate) struct Spill {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Where each document's line starts, and (last) the file's length.
    offsets: Vec<u64>,
    /// The source of each document (kept in memory: per-source counts need no read).
    sources: Vec<u32>,
    map: Option<memmap2::Mmap>,
}

impl Spill {
    /// A new, empty spill at `path`.
    pub fn create(path: PathBuf) -> Result<Self, PrepareError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let file = File::create(&path).map_err(|e| io_err(&path, e))?;
        Ok(Self {
            path,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            offsets: vec![0],
            sources: Vec::new(),
            map: None,
        })
    }

    /// Append `doc`; its index is the number of documents before it.
    pub fn push(&mut self, doc: &Doc) -> Result<(), PrepareError> {
        let Some(w) = self.writer.as_mut() else {
            return Err(PrepareError::Internal("spill: push after finish".into()));
        };
        let mut line =
            serde_json::to_vec(doc).map_err(|e| PrepareError::Internal(format!("spill: {e}")))?;
        line.push(b'\n');
        w.write_all(&line).map_err(|e| io_err(&self.path, e))?;
        let end = self.offsets.last().copied().unwrap_or(0) + line.len() as u64;
        self.offsets.push(end);
        self.sources.push(doc.source as u32);
        Ok(())
    }

    /// Documents written.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The source of document `i`.
    pub fn source(&self, i: usize) -> usize {
        self.sources[i] as usize
    }

    /// Stop writing and map the file for reading.
    pub fn finish(&mut self) -> Result<(), PrepareError> {
        if let Some(mut w) = self.writer.take() {
            w.flush().map_err(|e| io_err(&self.path, e))?;
        }
        if self.len() > 0 {
            let file = File::open(&self.path).map_err(|e| io_err(&self.path, e))?;
            // SAFETY: the file is private to this run (a fresh spool folder) and no longer
            // written to.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(&self.path, e))?;
            self.map = Some(map);
        }
        Ok(())
    }

    /// Document `i` (after [`Spill::finish`]).
    pub fn get(&self, i: usize) -> Result<Doc, PrepareError> {
        let map = self
            .map
            .as_ref()
            .ok_or_else(|| PrepareError::Internal("spill: read before finish".into()))?;
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        serde_json::from_slice(&map[a..b]).map_err(|e| {
            PrepareError::Internal(format!("spill {}: document {i}: {e}", self.path.display()))
        })
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        self.map = None;
        self.writer = None;
        std::fs::remove_file(&self.path).ok();
    }
}

/// The MinHash band keys of the spilled documents, on local disk: a file per band with
/// 8 bytes per document, read back one band at a time by the clustering, so that memory
/// holds one band's keys, not every band's.
pub(crate) struct BandKeys {
    paths: Vec<PathBuf>,
    writers: Vec<BufWriter<File>>,
    /// Whether each document has shingles (those without are nobody's duplicate).
    present: Vec<bool>,
}

impl BandKeys {
    /// Empty files for `bands` bands in `dir`.
    pub fn create(dir: &std::path::Path, bands: usize) -> Result<Self, PrepareError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut paths = Vec::with_capacity(bands);
        let mut writers = Vec::with_capacity(bands);
        for b in 0..bands {
            let path = dir.join(format!("minhash-band-{b:02}.bin"));
            let file = File::create(&path).map_err(|e| io_err(&path, e))?;
            writers.push(BufWriter::with_capacity(1 << 16, file));
            paths.push(path);
        }
        Ok(Self {
            paths,
            writers,
            present: Vec::new(),
        })
    }

    /// Append the next document's keys (`None`: no shingles).
    pub fn push(&mut self, keys: Option<&[u64]>) -> Result<(), PrepareError> {
        for (b, (w, path)) in self.writers.iter_mut().zip(&self.paths).enumerate() {
            let key = keys.and_then(|k| k.get(b)).copied().unwrap_or(0);
            w.write_all(&key.to_le_bytes())
                .map_err(|e| io_err(path, e))?;
        }
        self.present.push(keys.is_some());
        Ok(())
    }

    /// Flush the files.
    pub fn finish(&mut self) -> Result<(), PrepareError> {
        for (mut w, path) in self.writers.drain(..).zip(&self.paths) {
            w.flush().map_err(|e| io_err(path, e))?;
        }
        Ok(())
    }

    /// Band `b`'s `(key, document)` pairs, for the documents that have shingles.
    pub fn band(&self, b: usize) -> Result<Vec<(u64, usize)>, PrepareError> {
        let path = &self.paths[b];
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        Ok(bytes
            .chunks_exact(8)
            .enumerate()
            .filter(|(i, _)| self.present.get(*i).copied().unwrap_or(false))
            .map(|(i, k)| {
                let mut key = [0u8; 8];
                key.copy_from_slice(k);
                (u64::from_le_bytes(key), i)
            })
            .collect())
    }
}

impl Drop for BandKeys {
    fn drop(&mut self) {
        self.writers.clear();
        for p in &self.paths {
            std::fs::remove_file(p).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_keys_come_back_one_band_at_a_time() {
        let dir = std::env::temp_dir().join(format!("taper-band-keys-{}", std::process::id()));
        let mut keys = BandKeys::create(&dir, 2).expect("create");
        keys.push(Some(&[10, 20])).expect("push");
        keys.push(None).expect("push");
        keys.push(Some(&[10, 21])).expect("push");
        keys.finish().expect("finish");
        assert_eq!(keys.band(0).expect("band 0"), [(10, 0), (10, 2)]);
        assert_eq!(keys.band(1).expect("band 1"), [(20, 0), (21, 2)]);
        let paths = keys.paths.clone();
        drop(keys);
        assert!(paths.iter().all(|p| !p.exists()), "files removed");
        std::fs::remove_dir_all(&dir).ok();
    }
}
