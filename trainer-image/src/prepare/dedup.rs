//! Deduplication: normalised-URL and exact-content keys, and MinHash LSH for near
//! duplicates (word n-gram shingles, `bands × rows` signatures, union-find clusters, one
//! document kept per cluster: the first seen).

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128};

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

/// Words of `text` for shingling: lower-cased, punctuation stripped.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// 64-bit hashes of the distinct word n-grams of `text` (a text shorter than `n` words
/// is one shingle).
pub fn shingles(text: &str, n: usize) -> Vec<u64> {
    let w = words(text);
    if w.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<u64> = if w.len() < n {
        vec![xxh3_64(w.join(" ").as_bytes())]
    } else {
        w.windows(n)
            .map(|g| xxh3_64(g.join(" ").as_bytes()))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

const MERSENNE: u64 = (1 << 61) - 1;

fn mod_mersenne(x: u128) -> u64 {
    let lo = (x as u64) & MERSENNE;
    let hi = (x >> 61) as u64;
    let s = lo + hi;
    if s >= MERSENNE { s - MERSENNE } else { s }
}

/// A MinHash signer: `permutations` universal hash functions `(a·x + b) mod (2^61 − 1)`
/// with coefficients drawn from a fixed seed, so signatures are comparable across runs.
#[derive(Clone, Debug)]
pub struct MinHasher {
    params: MinHashParams,
    coefficients: Vec<(u64, u64)>,
}

impl MinHasher {
    /// A signer for `params`.
    pub fn new(params: MinHashParams) -> Self {
        let coefficients = (0..params.permutations() as u64)
            .map(|i| {
                let a = xxh3_64_with_seed(b"taper-minhash-a", i) % (MERSENNE - 1) + 1;
                let b = xxh3_64_with_seed(b"taper-minhash-b", i) % MERSENNE;
                (a, b)
            })
            .collect();
        Self {
            params,
            coefficients,
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
            let x = (s % MERSENNE) as u128;
            for (slot, &(a, b)) in sig.iter_mut().zip(&self.coefficients) {
                let h = mod_mersenne(a as u128 * x + b as u128);
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

/// Which documents to keep: [`near_duplicates_by_keys`] over full signatures.
pub fn near_duplicates(
    signatures: &[Vec<u64>],
    params: MinHashParams,
    similar: impl FnMut(usize, usize) -> bool,
) -> Vec<bool> {
    let keys: Vec<Option<Vec<u64>>> = signatures.iter().map(|s| band_keys(s, params)).collect();
    near_duplicates_by_keys(
        keys.len(),
        params.bands,
        |i, b| keys[i].as_ref().map(|k| k[b]),
        similar,
    )
}

/// Near-duplicate clustering of `n` documents: documents that share a band bucket
/// (`key(doc, band)`, `None` for a document without shingles) are candidates, and a
/// candidate pair is joined when `similar(i, j)` confirms it (the prepare stage checks the
/// exact Jaccard similarity of the shingle sets, so no pair below the threshold is merged
/// directly). Clusters are the transitive closure. Returns, for each document, whether it
/// is kept: the lowest index of each cluster.
pub fn near_duplicates_by_keys(
    n: usize,
    bands: usize,
    key: impl Fn(usize, usize) -> Option<u64>,
    mut similar: impl FnMut(usize, usize) -> bool,
) -> Vec<bool> {
    let mut uf = UnionFind::new(n);
    for band in 0..bands {
        let mut buckets: HashMap<u64, Vec<usize>> = HashMap::with_capacity(n);
        for i in 0..n {
            let Some(k) = key(i, band) else { continue };
            let members = buckets.entry(k).or_default();
            let mut joined = false;
            for &m in members.iter().take(BUCKET_PROBES) {
                if uf.find(m) == uf.find(i) {
                    joined = true;
                    break;
                }
                if similar(m, i) {
                    uf.union(m, i);
                    joined = true;
                    break;
                }
            }
            if !joined || members.len() < BUCKET_PROBES {
                members.push(i);
            }
        }
    }
    let mut first_of_cluster: HashMap<usize, usize> = HashMap::new();
    (0..n)
        .map(|i| {
            let root = uf.find(i);
            *first_of_cluster.entry(root).or_insert(i) == i
        })
        .collect()
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
        let h = |i: u64| xxh3_64(&i.to_le_bytes());
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
        let kept = near_duplicates(&sigs, p, |i, j| jaccard(&sets[i], &sets[j]) >= p.threshold);
        assert_eq!(kept, vec![true, true, false, false]);
    }
}
