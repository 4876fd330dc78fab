//! Reading: one record reader for every source format ([`each_record`]), and the two
//! ways a Dataset turns records into documents — text documents for pretraining
//! ([`read_source`]) and instruction records for finetuning. Empty, malformed and
//! below-threshold records are counted and skipped, never fatal.

use std::{
    io::{BufRead, Read},
    path::Path,
};

use taper_crds::{
    dataset::{Aggregate, QualityThreshold, Source, SourceFormat},
    report::{DropReason, Normalization, PrepareReport},
};

use super::{PrepareError, batch::Batcher, instruction, spill::Doc, stackexchange};

/// Malformed records reported by name and position before the rest are only counted.
const REPORTED_MALFORMED: u64 = 5;

/// One record of a source file, as its format delivers it.
pub(crate) enum Record {
    /// A JSON value: a JSON-lines line (`None`: the line is not JSON), an element of a
    /// JSON array, or a Parquet row (groups as objects, lists as arrays).
    Json {
        /// The value.
        value: Option<serde_json::Value>,
        /// Where it is (`line 3`, `element 7`, `row 2`), for messages.
        position: String,
    },
    /// A plain-text document (a WikiText article or paragraph block).
    Text(String),
    /// A StackExchange thread: a question with its answers.
    Thread(stackexchange::Thread),
}

/// What [`each_record`] read besides the records.
#[derive(Debug, Default)]
pub(crate) struct ReadCount {
    /// Records delivered.
    pub records: u64,
    /// Rows of a StackExchange dump that could not be parsed (not documents).
    pub malformed_rows: u64,
}

fn open_reader(path: &Path, format: SourceFormat) -> Result<Box<dyn BufRead>, PrepareError> {
    let file = std::fs::File::open(path)
        .map_err(|e| PrepareError::Data(format!("cannot read {}: {e}", path.display())))?;
    let raw: Box<dyn Read> = if format == SourceFormat::JsonlZst {
        Box::new(
            zstd::stream::read::Decoder::new(file)
                .map_err(|e| PrepareError::Data(format!("{}: not zstd: {e}", path.display())))?,
        )
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

/// Call `each` with the records of the file at `path`, in `format`, at most `limit` of
/// them. Errors name the file; the source's name is added by the caller.
pub(crate) fn each_record(
    path: &Path,
    format: SourceFormat,
    quality_minimum: Option<f64>,
    limit: u64,
    mut each: impl FnMut(Record),
) -> Result<ReadCount, PrepareError> {
    let mut count = ReadCount::default();
    let io_err = |e: std::io::Error| PrepareError::Data(format!("{}: {e}", path.display()));
    match format {
        SourceFormat::Parquet => {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let bad =
                |e: &dyn std::fmt::Display| PrepareError::Data(format!("{}: {e}", path.display()));
            let file = std::fs::File::open(path).map_err(|e| bad(&format!("cannot read: {e}")))?;
            let reader =
                SerializedFileReader::new(file).map_err(|e| bad(&format!("not Parquet: {e}")))?;
            // Rows are typed, so a row cannot be malformed; a corrupt file is an error.
            for (i, row) in reader.get_row_iter(None).map_err(|e| bad(&e))?.enumerate() {
                if count.records >= limit {
                    break;
                }
                let row = row.map_err(|e| bad(&format!("row {}: {e}", i + 1)))?;
                count.records += 1;
                each(Record::Json {
                    value: Some(row.to_json_value()),
                    position: format!("row {}", i + 1),
                });
            }
        }
        SourceFormat::Jsonl | SourceFormat::JsonlZst => {
            for (i, line) in open_reader(path, format)?.lines().enumerate() {
                if count.records >= limit {
                    break;
                }
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() {
                    continue;
                }
                count.records += 1;
                each(Record::Json {
                    value: serde_json::from_str(&line).ok(),
                    position: format!("line {}", i + 1),
                });
            }
        }
        SourceFormat::Json | SourceFormat::AlpacaJson => {
            // A JSON array, streamed element by element.
            use serde::de::Deserializer as _;
            let mut de = serde_json::Deserializer::from_reader(open_reader(path, format)?);
            de.deserialize_seq(ArrayVisitor(|value: serde_json::Value| {
                if count.records < limit {
                    count.records += 1;
                    each(Record::Json {
                        value: Some(value),
                        position: format!("element {}", count.records),
                    });
                }
            }))
            .map_err(|e| {
                PrepareError::Data(format!(
                    "{}: not a JSON array of records: {e}",
                    path.display()
                ))
            })?;
        }
        SourceFormat::Text => {
            let mut current = String::new();
            let mut emit = |text: String, count: &mut ReadCount| {
                count.records += 1;
                each(Record::Text(text));
            };
            for line in open_reader(path, format)?.lines() {
                if count.records >= limit {
                    current.clear();
                    break;
                }
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() || is_wikitext_article_heading(&line) {
                    if !current.is_empty() {
                        emit(std::mem::take(&mut current), &mut count);
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
                emit(current, &mut count);
            }
        }
        SourceFormat::StackexchangeXml => {
            let threads = stackexchange::read_threads(open_reader(path, format)?, quality_minimum)
                .map_err(|e| PrepareError::Data(format!("{}: {e}", path.display())))?;
            for t in threads.threads {
                if count.records >= limit {
                    break;
                }
                count.records += 1;
                each(Record::Thread(t));
            }
            count.malformed_rows = threads.malformed;
        }
    }
    Ok(count)
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

/// Count a malformed record; the first few are named in the log.
fn malformed(report: &mut PrepareReport, source: &Source, position: &str, what: &str) {
    report.drop_document(&source.name, DropReason::Malformed, "");
    if report.dropped_for(DropReason::Malformed) <= REPORTED_MALFORMED {
        tracing::warn!(source = %source.name, %position, "{what}; skipped");
    }
}

/// A document from one JSON record: `None` when it is malformed or below the quality
/// threshold (counted either way).
fn json_doc(
    source: &Source,
    index: usize,
    value: Option<serde_json::Value>,
    position: &str,
    report: &mut PrepareReport,
) -> Option<Doc> {
    let text = value
        .as_ref()
        .and_then(|v| dotted(v, &source.text_field).and_then(|t| t.as_str().map(str::to_string)));
    let (Some(record), Some(text)) = (value, text) else {
        let what = format!("not JSON with a string at {:?}", source.text_field);
        malformed(report, source, position, &what);
        return None;
    };
    if let Some(q) = &source.quality {
        match quality_value(&record, q) {
            Some(v) if v >= q.minimum => {}
            _ => {
                report.drop_document(&source.name, DropReason::QualityThreshold, &text);
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

/// An instruction document from one JSON record: `None` when it is malformed or has an
/// empty instruction or output (counted either way).
fn instruction_doc(
    source: &Source,
    index: usize,
    value: Option<serde_json::Value>,
    position: &str,
    report: &mut PrepareReport,
) -> Option<Doc> {
    let Some(value) = value else {
        malformed(report, source, position, "not JSON");
        return None;
    };
    match instruction::parse(&value) {
        Ok((rec, placeholder)) => {
            if placeholder {
                report.normalize(Normalization::PlaceholderInput);
            }
            // Dedup and decontamination compare the record's own words; the template,
            // shared by every record, would make them all look alike.
            let text = format!("{}\n\n{}\n\n{}", rec.instruction, rec.input, rec.output);
            Some(Doc {
                source: index,
                text,
                url: None,
                record: Some(rec),
            })
        }
        Err(reject) => {
            let text = value
                .get("instruction")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            report.drop_document(&source.name, reject.reason(), text);
            None
        }
    }
}

/// Read one source file into `docs`, as text documents or (`instruction_mode`)
/// instruction records, at most `limit` records.
pub(crate) fn read_source(
    path: &Path,
    index: usize,
    source: &Source,
    instruction_mode: bool,
    limit: Option<u64>,
    report: &mut PrepareReport,
    docs: &mut Batcher,
) -> Result<(), PrepareError> {
    let name = source.name.as_str();
    let records = matches!(
        source.format,
        SourceFormat::Parquet
            | SourceFormat::Jsonl
            | SourceFormat::JsonlZst
            | SourceFormat::Json
            | SourceFormat::AlpacaJson
    );
    if instruction_mode && !records {
        return Err(PrepareError::Spec(format!(
            "source {name}: an instruction Dataset reads alpaca-json, json, jsonl or parquet records, not {}",
            serde_json::to_string(&source.format).unwrap_or_default()
        )));
    }
    if !instruction_mode && source.format == SourceFormat::AlpacaJson {
        return Err(PrepareError::Spec(format!(
            "source {name}: format alpaca-json holds instruction records: set spec.format: instruction"
        )));
    }
    let quality_minimum = source.quality.as_ref().map(|q| q.minimum);
    let count = each_record(
        path,
        source.format,
        quality_minimum,
        limit.unwrap_or(u64::MAX),
        |record| {
            let doc = match record {
                Record::Json { value, position } if instruction_mode => {
                    instruction_doc(source, index, value, &position, report)
                }
                Record::Json { value, position } => {
                    json_doc(source, index, value, &position, report)
                }
                Record::Text(text) => Some(Doc {
                    source: index,
                    text,
                    url: None,
                    record: None,
                }),
                Record::Thread(t) if t.below_threshold => {
                    report.drop_document(name, DropReason::QualityThreshold, &t.text);
                    None
                }
                Record::Thread(t) => Some(Doc {
                    source: index,
                    text: t.text,
                    url: None,
                    record: None,
                }),
            };
            match doc {
                Some(doc) if !instruction_mode && doc.text.trim().is_empty() => {
                    report.drop_document(name, DropReason::Empty, "");
                }
                Some(doc) => docs.push(doc, report),
                None => {}
            }
        },
    )
    .map_err(|e| e.context(format!("source {name}")))?;
    if count.malformed_rows > 0 {
        tracing::warn!(
            source = name,
            rows = count.malformed_rows,
            "malformed rows skipped"
        );
        report.malformed_rows += count.malformed_rows;
    }
    report.record_read(name, count.records);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wikitext_headings_are_articles_not_sections() {
        assert!(is_wikitext_article_heading(" = Valkyria Chronicles III = "));
        assert!(!is_wikitext_article_heading(" = = Gameplay = = "));
        assert!(!is_wikitext_article_heading("= x"));
    }

    #[test]
    fn quality_values_reduce_lists_by_their_aggregate() {
        let q = |aggregate| QualityThreshold {
            field: "meta.scores".into(),
            minimum: 0.0,
            aggregate,
        };
        let r = serde_json::json!({"meta": {"scores": [1.0, 3.0, 2.0]}});
        assert_eq!(quality_value(&r, &q(Aggregate::Max)), Some(3.0));
        assert_eq!(quality_value(&r, &q(Aggregate::Min)), Some(1.0));
        assert_eq!(quality_value(&r, &q(Aggregate::Sum)), Some(6.0));
        assert_eq!(quality_value(&r, &q(Aggregate::Mean)), Some(2.0));
        let s = serde_json::json!({"meta": {"scores": " 4.5 "}});
        assert_eq!(quality_value(&s, &q(Aggregate::Max)), Some(4.5));
        assert_eq!(
            quality_value(&serde_json::json!({}), &q(Aggregate::Max)),
            None
        );
    }
}
