//! Exact-substring deduplication in the manner of Lee et al. 2021, "Deduplicating Training
//! Data Makes Language Models Better" (`ExactSubstr`): every span of at least `k` tokens
//! that already occurred earlier in the corpus is removed, so each long repeated span keeps
//! only its first occurrence, across the whole corpus.
//!
//! The corpus (documents' token ids, in corpus order, each followed by a separator) is
//! written to local disk as 16-bit ids ([`CorpusWriter`]). It is cut into chunks of whole
//! documents, at most `chunk_tokens` each; each chunk gets a suffix array (libsais, on
//! 16-bit symbols), of which only the suffixes whose first `k` tokens lie inside one
//! document are written to disk. The chunks' suffix arrays are then merged by their first
//! `k` tokens (read from the memory-mapped corpus), so that equal `k`-token windows of the
//! whole corpus arrive together, as in Lee et al.'s merge of per-chunk suffix arrays. In
//! each group of equal windows the earliest position is the first occurrence, and the
//! windows at the other positions are marked (a bit per token, in a memory-mapped file).
//! Marked tokens are then cut out of their documents ([`cut`]).
//!
//! Memory: a chunk's suffix array (4 bytes per token) and its 2 bytes of text, about
//! 6 bytes per token of a chunk, 1.5 bytes per input byte of English at ~4 bytes per GPT-2
//! token; the rest is on local disk: 2 bytes per token of text, 4 of suffix arrays and
//! 1 bit of marks, about 6.2 bytes per token in all.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use libsais::SuffixArrayConstruction;

/// Default tokens per chunk: 256 Mi tokens, about 1.5 GB of working memory.
pub const DEFAULT_CHUNK_TOKENS: usize = 256 << 20;

pub use taper_crds::report::SubstringStats;

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
    /// A working file could not be written or read.
    #[error("exact-substring working file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SubstringError + '_ {
    move |source| SubstringError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Follows each document in the indexed text; token ids must be below it.
const SEPARATOR: u16 = u16::MAX;

/// Writes a corpus, one document at a time, to a file of 16-bit ids.
#[derive(Debug)]
pub struct CorpusWriter {
    path: PathBuf,
    out: BufWriter<File>,
    starts: Vec<u64>,
    len: u64,
}

impl CorpusWriter {
    /// A new corpus file at `path`.
    pub fn create(path: PathBuf) -> Result<Self, SubstringError> {
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            starts: vec![0],
            len: 0,
        })
    }

    /// Append a document.
    pub fn push(&mut self, doc: &[u32]) -> Result<(), SubstringError> {
        let mut bytes = Vec::with_capacity(doc.len() * 2 + 2);
        for &t in doc {
            let id = u16::try_from(t)
                .ok()
                .filter(|&id| id != SEPARATOR)
                .ok_or(SubstringError::TokenTooLarge(t))?;
            bytes.extend_from_slice(&id.to_ne_bytes());
        }
        bytes.extend_from_slice(&SEPARATOR.to_ne_bytes());
        self.out.write_all(&bytes).map_err(io_err(&self.path))?;
        self.len += doc.len() as u64 + 1;
        self.starts.push(self.len);
        Ok(())
    }

    /// Close the file and map it.
    pub fn finish(self) -> Result<Corpus, SubstringError> {
        let file = self.out.into_inner().map_err(|e| SubstringError::Io {
            path: self.path.display().to_string(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&self.path))?;
        drop(file);
        let map = if self.len == 0 {
            None
        } else {
            let file = File::open(&self.path).map_err(io_err(&self.path))?;
            // SAFETY: the file is private to this run (the spool), and nothing writes to
            // it once it is closed.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&self.path))?;
            Some(map)
        };
        Ok(Corpus {
            path: self.path,
            map,
            starts: self.starts,
        })
    }
}

/// A corpus written by [`CorpusWriter`], mapped read-only.
#[derive(Debug)]
pub struct Corpus {
    path: PathBuf,
    map: Option<memmap2::Mmap>,
    /// Where each document starts, and (last) the text's length; document `d` is followed
    /// by its separator at `starts[d + 1] - 1`.
    starts: Vec<u64>,
}

impl Corpus {
    /// Documents.
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// Whether it holds no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens, separators included.
    fn text(&self) -> &[u16] {
        // A page-aligned map of an even number of bytes: the cast cannot fail.
        self.map
            .as_deref()
            .and_then(|m| bytemuck::try_cast_slice(m).ok())
            .unwrap_or(&[])
    }

    /// Document `i`'s tokens.
    pub fn doc(&self, i: usize) -> &[u16] {
        &self.text()[self.starts[i] as usize..self.starts[i + 1] as usize - 1]
    }
}

impl Drop for Corpus {
    fn drop(&mut self) {
        self.map = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A bit per token of a corpus: the tokens to cut.
#[derive(Debug)]
pub struct Marks {
    path: PathBuf,
    map: Option<memmap2::MmapMut>,
}

impl Marks {
    fn create(path: PathBuf, tokens: usize) -> Result<Self, SubstringError> {
        let bytes = tokens.div_ceil(8);
        let map = if bytes == 0 {
            None
        } else {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_err(&path))?;
            file.set_len(bytes as u64).map_err(io_err(&path))?;
            // SAFETY: a file of this run's own, mapped once.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io_err(&path))?;
            Some(map)
        };
        Ok(Self { path, map })
    }

    fn set(&mut self, p: usize) {
        if let Some(m) = self.map.as_mut() {
            m[p / 8] |= 1 << (p % 8);
        }
    }

    fn get(&self, p: usize) -> bool {
        self.map
            .as_ref()
            .is_some_and(|m| m[p / 8] >> (p % 8) & 1 == 1)
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        self.map = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A chunk's suffix array on disk: global positions, in the chunk's suffix order.
#[derive(Debug)]
struct SaReader {
    input: BufReader<File>,
    path: PathBuf,
    base: u64,
}

impl SaReader {
    fn next(&mut self) -> Result<Option<usize>, SubstringError> {
        let mut b = [0u8; 4];
        match self.input.read_exact(&mut b) {
            Ok(()) => Ok(Some(
                (self.base + u64::from(u32::from_le_bytes(b))) as usize,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_err(&self.path)(e)),
        }
    }
}

impl Drop for SaReader {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Build the suffix array of the chunk `[lo, hi)` (whole documents `docs`) and write, in
/// suffix order, the positions whose `k` tokens lie inside one document.
fn chunk_suffixes(
    corpus: &Corpus,
    docs: std::ops::Range<usize>,
    k: usize,
    path: PathBuf,
) -> Result<SaReader, SubstringError> {
    let (lo, hi) = (
        corpus.starts[docs.start] as usize,
        corpus.starts[docs.end] as usize,
    );
    if hi - lo >= i32::MAX as usize {
        return Err(SubstringError::ChunkTooLarge(hi - lo));
    }
    // Where a window may start: the first len - k + 1 positions of each document.
    let mut valid = vec![0u64; (hi - lo).div_ceil(64)];
    for d in docs {
        let (start, sep) = (
            corpus.starts[d] as usize - lo,
            corpus.starts[d + 1] as usize - 1 - lo,
        );
        for p in start..(sep + 1).saturating_sub(k) {
            valid[p / 64] |= 1 << (p % 64);
        }
    }
    {
        let mut out =
            BufWriter::with_capacity(1 << 20, File::create(&path).map_err(io_err(&path))?);
        if hi - lo >= 2 {
            let sa = SuffixArrayConstruction::for_text(&corpus.text()[lo..hi])
                .in_owned_buffer32()
                .single_threaded()
                .run()
                .map_err(|e| SubstringError::Libsais(format!("{e:?}")))?
                .into_vec();
            for s in sa {
                let p = s as usize;
                if valid[p / 64] >> (p % 64) & 1 == 1 {
                    out.write_all(&(p as u32).to_le_bytes())
                        .map_err(io_err(&path))?;
                }
            }
        } else if valid.first().is_some_and(|v| v & 1 == 1) {
            out.write_all(&0u32.to_le_bytes()).map_err(io_err(&path))?;
        }
        out.flush().map_err(io_err(&path))?;
    }
    let file = File::open(&path).map_err(io_err(&path))?;
    Ok(SaReader {
        input: BufReader::with_capacity(1 << 16, file),
        path,
        base: lo as u64,
    })
}

/// Find every `k`-token window of `corpus` that occurred earlier in it and mark its
/// tokens. Working files go to `dir`.
pub fn find_repeats(
    corpus: &Corpus,
    k: usize,
    chunk_tokens: usize,
    dir: &Path,
    stats: &mut SubstringStats,
) -> Result<Marks, SubstringError> {
    let k = k.max(1);
    stats.min_length = k as u64;
    let text = corpus.text();
    stats.tokens_in += (text.len() - corpus.len()) as u64;
    let mut marks = Marks::create(dir.join("substring-marks.bin"), text.len())?;
    // Chunks of whole documents, each with its suffix array on disk.
    let mut readers = Vec::new();
    let mut start = 0;
    while start < corpus.len() {
        let mut end = start + 1;
        while end < corpus.len()
            && corpus.starts[end + 1] - corpus.starts[start] <= chunk_tokens as u64
        {
            end += 1;
        }
        let path = dir.join(format!("substring-sa-{}.bin", readers.len()));
        readers.push(chunk_suffixes(corpus, start..end, k, path)?);
        start = end;
    }
    stats.chunks += readers.len() as u64;
    // Merge by the first k tokens: equal windows of the whole corpus come out together.
    let mut heap = BinaryHeap::with_capacity(readers.len());
    for (i, r) in readers.iter_mut().enumerate() {
        if let Some(p) = r.next()? {
            heap.push(Reverse((&text[p..p + k], p, i)));
        }
    }
    let mut group: Vec<usize> = Vec::new();
    let mut group_key: &[u16] = &[];
    let flush = |group: &mut Vec<usize>, marks: &mut Marks| {
        if group.len() > 1 {
            let first = group.iter().copied().min().unwrap_or(0);
            for &p in group.iter().filter(|&&p| p != first) {
                for q in p..p + k {
                    marks.set(q);
                }
            }
        }
        group.clear();
    };
    while let Some(Reverse((key, p, i))) = heap.pop() {
        if key != group_key {
            flush(&mut group, &mut marks);
            group_key = key;
        }
        group.push(p);
        if let Some(next) = readers[i].next()? {
            heap.push(Reverse((&text[next..next + k], next, i)));
        }
    }
    flush(&mut group, &mut marks);
    Ok(marks)
}

/// Document `i` of `corpus` without its marked tokens, counted into `stats`.
pub fn cut(corpus: &Corpus, marks: &Marks, i: usize, stats: &mut SubstringStats) -> Vec<u32> {
    let start = corpus.starts[i] as usize;
    let doc = corpus.doc(i);
    let mut kept = Vec::with_capacity(doc.len());
    let mut in_span = false;
    for (j, &t) in doc.iter().enumerate() {
        if marks.get(start + j) {
            stats.tokens_removed += 1;
            if !in_span {
                stats.spans_removed += 1;
            }
            in_span = true;
        } else {
            kept.push(u32::from(t));
            in_span = false;
        }
    }
    if kept.len() != doc.len() {
        stats.documents_changed += 1;
    }
    kept
}

/// A fresh working folder under the temporary folder.
fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "taper-substring-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Remove from `docs` (in memory) every span of at least `k` tokens that occurred earlier
/// in `docs`, indexing chunks of at most `chunk_tokens` tokens; working files go to a
/// fresh folder under the temporary folder.
pub fn dedup(
    docs: &mut [Vec<u32>],
    k: usize,
    chunk_tokens: usize,
) -> Result<SubstringStats, SubstringError> {
    let dir = scratch();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let result = (|| {
        let mut w = CorpusWriter::create(dir.join("corpus.u16"))?;
        for d in docs.iter() {
            w.push(d)?;
        }
        let corpus = w.finish()?;
        let mut stats = SubstringStats::default();
        let marks = find_repeats(&corpus, k, chunk_tokens, &dir, &mut stats)?;
        for (i, d) in docs.iter_mut().enumerate() {
            *d = cut(&corpus, &marks, i, &mut stats);
        }
        Ok(stats)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
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
            // One chunk, then chunks of a few documents: the merge of the chunks' suffix
            // arrays finds the repeats across them too.
            for chunk in [usize::MAX / 2, rng.random_range(1..200)] {
                let mut d = docs.clone();
                dedup(&mut d, k, chunk).expect("dedup");
                assert_eq!(d, expected, "round {round}, k = {k}, chunks of {chunk}");
            }
        }
    }

    #[test]
    fn repeats_across_chunks_are_found() {
        let mut docs = vec![
            vec![1, 2, 3, 4, 5, 6],
            vec![1, 2, 3, 4, 5, 6],
            vec![1, 2, 3, 4, 5, 6],
        ];
        let stats = dedup(&mut docs, 3, 8).expect("dedup");
        assert_eq!(stats.chunks, 3, "each document alone");
        assert_eq!(docs, [vec![1, 2, 3, 4, 5, 6], vec![], vec![]]);
        assert_eq!(stats.tokens_removed, 12);
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
        // 65,535 is the separator.
        let mut docs = vec![vec![65_535]];
        assert!(matches!(
            dedup(&mut docs, 50, DEFAULT_CHUNK_TOKENS),
            Err(SubstringError::TokenTooLarge(65_535))
        ));
    }
}
