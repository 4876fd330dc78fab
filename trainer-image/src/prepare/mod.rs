//! `taper prepare`: read a Dataset's sources, clean and filter the documents, remove
//! duplicates (normalised URL, exact content, MinHash near-duplicates) across all sources,
//! split into train and test by seed, remove test documents that share a long n-gram with
//! the train split, tokenize with GPT-2 BPE and publish shards, `stats.json` and — last —
//! `manifest.json`.
//!
//! Sources are `file://` paths, folders and globs, `s3://` prefixes and globs, and
//! `https://` URLs ([`sources`]), in JSON lines (plain or zstd), JSON arrays, Parquet, plain
//! text (WikiText) and StackExchange `Posts.xml` dumps.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead, Read},
    path::Path,
};

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::Instant;
use taper_crds::{
    Dataset,
    dataset::{Aggregate, DatasetFormat, QualityThreshold, Source, SourceFormat, TokenizerKind},
};

use crate::{
    job::JobError,
    store,
    train::data::{DatasetManifest, MaskInfo, ShardInfo},
};

pub mod clean;
pub mod dedup;
pub mod instruction;
pub(crate) mod sources;
pub mod stackexchange;
pub mod substring;
pub mod tokenize;

/// GPT-2's end-of-text token, placed after every document.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's vocabulary size.
pub const GPT2_VOCAB: u32 = 50257;
/// Tokens per shard at most (200 MB of `uint16`, 400 MB of `uint32`).
pub const SHARD_TOKENS: usize = 100_000_000;
/// Malformed records reported by name and line before the rest are only counted.
const REPORTED_MALFORMED: usize = 5;
/// Examples of dropped documents kept per reason in `stats.json`.
const EXAMPLES_PER_REASON: usize = 3;
/// Characters of each example.
const EXAMPLE_CHARS: usize = 200;

/// A progress bar for one stage over `len` items (drawn only when stderr is a terminal).
fn stage_bar(stage: &str, len: usize, unit: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{prefix:>14}} {{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  {{elapsed}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(stage.to_string());
    bar
}

/// Documents into and out of one stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageStats {
    /// Stage name: read, clean, urlDedup, exactDedup, quality, minhashDedup, split,
    /// decontaminate, tokenize.
    pub name: String,
    /// Documents that entered the stage.
    pub documents_in: u64,
    /// Documents that left it.
    pub documents_out: u64,
    /// Wall-clock seconds the stage took.
    pub seconds: f64,
}

/// Per-source accounting: every document read is either kept or dropped for one reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStats {
    /// Documents (records) read.
    pub read: u64,
    /// Documents in the output (train + test).
    pub kept: u64,
    /// Documents dropped, per reason.
    pub dropped: BTreeMap<String, u64>,
}

/// An example of a dropped document.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Example {
    /// Source it came from.
    pub source: String,
    /// Its first characters.
    pub text: String,
}

/// What a prepare run did, per stage and per source; written as `stats.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareStats {
    /// Documents read from all sources (malformed records included).
    pub documents_read: u64,
    /// Documents read per source.
    pub documents_per_source: BTreeMap<String, u64>,
    /// Documents dropped, per reason: `malformed`, `empty`, `qualityThreshold`,
    /// `emptyAfterCleaning`, `urlDuplicate`, `exactDuplicate`, a quality rule's name
    /// (`gopherWordCount`, `c4CurlyBraces`, …), `length`, `nearDuplicate`, `contaminated`,
    /// `substringDuplicate` (a document made only of spans seen earlier), `promptTooLong` (an
    /// instruction example whose prompt alone fills `maxSeqLength`).
    pub dropped: BTreeMap<String, u64>,
    /// Per-source accounting.
    pub sources: BTreeMap<String, SourceStats>,
    /// Stages in order, with documents in and out.
    pub stages: Vec<StageStats>,
    /// A few dropped documents per reason (truncated).
    pub examples: BTreeMap<String, Vec<Example>>,
    /// Records changed but kept, per change (`placeholderInput`: an instruction record's
    /// placeholder input such as `<noinput>` made empty).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub normalized: BTreeMap<String, u64>,
    /// Instruction examples cut at `maxSeqLength` tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<u64>,
    /// What exact-substring deduplication removed, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substring: Option<substring::SubstringStats>,
    /// MinHash parameters used, when the stage ran: `[ngram, bands, rows]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minhash: Option<[usize; 3]>,
    /// Documents in the train split.
    pub train_documents: u64,
    /// Documents in the test split.
    pub test_documents: u64,
    /// Tokens in the train split.
    pub train_tokens: u64,
    /// Tokens in the test split.
    pub test_tokens: u64,
}

impl PrepareStats {
    fn drop_doc(&mut self, source: &str, reason: &str, text: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
        *self
            .sources
            .entry(source.to_string())
            .or_default()
            .dropped
            .entry(reason.to_string())
            .or_default() += 1;
        let examples = self.examples.entry(reason.to_string()).or_default();
        if examples.len() < EXAMPLES_PER_REASON && !text.is_empty() {
            examples.push(Example {
                source: source.to_string(),
                text: text.chars().take(EXAMPLE_CHARS).collect(),
            });
        }
    }

    /// Count the records read from one source.
    fn record_read(&mut self, source: &str, read: u64) {
        self.documents_read += read;
        *self
            .documents_per_source
            .entry(source.to_string())
            .or_default() += read;
        self.sources.entry(source.to_string()).or_default().read += read;
    }

    /// Records read so far from `source`.
    fn read_from(&self, source: &str) -> u64 {
        self.sources.get(source).map_or(0, |s| s.read)
    }

    /// Record a stage that started at `started`.
    fn stage(&mut self, name: &str, documents_in: usize, documents_out: usize, started: Instant) {
        self.stages.push(StageStats {
            name: name.to_string(),
            documents_in: documents_in as u64,
            documents_out: documents_out as u64,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    /// Whether every document read is accounted for: kept or dropped for a reason.
    pub fn balanced(&self) -> bool {
        self.sources
            .values()
            .all(|s| s.read == s.kept + s.dropped.values().sum::<u64>())
    }
}

/// One document on its way through the stages.
#[derive(Clone, Debug)]
struct Doc {
    source: usize,
    /// The text every stage sees; for an instruction record, its instruction, input and
    /// output (without the template).
    text: String,
    url: Option<String>,
    /// The record of an instruction Dataset.
    record: Option<instruction::Record>,
}

fn dotted<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// The quality value of a record: a number, or a list of numbers reduced by `aggregate`.
fn quality_value(record: &serde_json::Value, q: &QualityThreshold) -> Option<f64> {
    let v = dotted(record, &q.field)?;
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    if let Some(s) = v.as_str() {
        return s.trim().parse().ok();
    }
    let xs: Vec<f64> = v
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    if xs.is_empty() {
        return None;
    }
    Some(match q.aggregate {
        Aggregate::Max => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Aggregate::Min => xs.iter().copied().fold(f64::INFINITY, f64::min),
        Aggregate::Sum => xs.iter().sum(),
        Aggregate::Mean => xs.iter().sum::<f64>() / xs.len() as f64,
    })
}

fn open_reader(
    path: &Path,
    format: SourceFormat,
    name: &str,
) -> Result<Box<dyn BufRead>, JobError> {
    let file = std::fs::File::open(path).map_err(|e| {
        JobError::Data(format!(
            "source {name}: cannot read {}: {e}",
            path.display()
        ))
    })?;
    let raw: Box<dyn Read> = if format == SourceFormat::JsonlZst {
        Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| {
            JobError::Data(format!("source {name}: {}: not zstd: {e}", path.display()))
        })?)
    } else {
        Box::new(file)
    };
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, raw)))
}

/// A WikiText article heading: ` = Title = ` (one `=` on each side; sections have more).
fn is_wikitext_article_heading(line: &str) -> bool {
    let t = line.trim();
    t.len() > 4
        && t.starts_with("= ")
        && t.ends_with(" =")
        && !t.starts_with("= =")
        && !t.ends_with("= =")
}

/// Read the records of an instruction Dataset's source (a JSON array — `alpaca-json` or
/// `json` — or JSON lines).
fn read_instruction_source(
    path: &Path,
    index: usize,
    source: &Source,
    limit: u64,
    stats: &mut PrepareStats,
    docs: &mut Vec<Doc>,
) -> Result<(), JobError> {
    let name = source.name.as_str();
    let mut read = 0u64;
    let mut take =
        |record: serde_json::Value, stats: &mut PrepareStats| match instruction::parse(&record) {
            Ok((rec, placeholder)) => {
                if placeholder {
                    *stats
                        .normalized
                        .entry("placeholderInput".into())
                        .or_default() += 1;
                }
                // Dedup and decontamination compare the record's own words; the template,
                // shared by every record, would make them all look alike.
                let text = format!("{}\n\n{}\n\n{}", rec.instruction, rec.input, rec.output);
                docs.push(Doc {
                    source: index,
                    text,
                    url: None,
                    record: Some(rec),
                });
            }
            Err(reject) => {
                let text = record
                    .get("instruction")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                stats.drop_doc(name, reject.name(), &text);
            }
        };
    match source.format {
        SourceFormat::Parquet => parquet_rows(path, name, |record| {
            if read >= limit {
                return false;
            }
            read += 1;
            take(record, stats);
            true
        })?,
        SourceFormat::AlpacaJson | SourceFormat::Json => {
            use serde::de::Deserializer as _;
            let reader = open_reader(path, source.format, name)?;
            let mut de = serde_json::Deserializer::from_reader(reader);
            let mut n = 0u64;
            de.deserialize_seq(ArrayVisitor(|record: serde_json::Value| {
                if n < limit {
                    n += 1;
                    take(record, stats);
                }
            }))
            .map_err(|e| {
                JobError::Data(format!(
                    "source {name}: {}: not a JSON array of records: {e}",
                    path.display()
                ))
            })?;
            read = n;
        }
        SourceFormat::Jsonl | SourceFormat::JsonlZst => {
            let reader = open_reader(path, source.format, name)?;
            for (i, line) in reader.lines().enumerate() {
                if read >= limit {
                    break;
                }
                let line = line.map_err(|e| {
                    JobError::Data(format!("source {name}: {}: {e}", path.display()))
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                read += 1;
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => take(v, stats),
                    Err(_) => {
                        stats.drop_doc(name, "malformed", "");
                        eprintln!("taper: source {name}: line {}: not JSON; skipped", i + 1);
                    }
                }
            }
        }
        other => {
            return Err(JobError::Spec(format!(
                "source {name}: an instruction Dataset reads alpaca-json, json, jsonl or parquet records, not {}",
                serde_json::to_string(&other).unwrap_or_default()
            )));
        }
    }
    stats.record_read(name, read);
    Ok(())
}

/// A document from one JSON record (a JSON-lines line or an array element): `None` when it
/// is malformed or below the quality threshold (counted either way).
fn record_doc(
    source: &Source,
    index: usize,
    record: Option<serde_json::Value>,
    position: &str,
    stats: &mut PrepareStats,
) -> Option<Doc> {
    let name = source.name.as_str();
    let text = record
        .as_ref()
        .and_then(|v| dotted(v, &source.text_field).and_then(|t| t.as_str().map(str::to_string)));
    let (Some(record), Some(text)) = (record, text) else {
        stats.drop_doc(name, "malformed", "");
        if stats.dropped["malformed"] as usize <= REPORTED_MALFORMED {
            eprintln!(
                "taper: source {name}: {position}: not JSON with a string at {:?}; skipped",
                source.text_field
            );
        }
        return None;
    };
    if let Some(q) = &source.quality {
        match quality_value(&record, q) {
            Some(v) if v >= q.minimum => {}
            _ => {
                stats.drop_doc(name, "qualityThreshold", &text);
                return None;
            }
        }
    }
    let url = source
        .url_field
        .as_deref()
        .and_then(|f| dotted(&record, f))
        .and_then(|u| u.as_str())
        .filter(|u| !u.trim().is_empty())
        .map(str::to_string);
    Some(Doc {
        source: index,
        text,
        url,
        record: None,
    })
}

/// Visits the elements of a JSON array one at a time.
struct ArrayVisitor<F>(F);

impl<'de, F: FnMut(serde_json::Value)> serde::de::Visitor<'de> for ArrayVisitor<F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            (self.0)(v);
        }
        Ok(())
    }
}

/// Call `each` with every row of the Parquet file at `path` as a JSON object (groups as
/// objects, lists as arrays), until it returns false. Rows are typed, so a row cannot be
/// malformed; a corrupt file is an error that names it.
fn parquet_rows(
    path: &Path,
    name: &str,
    mut each: impl FnMut(serde_json::Value) -> bool,
) -> Result<(), JobError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: &dyn std::fmt::Display| {
        JobError::Data(format!("source {name}: {}: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(|e| bad(&format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(&format!("not Parquet: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| bad(&e))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(&format!("row {}: {e}", i + 1)))?;
        if !each(row.to_json_value()) {
            break;
        }
    }
    Ok(())
}

/// Read one source into `docs`: empty and malformed records and those below the quality
/// threshold are counted and skipped.
#[allow(clippy::too_many_arguments)]
fn read_source(
    path: &Path,
    index: usize,
    source: &Source,
    instruction_mode: bool,
    limit: Option<u64>,
    stats: &mut PrepareStats,
    docs: &mut Vec<Doc>,
) -> Result<(), JobError> {
    let limit = limit.unwrap_or(u64::MAX);
    if instruction_mode {
        return read_instruction_source(path, index, source, limit, stats, docs);
    }
    let name = source.name.as_str();
    let mut read = 0u64;
    if source.format == SourceFormat::Parquet {
        let mut n = 0u64;
        parquet_rows(path, name, |record| {
            if read >= limit {
                return false;
            }
            n += 1;
            read += 1;
            if let Some(doc) = record_doc(source, index, Some(record), &format!("row {n}"), stats) {
                if doc.text.trim().is_empty() {
                    stats.drop_doc(name, "empty", "");
                } else {
                    docs.push(doc);
                }
            }
            true
        })?;
        stats.record_read(name, read);
        return Ok(());
    }
    let reader = open_reader(path, source.format, name)?;
    let io_err =
        |e: std::io::Error| JobError::Data(format!("source {name}: {}: {e}", path.display()));
    let mut push = |doc: Doc, stats: &mut PrepareStats| {
        if doc.text.trim().is_empty() {
            stats.drop_doc(name, "empty", "");
        } else {
            docs.push(doc);
        }
    };
    match source.format {
        SourceFormat::Text => {
            let mut current = String::new();
            for line in reader.lines() {
                if read >= limit {
                    current.clear();
                    break;
                }
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() || is_wikitext_article_heading(&line) {
                    if !current.is_empty() {
                        read += 1;
                        push(
                            Doc {
                                source: index,
                                text: std::mem::take(&mut current),
                                url: None,
                                record: None,
                            },
                            stats,
                        );
                    }
                    if !line.trim().is_empty() {
                        current.push_str(line.trim());
                        current.push('\n');
                    }
                } else {
                    current.push_str(&line);
                    current.push('\n');
                }
            }
            if !current.is_empty() {
                read += 1;
                push(
                    Doc {
                        source: index,
                        text: current,
                        url: None,
                        record: None,
                    },
                    stats,
                );
            }
        }
        SourceFormat::Jsonl | SourceFormat::JsonlZst => {
            for (i, line) in reader.lines().enumerate() {
                if read >= limit {
                    break;
                }
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() {
                    continue;
                }
                read += 1;
                let record = serde_json::from_str::<serde_json::Value>(&line).ok();
                if let Some(doc) =
                    record_doc(source, index, record, &format!("line {}", i + 1), stats)
                {
                    push(doc, stats);
                }
            }
        }
        SourceFormat::Json => {
            // A JSON array, streamed element by element.
            use serde::de::Deserializer as _;
            let mut de = serde_json::Deserializer::from_reader(reader);
            let mut n = 0u64;
            let visitor = ArrayVisitor(|record: serde_json::Value| {
                if read >= limit {
                    return;
                }
                n += 1;
                read += 1;
                if let Some(doc) =
                    record_doc(source, index, Some(record), &format!("element {n}"), stats)
                {
                    push(doc, stats);
                }
            });
            de.deserialize_seq(visitor).map_err(|e| {
                JobError::Data(format!(
                    "source {name}: {}: not a JSON array of objects: {e}",
                    path.display()
                ))
            })?;
        }
        SourceFormat::StackexchangeXml => {
            let threads =
                stackexchange::read_threads(reader, source.quality.as_ref().map(|q| q.minimum))
                    .map_err(|e| {
                        JobError::Data(format!("source {name}: {}: {e}", path.display()))
                    })?;
            for t in threads.threads {
                if read >= limit {
                    break;
                }
                read += 1;
                if t.below_threshold {
                    stats.drop_doc(name, "qualityThreshold", &t.text);
                } else {
                    push(
                        Doc {
                            source: index,
                            text: t.text,
                            url: None,
                            record: None,
                        },
                        stats,
                    );
                }
            }
            if threads.malformed > 0 {
                eprintln!(
                    "taper: source {name}: {} malformed rows skipped",
                    threads.malformed
                );
                *stats.dropped.entry("malformedRows".into()).or_default() += threads.malformed;
            }
        }
        other => {
            return Err(JobError::Spec(format!(
                "source {name}: format {} holds instruction records: set spec.format: instruction",
                serde_json::to_string(&other).unwrap_or_default()
            )));
        }
    }
    stats.record_read(name, read);
    Ok(())
}

/// Hashes of the word n-grams of `text` (none when it is shorter than `n` words).
fn ngram_hashes(text: &str, n: usize) -> impl Iterator<Item = u64> {
    let w = dedup::words(text);
    let grams: Vec<u64> = if w.len() < n {
        Vec::new()
    } else {
        w.windows(n)
            .map(|g| xxhash_rust::xxh3::xxh3_64(g.join(" ").as_bytes()))
            .collect()
    };
    grams.into_iter()
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
    pub stats: PrepareStats,
}

/// Run every stage up to tokenization on `ds`'s sources.
pub fn select_documents(ds: &Dataset) -> Result<Prepared, JobError> {
    select_documents_with(ds, None)
}

/// [`select_documents`] on at most `limit` records of each source (a dry run's sample).
pub fn select_documents_with(ds: &Dataset, limit: Option<u64>) -> Result<Prepared, JobError> {
    let spec = &ds.spec;
    let instruction_mode = spec.format == DatasetFormat::Instruction;
    if spec.dedup.substring.enabled && instruction_mode {
        return Err(JobError::Spec(
            "dedup.substring cuts spans out of documents, which would break instruction records; set dedup.substring.enabled: false for format: instruction".into(),
        ));
    }
    let names: Vec<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
    let mut stats = PrepareStats::default();
    let mut docs = Vec::new();
    let t = Instant::now();
    // S3 listings and downloads, and HTTP downloads, run on a small runtime of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| JobError::Internal(format!("tokio runtime: {e}")))?;
    let spool = sources::Spool::new();
    for (i, source) in spec.sources.iter().enumerate() {
        let objects = sources::list(&rt, source)?;
        let bar = stage_bar(&format!("read {}", source.name), objects.len(), "files");
        for (k, object) in objects.iter().enumerate() {
            bar.set_message(object.label());
            let remaining = limit.map(|l| l.saturating_sub(stats.read_from(&source.name)));
            if remaining == Some(0) {
                break;
            }
            let fetched = sources::fetch(&rt, &spool, &source.name, object, k)?;
            read_source(
                &fetched.path,
                i,
                source,
                instruction_mode,
                remaining,
                &mut stats,
                &mut docs,
            )
            .map_err(|e| match e {
                // Name the object, not the spool file it was read from.
                JobError::Data(m) if !matches!(object, sources::Object::Local(_)) => {
                    JobError::Data(format!("{m} (downloaded from {})", object.label()))
                }
                e => e,
            })?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    drop((spool, rt));
    stats.stage("read", stats.documents_read as usize, docs.len(), t);

    // Cleaning: markup, Unicode, whitespace, boilerplate (in parallel; the rayon pool has
    // one thread per core unless RAYON_NUM_THREADS says otherwise).
    let t = Instant::now();
    let filter = clean::QualityFilter::new(&spec.cleaning, instruction_mode);
    let n_in = docs.len();
    // Instruction records were normalised field by field when read; markup and whitespace
    // are content in their (code) answers.
    let bar = stage_bar("clean", docs.len(), "docs");
    let texts: Vec<String> = docs
        .par_iter()
        .map(|d| {
            bar.inc(1);
            if d.record.is_some() {
                d.text.clone()
            } else {
                filter.clean(&d.text)
            }
        })
        .collect();
    bar.finish_and_clear();
    let mut cleaned = Vec::with_capacity(docs.len());
    for (mut d, text) in docs.into_iter().zip(texts) {
        if text.trim().is_empty() {
            stats.drop_doc(names[d.source], "emptyAfterCleaning", &d.text);
        } else {
            d.text = text;
            cleaned.push(d);
        }
    }
    let mut docs = cleaned;
    stats.stage("clean", n_in, docs.len(), t);

    if spec.dedup.url {
        let t = Instant::now();
        let n_in = docs.len();
        let mut seen = HashSet::new();
        docs.retain(|d| match &d.url {
            Some(u) if !seen.insert(dedup::normalize_url(u)) => {
                stats.drop_doc(names[d.source], "urlDuplicate", &d.text);
                false
            }
            _ => true,
        });
        stats.stage("urlDedup", n_in, docs.len(), t);
    }
    if spec.dedup.exact {
        let t = Instant::now();
        let n_in = docs.len();
        let mut seen = HashSet::new();
        docs.retain(|d| {
            if seen.insert(dedup::content_key(&d.text)) {
                true
            } else {
                stats.drop_doc(names[d.source], "exactDuplicate", &d.text);
                false
            }
        });
        stats.stage("exactDedup", n_in, docs.len(), t);
    }

    // Quality rules (Gopher, then C4's line and document rules) and the length bounds.
    let t = Instant::now();
    let n_in = docs.len();
    let bar = stage_bar("quality", docs.len(), "docs");
    let verdicts: Vec<clean::Verdict> = docs
        .par_iter()
        .map(|d| {
            bar.inc(1);
            if d.record.is_some() {
                Ok(d.text.clone())
            } else {
                filter.judge(&d.text)
            }
        })
        .collect();
    bar.finish_and_clear();
    let mut kept = Vec::with_capacity(docs.len());
    for (mut d, verdict) in docs.into_iter().zip(verdicts) {
        match verdict {
            Err(rule) => stats.drop_doc(names[d.source], &clean::rule_name(rule), &d.text),
            Ok(text) if !filter.length_ok(&text) => {
                stats.drop_doc(names[d.source], "length", &text)
            }
            Ok(text) => {
                d.text = text;
                kept.push(d);
            }
        }
    }
    let mut docs = kept;
    stats.stage("quality", n_in, docs.len(), t);

    let mh = &spec.dedup.minhash;
    if mh.enabled {
        let t = Instant::now();
        let n_in = docs.len();
        let params = dedup::MinHashParams::new(
            mh.ngram.max(1) as usize,
            mh.permutations.max(1) as usize,
            mh.threshold,
        );
        let hasher = dedup::MinHasher::new(params);
        let sets: Vec<Vec<u64>> = docs
            .par_iter()
            .map(|d| dedup::shingles(&d.text, params.ngram))
            .collect();
        let bar = stage_bar("minhash", sets.len(), "docs");
        let signatures: Vec<Vec<u64>> = sets
            .par_iter()
            .map(|s| {
                bar.inc(1);
                hasher.signature(s)
            })
            .collect();
        bar.finish_and_clear();
        let keep = dedup::near_duplicates(&signatures, params, |i, j| {
            dedup::jaccard(&sets[i], &sets[j]) >= params.threshold
        });
        let mut i = 0;
        docs.retain(|d| {
            let k = keep[i];
            i += 1;
            if !k {
                stats.drop_doc(names[d.source], "nearDuplicate", &d.text);
            }
            k
        });
        stats.minhash = Some([params.ngram, params.bands, params.rows]);
        stats.stage("minhashDedup", n_in, docs.len(), t);
    }
    if docs.is_empty() {
        return Err(JobError::Data(format!(
            "no document left after filtering: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        )));
    }

    // Document-level split, deterministic in the seed.
    let t = Instant::now();
    let n = docs.len();
    let test_size = spec.split.test_size;
    let n_test = if test_size < 1.0 {
        ((test_size * n as f64).round() as usize).max(1)
    } else {
        test_size as usize
    };
    let n_test = n_test.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.split.seed as u64));
    let mut is_test = vec![false; n];
    for &i in &order[..n_test] {
        is_test[i] = true;
    }
    stats.stage("split", n, n, t);

    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (d, t) in docs.into_iter().zip(is_test) {
        if t { test.push(d) } else { train.push(d) }
    }
    let decon = &spec.dedup.decontamination;
    if decon.enabled {
        let t = Instant::now();
        let n_gram = decon.ngram.max(1) as usize;
        let train_grams: HashSet<u64> = train
            .iter()
            .flat_map(|d| ngram_hashes(&d.text, n_gram))
            .collect();
        let n_in = train.len() + test.len();
        test.retain(|d| {
            let mut grams = ngram_hashes(&d.text, n_gram);
            if grams.any(|g| train_grams.contains(&g)) {
                stats.drop_doc(names[d.source], "contaminated", &d.text);
                false
            } else {
                true
            }
        });
        stats.stage("decontaminate", n_in, train.len() + test.len(), t);
    }
    let mut kept_per_source: HashMap<usize, u64> = HashMap::new();
    for d in train.iter().chain(&test) {
        *kept_per_source.entry(d.source).or_default() += 1;
    }
    for (i, name) in names.iter().enumerate() {
        stats.sources.entry(name.to_string()).or_default().kept =
            kept_per_source.get(&i).copied().unwrap_or(0);
    }
    stats.train_documents = train.len() as u64;
    stats.test_documents = test.len() as u64;
    let train_records = train.iter().filter_map(|d| d.record.clone()).collect();
    let test_records = test.iter().filter_map(|d| d.record.clone()).collect();
    let train_sources = train.iter().map(|d| d.source).collect();
    let test_sources = test.iter().map(|d| d.source).collect();
    Ok(Prepared {
        train_sources,
        test_sources,
        train: train.into_iter().map(|d| d.text).collect(),
        test: test.into_iter().map(|d| d.text).collect(),
        train_records,
        test_records,
        stats,
    })
}

/// A plain-text table of the stages and the reasons documents were dropped, for people.
pub fn summary_table(stats: &PrepareStats) -> String {
    let mut out = String::from("stage            documents in  documents out  seconds\n");
    for st in &stats.stages {
        out.push_str(&format!(
            "{:<16} {:>12}  {:>13}  {:>7.2}\n",
            st.name, st.documents_in, st.documents_out, st.seconds
        ));
    }
    out.push_str("\ndropped (reason)       documents\n");
    for (reason, n) in &stats.dropped {
        out.push_str(&format!("{reason:<22} {n:>9}\n"));
    }
    out.push_str(&format!(
        "\nkept: {} train + {} test documents; {} + {} tokens\n",
        stats.train_documents, stats.test_documents, stats.train_tokens, stats.test_tokens
    ));
    out
}

/// Count a document that was kept (in train when `train`) as dropped for `reason` after all.
fn unkeep(stats: &mut PrepareStats, source: &str, train: bool, reason: &str) {
    stats.drop_doc(source, reason, "");
    if let Some(s) = stats.sources.get_mut(source) {
        s.kept -= 1;
    }
    if train {
        stats.train_documents -= 1;
    } else {
        stats.test_documents -= 1;
    }
}

/// Prepare `ds` and publish it to its `spec.output`. Returns the stats it published.
pub fn prepare(rt: &tokio::runtime::Runtime, ds: &Dataset) -> Result<PrepareStats, JobError> {
    let spec = &ds.spec;
    let tokenizer = match (spec.tokenizer.type_, spec.tokenizer.uri.as_deref()) {
        (TokenizerKind::Gpt2, _) => tokenize::Tokenizer::gpt2()?,
        (TokenizerKind::Huggingface, None) => {
            return Err(JobError::Spec(
                "tokenizer.uri is required when tokenizer.type is huggingface".into(),
            ));
        }
        (TokenizerKind::Huggingface, Some(uri)) => {
            let spool = sources::Spool::new();
            let file =
                sources::fetch_one(rt, &spool, "tokenizer", uri, spec.tokenizer.access.as_ref())?;
            tokenize::Tokenizer::hugging_face(&file.path, uri)?
        }
    };
    let output = spec.output.as_ref().ok_or_else(|| {
        JobError::Spec("spec.output is unset (the operator fills it in a cluster)".into())
    })?;
    let Prepared {
        train: train_docs,
        test: test_docs,
        train_records,
        test_records,
        train_sources,
        test_sources,
        mut stats,
    } = select_documents(ds)?;
    let prepared_sources: Vec<usize> = train_sources.into_iter().chain(test_sources).collect();
    let instruction_mode = spec.format == DatasetFormat::Instruction;

    // Documents are tokenized in parallel and concatenated in order, each followed by EOT.
    let t = Instant::now();
    let eot = tokenizer.eot();
    let encode = |text: &str| {
        tokenizer.encode(text).map_err(|e| {
            JobError::Data(format!(
                "tokenizer {}: cannot encode a document: {e}",
                tokenizer.name()
            ))
        })
    };
    let bar = stage_bar(
        "tokenize",
        train_docs.len() + test_docs.len() + train_records.len() + test_records.len(),
        "docs",
    );
    let encode_docs = |docs: &[String]| -> Result<Vec<Vec<u32>>, JobError> {
        docs.par_iter()
            .map(|d| {
                bar.inc(1);
                encode(d)
            })
            .collect()
    };
    let concat = |pieces: Vec<Vec<u32>>| -> Vec<u32> {
        let mut out = Vec::with_capacity(pieces.iter().map(|p| p.len() + 1).sum());
        for p in pieces.into_iter().filter(|p| !p.is_empty()) {
            out.extend(p);
            out.push(eot);
        }
        out
    };
    // Instruction examples: prompt and response tokenized apart, so that the mask covers
    // exactly the response; each cut at maxSeqLength.
    let ispec = &spec.instruction;
    let max_len = ispec.max_seq_length.max(2) as usize;
    // `None` for an example whose prompt alone fills maxSeqLength: no response token would
    // be left to learn from.
    let encode_records = |records: &[instruction::Record]| -> Result<Vec<Option<_>>, JobError> {
        records
            .par_iter()
            .map(|r| {
                bar.inc(1);
                let prompt = encode(&instruction::alpaca_prompt(r))?;
                if prompt.len() + 1 >= max_len {
                    return Ok(None);
                }
                let response = encode(&r.output)?;
                Ok(Some(instruction::encode(
                    &prompt,
                    &response,
                    eot,
                    ispec.mask_prompt,
                    max_len,
                )))
            })
            .collect()
    };
    let n_train = train_docs.len().max(train_records.len());
    let (train, test, train_mask, test_mask) = if instruction_mode {
        let mut pieces = encode_records(&train_records)?;
        pieces.extend(encode_records(&test_records)?);
        let (mut tokens, mut masks, mut cut) =
            ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()], 0);
        for (i, piece) in pieces.into_iter().enumerate() {
            let split = usize::from(i >= n_train);
            match piece {
                Some((t, m, c)) => {
                    tokens[split].extend(t);
                    masks[split].extend(m);
                    cut += u64::from(c);
                }
                None => unkeep(
                    &mut stats,
                    &spec.sources[prepared_sources[i]].name,
                    split == 0,
                    "promptTooLong",
                ),
            }
        }
        stats.truncated = Some(cut);
        let [train, test] = tokens;
        let [train_mask, test_mask] = masks;
        (train, test, Some(train_mask), Some(test_mask))
    } else {
        let mut pieces = encode_docs(&train_docs)?;
        pieces.extend(encode_docs(&test_docs)?);
        let n = pieces.len();
        stats.stage("tokenize", n, n, t);
        if spec.dedup.substring.enabled {
            let t = Instant::now();
            let chunk = std::env::var("TAPER_SUBSTRING_CHUNK_TOKENS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(substring::DEFAULT_CHUNK_TOKENS);
            let k = spec.dedup.substring.min_length.max(1) as usize;
            let sub = substring::dedup(&mut pieces, k, chunk)
                .map_err(|e| JobError::Spec(format!("dedup.substring: {e}")))?;
            // A document left without tokens is a duplicate through and through.
            for (i, piece) in pieces.iter().enumerate() {
                if piece.is_empty() {
                    let name = &spec.sources[prepared_sources[i]].name;
                    unkeep(&mut stats, name, i < n_train, "substringDuplicate");
                }
            }
            let out = pieces.iter().filter(|p| !p.is_empty()).count();
            stats.substring = Some(sub);
            stats.stage("substringDedup", n, out, t);
        }
        let test = pieces.split_off(n_train);
        (concat(pieces), concat(test), None, None)
    };
    bar.finish_and_clear();
    let dtype = tokenizer.dtype();
    if instruction_mode {
        let n = train_records.len() + test_records.len();
        stats.stage("tokenize", n, n, t);
    }
    stats.train_tokens = train.len() as u64;
    stats.test_tokens = test.len() as u64;

    let store = rt.block_on(store::open(&output.uri, output.access.as_ref()))?;
    // A previous manifest is removed first: readers never see it next to new shards.
    rt.block_on(store.delete("manifest.json"))?;
    let shard_infos =
        |split: &str, tokens: &[u32], mask: Option<&Vec<u8>>| -> Result<Vec<ShardInfo>, JobError> {
            let mut infos = Vec::new();
            for (i, chunk) in tokens.chunks(SHARD_TOKENS).enumerate() {
                let mask_info = match mask {
                    Some(m) => {
                        let bytes = m[i * SHARD_TOKENS..(i * SHARD_TOKENS + chunk.len())].to_vec();
                        let sha = hex::encode(Sha256::digest(&bytes));
                        let file = format!("{split}-{i:05}.mask.bin");
                        rt.block_on(store.put(&file, bytes))?;
                        Some(MaskInfo { file, sha256: sha })
                    }
                    None => None,
                };
                let bytes = tokenize::to_bytes(chunk, dtype);
                let sha = hex::encode(Sha256::digest(&bytes));
                let file = format!("{split}-{i:05}.bin");
                rt.block_on(store.put(&file, bytes))?;
                infos.push(ShardInfo {
                    file,
                    tokens: chunk.len() as u64,
                    sha256: sha,
                    mask: mask_info,
                });
            }
            Ok(infos)
        };
    let train_shards = shard_infos("train", &train, train_mask.as_ref())?;
    let test_shards = shard_infos("test", &test, test_mask.as_ref())?;
    let digest = hex::encode(Sha256::digest(
        train_shards
            .iter()
            .chain(&test_shards)
            .map(|s| s.sha256.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    ));
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: tokenizer.name(),
        vocab_size: tokenizer.vocab_size(),
        eot_token: eot,
        dtype,
        train: train_shards,
        test: test_shards,
        digest,
    };
    let stats_json = serde_json::to_vec_pretty(&stats)
        .map_err(|e| JobError::Internal(format!("stats.json: {e}")))?;
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| JobError::Internal(format!("manifest.json: {e}")))?;
    rt.block_on(store.put("stats.json", stats_json))?;
    rt.block_on(store.put("manifest.json", manifest_json))?;
    Ok(stats)
}
