//! Shard writing: the tokens of one split go to local files as they arrive,
//! `SHARD_TOKENS` tokens each, hashed on the way (with a loss-mask file beside each shard
//! for instruction data), ready to be published.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use taper_crds::report::{MaskInfo, ShardInfo, TokenDtype};

use super::{PrepareError, SHARD_TOKENS, io_err};
use crate::tokenizer;

/// Shards of one split written to local files as tokens arrive: `SHARD_TOKENS` tokens
/// each, with their sha256 computed on the way (and a mask file beside each for
/// instruction data).
pub(crate) struct ShardWriter {
    split: &'static str,
    dir: PathBuf,
    dtype: TokenDtype,
    masked: bool,
    open: Option<OpenShard>,
    done: Vec<ShardInfo>,
}

struct OpenShard {
    tokens: std::io::BufWriter<std::fs::File>,
    tokens_sha: Sha256,
    mask: Option<(std::io::BufWriter<std::fs::File>, Sha256)>,
    count: usize,
}

impl ShardWriter {
    pub fn new(split: &'static str, dir: &Path, dtype: TokenDtype, masked: bool) -> Self {
        Self {
            split,
            dir: dir.to_path_buf(),
            dtype,
            masked,
            open: None,
            done: Vec::new(),
        }
    }

    fn io(&self, e: std::io::Error) -> PrepareError {
        io_err(&self.dir, e)
    }

    fn file(&self, i: usize, mask: bool) -> String {
        let kind = if mask { ".mask" } else { "" };
        format!("{}-{i:05}{kind}.bin", self.split)
    }

    /// Append one example's tokens (and mask).
    pub fn append(
        &mut self,
        mut tokens: &[u32],
        mut mask: Option<&[u8]>,
    ) -> Result<(), PrepareError> {
        use std::io::Write;
        while !tokens.is_empty() {
            if self.open.is_none() {
                let i = self.done.len();
                let create = |name: String| {
                    std::fs::File::create(self.dir.join(name))
                        .map(|f| std::io::BufWriter::with_capacity(1 << 20, f))
                };
                let t = create(self.file(i, false)).map_err(|e| self.io(e))?;
                let m = if self.masked {
                    Some((
                        create(self.file(i, true)).map_err(|e| self.io(e))?,
                        Sha256::new(),
                    ))
                } else {
                    None
                };
                self.open = Some(OpenShard {
                    tokens: t,
                    tokens_sha: Sha256::new(),
                    mask: m,
                    count: 0,
                });
            }
            let Some(shard) = self.open.as_mut() else {
                break;
            };
            let room = SHARD_TOKENS - shard.count;
            let n = room.min(tokens.len());
            let bytes = tokenizer::to_bytes(&tokens[..n], self.dtype);
            shard.tokens_sha.update(&bytes);
            let written = shard.tokens.write_all(&bytes);
            let mut mask_written = Ok(());
            if let (Some((w, sha)), Some(m)) = (shard.mask.as_mut(), mask) {
                sha.update(&m[..n]);
                mask_written = w.write_all(&m[..n]);
                mask = Some(&m[n..]);
            }
            shard.count += n;
            let full = shard.count == SHARD_TOKENS;
            written.and(mask_written).map_err(|e| self.io(e))?;
            tokens = &tokens[n..];
            if full {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), PrepareError> {
        use std::io::Write;
        let Some(mut shard) = self.open.take() else {
            return Ok(());
        };
        let i = self.done.len();
        shard.tokens.flush().map_err(|e| self.io(e))?;
        let mask = match shard.mask {
            Some((mut w, sha)) => {
                w.flush().map_err(|e| self.io(e))?;
                Some(MaskInfo {
                    file: self.file(i, true),
                    sha256: hex::encode(sha.finalize()),
                })
            }
            None => None,
        };
        self.done.push(ShardInfo {
            file: self.file(i, false),
            tokens: shard.count as u64,
            sha256: hex::encode(shard.tokens_sha.finalize()),
            mask,
        });
        Ok(())
    }

    pub fn finish(mut self) -> Result<Vec<ShardInfo>, PrepareError> {
        self.close()?;
        Ok(self.done)
    }
}
