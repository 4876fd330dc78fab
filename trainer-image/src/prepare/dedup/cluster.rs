//! Clustering near-duplicate candidates: union-find over the pairs that share a band
//! bucket (optionally confirmed by exact Jaccard), one document kept per cluster.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::MinHashParams;

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
