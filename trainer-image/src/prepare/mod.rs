//! `taper prepare`: read a Dataset's sources, clean and filter the documents, remove
//! duplicates (normalised URL, exact content, MinHash near-duplicates) across all sources,
//! split into train and test by seed, remove test documents that share a long n-gram with
//! the train split, tokenize and publish shards, `stats.json` and — last —
//! `manifest.json`.
//!
//! One file per stage, in the order they run:
//!
//! | file | stage |
//! | --- | --- |
//! | [`sources`] | listing and fetching `file://`, `s3://` and `https://` sources |
//! | [`read`] | one record reader for every format; records become documents |
//! | [`batch`] (with [`clean`], [`dedup`]) | cleaning, URL and exact dedup, quality rules, MinHash signatures |
//! | [`spill`] | the surviving documents on local disk |
//! | [`near_dup`] | MinHash near-duplicate clustering |
//! | [`split`] | the train/test split and decontamination |
//! | [`select`] | the wiring of the stages above |
//! | [`encode`] (with [`instruction`], [`substring`]) | tokenization, loss masks, exact-substring dedup |
//! | [`shards`] | shard files and their checksums |
//! | [`publish`] | upload, `stats.json`, `manifest.json` |
//! | [`stats`] | per-stage accounting and progress bars |
//!
//! This file is the wiring: [`prepare`] runs them all, [`select_documents`] the stages
//! before tokenization (the dry run and the tests).

use std::path::PathBuf;

use taper_crds::{Dataset, dataset::TokenizerKind};

use crate::tokenizer::Tokenizer;

pub(crate) mod batch;
pub mod clean;
pub mod dedup;
mod encode;
mod error;
pub mod instruction;
mod near_dup;
mod publish;
pub(crate) mod read;
mod select;
mod shards;
pub(crate) mod sources;
#[rustfmt::skip]
mod spacy_en;
mod spill;
mod split;
pub mod stackexchange;
pub mod stats;
pub mod substring;
mod words;

pub use error::PrepareError;
pub(crate) use error::io_err;
pub use taper_crds::report::PrepareReport;

/// Tokens per shard at most (200 MB of `uint16`, 400 MB of `uint32`).
pub const SHARD_TOKENS: usize = 100_000_000;

/// What a prepare run does beyond its spec.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Read at most this many records of each source (a dry run's sample).
    pub limit: Option<u64>,
    /// Write the MinHash clusters here: a JSON line per document in a cluster of two or
    /// more (`cluster`, `kept`, `source`, `url`, the first 200 characters of `text`).
    pub clusters: Option<PathBuf>,
    /// Tokens per suffix array of exact-substring dedup; unset: the environment's
    /// `TAPER_SUBSTRING_CHUNK_TOKENS`, else [`substring::DEFAULT_CHUNK_TOKENS`].
    pub substring_chunk_tokens: Option<usize>,
}

/// Documents after cleaning, filtering and deduplication, split into train and test.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Train documents (text).
    pub train: Vec<String>,
    /// Test documents (text).
    pub test: Vec<String>,
    /// Train records of an instruction Dataset (empty otherwise).
    pub train_records: Vec<instruction::Record>,
    /// Test records of an instruction Dataset (empty otherwise).
    pub test_records: Vec<instruction::Record>,
    /// The source (index in `spec.sources`) of each train document or record.
    pub train_sources: Vec<usize>,
    /// The source of each test document or record.
    pub test_sources: Vec<usize>,
    /// The accounting.
    pub stats: PrepareReport,
}

/// Run every stage up to tokenization on `ds`'s sources.
pub fn select_documents(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
) -> Result<Prepared, PrepareError> {
    select_documents_with(rt, ds, &Options::default())
}

/// [`select_documents`] with `options` (a dry run's sample, a clusters file).
pub fn select_documents_with(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
    options: &Options,
) -> Result<Prepared, PrepareError> {
    let sel = select::select(rt, ds, options)?;
    let load = |test: bool| -> Result<Vec<spill::Doc>, PrepareError> {
        sel.split(test).map(|i| sel.spill.get(i)).collect()
    };
    let (train, test) = (load(false)?, load(true)?);
    Ok(Prepared {
        train_sources: train.iter().map(|d| d.source).collect(),
        test_sources: test.iter().map(|d| d.source).collect(),
        train_records: train.iter().filter_map(|d| d.record.clone()).collect(),
        test_records: test.iter().filter_map(|d| d.record.clone()).collect(),
        train: train.into_iter().map(|d| d.text).collect(),
        test: test.into_iter().map(|d| d.text).collect(),
        stats: sel.report.clone(),
    })
}

/// Prepare `ds` and publish it to its `spec.output`. Returns the report it published.
pub fn prepare(rt: &tokio::runtime::Runtime, ds: &Dataset) -> Result<PrepareReport, PrepareError> {
    prepare_with(rt, ds, &Options::default())
}

/// [`prepare`] with `options` (a clusters file, a substring chunk size).
pub fn prepare_with(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
    options: &Options,
) -> Result<PrepareReport, PrepareError> {
    let spec = &ds.spec;
    let tokenizer = match (spec.tokenizer.type_, spec.tokenizer.uri.as_deref()) {
        (TokenizerKind::Gpt2, _) => Tokenizer::gpt2()?,
        (TokenizerKind::Huggingface, None) => {
            return Err(PrepareError::Spec(
                "tokenizer.uri is required when tokenizer.type is huggingface".into(),
            ));
        }
        (TokenizerKind::Huggingface, Some(uri)) => {
            let spool = sources::Spool::new();
            let file =
                sources::fetch_one(rt, &spool, "tokenizer", uri, spec.tokenizer.access.as_ref())?;
            Tokenizer::hugging_face(&file.path, uri)?
        }
    };
    let output = spec.output.as_ref().ok_or_else(|| {
        PrepareError::Spec("spec.output is unset (the operator fills it in a cluster)".into())
    })?;
    let sel = select::select(rt, ds, options)?;
    let mut report = sel.report.clone();
    let staging = sources::Spool::new();
    std::fs::create_dir_all(staging.path()).map_err(|e| io_err(staging.path(), e))?;
    let substring_chunk = spec.dedup.substring.enabled.then(|| {
        options
            .substring_chunk_tokens
            .or_else(|| {
                std::env::var(taper_crds::pod::env::SUBSTRING_CHUNK_TOKENS)
                    .ok()
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(substring::DEFAULT_CHUNK_TOKENS)
            .max(1)
    });
    let shards = encode::encode(
        spec,
        &sel,
        &tokenizer,
        staging.path(),
        substring_chunk,
        &mut report,
    )?;
    publish::publish(rt, output, staging.path(), shards, &tokenizer, &mut report)?;
    Ok(report)
}
