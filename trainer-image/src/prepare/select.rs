//! Selection: every stage before tokenization, wired in order. Sources are read into the
//! per-document stages ([`Batcher`]); the survivors, spilled to disk, go through MinHash
//! near-duplicate removal, the train/test split and decontamination.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use taper_crds::{
    Dataset,
    dataset::DatasetFormat,
    report::{DropReason, PrepareReport, Stage},
};

use super::{
    Options, PrepareError,
    batch::{BATCH_DOCS, Batcher},
    clean, dedup, near_dup, read, sources,
    spill::{self, Spill},
    split,
    stats::{StageAcc, stage_bar},
};

/// The outcome of the selecting stages: the surviving documents on disk, which of them
/// are kept, and which of those are test documents.
pub(crate) struct Selection {
    /// Spilled documents (dropped near-duplicates and contaminated ones included).
    pub spill: Spill,
    /// Spill indices of the kept documents, in order, with whether each is a test one.
    pub kept: Vec<(usize, bool)>,
    /// The accounting so far.
    pub report: PrepareReport,
    /// Where the spill lives; removed after it.
    _spool: sources::Spool,
}

impl Selection {
    /// Kept documents of one split (`test`), in order.
    pub fn split(&self, test: bool) -> impl Iterator<Item = usize> + '_ {
        self.kept
            .iter()
            .filter(move |(_, t)| *t == test)
            .map(|(i, _)| *i)
    }
}

/// What the stages after the spill share: the report, the spill and the source names.
pub(crate) struct Selecting<'a> {
    pub report: &'a mut PrepareReport,
    pub spill: &'a Spill,
    pub names: Vec<&'a str>,
}

impl Selecting<'_> {
    /// Count spilled document `i` as dropped for `reason`; its text is read back only
    /// while the reason still collects examples.
    pub fn drop_spilled(&mut self, i: usize, reason: DropReason) -> Result<(), PrepareError> {
        let text = if self.report.wants_example(reason) {
            self.spill.get(i)?.text
        } else {
            String::new()
        };
        self.report
            .drop_document(self.names[self.spill.source(i)], reason, &text);
        Ok(())
    }
}

/// Run every stage before tokenization on `ds`'s sources; `rt` drives S3 and HTTP.
pub(crate) fn select(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
    options: &Options,
) -> Result<Selection, PrepareError> {
    let spec = &ds.spec;
    let instruction_mode = spec.format == DatasetFormat::Instruction;
    if spec.dedup.substring.enabled && instruction_mode {
        return Err(PrepareError::Spec(
            "dedup.substring cuts spans out of documents, which would break instruction records; set dedup.substring.enabled: false for format: instruction".into(),
        ));
    }
    let mut report = PrepareReport::default();
    let t = Instant::now();
    let spool = sources::Spool::new();
    let mh = &spec.dedup.minhash;
    let params = dedup::MinHashParams::new(
        mh.ngram.max(1) as usize,
        mh.permutations.max(1) as usize,
        mh.threshold,
    );
    let mut docs = Batcher {
        spec,
        filter: clean::QualityFilter::new(&spec.cleaning, instruction_mode),
        batch: Vec::with_capacity(BATCH_DOCS),
        seen_urls: HashSet::new(),
        seen_texts: HashSet::new(),
        minhash: mh.enabled.then(|| (dedup::MinHasher::new(params), params)),
        band_keys: match mh.enabled {
            true => Some(spill::BandKeys::create(spool.path(), params.bands)?),
            false => None,
        },
        spill: Spill::create(spool.path().join("documents.jsonl"))?,
        read_out: 0,
        clean: StageAcc::default(),
        url: StageAcc::default(),
        exact: StageAcc::default(),
        quality: StageAcc::default(),
        signatures: StageAcc::default(),
        error: None,
    };
    for (i, source) in spec.sources.iter().enumerate() {
        let objects = sources::list(rt, source)?;
        let bar = stage_bar(&format!("read {}", source.name), objects.len(), "files");
        for (k, object) in objects.iter().enumerate() {
            bar.set_message(object.label());
            let remaining = options
                .limit
                .map(|l| l.saturating_sub(report.read_from(&source.name)));
            if remaining == Some(0) {
                break;
            }
            let fetched = sources::fetch(rt, &spool, &source.name, object, k)?;
            read::read_source(
                &fetched.path,
                &object.label(),
                i,
                source,
                instruction_mode,
                remaining,
                &mut report,
                &mut docs,
            )
            .map_err(|e| match e {
                // Name the object, not the spool file it was read from.
                PrepareError::Data(m) if !matches!(object, sources::Object::Local(_)) => {
                    PrepareError::Data(format!("{m} (downloaded from {})", object.label()))
                }
                e => e,
            })?;
            if let Some(e) = docs.error.take() {
                return Err(e);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    docs.flush(&mut report);
    if let Some(e) = docs.error.take() {
        return Err(e);
    }
    let mut spill = docs.spill;
    spill.finish()?;
    if let Some(files) = docs.band_keys.as_mut() {
        files.finish()?;
    }
    let per_document = docs.clean.seconds
        + docs.url.seconds
        + docs.exact.seconds
        + docs.quality.seconds
        + docs.signatures.seconds;
    let read = StageAcc {
        documents_in: report.documents_read,
        documents_out: docs.read_out,
        seconds: (t.elapsed().as_secs_f64() - per_document).max(0.0),
    };
    report.stages.push(read.stats(Stage::Read));
    report.stages.push(docs.clean.stats(Stage::Clean));
    if spec.dedup.url {
        report.stages.push(docs.url.stats(Stage::UrlDedup));
    }
    if spec.dedup.exact {
        report.stages.push(docs.exact.stats(Stage::ExactDedup));
    }
    report.stages.push(docs.quality.stats(Stage::Quality));

    let names: Vec<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
    let mut sel = Selecting {
        report: &mut report,
        spill: &spill,
        names: names.clone(),
    };
    let n = spill.len();
    let keep = if mh.enabled {
        near_dup::remove_near_duplicates(
            &mut sel,
            mh,
            params,
            docs.band_keys.as_ref(),
            docs.signatures,
            options.clusters.as_deref(),
        )?
    } else {
        vec![true; n]
    };
    let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
    if kept.is_empty() {
        return Err(PrepareError::Data(format!(
            "no document left after filtering: {}",
            serde_json::to_string(&*sel.report).unwrap_or_default()
        )));
    }
    let mut kept = split::split(&mut sel, kept, &spec.split);
    if spec.dedup.decontamination.enabled {
        split::decontaminate(&mut sel, &mut kept, &spec.dedup.decontamination)?;
    }

    let mut kept_per_source: HashMap<usize, u64> = HashMap::new();
    for &(i, _) in &kept {
        *kept_per_source.entry(spill.source(i)).or_default() += 1;
    }
    for (i, name) in names.iter().enumerate() {
        report.sources.entry(name.to_string()).or_default().kept =
            kept_per_source.get(&i).copied().unwrap_or(0);
    }
    report.test_documents = kept.iter().filter(|(_, t)| *t).count() as u64;
    report.train_documents = kept.len() as u64 - report.test_documents;
    Ok(Selection {
        spill,
        kept,
        report,
        _spool: spool,
    })
}
