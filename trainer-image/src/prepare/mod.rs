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
    io::{BufRead, Read, Write},
    path::{Path, PathBuf},
};

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use spill::{Doc, Spill};
use std::time::Instant;
use taper_crds::{
    Dataset,
    dataset::{Aggregate, DatasetFormat, QualityThreshold, Source, SourceFormat, TokenizerKind},
};
use xxhash_rust::xxh3::xxh3_128;

use crate::{
    job::JobError,
    store,
    train::data::{DatasetManifest, MaskInfo, ShardInfo, TokenDtype},
};

pub mod clean;
pub mod dedup;
pub mod instruction;
pub(crate) mod sources;
#[rustfmt::skip]
mod spacy_en;
mod spill;
pub mod stackexchange;
pub mod substring;
pub mod tokenize;
mod words;

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

    /// Whether a document dropped for `reason` would still be kept as an example.
    fn wants_example(&self, reason: &str) -> bool {
        self.examples
            .get(reason)
            .is_none_or(|e| e.len() < EXAMPLES_PER_REASON)
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
    docs: &mut Batcher,
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
                docs.push(
                    Doc {
                        source: index,
                        text,
                        url: None,
                        record: Some(rec),
                    },
                    stats,
                );
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
    docs: &mut Batcher,
) -> Result<(), JobError> {
    let limit = limit.unwrap_or(u64::MAX);
    if instruction_mode {
        return read_instruction_source(path, index, source, limit, stats, docs);
    }
    let name = source.name.as_str();
    let mut read = 0u64;
    let mut push = |doc: Doc, stats: &mut PrepareStats| {
        if doc.text.trim().is_empty() {
            stats.drop_doc(name, "empty", "");
        } else {
            docs.push(doc, stats);
        }
    };
    if source.format == SourceFormat::Parquet {
        parquet_rows(path, name, |record| {
            if read >= limit {
                return false;
            }
            read += 1;
            let row = format!("row {read}");
            if let Some(doc) = record_doc(source, index, Some(record), &row, stats) {
                push(doc, stats);
            }
            true
        })?;
        stats.record_read(name, read);
        return Ok(());
    }
    let reader = open_reader(path, source.format, name)?;
    let io_err =
        |e: std::io::Error| JobError::Data(format!("source {name}: {}: {e}", path.display()));
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

/// The job error of a failed exact-substring stage: ids or chunks too large are the
/// spec's; a working file that cannot be written is the local store's.
fn substring_error(e: substring::SubstringError) -> JobError {
    use substring::SubstringError as E;
    match e {
        E::Io { path, source } => JobError::Store(store::StoreError::Io { path, source }),
        E::Libsais(_) => JobError::Internal(format!("dedup.substring: {e}")),
        E::TokenTooLarge(_) | E::ChunkTooLarge(_) => {
            JobError::Spec(format!("dedup.substring: {e}"))
        }
    }
}

/// Write `clusters` to `path` as JSON lines: each document in a cluster of two or more,
/// in reading order, with its cluster's number (in order of first member), whether it is
/// the one kept, its source, URL and the first 200 characters of its text.
fn write_clusters(
    path: &Path,
    clusters: &dedup::Clusters,
    spill: &Spill,
    names: &[&str],
) -> Result<(), JobError> {
    let io = |e| spill::io_err(path, e);
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

/// Documents per batch of the per-document stages and of tokenization.
const BATCH_DOCS: usize = 4096;

/// Documents in, documents out and seconds of one stage, summed over batches.
#[derive(Clone, Copy, Default)]
struct StageAcc {
    documents_in: u64,
    documents_out: u64,
    seconds: f64,
}

impl StageAcc {
    fn add(&mut self, documents_in: usize, documents_out: usize, started: Instant) {
        self.documents_in += documents_in as u64;
        self.documents_out += documents_out as u64;
        self.seconds += started.elapsed().as_secs_f64();
    }

    fn stats(&self, name: &str) -> StageStats {
        StageStats {
            name: name.to_string(),
            documents_in: self.documents_in,
            documents_out: self.documents_out,
            seconds: self.seconds,
        }
    }
}

/// The per-document stages — cleaning, URL and exact dedup, the quality rules and the
/// MinHash signature — applied to batches of documents as they are read. Survivors go to
/// the spill; in memory stay only a hash per URL and per text, and the MinHash band keys.
struct Batcher<'a> {
    spec: &'a taper_crds::DatasetSpec,
    filter: clean::QualityFilter,
    batch: Vec<Doc>,
    seen_urls: HashSet<u128>,
    seen_texts: HashSet<u128>,
    minhash: Option<(dedup::MinHasher, dedup::MinHashParams)>,
    /// MinHash band keys of the spilled documents, a file per band (`None`: MinHash off).
    band_keys: Option<spill::BandKeys>,
    spill: Spill,
    read_out: u64,
    clean: StageAcc,
    url: StageAcc,
    exact: StageAcc,
    quality: StageAcc,
    signatures: StageAcc,
    /// The first error of a batch (reported when the source it came from is done).
    error: Option<JobError>,
}

impl Batcher<'_> {
    /// Take a document that was read (not empty).
    fn push(&mut self, doc: Doc, stats: &mut PrepareStats) {
        self.read_out += 1;
        self.batch.push(doc);
        if self.batch.len() >= BATCH_DOCS {
            self.flush(stats);
        }
    }

    /// Run the per-document stages on the batch.
    fn flush(&mut self, stats: &mut PrepareStats) {
        if self.error.is_none()
            && let Err(e) = self.run_batch(stats)
        {
            self.error = Some(e);
        }
        self.batch.clear();
    }

    fn run_batch(&mut self, stats: &mut PrepareStats) -> Result<(), JobError> {
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
                stats.drop_doc(names[d.source], "emptyAfterCleaning", &d.text);
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
                    stats.drop_doc(names[d.source], "urlDuplicate", &d.text);
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
                    stats.drop_doc(names[d.source], "exactDuplicate", &d.text);
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

/// The outcome of the selecting stages: the surviving documents on disk, which of them
/// are kept, and which of those are test documents.
struct Selection {
    /// Spilled documents (dropped near-duplicates and contaminated ones included).
    spill: Spill,
    /// Spill indices of the kept documents, in order, with whether each is a test one.
    kept: Vec<(usize, bool)>,
    stats: PrepareStats,
    /// Where the spill lives; removed after it.
    _spool: sources::Spool,
}

impl Selection {
    /// Kept documents of one split (`test`), in order.
    fn split(&self, test: bool) -> impl Iterator<Item = usize> + '_ {
        self.kept
            .iter()
            .filter(move |(_, t)| *t == test)
            .map(|(i, _)| *i)
    }
}

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

/// Run every stage up to tokenization on `ds`'s sources.
pub fn select_documents(ds: &Dataset) -> Result<Prepared, JobError> {
    select_documents_with(ds, &Options::default())
}

/// [`select_documents`] with `options` (a dry run's sample, a clusters file).
pub fn select_documents_with(ds: &Dataset, options: &Options) -> Result<Prepared, JobError> {
    let sel = select(ds, options)?;
    let load = |test: bool| -> Result<Vec<Doc>, JobError> {
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
        stats: sel.stats.clone(),
    })
}

fn select(ds: &Dataset, options: &Options) -> Result<Selection, JobError> {
    let spec = &ds.spec;
    let limit = options.limit;
    let instruction_mode = spec.format == DatasetFormat::Instruction;
    if spec.dedup.substring.enabled && instruction_mode {
        return Err(JobError::Spec(
            "dedup.substring cuts spans out of documents, which would break instruction records; set dedup.substring.enabled: false for format: instruction".into(),
        ));
    }
    let names: Vec<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
    let mut stats = PrepareStats::default();
    let t = Instant::now();
    // S3 listings and downloads, and HTTP downloads, run on a small runtime of their own.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| JobError::Internal(format!("tokio runtime: {e}")))?;
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
            if let Some(e) = docs.error.take() {
                return Err(e);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    docs.flush(&mut stats);
    if let Some(e) = docs.error.take() {
        return Err(e);
    }
    drop(rt);
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
        documents_in: stats.documents_read,
        documents_out: docs.read_out,
        seconds: (t.elapsed().as_secs_f64() - per_document).max(0.0),
    };
    stats.stages.push(read.stats("read"));
    stats.stages.push(docs.clean.stats("clean"));
    if spec.dedup.url {
        stats.stages.push(docs.url.stats("urlDedup"));
    }
    if spec.dedup.exact {
        stats.stages.push(docs.exact.stats("exactDedup"));
    }
    stats.stages.push(docs.quality.stats("quality"));

    // A spilled document dropped for `reason`: its text is read back only while the
    // reason still collects examples.
    let drop_spilled = |stats: &mut PrepareStats, i: usize, reason: &str| {
        let text = if stats.wants_example(reason) {
            spill.get(i)?.text
        } else {
            String::new()
        };
        stats.drop_doc(names[spill.source(i)], reason, &text);
        Ok::<_, JobError>(())
    };

    // MinHash near-duplicates across all sources: candidates share a band bucket; with
    // `verify` on, each pair is confirmed by the exact Jaccard similarity of the two
    // documents' shingles, read back from the spill.
    let n = spill.len();
    let mut keep = vec![true; n];
    if mh.enabled {
        let t = Instant::now();
        let band_keys = &docs.band_keys;
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
        keep = (0..n).map(|i| clusters.kept(i)).collect();
        if let Some(path) = &options.clusters {
            write_clusters(path, &clusters, &spill, &names)?;
        }
        for (i, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
            drop_spilled(&mut stats, i, "nearDuplicate")?;
        }
        let kept = keep.iter().filter(|k| **k).count();
        let mut acc = docs.signatures;
        acc.add(0, 0, t);
        acc.documents_out = kept as u64;
        stats.minhash = Some([params.ngram, params.bands, params.rows]);
        stats.stages.push(acc.stats("minhashDedup"));
    }
    let kept: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
    if kept.is_empty() {
        return Err(JobError::Data(format!(
            "no document left after filtering: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        )));
    }

    // Document-level split, deterministic in the seed.
    let t = Instant::now();
    let n = kept.len();
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
    let mut kept: Vec<(usize, bool)> = kept.into_iter().zip(is_test).collect();

    // Decontamination: test documents sharing a long word n-gram with any train document
    // are dropped. The n-grams of the (small) test split are held; train streams past.
    let decon = &spec.dedup.decontamination;
    if decon.enabled {
        let t = Instant::now();
        let n_gram = decon.ngram.max(1) as usize;
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
            .map(|&i| -> Result<Vec<usize>, JobError> {
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
            drop_spilled(&mut stats, i, "contaminated")?;
        }
        stats.stage("decontaminate", n_in, kept.len(), t);
    }
    let mut kept_per_source: HashMap<usize, u64> = HashMap::new();
    for &(i, _) in &kept {
        *kept_per_source.entry(spill.source(i)).or_default() += 1;
    }
    for (i, name) in names.iter().enumerate() {
        stats.sources.entry(name.to_string()).or_default().kept =
            kept_per_source.get(&i).copied().unwrap_or(0);
    }
    stats.test_documents = kept.iter().filter(|(_, t)| *t).count() as u64;
    stats.train_documents = kept.len() as u64 - stats.test_documents;
    Ok(Selection {
        spill,
        kept,
        stats,
        _spool: spool,
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

/// Shards of one split written to local files as tokens arrive: `SHARD_TOKENS` tokens
/// each, with their sha256 computed on the way (and a mask file beside each for
/// instruction data).
struct ShardWriter {
    split: &'static str,
    dir: PathBuf,
    dtype: TokenDtype,
    masked: bool,
    open: Option<OpenShard>,
    done: Vec<ShardInfo>,
}

struct OpenShard {
    tokens: std::io::BufWriter<std::fs::File>,
    tokens_sha: Sha256,
    mask: Option<(std::io::BufWriter<std::fs::File>, Sha256)>,
    count: usize,
}

impl ShardWriter {
    fn new(split: &'static str, dir: &Path, dtype: TokenDtype, masked: bool) -> Self {
        Self {
            split,
            dir: dir.to_path_buf(),
            dtype,
            masked,
            open: None,
            done: Vec::new(),
        }
    }

    fn io(&self, e: std::io::Error) -> JobError {
        spill::io_err(&self.dir, e)
    }

    fn file(&self, i: usize, mask: bool) -> String {
        let kind = if mask { ".mask" } else { "" };
        format!("{}-{i:05}{kind}.bin", self.split)
    }

    /// Append one example's tokens (and mask).
    fn append(&mut self, mut tokens: &[u32], mut mask: Option<&[u8]>) -> Result<(), JobError> {
        use std::io::Write;
        while !tokens.is_empty() {
            if self.open.is_none() {
                let i = self.done.len();
                let create = |name: String| {
                    std::fs::File::create(self.dir.join(name))
                        .map(|f| std::io::BufWriter::with_capacity(1 << 20, f))
                };
                let t = create(self.file(i, false)).map_err(|e| self.io(e))?;
                let m = if self.masked {
                    Some((
                        create(self.file(i, true)).map_err(|e| self.io(e))?,
                        Sha256::new(),
                    ))
                } else {
                    None
                };
                self.open = Some(OpenShard {
                    tokens: t,
                    tokens_sha: Sha256::new(),
                    mask: m,
                    count: 0,
                });
            }
            let Some(shard) = self.open.as_mut() else {
                break;
            };
            let room = SHARD_TOKENS - shard.count;
            let n = room.min(tokens.len());
            let bytes = tokenize::to_bytes(&tokens[..n], self.dtype);
            shard.tokens_sha.update(&bytes);
            let written = shard.tokens.write_all(&bytes);
            let mut mask_written = Ok(());
            if let (Some((w, sha)), Some(m)) = (shard.mask.as_mut(), mask) {
                sha.update(&m[..n]);
                mask_written = w.write_all(&m[..n]);
                mask = Some(&m[n..]);
            }
            shard.count += n;
            let full = shard.count == SHARD_TOKENS;
            written.and(mask_written).map_err(|e| self.io(e))?;
            tokens = &tokens[n..];
            if full {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), JobError> {
        use std::io::Write;
        let Some(mut shard) = self.open.take() else {
            return Ok(());
        };
        let i = self.done.len();
        shard.tokens.flush().map_err(|e| self.io(e))?;
        let mask = match shard.mask {
            Some((mut w, sha)) => {
                w.flush().map_err(|e| self.io(e))?;
                Some(MaskInfo {
                    file: self.file(i, true),
                    sha256: hex::encode(sha.finalize()),
                })
            }
            None => None,
        };
        self.done.push(ShardInfo {
            file: self.file(i, false),
            tokens: shard.count as u64,
            sha256: hex::encode(shard.tokens_sha.finalize()),
            mask,
        });
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardInfo>, JobError> {
        self.close()?;
        Ok(self.done)
    }
}

/// One encoded document: its tokens, its loss mask (instruction data) and whether it was
/// cut at `maxSeqLength`.
type Encoded = (Vec<u32>, Option<Vec<u8>>, bool);

/// Prepare `ds` and publish it to its `spec.output`. Returns the stats it published.
///
/// Documents stream from the selection's spill through the tokenizer (a batch at a time,
/// in parallel) into shard files in a local staging folder, which are then uploaded;
/// `stats.json` and, last, `manifest.json` follow.
pub fn prepare(rt: &tokio::runtime::Runtime, ds: &Dataset) -> Result<PrepareStats, JobError> {
    prepare_with(rt, ds, &Options::default())
}

/// [`prepare`] with `options` (a clusters file).
pub fn prepare_with(
    rt: &tokio::runtime::Runtime,
    ds: &Dataset,
    options: &Options,
) -> Result<PrepareStats, JobError> {
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
    let sel = select(ds, options)?;
    let mut stats = sel.stats.clone();
    let instruction_mode = spec.format == DatasetFormat::Instruction;
    let eot = tokenizer.eot();
    let dtype = tokenizer.dtype();
    let staging = sources::Spool::new();
    std::fs::create_dir_all(staging.path()).map_err(|e| spill::io_err(staging.path(), e))?;
    let mut writers = [
        ShardWriter::new("train", staging.path(), dtype, instruction_mode),
        ShardWriter::new("test", staging.path(), dtype, instruction_mode),
    ];

    let t = Instant::now();
    let encode = |text: &str| {
        tokenizer.encode(text).map_err(|e| {
            JobError::Data(format!(
                "tokenizer {}: cannot encode a document: {e}",
                tokenizer.name()
            ))
        })
    };
    let ispec = &spec.instruction;
    let max_len = ispec.max_seq_length.max(2) as usize;
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
    // With exact-substring dedup, documents are encoded into a local corpus file first,
    // then cut and written once the whole corpus is indexed.
    let mut corpus = match substring_chunk {
        Some(_) => Some(
            substring::CorpusWriter::create(staging.path().join("substring-corpus.u16"))
                .map_err(substring_error)?,
        ),
        None => None,
    };
    // Each document in the corpus file: (test, source).
    let mut corpus_docs: Vec<(bool, usize)> = Vec::new();
    // Train documents, then test ones: exact-substring dedup sees train first.
    let order: Vec<(usize, bool)> = sel
        .split(false)
        .map(|i| (i, false))
        .chain(sel.split(true).map(|i| (i, true)))
        .collect();
    let bar = stage_bar("tokenize", order.len(), "docs");
    let mut truncated = 0u64;
    for batch in order.chunks(BATCH_DOCS) {
        let docs: Vec<Doc> = batch
            .par_iter()
            .map(|&(i, _)| sel.spill.get(i))
            .collect::<Result<_, _>>()?;
        // An instruction example whose prompt alone fills maxSeqLength is `None`: no
        // response token would be left to learn from.
        let encoded: Vec<Option<Encoded>> = docs
            .par_iter()
            .map(|d| {
                bar.inc(1);
                match &d.record {
                    Some(r) if instruction_mode => {
                        let prompt = encode(&instruction::alpaca_prompt(r))?;
                        if prompt.len() + 1 >= max_len {
                            return Ok(None);
                        }
                        let response = encode(&r.output)?;
                        let (t, m, cut) = instruction::encode(
                            &prompt,
                            &response,
                            eot,
                            ispec.mask_prompt,
                            max_len,
                        );
                        Ok(Some((t, Some(m), cut)))
                    }
                    _ => Ok(Some((encode(&d.text)?, None, false))),
                }
            })
            .collect::<Result<_, JobError>>()?;
        for ((d, e), &(_, test)) in docs.iter().zip(encoded).zip(batch) {
            match e {
                Some((tokens, _, _)) if corpus.is_some() => {
                    if let Some(c) = corpus.as_mut() {
                        c.push(&tokens).map_err(substring_error)?;
                    }
                    corpus_docs.push((test, d.source));
                }
                Some((mut tokens, mask, cut)) => {
                    truncated += u64::from(cut);
                    let w = &mut writers[usize::from(test)];
                    match mask {
                        Some(m) => w.append(&tokens, Some(&m))?,
                        None => {
                            tokens.push(eot);
                            w.append(&tokens, None)?;
                        }
                    }
                }
                None => unkeep(
                    &mut stats,
                    &spec.sources[d.source].name,
                    !test,
                    "promptTooLong",
                ),
            }
        }
    }
    bar.finish_and_clear();
    let n = order.len();
    let mut tokenize_acc = StageAcc::default();
    tokenize_acc.add(n, n, t);
    stats.stages.push(tokenize_acc.stats("tokenize"));
    if let (Some(writer), Some(chunk)) = (corpus, substring_chunk) {
        let t = Instant::now();
        let corpus = writer.finish().map_err(substring_error)?;
        let mut s = substring::SubstringStats::default();
        let k = spec.dedup.substring.min_length.max(1) as usize;
        let marks = substring::find_repeats(&corpus, k, chunk, staging.path(), &mut s)
            .map_err(substring_error)?;
        let mut out = 0;
        for (i, &(test, source)) in corpus_docs.iter().enumerate() {
            let mut tokens = substring::cut(&corpus, &marks, i, &mut s);
            if tokens.is_empty() {
                unkeep(
                    &mut stats,
                    &spec.sources[source].name,
                    !test,
                    "substringDuplicate",
                );
                continue;
            }
            out += 1;
            tokens.push(eot);
            writers[usize::from(test)].append(&tokens, None)?;
        }
        let mut acc = StageAcc::default();
        acc.add(corpus_docs.len(), out, t);
        stats.substring = Some(s);
        stats.stages.push(acc.stats("substringDedup"));
    }
    if instruction_mode {
        stats.truncated = Some(truncated);
    }
    let [train_writer, test_writer] = writers;
    let train_shards = train_writer.finish()?;
    let test_shards = test_writer.finish()?;
    stats.train_tokens = train_shards.iter().map(|s| s.tokens).sum();
    stats.test_tokens = test_shards.iter().map(|s| s.tokens).sum();

    let store = rt.block_on(store::open(&output.uri, output.access.as_ref()))?;
    // A previous manifest is removed first: readers never see it next to new shards.
    rt.block_on(store.delete("manifest.json"))?;
    for shard in train_shards.iter().chain(&test_shards) {
        rt.block_on(store.put_file(&shard.file, &staging.path().join(&shard.file)))?;
        if let Some(m) = &shard.mask {
            rt.block_on(store.put_file(&m.file, &staging.path().join(&m.file)))?;
        }
    }
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
