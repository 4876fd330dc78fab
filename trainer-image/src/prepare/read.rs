//! Reading: one record reader for every source format ([`each_record`]), and the two
//! ways a Dataset turns records into documents — text documents for pretraining
//! ([`read_source`]) and instruction records for finetuning. Empty, malformed and
//! below-threshold records are counted and skipped, never fatal; a file that breaks off
//! before its end (a truncated `jsonl.zst`, a cut XML dump, a damaged Parquet row group)
//! keeps the records read before the break and is listed in the report's `brokenFiles`.
//! A source with `onError: fail` fails the run at the first of either instead.
//!
//! Hostile input stays bounded: lines are read as bytes and checked for UTF-8 one at a
//! time (one bad byte makes one malformed record), a JSON array is split into its elements
//! by a scanner that counts nesting instead of recursing, and every record is parsed on
//! its own by serde_json, whose nesting limit (128) makes a deeply nested record
//! malformed rather than a stack overflow. A file that is not its format at all (no zstd
//! frame at its start, no Parquet footer, no `[` opening a JSON array) is a wrong
//! `format` or a stray file, and fails the run in both modes; an empty file has no records.

use std::{
    io::BufRead,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
};

use taper_crds::{
    dataset::{Aggregate, OnError, QualityThreshold, Source, SourceFormat},
    report::{DropReason, Normalization, PrepareReport, prepare::BrokenFile},
};

use super::{PrepareError, batch::Batcher, instruction, spill::Doc, stackexchange};

/// Malformed records reported by name and position before the rest are only counted.
const REPORTED_MALFORMED: u64 = 5;

/// The UTF-8 byte-order mark, skipped at the start of a file.
const BOM: &[u8] = &[0xEF, 0xBB, 0xBF];

/// One record of a source file, as its format delivers it.
pub(crate) enum Record {
    /// A JSON value: a JSON-lines line, an element of a JSON array, or a Parquet row
    /// (groups as objects, lists as arrays).
    Json {
        /// The value.
        value: serde_json::Value,
        /// Where it is (`line 3`, `element 7`, `row 2`), for messages.
        position: String,
    },
    /// A plain-text document (a WikiText article or paragraph block).
    Text(String),
    /// A StackExchange thread: a question with its answers.
    Thread(stackexchange::Thread),
    /// A record that cannot be read: invalid UTF-8, not JSON, a Parquet row that cannot
    /// be decoded.
    Malformed {
        /// Where it is, as for [`Record::Json`].
        position: String,
        /// What is wrong with it.
        what: String,
    },
}

/// Where a file broke off before its end.
#[derive(Debug)]
pub(crate) struct Break {
    /// Records of the file read before the break.
    pub records: u64,
    /// Byte offset of the break in the decoded stream (the file, or its decompressed
    /// content); `None` where the reader gives none (Parquet).
    pub byte_offset: Option<u64>,
    /// What broke.
    pub error: String,
}

/// What [`each_record`] read besides the records.
#[derive(Debug, Default)]
pub(crate) struct ReadCount {
    /// Records delivered (malformed ones included).
    pub records: u64,
    /// Rows of a StackExchange dump that could not be parsed (not documents).
    pub malformed_rows: u64,
    /// Byte offset of the first of them.
    pub first_malformed_row: Option<u64>,
    /// Where the file broke off (a Parquet file can break once per row group).
    pub breaks: Vec<Break>,
}

impl ReadCount {
    /// Note a break after the records read so far.
    fn broke(&mut self, byte_offset: Option<u64>, error: String) {
        self.breaks.push(Break {
            records: self.records,
            byte_offset,
            error,
        });
    }
}

/// Whether `head` starts a zstd frame or a skippable frame (magic 0x184D2A5?).
fn is_zstd(head: &[u8]) -> bool {
    matches!(head, [0x28, 0xB5, 0x2F, 0xFD, ..])
        || matches!(head, [m, 0x2A, 0x4D, 0x18, ..] if m & 0xF0 == 0x50)
}

fn open_reader(path: &Path, format: SourceFormat) -> Result<Box<dyn BufRead>, PrepareError> {
    let cannot_read =
        |e: std::io::Error| PrepareError::Data(format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut file = std::io::BufReader::with_capacity(1 << 20, file);
    if format != SourceFormat::JsonlZst {
        return Ok(Box::new(file));
    }
    let head = file.fill_buf().map_err(cannot_read)?;
    if head.is_empty() {
        // An empty file holds no records.
        return Ok(Box::new(file));
    }
    if !is_zstd(head) {
        let shown: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(PrepareError::Data(format!(
            "{}: not zstd: it starts with bytes {}, not a zstd frame (28 b5 2f fd)",
            path.display(),
            shown.join(" ")
        )));
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(file)
        .map_err(|e| PrepareError::Data(format!("{}: not zstd: {e}", path.display())))?;
    Ok(Box::new(std::io::BufReader::with_capacity(
        1 << 20,
        decoder,
    )))
}

/// A stream of lines that broke off.
struct LineBreak {
    /// Bytes of the stream read before the error (a partial line's included).
    offset: u64,
    error: std::io::Error,
}

/// The lines of a stream as bytes, without their `\n` or `\r\n` (and without a
/// byte-order mark at the start of the first).
struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    /// Bytes of the stream in the lines returned so far.
    offset: u64,
    /// Lines returned so far.
    number: u64,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            buf: Vec::new(),
            offset: 0,
            number: 0,
        }
    }

    /// The next line and its number (from 1); `Ok(None)` at the end of the stream. An
    /// error is the stream breaking off, at the byte offset returned with it.
    fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, LineBreak> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => Ok(None),
            Ok(n) => {
                self.offset += n as u64;
                self.number += 1;
                let mut line = self.buf.as_slice();
                if self.number == 1 {
                    line = line.strip_prefix(BOM).unwrap_or(line);
                }
                if let Some(l) = line.strip_suffix(b"\n") {
                    line = l.strip_suffix(b"\r").unwrap_or(l);
                }
                Ok(Some((self.number, line)))
            }
            Err(error) => Err(LineBreak {
                offset: self.offset + self.buf.len() as u64,
                error,
            }),
        }
    }
}

/// Why a JSON array stopped before its end.
enum ArrayStop {
    /// The file is not a JSON array at all.
    NotArray(String),
    /// It broke off (read error, end of file inside the array, bytes after it).
    Broken { offset: u64, error: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// Before the opening `[`.
    Before,
    /// Between elements.
    Inside,
    /// After the closing `]`: only whitespace may follow.
    Closed,
    /// Nothing more.
    Done,
}

/// A JSON array read one element at a time, as bytes. Strings and nesting are tracked
/// (nesting as a count) only to find the commas between elements; nothing is parsed
/// here, so one bad element is one malformed record, not the end of the array.
struct JsonArray<R> {
    reader: R,
    /// Bytes consumed.
    offset: u64,
    /// Elements returned.
    elements: u64,
    state: ArrayState,
    element: Vec<u8>,
}

impl<R: BufRead> JsonArray<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            offset: 0,
            elements: 0,
            state: ArrayState::Before,
            element: Vec::new(),
        }
    }

    fn broken(&self, error: impl std::fmt::Display) -> ArrayStop {
        ArrayStop::Broken {
            offset: self.offset,
            error: error.to_string(),
        }
    }

    /// Skip JSON whitespace (and a byte-order mark at the start); the next byte, not
    /// consumed, or `None` at the end.
    fn skip_whitespace(&mut self) -> Result<Option<u8>, ArrayStop> {
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) => return Err(self.broken(e)),
            };
            if buf.is_empty() {
                return Ok(None);
            }
            let bom = if self.offset == 0 && buf.starts_with(BOM) {
                BOM.len()
            } else {
                0
            };
            let n = bom
                + buf[bom..]
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .count();
            let next = buf.get(n).copied();
            self.reader.consume(n);
            self.offset += n as u64;
            if next.is_some() {
                return Ok(next);
            }
        }
    }

    /// The next element's number (from 1) and bytes (surrounding whitespace included);
    /// `Ok(None)` after the last.
    fn next_element(&mut self) -> Result<Option<(u64, &[u8])>, ArrayStop> {
        loop {
            match self.state {
                ArrayState::Done => return Ok(None),
                ArrayState::Before => match self.skip_whitespace()? {
                    None => {
                        // An empty or blank file: no records.
                        self.state = ArrayState::Done;
                        return Ok(None);
                    }
                    Some(b'[') => {
                        self.reader.consume(1);
                        self.offset += 1;
                        self.state = ArrayState::Inside;
                    }
                    Some(b) => {
                        self.state = ArrayState::Done;
                        return Err(ArrayStop::NotArray(format!(
                            "it starts with {:?} at byte {}, not '['",
                            char::from(b),
                            self.offset
                        )));
                    }
                },
                ArrayState::Closed => {
                    self.state = ArrayState::Done;
                    return match self.skip_whitespace()? {
                        None => Ok(None),
                        Some(_) => Err(self.broken("bytes after the end of the array")),
                    };
                }
                ArrayState::Inside => {
                    if self.scan_element()? {
                        self.elements += 1;
                        return Ok(Some((self.elements, &self.element)));
                    }
                }
            }
        }
    }

    /// Read the bytes up to the next `,` or `]` outside strings and nesting into
    /// `element`. Whether it is an element: the blank end of `[]` or of `[1,]` is not.
    fn scan_element(&mut self) -> Result<bool, ArrayStop> {
        self.element.clear();
        let start = self.offset;
        let (mut depth, mut in_string, mut escaped) = (0u64, false, false);
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) => return Err(self.broken(e)),
            };
            if buf.is_empty() {
                return Err(self.broken(format!(
                    "the file ends inside the array, in element {} (from byte {start})",
                    self.elements + 1
                )));
            }
            let mut end = None;
            for (i, &c) in buf.iter().enumerate() {
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if c == b'\\' {
                        escaped = true;
                    } else if c == b'"' {
                        in_string = false;
                    }
                    continue;
                }
                match c {
                    b'"' => in_string = true,
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' if depth > 0 => depth -= 1,
                    b',' | b']' if depth == 0 => {
                        end = Some((i, c));
                        break;
                    }
                    _ => {}
                }
            }
            let Some((i, c)) = end else {
                let n = buf.len();
                self.element.extend_from_slice(buf);
                self.reader.consume(n);
                self.offset += n as u64;
                continue;
            };
            self.element.extend_from_slice(&buf[..i]);
            self.reader.consume(i + 1);
            self.offset += i as u64 + 1;
            if c == b']' {
                self.state = ArrayState::Closed;
                if self.element.iter().all(u8::is_ascii_whitespace) {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
    }
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

/// What is wrong with bytes that are not UTF-8, in a `unit` (line, element).
fn invalid_utf8(e: &std::str::Utf8Error, unit: &str) -> String {
    format!("invalid UTF-8 at byte {} of the {unit}", e.valid_up_to())
}

/// A record from the text of one JSON value.
fn json_record(text: &str, position: String) -> Record {
    match serde_json::from_str(text) {
        Ok(value) => Record::Json { value, position },
        Err(e) => Record::Malformed {
            position,
            what: format!("not JSON: {e}"),
        },
    }
}

/// A record from the bytes of one JSON value (a line, an array element).
fn json_bytes_record(bytes: &[u8], unit: &str, position: String) -> Record {
    match std::str::from_utf8(bytes) {
        Ok(text) => json_record(text, position),
        Err(e) => Record::Malformed {
            position,
            what: invalid_utf8(&e, unit),
        },
    }
}

/// A paragraph of a plain-text file being gathered into a document.
#[derive(Default)]
struct Paragraph {
    text: String,
    /// Its first line's number.
    first_line: u64,
    /// Why it is malformed: a line of it is not UTF-8.
    bad: Option<String>,
}

impl Paragraph {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.bad.is_none()
    }

    fn start(&mut self, line: u64) {
        if self.is_empty() {
            self.first_line = line;
        }
    }

    fn record(self) -> Record {
        match self.bad {
            Some(what) => Record::Malformed {
                position: format!("line {}", self.first_line),
                what,
            },
            None => Record::Text(self.text),
        }
    }
}

/// Characters of a reader's message kept (a Parquet error quotes the whole bad value).
const MESSAGE_CHARS: usize = 200;

/// `message`, cut to [`MESSAGE_CHARS`] characters.
fn clip(message: String) -> String {
    match message.char_indices().nth(MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message,
    }
}

/// Run `f`, a call into the Parquet reader, turning its errors and panics into messages:
/// a damaged file must not take the process down.
fn guarded<T>(f: impl FnOnce() -> parquet::errors::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(clip(e.to_string())),
        Err(panic) => Err(clip(format!(
            "the Parquet reader panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        ))),
    }
}

/// The rows of a Parquet file, row group by row group. A row that cannot be decoded
/// (invalid UTF-8 in a string column, a damaged page) is malformed, and the rest of its
/// row group, which the reader cannot reach past it, is a break; the next row group is
/// read again. A file without a readable footer is not Parquet (an error).
fn read_parquet(
    path: &Path,
    limit: u64,
    count: &mut ReadCount,
    each: &mut impl FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |what: String| PrepareError::Data(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if file.metadata().map(|m| m.len()).ok() == Some(0) {
        return Ok(());
    }
    let reader = guarded(|| SerializedFileReader::new(file))
        .map_err(|e| bad(format!("not Parquet: {e}")))?;
    // Rows of the file before the current row group.
    let mut before = 0u64;
    for g in 0..reader.num_row_groups() {
        let group_rows = u64::try_from(reader.metadata().row_group(g).num_rows()).unwrap_or(0);
        let group = guarded(|| reader.get_row_group(g));
        let rows = group
            .as_ref()
            .map_err(String::clone)
            .and_then(|group| guarded(|| group.get_row_iter(None)));
        let mut rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                count.broke(
                    None,
                    format!("row group {}: {e}; its {group_rows} rows skipped", g + 1),
                );
                before += group_rows;
                continue;
            }
        };
        let mut done = 0u64;
        loop {
            if count.records >= limit {
                return Ok(());
            }
            let row = guarded(|| rows.next().transpose())
                .and_then(|row| row.map(|r| guarded(|| Ok(r.to_json_value()))).transpose());
            let value = match row {
                Ok(Some(value)) => value,
                Ok(None) => break,
                Err(e) => {
                    done += 1;
                    count.records += 1;
                    each(Record::Malformed {
                        position: format!("row {}", before + done),
                        what: e.clone(),
                    })?;
                    let lost = group_rows.saturating_sub(done);
                    if lost > 0 {
                        count.broke(
                            None,
                            format!(
                                "row group {}: its last {lost} rows are unreadable after row {}: {e}",
                                g + 1,
                                before + done
                            ),
                        );
                    }
                    break;
                }
            };
            done += 1;
            count.records += 1;
            each(Record::Json {
                value,
                position: format!("row {}", before + done),
            })?;
        }
        before += group_rows.max(done);
    }
    Ok(())
}

/// Call `each` with the records of the file at `path`, in `format`, at most `limit` of
/// them; an error from `each` stops the reading and is returned. Errors name the file;
/// the source's name is added by the caller.
pub(crate) fn each_record(
    path: &Path,
    format: SourceFormat,
    quality_minimum: Option<f64>,
    limit: u64,
    mut each: impl FnMut(Record) -> Result<(), PrepareError>,
) -> Result<ReadCount, PrepareError> {
    let mut count = ReadCount::default();
    match format {
        SourceFormat::Parquet => read_parquet(path, limit, &mut count, &mut each)?,
        SourceFormat::Jsonl | SourceFormat::JsonlZst => {
            let mut lines = Lines::new(open_reader(path, format)?);
            while count.records < limit {
                let (number, line) = match lines.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(LineBreak { offset, error }) => {
                        count.broke(Some(offset), error.to_string());
                        break;
                    }
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record = json_bytes_record(line, "line", format!("line {number}"));
                count.records += 1;
                each(record)?;
            }
        }
        SourceFormat::Json | SourceFormat::AlpacaJson => {
            let mut array = JsonArray::new(open_reader(path, format)?);
            while count.records < limit {
                let record = match array.next_element() {
                    Ok(Some((n, bytes))) => {
                        json_bytes_record(bytes.trim_ascii(), "element", format!("element {n}"))
                    }
                    Ok(None) => break,
                    Err(ArrayStop::NotArray(what)) => {
                        return Err(PrepareError::Data(format!(
                            "{}: not a JSON array of records: {what}",
                            path.display()
                        )));
                    }
                    Err(ArrayStop::Broken { offset, error }) => {
                        count.broke(Some(offset), error);
                        break;
                    }
                };
                count.records += 1;
                each(record)?;
            }
        }
        SourceFormat::Text => {
            let mut lines = Lines::new(open_reader(path, format)?);
            let mut paragraph = Paragraph::default();
            loop {
                if count.records >= limit {
                    paragraph = Paragraph::default();
                    break;
                }
                let (number, line) = match lines.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(LineBreak { offset, error }) => {
                        // The paragraph the break cut is incomplete: not a record.
                        paragraph = Paragraph::default();
                        count.broke(Some(offset), error.to_string());
                        break;
                    }
                };
                let line = match std::str::from_utf8(line) {
                    Ok(line) => line,
                    Err(e) => {
                        paragraph.start(number);
                        paragraph.bad.get_or_insert_with(|| {
                            format!("invalid UTF-8 at byte {} of line {number}", e.valid_up_to())
                        });
                        continue;
                    }
                };
                if line.trim().is_empty() || is_wikitext_article_heading(line) {
                    if !paragraph.is_empty() {
                        count.records += 1;
                        each(std::mem::take(&mut paragraph).record())?;
                    }
                    if !line.trim().is_empty() {
                        paragraph.start(number);
                        paragraph.text.push_str(line.trim());
                        paragraph.text.push('\n');
                    }
                } else {
                    paragraph.start(number);
                    paragraph.text.push_str(line);
                    paragraph.text.push('\n');
                }
            }
            if !paragraph.is_empty() {
                count.records += 1;
                each(paragraph.record())?;
            }
        }
        SourceFormat::StackexchangeXml => {
            let threads = stackexchange::read_threads(open_reader(path, format)?, quality_minimum);
            count.malformed_rows = threads.malformed;
            count.first_malformed_row = threads.first_malformed_at;
            let before_break = threads.threads.len() as u64;
            for t in threads.threads {
                if count.records >= limit {
                    break;
                }
                count.records += 1;
                each(Record::Thread(t))?;
            }
            if let Some(b) = threads.broken {
                count.breaks.push(Break {
                    records: before_break,
                    byte_offset: Some(b.byte_offset),
                    error: b.error,
                });
            }
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

/// Where a break is, for messages.
fn break_place(b: &Break, format: SourceFormat) -> String {
    match b.byte_offset {
        Some(offset) if format == SourceFormat::JsonlZst => format!(
            "at byte {offset} of the decompressed stream, after {} records",
            b.records
        ),
        Some(offset) => format!("at byte {offset}, after {} records", b.records),
        None => format!("after {} records", b.records),
    }
}

/// A malformed record of `file`: with `onError: fail` an error naming it; otherwise
/// counted (with `example` as its text), the first few named in the log.
fn malformed(
    report: &mut PrepareReport,
    source: &Source,
    file: &str,
    position: &str,
    what: &str,
    example: &str,
) -> Result<(), PrepareError> {
    if source.on_error == OnError::Fail {
        return Err(PrepareError::Data(format!(
            "{file}: {position}: {what} (onError: fail)"
        )));
    }
    report.drop_document(&source.name, DropReason::Malformed, example);
    if report.dropped_for(DropReason::Malformed) <= REPORTED_MALFORMED {
        tracing::warn!(source = %source.name, file, %position, "{what}; skipped");
    }
    Ok(())
}

/// A document from one JSON record: `None` when it is malformed or below the quality
/// threshold (counted either way).
fn json_doc(
    source: &Source,
    file: &str,
    index: usize,
    record: serde_json::Value,
    position: &str,
    report: &mut PrepareReport,
) -> Result<Option<Doc>, PrepareError> {
    let Some(text) = dotted(&record, &source.text_field).and_then(|t| t.as_str()) else {
        let what = format!("no string at {:?}", source.text_field);
        malformed(report, source, file, position, &what, "")?;
        return Ok(None);
    };
    let text = text.to_string();
    if let Some(q) = &source.quality {
        match quality_value(&record, q) {
            Some(v) if v >= q.minimum => {}
            _ => {
                report.drop_document(&source.name, DropReason::QualityThreshold, &text);
                return Ok(None);
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
    Ok(Some(Doc {
        source: index,
        text,
        url,
        record: None,
    }))
}

/// An instruction document from one JSON record: `None` when it is malformed or has an
/// empty instruction or output (counted either way).
fn instruction_doc(
    source: &Source,
    file: &str,
    index: usize,
    value: serde_json::Value,
    position: &str,
    report: &mut PrepareReport,
) -> Result<Option<Doc>, PrepareError> {
    match instruction::parse(&value) {
        Ok((rec, placeholder)) => {
            if placeholder {
                report.normalize(Normalization::PlaceholderInput);
            }
            // Dedup and decontamination compare the record's own words; the template,
            // shared by every record, would make them all look alike.
            let text = format!("{}\n\n{}\n\n{}", rec.instruction, rec.input, rec.output);
            Ok(Some(Doc {
                source: index,
                text,
                url: None,
                record: Some(rec),
            }))
        }
        Err(reject) => {
            let text = value
                .get("instruction")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if reject == instruction::Reject::Malformed {
                let what = "not an object with string instruction and output (and input)";
                malformed(report, source, file, position, what, text)?;
            } else {
                report.drop_document(&source.name, reject.reason(), text);
            }
            Ok(None)
        }
    }
}

/// Read one source file into `docs`, as text documents or (`instruction_mode`)
/// instruction records, at most `limit` records. A file that breaks off is listed in the
/// report's `brokenFiles` (an error with `onError: fail`) under `label`, the name the
/// user gave it (a downloaded object's URI, not its local copy). Messages name the file by
/// `path`: for a downloaded object, the local copy, which the caller names.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_source(
    path: &Path,
    label: &str,
    index: usize,
    source: &Source,
    instruction_mode: bool,
    limit: Option<u64>,
    report: &mut PrepareReport,
    docs: &mut Batcher,
) -> Result<(), PrepareError> {
    let name = source.name.as_str();
    let file = path.display().to_string();
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
    let strict = source.on_error == OnError::Fail;
    let quality_minimum = source.quality.as_ref().map(|q| q.minimum);
    let count = each_record(
        path,
        source.format,
        quality_minimum,
        limit.unwrap_or(u64::MAX),
        |record| {
            let doc = match record {
                Record::Malformed { position, what } => {
                    malformed(report, source, &file, &position, &what, "")?;
                    None
                }
                Record::Json { value, position } if instruction_mode => {
                    instruction_doc(source, &file, index, value, &position, report)?
                }
                Record::Json { value, position } => {
                    json_doc(source, &file, index, value, &position, report)?
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
            Ok(())
        },
    )
    .map_err(|e| e.context(format!("source {name}")))?;
    if count.malformed_rows > 0 {
        if strict {
            return Err(PrepareError::Data(format!(
                "source {name}: {file}: {} malformed rows, the first at byte {} (onError: fail)",
                count.malformed_rows,
                count.first_malformed_row.unwrap_or(0)
            )));
        }
        tracing::warn!(
            source = name,
            file,
            rows = count.malformed_rows,
            first_at_byte = count.first_malformed_row,
            "malformed rows skipped"
        );
        report.malformed_rows += count.malformed_rows;
    }
    for b in count.breaks {
        let place = break_place(&b, source.format);
        if strict {
            return Err(PrepareError::Data(format!(
                "source {name}: {file}: broke off {place}: {} (onError: fail)",
                b.error
            )));
        }
        tracing::warn!(
            source = name,
            file,
            "broke off {place}: {}; the records before the break are kept",
            b.error
        );
        report.broken_file(BrokenFile {
            source: name.to_string(),
            file: label.to_string(),
            records: b.records,
            byte_offset: b.byte_offset,
            error: b.error,
        });
    }
    report.record_read(name, count.records);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The elements of `text` read as a JSON array, as strings, and how it ended.
    fn elements(text: &[u8]) -> (Vec<String>, Option<String>) {
        let mut array = JsonArray::new(text);
        let mut out = Vec::new();
        loop {
            match array.next_element() {
                Ok(Some((n, bytes))) => {
                    assert_eq!(n as usize, out.len() + 1);
                    out.push(String::from_utf8_lossy(bytes.trim_ascii()).into_owned());
                }
                Ok(None) => return (out, None),
                Err(ArrayStop::NotArray(m)) => return (out, Some(format!("not an array: {m}"))),
                Err(ArrayStop::Broken { offset, error }) => {
                    return (out, Some(format!("{offset}: {error}")));
                }
            }
        }
    }

    #[test]
    fn json_arrays_split_at_top_level_commas_only() {
        let (e, end) =
            elements(b"\xEF\xBB\xBF [1, \"a,]\\\"\", {\"b\": [2, {\"c\": 3}]},, [[[]]] , \xFF ]\n");
        assert_eq!(
            e,
            [
                "1",
                "\"a,]\\\"\"",
                "{\"b\": [2, {\"c\": 3}]}",
                "",
                "[[[]]]",
                "\u{FFFD}"
            ]
        );
        assert_eq!(end, None);
        assert_eq!(elements(b"[]"), (vec![], None));
        assert_eq!(elements(b"[1,]"), (vec!["1".into()], None));
        assert_eq!(elements(b" \n\t"), (vec![], None));
        assert_eq!(elements(b""), (vec![], None));
        let deep = format!("[{}{}]", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(elements(deep.as_bytes()).0.len(), 1);
        assert_eq!(
            elements(b"{\"a\": 1}"),
            (
                vec![],
                Some("not an array: it starts with '{' at byte 0, not '['".into())
            )
        );
        assert_eq!(
            elements(b"[1, 2, {\"cut"),
            (
                vec!["1".into(), "2".into()],
                Some("12: the file ends inside the array, in element 3 (from byte 6)".into())
            )
        );
        assert_eq!(
            elements(b"[1] x"),
            (
                vec!["1".into()],
                Some("4: bytes after the end of the array".into())
            )
        );
    }

    /// A reader that fails after its bytes.
    struct Failing<'a>(&'a [u8]);

    impl std::io::Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("cut"));
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn lines_are_bytes_and_a_read_error_says_where() {
        let input = b"\xEF\xBB\xBFone\r\ntw\xFFo\n\nthree\rstill three\npartial";
        let mut lines = Lines::new(std::io::BufReader::new(Failing(input)));
        let mut seen = Vec::new();
        let broke = loop {
            match lines.next_line() {
                Ok(Some((n, l))) => seen.push((n, l.to_vec())),
                Ok(None) => break None,
                Err(b) => break Some((b.offset, b.error.to_string())),
            }
        };
        assert_eq!(
            seen,
            [
                (1, b"one".to_vec()),
                (2, b"tw\xFFo".to_vec()),
                (3, b"".to_vec()),
                (4, b"three\rstill three".to_vec())
            ]
        );
        assert_eq!(broke, Some((input.len() as u64, "cut".into())));
    }

    #[test]
    fn zstd_magic_numbers() {
        assert!(is_zstd(&[0x28, 0xB5, 0x2F, 0xFD, 0]));
        assert!(is_zstd(&[0x5A, 0x2A, 0x4D, 0x18]));
        assert!(!is_zstd(&[0x1F, 0x8B, 0x08]));
        assert!(!is_zstd(&[0x28, 0xB5]));
    }

    #[test]
    fn clipped_messages_end_in_an_ellipsis() {
        assert_eq!(clip("short".into()), "short");
        let long = "é".repeat(MESSAGE_CHARS + 1);
        assert_eq!(clip(long).chars().count(), MESSAGE_CHARS + 1);
    }

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
