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
use xxhash_rust::{xxh3::xxh3_128, xxh64::xxh64};

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

mod cluster;
#[cfg(test)]
mod tests;

pub use cluster::{
    Clusters, UnionFind, band_keys, cluster_bands, jaccard, near_duplicates,
    near_duplicates_by_keys,
};
