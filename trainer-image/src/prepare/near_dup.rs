//! MinHash near-duplicate removal across all sources: candidates share a band bucket;
//! with `verify` on, each pair is confirmed by the exact Jaccard similarity of the two
//! documents' shingles, read back from the spill. Optionally writes the clusters found.

use std::{collections::HashMap, io::Write, path::Path, time::Instant};

use taper_crds::{
    dataset::MinHash,
    report::{DropReason, Stage},
};

use super::{
    PrepareError, dedup, io_err,
    select::Selecting,
    spill::{BandKeys, Spill},
    stats::StageAcc,
};

/// Run the stage over the `n` spilled documents: returns which are kept, counts the
/// dropped ones, and records the stage (its signature time included, from `signatures`).
pub(crate) fn remove_near_duplicates(
    sel: &mut Selecting<'_>,
    mh: &MinHash,
    params: dedup::MinHashParams,
    band_keys: Option<&BandKeys>,
    signatures: StageAcc,
    clusters_file: Option<&Path>,
) -> Result<Vec<bool>, PrepareError> {
    let t = Instant::now();
    let spill = sel.spill;
    let n = spill.len();
    let mut cache: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut failure = None;
    let mut shingles = |i: usize| -> Vec<u64> {
        // A bounded cache (4,096 shingle sets, tens of MB): a document meets its
        // candidates band after band.
        if cache.len() > 4_096 {
            cache.clear();
        }
        cache
            .entry(i)
            .or_insert_with(|| match spill.get(i) {
                Ok(d) => dedup::shingles(&d.text, params.ngram),
                Err(e) => {
                    failure.get_or_insert(e);
                    Vec::new()
                }
            })
            .clone()
    };
    let clusters = dedup::cluster_bands(
        n,
        params.bands,
        |b| match band_keys {
            Some(files) => files.band(b),
            None => Ok(Vec::new()),
        },
        |i, j| !mh.verify || dedup::jaccard(&shingles(i), &shingles(j)) >= params.threshold,
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    let keep: Vec<bool> = (0..n).map(|i| clusters.kept(i)).collect();
    if let Some(path) = clusters_file {
        write_clusters(path, &clusters, spill, &sel.names)?;
    }
    for (i, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
        sel.drop_spilled(i, DropReason::NearDuplicate)?;
    }
    let mut acc = signatures;
    acc.add(0, 0, t);
    acc.documents_out = keep.iter().filter(|k| **k).count() as u64;
    sel.report.minhash = Some([params.ngram, params.bands, params.rows]);
    sel.report.stages.push(acc.stats(Stage::MinhashDedup));
    Ok(keep)
}

/// Write `clusters` to `path` as JSON lines: each document in a cluster of two or more,
/// in reading order, with its cluster's number (in order of first member), whether it is
/// the one kept, its source, URL and the first 200 characters of its text.
fn write_clusters(
    path: &Path,
    clusters: &dedup::Clusters,
    spill: &Spill,
    names: &[&str],
) -> Result<(), PrepareError> {
    let io = |e| io_err(path, e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let mut numbers: HashMap<usize, usize> = HashMap::new();
    for (i, multi) in clusters.in_clusters().into_iter().enumerate() {
        if !multi {
            continue;
        }
        let next = numbers.len();
        let cluster = *numbers.entry(clusters.0[i]).or_insert(next);
        let d = spill.get(i)?;
        let line = serde_json::json!({
            "cluster": cluster,
            "kept": clusters.kept(i),
            "source": names[d.source],
            "url": d.url,
            "text": d.text.chars().take(200).collect::<String>(),
        });
        writeln!(out, "{line}").map_err(io)?;
    }
    out.flush().map_err(io)
}
