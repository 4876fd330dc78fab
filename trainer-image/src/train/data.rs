//! Token shards and the batch sampler.
//!
//! A tokenized dataset is a folder (or object-store prefix) of `train-NNNNN.bin` and
//! `test-NNNNN.bin` shards — flat little-endian `uint16` token ids (or `uint32` when the
//! vocabulary does not fit), readable by `numpy.memmap` as nanoGPT's `train.bin` — and a
//! `manifest.json` describing them, written last. The sampler draws random windows of
//! `blockSize + 1` tokens from a seeded RNG whose position is part of every checkpoint,
//! so a resumed run sees exactly the batches an uninterrupted one would.
//!
//! An instruction dataset's shards come with loss masks (one byte per token). Its split is
//! read as whole examples — each ends with the end-of-text token — and a batch is
//! `batch` examples drawn at random, cut to `blockSize + 1` tokens and padded to the
//! longest, with the loss on the masked (response) targets only, as lit-gpt finetunes.

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

/// A memory-mapped split: its shards and their token counts, and for an instruction
/// dataset the loss masks and where each example starts.
#[derive(Debug)]
pub struct TokenSplit {
    shards: Vec<Mmap>,
    tokens: Vec<u64>,
    dtype: TokenDtype,
    /// Loss masks, one per shard (instruction datasets).
    masks: Option<Vec<Mmap>>,
    /// (first token, length) of every example, over the shards as one stream.
    examples: Vec<(u64, u64)>,
}

fn map_file(path: &Path) -> Result<Mmap, DataError> {
    let io = |source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY of the mapping: shards are immutable once their manifest is published.
    #[allow(unsafe_code)]
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// A batch: inputs and next-token targets `[batch, T]` (u32), and for instruction data the
/// loss mask of the targets `[batch, T]` (f32, 1 = counts); `tokens` is the count of real
/// (unpadded) input tokens.
#[derive(Debug)]
pub struct Batch {
    /// Inputs.
    pub x: Tensor,
    /// Targets.
    pub y: Tensor,
    /// Which targets count.
    pub mask: Option<Tensor>,
    /// Real input tokens.
    pub tokens: u64,
}

impl TokenSplit {
    /// Map every shard of `infos` under `dir` (and its mask, when every shard has one:
    /// then the split is read as examples, each ending with `eot`).
    pub fn open(
        dir: &Path,
        infos: &[ShardInfo],
        dtype: TokenDtype,
        eot: u32,
    ) -> Result<Self, DataError> {
        let mut shards = Vec::with_capacity(infos.len());
        let mut tokens = Vec::with_capacity(infos.len());
        let masked = !infos.is_empty() && infos.iter().all(|i| i.mask.is_some());
        let mut masks = Vec::new();
        for info in infos {
            let path = dir.join(&info.file);
            let map = map_file(&path)?;
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
            if let Some(mask) = info.mask.as_ref().filter(|_| masked) {
                let path = dir.join(&mask.file);
                let m = map_file(&path)?;
                if m.len() as u64 != n {
                    return Err(DataError::Invalid(format!(
                        "{}: {} mask bytes for {n} tokens",
                        path.display(),
                        m.len()
                    )));
                }
                masks.push(m);
            }
            shards.push(map);
            tokens.push(n);
        }
        let mut split = Self {
            shards,
            tokens,
            dtype,
            masks: masked.then_some(masks),
            examples: Vec::new(),
        };
        if masked {
            let mut start = 0u64;
            let mut at = 0u64;
            for shard in 0..split.shards.len() {
                for i in 0..split.tokens[shard] as usize {
                    at += 1;
                    if split.token(shard, i) == eot {
                        split.examples.push((start, at - start));
                        start = at;
                    }
                }
            }
        }
        Ok(split)
    }

    /// Whether the split is read as masked examples (an instruction dataset).
    pub fn is_masked(&self) -> bool {
        self.masks.is_some()
    }

    /// Examples in an instruction split.
    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// `len` tokens and their mask bytes from `start` of the split as one stream.
    fn span(&self, mut start: u64, len: u64) -> (Vec<u32>, Vec<u8>) {
        let mut shard = 0;
        while shard < self.tokens.len() && start >= self.tokens[shard] {
            start -= self.tokens[shard];
            shard += 1;
        }
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        let mut i = start as usize;
        while (ids.len() as u64) < len && shard < self.shards.len() {
            if i as u64 >= self.tokens[shard] {
                shard += 1;
                i = 0;
                continue;
            }
            ids.push(self.token(shard, i));
            mask.push(self.masks.as_ref().map_or(1, |m| m[shard][i]));
            i += 1;
        }
        (ids, mask)
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
    let train = TokenSplit::open(dir, &manifest.train, manifest.dtype, manifest.eot_token)?;
    let test = TokenSplit::open(dir, &manifest.test, manifest.dtype, manifest.eot_token)?;
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

    /// A batch of `split`: windows of a token stream, or examples of an instruction split
    /// (see [`BatchSampler::examples`]).
    pub fn batch(
        &mut self,
        split: &TokenSplit,
        batch: usize,
        block: usize,
        device: &Device,
    ) -> Result<Batch, DataError> {
        if split.is_masked() {
            return self.examples(split, batch, block, device);
        }
        let (x, y) = self.windows(split, batch, block, device)?;
        Ok(Batch {
            x,
            y,
            mask: None,
            tokens: (batch * block) as u64,
        })
    }

    /// `batch` examples drawn uniformly, each cut to `block + 1` tokens, padded to the
    /// longest: inputs are the example but its last token, targets the example from its
    /// second token, and the mask keeps the targets the example's loss mask marks (the
    /// response and its end-of-text) and drops the padding.
    pub fn examples(
        &mut self,
        split: &TokenSplit,
        batch: usize,
        block: usize,
        device: &Device,
    ) -> Result<Batch, DataError> {
        let n = split.examples.len() as u64;
        if n == 0 {
            return Err(DataError::Invalid(
                "the instruction split holds no example".into(),
            ));
        }
        let picked: Vec<(Vec<u32>, Vec<u8>)> = (0..batch)
            .map(|_| {
                let (start, len) = split.examples[self.rng.random_range(0..n) as usize];
                split.span(start, len.min(block as u64 + 1))
            })
            .collect();
        let t = picked
            .iter()
            .map(|(ids, _)| ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut xs, mut ys, mut ms) = (
            Vec::with_capacity(batch * t),
            Vec::with_capacity(batch * t),
            Vec::with_capacity(batch * t),
        );
        let mut tokens = 0u64;
        for (ids, mask) in &picked {
            let len = ids.len().saturating_sub(1);
            tokens += len as u64;
            for i in 0..t {
                if i < len {
                    xs.push(ids[i]);
                    ys.push(ids[i + 1]);
                    ms.push(f32::from(mask[i + 1]));
                } else {
                    xs.push(0);
                    ys.push(0);
                    ms.push(0.0);
                }
            }
        }
        Ok(Batch {
            x: Tensor::from_vec(xs, (batch, t), device)?,
            y: Tensor::from_vec(ys, (batch, t), device)?,
            mask: Some(Tensor::from_vec(ms, (batch, t), device)?),
            tokens,
        })
    }

    /// `batch` windows of `block + 1` tokens: inputs `[batch, block]` and next-token
    /// targets `[batch, block]`, both u32. A shard is chosen in proportion to its
    /// usable windows, then a start uniformly within it.
    pub fn windows(
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
