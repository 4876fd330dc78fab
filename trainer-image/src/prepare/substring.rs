//! Exact-substring deduplication in the manner of Lee et al. 2021, "Deduplicating Training
//! Data Makes Language Models Better" (`ExactSubstr`): every span of at least `k` tokens
//! that already occurred earlier in the corpus is removed, so each long repeated span keeps
//! only its first occurrence.
//!
//! The corpus (documents' token ids, in corpus order, each followed by a separator) is
//! indexed with a suffix array (libsais, on 16-bit symbols) and its permuted LCP array.
//! Suffixes that share a prefix of at least `k` tokens are adjacent in the suffix array and
//! linked by LCP values ≥ `k`; in each such run the earliest position whose `k` tokens lie
//! inside one document is the first occurrence, and the `k`-token windows at the other
//! positions are marked. Marked tokens are then cut out of their documents.
//!
//! Memory: 2 bytes of text, 4 of suffix array and 4 of PLCP per token, plus a bit per token
//! for the marks: about 10 bytes per token, 2.5 bytes per input byte of English at ~4 bytes
//! per GPT-2 token. Corpora larger than `chunk_tokens` are processed in chunks of whole
//! documents, one at a time; a span repeated only across two chunks is not found (Lee et
//! al. merge per-chunk suffix arrays to find those, at several times the memory).

use libsais::SuffixArrayConstruction;
use serde::Serialize;

/// Default tokens per chunk: 256 Mi tokens, about 2.6 GB of working memory.
pub const DEFAULT_CHUNK_TOKENS: usize = 256 << 20;

/// What the stage removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubstringStats {
    /// Shortest span removed, in tokens.
    pub min_length: u64,
    /// Tokens examined.
    pub tokens_in: u64,
    /// Tokens removed.
    pub tokens_removed: u64,
    /// Maximal runs of removed tokens.
    pub spans_removed: u64,
    /// Documents that lost tokens (those left empty included).
    pub documents_changed: u64,
    /// Suffix arrays built (one per chunk).
    pub chunks: u64,
}

impl SubstringStats {
    /// Add the counts of another run with the same `min_length` (a later batch).
    pub fn merge(&mut self, other: &Self) {
        self.tokens_in += other.tokens_in;
        self.tokens_removed += other.tokens_removed;
        self.spans_removed += other.spans_removed;
        self.documents_changed += other.documents_changed;
        self.chunks += other.chunks;
    }
}

/// Why the stage could not run.
#[derive(Debug, thiserror::Error)]
pub enum SubstringError {
    /// A token id does not fit the 16-bit suffix array.
    #[error(
        "exact-substring dedup indexes 16-bit token ids; id {0} does not fit (use a vocabulary of at most 65,535 tokens)"
    )]
    TokenTooLarge(u32),
    /// A chunk is larger than a 32-bit suffix array can index.
    #[error("a chunk of {0} tokens is too large for a 32-bit suffix array")]
    ChunkTooLarge(usize),
    /// libsais failed.
    #[error("suffix array construction failed: {0}")]
    Libsais(String),
}

/// Separates documents in the indexed text. Windows never span it (they are checked to lie
/// inside one document), so it need not be unique or unused.
const SEPARATOR: u16 = u16::MAX;

/// Remove from `docs` every span of at least `k` tokens that occurred earlier in `docs`
/// (within the same chunk of at most `chunk_tokens` tokens).
pub fn dedup(
    docs: &mut [Vec<u32>],
    k: usize,
    chunk_tokens: usize,
) -> Result<SubstringStats, SubstringError> {
    let k = k.max(1);
    let mut stats = SubstringStats {
        min_length: k as u64,
        ..SubstringStats::default()
    };
    let mut start = 0;
    while start < docs.len() {
        let mut end = start;
        let mut tokens = 0usize;
        while end < docs.len() && (end == start || tokens + docs[end].len() < chunk_tokens) {
            tokens += docs[end].len() + 1;
            end += 1;
        }
        dedup_chunk(&mut docs[start..end], k, &mut stats)?;
        stats.chunks += 1;
        start = end;
    }
    Ok(stats)
}

/// Positions of tokens to remove from `docs` (as one text with a separator after each
/// document), as a bit per position. `starts[d]` is where document `d` starts.
fn marks(text: &[u16], starts: &[usize], k: usize) -> Result<Vec<u64>, SubstringError> {
    let n = text.len();
    let mut marked = vec![0u64; n.div_ceil(64)];
    if n < 2 {
        return Ok(marked);
    }
    let sa = SuffixArrayConstruction::for_text(text)
        .in_owned_buffer32()
        .single_threaded()
        .run()
        .map_err(|e| SubstringError::Libsais(format!("{e:?}")))?
        .plcp_construction()
        .single_threaded()
        .run()
        .map_err(|e| SubstringError::Libsais(format!("{e:?}")))?;
    let (sa, plcp, _) = sa.into_parts();
    let (sa, plcp): (&[i32], &[i32]) = (&sa, &plcp);
    // Tokens from `p` to the end of its document (0 on a separator).
    let room = |p: usize| -> usize {
        let d = starts.partition_point(|&s| s <= p) - 1;
        // Each document is followed by its separator.
        let end = starts.get(d + 1).copied().unwrap_or(n) - 1;
        end.saturating_sub(p)
    };
    let mut run: Vec<usize> = Vec::new();
    let flush = |run: &mut Vec<usize>, marked: &mut Vec<u64>| {
        if run.len() > 1 {
            let first = run.iter().copied().min().unwrap_or(0);
            for &p in run.iter().filter(|&&p| p != first) {
                for q in p..p + k {
                    marked[q / 64] |= 1 << (q % 64);
                }
            }
        }
        run.clear();
    };
    for &s in sa {
        let p = s as usize;
        // plcp[p]: the common prefix of suffix p and the suffix before it in `sa`.
        if (plcp[p] as usize) < k {
            flush(&mut run, &mut marked);
        }
        if room(p) >= k {
            run.push(p);
        }
    }
    flush(&mut run, &mut marked);
    Ok(marked)
}

fn dedup_chunk(
    docs: &mut [Vec<u32>],
    k: usize,
    stats: &mut SubstringStats,
) -> Result<(), SubstringError> {
    let total: usize = docs.iter().map(|d| d.len() + 1).sum();
    if total >= i32::MAX as usize {
        return Err(SubstringError::ChunkTooLarge(total));
    }
    let mut text = Vec::with_capacity(total);
    let mut starts = Vec::with_capacity(docs.len());
    for d in docs.iter() {
        starts.push(text.len());
        for &t in d {
            text.push(u16::try_from(t).map_err(|_| SubstringError::TokenTooLarge(t))?);
        }
        text.push(SEPARATOR);
    }
    stats.tokens_in += (total - docs.len()) as u64;
    let marked = marks(&text, &starts, k)?;
    drop(text);
    let is_marked = |p: usize| marked[p / 64] >> (p % 64) & 1 == 1;
    for (d, &start) in docs.iter_mut().zip(&starts) {
        let mut kept = Vec::with_capacity(d.len());
        let mut in_span = false;
        for (i, &t) in d.iter().enumerate() {
            if is_marked(start + i) {
                stats.tokens_removed += 1;
                if !in_span {
                    stats.spans_removed += 1;
                }
                in_span = true;
            } else {
                kept.push(t);
                in_span = false;
            }
        }
        if kept.len() != d.len() {
            stats.documents_changed += 1;
            *d = kept;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// The definition, by brute force: mark the `k` tokens at `p` when the same `k` tokens
    /// start at an earlier position, both windows inside their documents.
    fn naive(docs: &[Vec<u32>], k: usize) -> Vec<Vec<u32>> {
        let mut first: HashMap<&[u32], ()> = HashMap::new();
        let mut marks: Vec<Vec<bool>> = docs.iter().map(|d| vec![false; d.len()]).collect();
        for (di, d) in docs.iter().enumerate() {
            for p in 0..d.len().saturating_sub(k - 1) {
                let w = &d[p..p + k];
                if first.insert(w, ()).is_some() {
                    marks[di][p..p + k].iter_mut().for_each(|m| *m = true);
                }
            }
        }
        docs.iter()
            .zip(&marks)
            .map(|(d, m)| {
                d.iter()
                    .zip(m)
                    .filter(|(_, m)| !**m)
                    .map(|(t, _)| *t)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn removes_later_copies_of_long_spans_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut random =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..50_257)).collect() };
        let long = random(80);
        let short = random(30);
        let mut docs = vec![random(100), random(100), random(100), random(100)];
        docs[0].splice(10..10, long.iter().copied()); // first occurrence
        docs[2].splice(50..50, long.iter().copied()); // a later copy: removed
        docs[1].splice(0..0, short.iter().copied());
        docs[3].splice(5..5, short.iter().copied()); // shorter than k: kept
        docs.push(long[5..70].to_vec()); // a document that is all repeat: emptied
        let before = docs.clone();
        let stats = dedup(&mut docs, 50, DEFAULT_CHUNK_TOKENS).expect("dedup");
        assert_eq!(docs[0], before[0]);
        assert_eq!(docs[1], before[1]);
        assert_eq!(docs[3], before[3]);
        assert_eq!(docs[2].len(), 100, "the 80 copied tokens are gone");
        assert!(docs[4].is_empty());
        assert_eq!(stats.tokens_removed, 80 + 65);
        assert_eq!(stats.spans_removed, 2);
        assert_eq!(stats.documents_changed, 2);
        assert_eq!(docs, naive(&before, 50));
    }

    #[test]
    fn agrees_with_the_definition_on_repetitive_random_text() {
        // A small alphabet and copied fragments make many overlapping repeats.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for round in 0..20 {
            let k = rng.random_range(2..12);
            let mut docs: Vec<Vec<u32>> = Vec::new();
            for _ in 0..rng.random_range(1..30) {
                let len = rng.random_range(0..60);
                let mut d: Vec<u32> = (0..len).map(|_| rng.random_range(0..4)).collect();
                if let Some(prev) = docs.last().filter(|p| p.len() > 10) {
                    let a = rng.random_range(0..prev.len() - 10);
                    d.extend_from_slice(&prev[a..a + 10]);
                }
                docs.push(d);
            }
            let expected = naive(&docs, k);
            let chunked = {
                // One chunk for everything: the definition covers the whole corpus.
                let mut d = docs.clone();
                dedup(&mut d, k, usize::MAX / 2).expect("dedup");
                d
            };
            assert_eq!(chunked, expected, "round {round}, k = {k}");
        }
    }

    #[test]
    fn chunks_bound_the_index() {
        let mut docs = vec![
            vec![1, 2, 3, 4, 5, 6],
            vec![1, 2, 3, 4, 5, 6],
            vec![1, 2, 3, 4, 5, 6],
        ];
        let stats = dedup(&mut docs, 3, 8).expect("dedup");
        assert_eq!(stats.chunks, 3, "each document alone");
        assert!(
            docs.iter().all(|d| d.len() == 6),
            "repeats across chunks are not seen"
        );
        let mut docs = vec![vec![1, 2, 3, 4, 5, 6]; 3];
        let stats = dedup(&mut docs, 3, 100).expect("dedup");
        assert_eq!(stats.chunks, 1);
        assert_eq!(docs, [vec![1, 2, 3, 4, 5, 6], vec![], vec![]]);
    }

    #[test]
    fn large_ids_are_refused() {
        let mut docs = vec![vec![70_000]];
        assert!(matches!(
            dedup(&mut docs, 50, DEFAULT_CHUNK_TOKENS),
            Err(SubstringError::TokenTooLarge(70_000))
        ));
    }
}
