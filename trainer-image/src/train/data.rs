//! Token shards and the batch sampler.
//!
//! A tokenized dataset is a folder (or object-store prefix) of `train-NNNNN.bin` and
//! `test-NNNNN.bin` shards — flat little-endian `uint16` token ids (or `uint32` when the
//! vocabulary does not fit), readable by `numpy.memmap` as nanoGPT's `train.bin` — and a
//! `manifest.json` describing them, written last. The sampler draws random windows of
//! `blockSize + 1` tokens from a seeded RNG whose position is part of every checkpoint,
//! so a resumed run sees exactly the batches an uninterrupted one would.

use std::{fs::File, path::Path};

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use taper_crds::report::{DatasetManifest, MaskInfo, ShardInfo, TokenDtype};

/// Why data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is malformed.
    #[error("{path}: {source}")]
    Manifest {
        /// The manifest.
        path: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The data does not fit the request.
    #[error("{0}")]
    Invalid(String),
    /// A tensor could not be built.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A memory-mapped split: its shards and their token counts.
#[derive(Debug)]
pub struct TokenSplit {
    shards: Vec<Mmap>,
    tokens: Vec<u64>,
    dtype: TokenDtype,
}

impl TokenSplit {
    /// Map every shard of `infos` under `dir`.
    pub fn open(dir: &Path, infos: &[ShardInfo], dtype: TokenDtype) -> Result<Self, DataError> {
        let mut shards = Vec::with_capacity(infos.len());
        let mut tokens = Vec::with_capacity(infos.len());
        for info in infos {
            let path = dir.join(&info.file);
            let io = |source| DataError::Io {
                path: path.display().to_string(),
                source,
            };
            let file = File::open(&path).map_err(io)?;
            // SAFETY of the mapping: shards are immutable once their manifest is published.
            #[allow(unsafe_code)]
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            let n = (map.len() / dtype.width()) as u64;
            if map.len() % dtype.width() != 0 || n != info.tokens {
                return Err(DataError::Invalid(format!(
                    "{}: {} bytes, expected {} tokens of {} bytes",
                    path.display(),
                    map.len(),
                    info.tokens,
                    dtype.width()
                )));
            }
            shards.push(map);
            tokens.push(n);
        }
        Ok(Self {
            shards,
            tokens,
            dtype,
        })
    }

    /// Tokens in the split.
    pub fn len(&self) -> u64 {
        self.tokens.iter().sum()
    }

    /// Whether the split holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn token(&self, shard: usize, i: usize) -> u32 {
        let bytes = &self.shards[shard];
        match self.dtype {
            TokenDtype::Uint16 => u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32,
            TokenDtype::Uint32 => u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
        }
    }

    /// `len` tokens from `start` of `shard`.
    pub fn window(&self, shard: usize, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.token(shard, i)).collect()
    }
}

/// Open the train and test splits of a dataset folder.
pub fn open_dataset(dir: &Path) -> Result<(DatasetManifest, TokenSplit, TokenSplit), DataError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let manifest: DatasetManifest =
        serde_json::from_str(&text).map_err(|source| DataError::Manifest {
            path: path.display().to_string(),
            source,
        })?;
    let train = TokenSplit::open(dir, &manifest.train, manifest.dtype)?;
    let test = TokenSplit::open(dir, &manifest.test, manifest.dtype)?;
    Ok((manifest, train, test))
}

/// The sampler's position, saved in checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SamplerState {
    /// Seed of the ChaCha stream.
    pub seed: u64,
    /// 32-bit words consumed from the stream so far.
    pub word_pos: u128,
}

/// Random windows of a split, from a seeded, resumable RNG.
#[derive(Debug)]
pub struct BatchSampler {
    seed: u64,
    rng: ChaCha8Rng,
}

impl BatchSampler {
    /// A sampler at the start of its stream.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A sampler at a saved position.
    pub fn resume(state: SamplerState) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(state.seed);
        rng.set_word_pos(state.word_pos);
        Self {
            seed: state.seed,
            rng,
        }
    }

    /// The current position.
    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// `batch` windows of `block + 1` tokens: inputs `[batch, block]` and next-token
    /// targets `[batch, block]`, both u32. A shard is chosen in proportion to its
    /// usable windows, then a start uniformly within it.
    pub fn batch(
        &mut self,
        split: &TokenSplit,
        batch: usize,
        block: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor), DataError> {
        let usable: Vec<u64> = split
            .tokens
            .iter()
            .map(|&n| n.saturating_sub(block as u64))
            .collect();
        let total: u64 = usable.iter().sum();
        if total == 0 {
            return Err(DataError::Invalid(format!(
                "no shard holds more than blockSize ({block}) tokens"
            )));
        }
        let mut xs = Vec::with_capacity(batch * block);
        let mut ys = Vec::with_capacity(batch * block);
        for _ in 0..batch {
            let mut r = self.rng.random_range(0..total);
            let mut shard = 0;
            while r >= usable[shard] {
                r -= usable[shard];
                shard += 1;
            }
            let w = split.window(shard, r as usize, block + 1);
            xs.extend_from_slice(&w[..block]);
            ys.extend_from_slice(&w[1..]);
        }
        Ok((
            Tensor::from_vec(xs, (batch, block), device)?,
            Tensor::from_vec(ys, (batch, block), device)?,
        ))
    }
}

/// Whether the file at `path` exists with the given sha256; an empty `sha256` (unknown)
/// accepts any existing file.
pub fn verify_sha256(path: &Path, sha256: &str) -> std::io::Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    if sha256.is_empty() {
        return Ok(true);
    }
    Ok(crate::store::sha256_file(path)?.1 == sha256)
}

/// Write `tokens` as a little-endian u16 shard (the caller ensures ids fit).
pub fn write_u16_shard(path: &Path, tokens: &[u32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(tokens.len() * 2);
    for &t in tokens {
        bytes.extend_from_slice(&(t as u16).to_le_bytes());
    }
    std::fs::write(path, bytes)
}
