//! The per-document stages, run on batches of documents as they are read: cleaning,
//! URL and exact dedup, the quality rules and length limits, and the MinHash signature.
//! Survivors go to the spill; in memory stay only a hash per URL and per text.

use std::{collections::HashSet, time::Instant};

use rayon::prelude::*;
use taper_crds::report::{DropReason, PrepareReport};
use xxhash_rust::xxh3::xxh3_128;

use super::{
    PrepareError, clean, dedup,
    spill::{self, Doc, Spill},
    stats::StageAcc,
};

/// Documents per batch of the per-document stages and of tokenization.
pub(crate) const BATCH_DOCS: usize = 4096;

/// The per-document stages — cleaning, URL and exact dedup, the quality rules and the
/// MinHash signature — applied to batches of documents as they are read. Survivors go to
/// the spill; in memory stay only a hash per URL and per text, and the MinHash band keys.
pub(crate) struct Batcher<'a> {
    pub spec: &'a taper_crds::DatasetSpec,
    pub filter: clean::QualityFilter,
    pub batch: Vec<Doc>,
    pub seen_urls: HashSet<u128>,
    pub seen_texts: HashSet<u128>,
    pub minhash: Option<(dedup::MinHasher, dedup::MinHashParams)>,
    /// MinHash band keys of the spilled documents, a file per band (`None`: MinHash off).
    pub band_keys: Option<spill::BandKeys>,
    pub spill: Spill,
    pub read_out: u64,
    pub clean: StageAcc,
    pub url: StageAcc,
    pub exact: StageAcc,
    pub quality: StageAcc,
    pub signatures: StageAcc,
    /// The first error of a batch (reported when the source it came from is done).
    pub error: Option<PrepareError>,
}

impl Batcher<'_> {
    /// Take a document that was read (not empty).
    pub fn push(&mut self, doc: Doc, report: &mut PrepareReport) {
        self.read_out += 1;
        self.batch.push(doc);
        if self.batch.len() >= BATCH_DOCS {
            self.flush(report);
        }
    }

    /// Run the per-document stages on the batch.
    pub fn flush(&mut self, report: &mut PrepareReport) {
        if self.error.is_none()
            && let Err(e) = self.run_batch(report)
        {
            self.error = Some(e);
        }
        self.batch.clear();
    }

    fn run_batch(&mut self, report: &mut PrepareReport) -> Result<(), PrepareError> {
        let names: Vec<&str> = self.spec.sources.iter().map(|s| s.name.as_str()).collect();
        let docs = std::mem::take(&mut self.batch);
        let filter = &self.filter;

        // Cleaning: markup, Unicode, whitespace, boilerplate, in parallel. Instruction
        // records were normalised field by field when read; markup and whitespace are
        // content in their (code) answers.
        let t = Instant::now();
        let n_in = docs.len();
        let texts: Vec<String> = docs
            .par_iter()
            .map(|d| {
                if d.record.is_some() {
                    d.text.clone()
                } else {
                    filter.clean(&d.text)
                }
            })
            .collect();
        let mut cleaned = Vec::with_capacity(docs.len());
        for (mut d, text) in docs.into_iter().zip(texts) {
            if text.trim().is_empty() {
                report.drop_document(names[d.source], DropReason::EmptyAfterCleaning, &d.text);
            } else {
                d.text = text;
                cleaned.push(d);
            }
        }
        let mut docs = cleaned;
        self.clean.add(n_in, docs.len(), t);

        if self.spec.dedup.url {
            let t = Instant::now();
            let n_in = docs.len();
            docs.retain(|d| match &d.url {
                Some(u)
                    if !self
                        .seen_urls
                        .insert(xxh3_128(dedup::normalize_url(u).as_bytes())) =>
                {
                    report.drop_document(names[d.source], DropReason::UrlDuplicate, &d.text);
                    false
                }
                _ => true,
            });
            self.url.add(n_in, docs.len(), t);
        }
        if self.spec.dedup.exact {
            let t = Instant::now();
            let n_in = docs.len();
            docs.retain(|d| {
                if self.seen_texts.insert(dedup::content_key(&d.text)) {
                    true
                } else {
                    report.drop_document(names[d.source], DropReason::ExactDuplicate, &d.text);
                    false
                }
            });
            self.exact.add(n_in, docs.len(), t);
        }

        // Quality rules (Gopher, then C4's line and document rules) and the length bounds.
        let t = Instant::now();
        let n_in = docs.len();
        let verdicts: Vec<clean::Verdict> = docs
            .par_iter()
            .map(|d| {
                if d.record.is_some() {
                    Ok(d.text.clone())
                } else {
                    filter.judge(&d.text)
                }
            })
            .collect();
        let mut kept = Vec::with_capacity(docs.len());
        for (mut d, verdict) in docs.into_iter().zip(verdicts) {
            match verdict {
                Err(rule) => report.drop_document(names[d.source], DropReason::Rule(rule), &d.text),
                Ok(text) if !filter.length_ok(&text) => {
                    report.drop_document(names[d.source], DropReason::Length, &text)
                }
                Ok(text) => {
                    d.text = text;
                    kept.push(d);
                }
            }
        }
        self.quality.add(n_in, kept.len(), t);

        if let Some((hasher, params)) = &self.minhash {
            let t = Instant::now();
            let keys: Vec<Option<Vec<u64>>> = kept
                .par_iter()
                .map(|d| {
                    let shingles = dedup::shingles(&d.text, params.ngram);
                    dedup::band_keys(&hasher.signature(&shingles), *params)
                })
                .collect();
            if let Some(files) = self.band_keys.as_mut() {
                for k in &keys {
                    files.push(k.as_deref())?;
                }
            }
            self.signatures.add(kept.len(), kept.len(), t);
        }
        for d in &kept {
            self.spill.push(d)?;
        }
        Ok(())
    }
}
