//! Deduplication: normalised-URL and exact-content keys, and MinHash LSH for near
//! duplicates (word n-gram shingles, `bands × rows` signatures, union-find clusters, one
//! document kept per cluster: the first seen).
//!
//! Shingles and signatures are datatrove's (`MinhashDedupSignature` with its default
//! `MinhashConfig`): the same text normalisation, xxh64 of each space-joined word n-gram,
//! and the same hash functions, `(a·x + b) mod 2^64 mod (2^61 − 1)` with `a` and `b`
//! drawn by NumPy's legacy MT19937 from seed 1. The same shingle sets therefore give the
//! same band collisions, hence the same clusters when candidates are not verified. Words
//! are split by spaCy's English rules, as datatrove splits them ([`super::words`]).

use std::{collections::HashSet, sync::LazyLock};

use unicode_normalization::UnicodeNormalization;
use xxhash_rust::{
    xxh3::{xxh3_64_with_seed, xxh3_128},
    xxh64::xxh64,
};

/// A URL reduced to what identifies the page: lower-case scheme and host without `www.`,
/// no default port, no fragment, no tracking parameters (`utm_*`, `fbclid`, `gclid`), the
/// remaining query parameters sorted, no trailing slash. Unparsable URLs are kept as
/// trimmed text.
pub fn normalize_url(raw: &str) -> String {
    let raw = raw.trim();
    let Ok(mut url) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    url.set_fragment(None);
    if let Some(host) = url
        .host_str()
        .map(|h| h.trim_start_matches("www.").to_string())
    {
        let _ = url.set_host(Some(&host));
    }
    if url.port() == url.port_or_known_default() {
        let _ = url.set_port(None);
    }
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !(k.starts_with("utm_") || k == "fbclid" || k == "gclid"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let scheme = if url.scheme() == "http" {
        "https"
    } else {
        url.scheme()
    };
    let rest = &url.as_str()[url.scheme().len()..];
    format!("{scheme}{}", rest.trim_end_matches('/'))
}

/// The exact-duplicate key of a text: 128-bit xxh3 of the text with whitespace runs
/// collapsed and the ends trimmed (so re-wrapped copies match; case and punctuation count).
pub fn content_key(text: &str) -> u128 {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    xxh3_128(collapsed.as_bytes())
}

/// MinHash parameters: `bands × rows = permutations`, chosen so that the LSH threshold
/// `(1/bands)^(1/rows)` is the closest to the requested similarity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MinHashParams {
    /// Words per shingle.
    pub ngram: usize,
    /// Bands.
    pub bands: usize,
    /// Rows per band.
    pub rows: usize,
    /// The similarity threshold asked for.
    pub threshold: f64,
}

impl MinHashParams {
    /// Derive bands and rows from `permutations` and `threshold`.
    pub fn new(ngram: usize, permutations: usize, threshold: f64) -> Self {
        let permutations = permutations.max(1);
        let (bands, rows) = (1..=permutations)
            .filter(|r| permutations.is_multiple_of(*r))
            .map(|r| (permutations / r, r))
            .min_by(|a, b| {
                let t = |(b, r): (usize, usize)| {
                    ((1.0 / b as f64).powf(1.0 / r as f64) - threshold).abs()
                };
                t(*a).total_cmp(&t(*b))
            })
            .unwrap_or((permutations, 1));
        Self {
            ngram: ngram.max(1),
            bands,
            rows,
            threshold,
        }
    }

    /// Permutations per signature.
    pub fn permutations(&self) -> usize {
        self.bands * self.rows
    }

    /// The similarity at which a pair collides in some band with probability 1/2-ish:
    /// `(1/bands)^(1/rows)`.
    pub fn lsh_threshold(&self) -> f64 {
        (1.0 / self.bands as f64).powf(1.0 / self.rows as f64)
    }
}

/// datatrove's `PUNCTUATION` (`datatrove.utils.text`), which normalisation turns into
/// spaces, besides the control characters below.
const PUNCTUATION: &str =
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»";

static PUNCTUATION_SET: LazyLock<HashSet<char>> = LazyLock::new(|| {
    let controls = [(0u32, 9u32), (11, 13), (13, 32), (127, 160)]
        .into_iter()
        .flat_map(|(a, b)| a..b)
        .filter_map(char::from_u32);
    PUNCTUATION.chars().chain(controls).collect()
});

/// Digits in any script, with an optional decimal part (datatrove's `NUMBERS_PATTERN`).
static NUMBERS: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r"\p{Nd}+(?:[.,،٫⎖⎗⎘]\p{Nd}+)?").expect("a valid pattern"));
/// Non-spacing marks, removed after canonical decomposition.
static MARKS: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r"\p{Mn}+").expect("a valid pattern"));

/// datatrove's `simplify_text` with its defaults, to raise the recall of near-duplicate
/// search: lower case, numbers to `0`, punctuation and control characters to spaces,
/// whitespace runs to one space, diacritics removed (NFD without non-spacing marks).
pub fn simplify(text: &str) -> String {
    if text.is_ascii() {
        return simplify_ascii(text.as_bytes());
    }
    simplify_unicode(text)
}

/// [`simplify`] for ASCII text in one pass: no diacritics to strip, digits are `[0-9]`,
/// and every control character but tab and newline is punctuation.
fn simplify_ascii(b: &[u8]) -> String {
    static SEPARATOR: LazyLock<[bool; 128]> = LazyLock::new(|| {
        let mut t = [false; 128];
        for (c, slot) in t.iter_mut().enumerate() {
            let c = c as u8 as char;
            *slot = PUNCTUATION_SET.contains(&c) || c.is_whitespace();
        }
        t
    });
    let mut out = String::with_capacity(b.len());
    let mut space = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i].to_ascii_lowercase();
        if SEPARATOR[c as usize] {
            space = !out.is_empty();
            i += 1;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        if c.is_ascii_digit() {
            // \p{Nd}+ with an optional decimal part becomes one "0".
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && matches!(b[i], b'.' | b',') && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push('0');
            continue;
        }
        out.push(c as char);
        i += 1;
    }
    out
}

fn simplify_unicode(text: &str) -> String {
    let lower = text.to_lowercase();
    let numbers = NUMBERS.replace_all(&lower, "0");
    let spaced: String = numbers
        .chars()
        .map(|c| if PUNCTUATION_SET.contains(&c) { ' ' } else { c })
        .collect();
    let mut joined = String::with_capacity(spaced.len());
    for w in spaced.split_whitespace() {
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(w);
    }
    let decomposed: String = joined.nfd().collect();
    MARKS.replace_all(&decomposed, "").trim().to_string()
}

/// xxh64 hashes of the distinct word n-grams of `text` ([`simplify`], then words split
/// as spaCy's English tokenizer splits them, see [`super::words`]), each n-gram's words
/// joined by one space as datatrove hashes them. A text shorter than `n` words has none, and is
/// nobody's near-duplicate.
pub fn shingles(text: &str, n: usize) -> Vec<u64> {
    let simple = simplify(text);
    let mut w: Vec<&str> = Vec::new();
    super::words::split(&simple, &mut w);
    if n == 0 || w.len() < n {
        return Vec::new();
    }
    let mut gram = String::new();
    let mut out: Vec<u64> = w
        .windows(n)
        .map(|g| {
            gram.clear();
            for (k, word) in g.iter().enumerate() {
                if k > 0 {
                    gram.push(' ');
                }
                gram.push_str(word);
            }
            xxh64(gram.as_bytes(), 0)
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

const MERSENNE: u64 = (1 << 61) - 1;

/// `x % (2^61 − 1)` without a division: `x = hi·2^61 + lo ≡ hi + lo`.
fn mod_mersenne(x: u64) -> u64 {
    let s = (x & MERSENNE) + (x >> 61);
    if s >= MERSENNE { s - MERSENNE } else { s }
}

/// MT19937 as NumPy's legacy `RandomState(seed)` runs it, for datatrove's coefficients.
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    next ^= 0x9908_b0df;
                }
                self.state[i] = next;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        let high = self.next_u32() as u64;
        (high << 32) | self.next_u32() as u64
    }

    /// `randint(low, high, dtype=uint64)` for a range wider than 32 bits: masked
    /// rejection sampling, as NumPy's legacy generator does it.
    fn randint(&mut self, low: u64, high: u64) -> u64 {
        let range = high - 1 - low;
        let mask = u64::MAX >> range.leading_zeros();
        loop {
            let v = self.next_u64() & mask;
            if v <= range {
                return low + v;
            }
        }
    }
}

/// A MinHash signer: `permutations` hash functions `(a·x + b) mod 2^64 mod (2^61 − 1)`
/// with datatrove's coefficients (NumPy `RandomState(1)`: every `a`, then every `b`), so
/// signatures are datatrove's and comparable across runs.
#[derive(Clone, Debug)]
pub struct MinHasher {
    params: MinHashParams,
    coefficients: Vec<(u64, u64)>,
}

impl MinHasher {
    /// A signer for `params`.
    pub fn new(params: MinHashParams) -> Self {
        let mut rng = Mt19937::new(1);
        let k = params.permutations();
        let a: Vec<u64> = (0..k).map(|_| rng.randint(1, MERSENNE)).collect();
        let b: Vec<u64> = (0..k).map(|_| rng.randint(0, MERSENNE)).collect();
        Self {
            params,
            coefficients: a.into_iter().zip(b).collect(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> MinHashParams {
        self.params
    }

    /// The signature of a set of shingle hashes (all `u64::MAX` for an empty set).
    pub fn signature(&self, shingles: &[u64]) -> Vec<u64> {
        let mut sig = vec![u64::MAX; self.coefficients.len()];
        for &s in shingles {
            for (slot, &(a, b)) in sig.iter_mut().zip(&self.coefficients) {
                let h = mod_mersenne(s.wrapping_mul(a).wrapping_add(b));
                if h < *slot {
                    *slot = h;
                }
            }
        }
        sig
    }
}

/// Estimated Jaccard similarity of two signatures.
pub fn estimated_similarity(a: &[u64], b: &[u64]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Union-find with path halving and union by size.
#[derive(Clone, Debug)]
pub struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    /// `n` singletons.
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    /// The representative of `x`.
    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    /// Merge the sets of `a` and `b`.
    pub fn union(&mut self, a: usize, b: usize) {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        if self.size[a] < self.size[b] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b] = a;
        self.size[a] += self.size[b];
    }
}

/// Exact Jaccard similarity of two sorted, deduplicated shingle sets.
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        0.0
    } else {
        common as f64 / union as f64
    }
}

/// Members of one LSH bucket compared with a newcomer before it is joined to none.
const BUCKET_PROBES: usize = 8;

/// The LSH bucket key of each band of `signature`, or `None` for a document without
/// shingles (it is nobody's duplicate).
pub fn band_keys(signature: &[u64], params: MinHashParams) -> Option<Vec<u64>> {
    if signature.iter().all(|&h| h == u64::MAX) {
        return None;
    }
    Some(
        (0..params.bands)
            .map(|band| {
                let rows = &signature[band * params.rows..(band + 1) * params.rows];
                let mut bytes = Vec::with_capacity(rows.len() * 8);
                for h in rows {
                    bytes.extend_from_slice(&h.to_le_bytes());
                }
                xxh3_64_with_seed(&bytes, band as u64)
            })
            .collect(),
    )
}

/// [`near_duplicates_by_keys`] over full signatures.
pub fn near_duplicates(
    signatures: &[Vec<u64>],
    params: MinHashParams,
    similar: impl FnMut(usize, usize) -> bool,
) -> Clusters {
    let keys: Vec<Option<Vec<u64>>> = signatures.iter().map(|s| band_keys(s, params)).collect();
    near_duplicates_by_keys(
        keys.len(),
        params.bands,
        |i, b| keys[i].as_ref().map(|k| k[b]),
        similar,
    )
}

/// The near-duplicate clusters of `n` documents: each document's representative, the
/// lowest index of its cluster (itself when it has no near-duplicate).
#[derive(Clone, Debug, PartialEq)]
pub struct Clusters(pub Vec<usize>);

impl Clusters {
    /// Whether document `i` is kept: it is the first of its cluster.
    pub fn kept(&self, i: usize) -> bool {
        self.0[i] == i
    }

    /// For each document, whether it belongs to a cluster of two or more.
    pub fn in_clusters(&self) -> Vec<bool> {
        let mut multi = vec![false; self.0.len()];
        for (j, &r) in self.0.iter().enumerate() {
            if r != j {
                multi[j] = true;
                multi[r] = true;
            }
        }
        multi
    }
}

/// Near-duplicate clustering of `n` documents from in-memory band keys (`key(doc, band)`,
/// `None` for a document without shingles): [`cluster_bands`].
pub fn near_duplicates_by_keys(
    n: usize,
    bands: usize,
    key: impl Fn(usize, usize) -> Option<u64>,
    similar: impl FnMut(usize, usize) -> bool,
) -> Clusters {
    let band = |b: usize| -> Result<Vec<(u64, usize)>, std::convert::Infallible> {
        Ok((0..n).filter_map(|i| key(i, b).map(|k| (k, i))).collect())
    };
    match cluster_bands(n, bands, band, similar) {
        Ok(c) => c,
        Err(never) => match never {},
    }
}

/// Near-duplicate clustering of `n` documents, one band at a time: `band(b)` gives the
/// `(key, document)` pairs of band `b` (documents without shingles left out). Documents
/// that share a key in some band are candidates, and a candidate pair is joined when
/// `similar(i, j)` says so (the prepare stage checks the exact Jaccard similarity of the
/// shingle sets when `verify` is on; by default every candidate pair is joined, as
/// datatrove does). Clusters are the transitive closure. Memory: one band's pairs, sorted
/// (16 bytes per document), and the union-find.
pub fn cluster_bands<E>(
    n: usize,
    bands: usize,
    mut band: impl FnMut(usize) -> Result<Vec<(u64, usize)>, E>,
    mut similar: impl FnMut(usize, usize) -> bool,
) -> Result<Clusters, E> {
    let mut uf = UnionFind::new(n);
    for b in 0..bands {
        let mut pairs = band(b)?;
        pairs.sort_unstable();
        let mut members: Vec<usize> = Vec::with_capacity(BUCKET_PROBES);
        for bucket in pairs.chunk_by(|x, y| x.0 == y.0) {
            members.clear();
            for &(_, i) in bucket {
                for &m in &members {
                    if uf.find(m) == uf.find(i) {
                        break;
                    }
                    if similar(m, i) {
                        uf.union(m, i);
                        break;
                    }
                }
                // Newcomers are compared with the bucket's first few members only.
                if members.len() < BUCKET_PROBES {
                    members.push(i);
                }
            }
        }
    }
    let mut first_of_cluster = vec![usize::MAX; n];
    Ok(Clusters(
        (0..n)
            .map(|i| {
                let root = uf.find(i);
                if first_of_cluster[root] == usize::MAX {
                    first_of_cluster[root] = i;
                }
                first_of_cluster[root]
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parameters_are_14_bands_of_8_rows() {
        let p = MinHashParams::new(5, 112, 0.72);
        assert_eq!((p.bands, p.rows), (14, 8));
        assert!((p.lsh_threshold() - 0.719).abs() < 0.001);
    }

    #[test]
    fn jaccard_of_sorted_sets() {
        assert_eq!(jaccard(&[1, 2, 3, 4], &[3, 4, 5, 6]), 2.0 / 6.0);
        assert_eq!(jaccard(&[], &[]), 0.0);
    }

    #[test]
    fn urls_normalise() {
        assert_eq!(
            normalize_url("HTTP://www.Example.com:80/a/?utm_source=x&b=2&a=1#top"),
            "https://example.com/a/?a=1&b=2"
        );
        assert_eq!(
            normalize_url("https://example.com/a/"),
            "https://example.com/a"
        );
        assert_eq!(normalize_url("not a url"), "not a url");
    }

    #[test]
    fn content_keys_ignore_whitespace_only() {
        assert_eq!(content_key("a  b\n c"), content_key("a b c "));
        assert_ne!(content_key("a b c"), content_key("A b c"));
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let m = MinHasher::new(MinHashParams::new(1, 256, 0.7));
        let h = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        let a: Vec<u64> = (0..1000).map(h).collect();
        let b: Vec<u64> = (250..1250).map(h).collect(); // Jaccard 750/1250 = 0.6
        let est = estimated_similarity(&m.signature(&a), &m.signature(&b));
        assert!((est - 0.6).abs() < 0.08, "estimate {est}");
    }

    #[test]
    fn clusters_keep_the_first_document() {
        let p = MinHashParams::new(5, 112, 0.72);
        let m = MinHasher::new(p);
        let base = "the quick brown fox jumps over the lazy dog while the cat watches from the old wooden fence near the barn";
        let near = format!("{base} today");
        let other = "completely different words make up this sentence about rivers mountains and clouds drifting over valleys far away";
        let sets: Vec<Vec<u64>> = [base, other, &near, base]
            .iter()
            .map(|t| shingles(t, p.ngram))
            .collect();
        let sigs: Vec<Vec<u64>> = sets.iter().map(|s| m.signature(s)).collect();
        let clusters = near_duplicates(&sigs, p, |i, j| jaccard(&sets[i], &sets[j]) >= p.threshold);
        assert_eq!(clusters, Clusters(vec![0, 1, 0, 0]));
        assert_eq!(clusters.in_clusters(), vec![true, false, true, true]);
        assert!(clusters.kept(0) && clusters.kept(1) && !clusters.kept(2));
    }

    // The reference values below were printed by datatrove 0.10.1 (NumPy 2, xxhash 3.5):
    //   MinhashDedupSignature(config=MinhashConfig()).parameters, .get_shingles(text),
    //   .get_signature(shingles) and datatrove.utils.text.simplify_text(text).

    #[test]
    fn coefficients_are_datatroves() {
        let m = MinHasher::new(MinHashParams::new(5, 112, 0.72));
        let a: Vec<u64> = m.coefficients.iter().map(|c| c.0).collect();
        let b: Vec<u64> = m.coefficients.iter().map(|c| c.1).collect();
        assert_eq!(
            a[..3],
            [775169054918279404, 1758426461858698313, 2109959069025162]
        );
        assert_eq!(a[111], 223865076026037746);
        assert_eq!(
            b[..3],
            [
                1062448801025099917,
                1324811268927594100,
                1217488311597731462
            ]
        );
        assert_eq!(b[111], 1097409548522419201);
    }

    #[test]
    fn the_ascii_path_agrees_with_the_unicode_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let alphabet: Vec<char> = "aZ09 .,;'\"-\t\n\r\x0b\x0c\x01\x1f\x7f#{}()?!Mq"
            .chars()
            .collect();
        for _ in 0..2_000 {
            let len = rng.random_range(0..40);
            let s: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            assert_eq!(simplify_ascii(s.as_bytes()), simplify_unicode(&s), "{s:?}");
        }
        for x in [
            0u64,
            1,
            MERSENNE - 1,
            MERSENNE,
            MERSENNE + 1,
            u64::MAX,
            u64::MAX - 7,
        ] {
            assert_eq!(mod_mersenne(x), x % MERSENNE, "{x}");
        }
    }

    #[test]
    fn text_is_simplified_as_datatrove_does() {
        assert_eq!(
            simplify("Héllo, WORLD! It's 3.14 — naïve café 1,000,000 monday\tMay  ¿Qué? 10km"),
            "hello world it s 0 naive cafe 0 0 monday may ¿que 0km"
        );
    }

    #[test]
    fn shingles_and_signatures_are_datatroves() {
        let text = "The quick brown fox jumps over the lazy dog, again and again.";
        let sh = shingles(text, 5);
        assert_eq!(sh.len(), 8);
        for h in [
            7797000677988824208,
            4793414983259776074,
            7369512836458661087,
        ] {
            assert!(sh.contains(&h), "{h} missing from {sh:?}");
        }
        let sig = MinHasher::new(MinHashParams::new(5, 112, 0.72)).signature(&sh);
        assert_eq!(
            sig[..4],
            [
                85330943174081874,
                366011346326592937,
                302227827184868053,
                34440879854629237
            ]
        );
        assert_eq!(sig[111], 3963570588256049);
        assert!(shingles("only four words here", 5).is_empty());
    }
}
