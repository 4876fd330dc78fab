//! The train/test split (document-level, deterministic in the seed) and decontamination:
//! test documents sharing a long word n-gram with any train document are dropped.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use taper_crds::{
    dataset::{Decontamination, Split},
    report::{DropReason, Stage},
};

use super::{PrepareError, dedup, select::Selecting, stats::record_stage};

/// Split the `kept` spill indices: returns each with whether it is a test document.
/// `testSize` below 1 is a fraction (at least one document), else a count; at least one
/// document stays in train.
pub(crate) fn split(sel: &mut Selecting<'_>, kept: Vec<usize>, spec: &Split) -> Vec<(usize, bool)> {
    let t = Instant::now();
    let n = kept.len();
    let n_test = if spec.test_size < 1.0 {
        ((spec.test_size * n as f64).round() as usize).max(1)
    } else {
        spec.test_size as usize
    };
    let n_test = n_test.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.seed as u64));
    let mut is_test = vec![false; n];
    for &i in &order[..n_test] {
        is_test[i] = true;
    }
    record_stage(sel.report, Stage::Split, n, n, t);
    kept.into_iter().zip(is_test).collect()
}

/// Drop the test documents of `kept` that share a word n-gram with a train document. The
/// n-grams of the (small) test split are held; train streams past.
pub(crate) fn decontaminate(
    sel: &mut Selecting<'_>,
    kept: &mut Vec<(usize, bool)>,
    spec: &Decontamination,
) -> Result<(), PrepareError> {
    let t = Instant::now();
    let spill = sel.spill;
    let n_gram = spec.ngram.max(1) as usize;
    let mut test_grams: HashMap<u64, Vec<usize>> = HashMap::new();
    for &(i, _) in kept.iter().filter(|(_, t)| *t) {
        let text = spill.get(i)?.text;
        for g in dedup::shingles(&text, n_gram) {
            let ids = test_grams.entry(g).or_default();
            if ids.last() != Some(&i) {
                ids.push(i);
            }
        }
    }
    let train: Vec<usize> = kept.iter().filter(|(_, t)| !*t).map(|(i, _)| *i).collect();
    let hits: Vec<usize> = train
        .par_iter()
        .map(|&i| -> Result<Vec<usize>, PrepareError> {
            let text = spill.get(i)?.text;
            Ok(dedup::shingles(&text, n_gram)
                .iter()
                .filter_map(|g| test_grams.get(g))
                .flatten()
                .copied()
                .collect())
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let contaminated: HashSet<usize> = hits.into_iter().collect();
    let n_in = kept.len();
    let mut dropped = Vec::new();
    kept.retain(|(i, _)| {
        let keep = !contaminated.contains(i);
        if !keep {
            dropped.push(*i);
        }
        keep
    });
    for i in dropped {
        sel.drop_spilled(i, DropReason::Contaminated)?;
    }
    record_stage(sel.report, Stage::Decontaminate, n_in, kept.len(), t);
    Ok(())
}
