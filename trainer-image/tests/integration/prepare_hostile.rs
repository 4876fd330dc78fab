//! `taper prepare` on hostile input, for every source format: invalid UTF-8, truncated
//! lines and files, wrong JSON types, deep nesting, a 20 MB record, control characters,
//! empty and blank files, and garbage behind a format's magic bytes. Nothing may crash;
//! each outcome is exact: records read and kept, the drop reason counted, the broken file
//! reported with its offset, and, with `onError: fail`, the error and its message.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use parquet::{
    data_type::{ByteArray, ByteArrayType},
    file::{properties::WriterProperties, writer::SerializedFileWriter},
    schema::parser::parse_message_type,
};
use serde_json::{Value, json};
use taper_crds::report::{DropReason, SourceStats, prepare::BrokenFile};
use taper_trainer::prepare::{self, PrepareError, Prepared};

use crate::common::{TempDir, all_rules_off, dataset, runtime};

/// A source of `format` reading `path`.
fn source(name: &str, path: &Path, format: &str) -> Value {
    json!({"name": name, "uri": format!("file://{}", path.display()), "format": format})
}

/// The same source with `onError: fail`.
fn strict(mut source: Value) -> Value {
    source["onError"] = json!("fail");
    source
}

/// Select the documents of `sources` (a pretraining Dataset with every rule off, no
/// MinHash and no decontamination, one test document).
fn select(sources: Vec<Value>) -> Result<Prepared, PrepareError> {
    prepare::select_documents(
        &runtime(),
        &dataset(json!({
            "sources": sources,
            "cleaning": all_rules_off(),
            "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
            "split": {"testSize": 1},
        })),
    )
}

/// Select the records of an instruction Dataset of `sources`.
fn select_instructions(sources: Vec<Value>) -> Result<Prepared, PrepareError> {
    prepare::select_documents(
        &runtime(),
        &dataset(json!({
            "format": "instruction",
            "sources": sources,
            "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
            "split": {"testSize": 1},
        })),
    )
}

/// The accounting of a source that read `read` records, kept `kept` and dropped the rest
/// for `dropped`.
fn stats(read: u64, kept: u64, dropped: &[(DropReason, u64)]) -> SourceStats {
    SourceStats {
        read,
        kept,
        dropped: dropped.iter().copied().collect::<BTreeMap<_, _>>(),
    }
}

/// Kept documents, train and test.
fn kept(p: &Prepared) -> Vec<&String> {
    p.train.iter().chain(&p.test).collect()
}

/// A distinct, well-formed document text.
fn text(i: usize) -> String {
    format!("Record {i} of the hostile corpus is a plain sentence about thing number {i}.")
}

/// A JSON line of [`text`].
fn line(i: usize) -> Vec<u8> {
    json!({"text": text(i)}).to_string().into_bytes()
}

/// Lines joined with `\n`, ending with one.
fn lines(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// Write `bytes` to `name` in `tmp`.
fn write(tmp: &TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = tmp.path().join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

/// A `good` source of 3 JSON lines, for Datasets whose hostile source keeps nothing.
fn good_source(tmp: &TempDir) -> Value {
    let path = write(
        tmp,
        "good.jsonl",
        &lines(&[line(1001), line(1002), line(1003)]),
    );
    source("good", &path, "jsonl")
}

/// `{"text": "<text>"}` with `bad` bytes (not UTF-8) in the middle of the text.
fn invalid_utf8_line(i: usize, bad: &[u8]) -> Vec<u8> {
    let mut l = br#"{"text": "caf"#.to_vec();
    l.extend_from_slice(bad);
    l.extend_from_slice(format!(" {}\"}}", text(i)).as_bytes());
    l
}

/// Arrays nested `depth` deep, as text.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn jsonl_one_line_of_invalid_utf8_is_one_malformed_record() {
    let tmp = TempDir::new("hostile-utf8");
    let mut ls: Vec<Vec<u8>> = (1..=50).map(line).collect();
    ls[16] = invalid_utf8_line(17, &[0xE9]);
    let path = write(&tmp, "web.jsonl", &lines(&ls));

    let p = select(vec![source("web", &path, "jsonl")]).expect("one bad byte does not fail");
    assert_eq!(
        p.stats.sources["web"],
        stats(50, 49, &[(DropReason::Malformed, 1)])
    );
    assert!(p.stats.balanced());
    assert!(p.stats.broken_files.is_empty());
    assert!(kept(&p).iter().all(|d| !d.contains("Record 17 ")));

    let err = select(vec![strict(source("web", &path, "jsonl"))]).expect_err("strict");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert_eq!(err.exit_code(), 3);
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: line 17: invalid UTF-8 at byte 13 of the line (onError: fail)",
            path.display()
        )
    );
}

#[test]
fn jsonl_wrong_types_truncation_nesting_and_control_characters_are_malformed() {
    let tmp = TempDir::new("hostile-jsonl");
    let mut bom_line = b"\xEF\xBB\xBF".to_vec();
    bom_line.extend_from_slice(&line(1));
    let ls: Vec<Vec<u8>> = vec![
        bom_line,                                      // 1 kept: a BOM is not a byte of the record
        br#"{"text": 42}"#.to_vec(),                   // 2 malformed: a number
        br#"{"text": null}"#.to_vec(),                 // 3 malformed
        br#"{"text": ["a", "b"]}"#.to_vec(),           // 4 malformed
        br#"{"text": {"nested": "object"}}"#.to_vec(), // 5 malformed
        br#"[1, 2, 3]"#.to_vec(),                      // 6 malformed: not an object
        br#""just a string""#.to_vec(),                // 7 malformed
        b"null".to_vec(),                              // 8 malformed
        b"   ".to_vec(),                               // blank: not a record
        br#"{"text": "cut in the mid"#.to_vec(),       // 9 malformed: truncated
        nested(100_000).into_bytes(),                  // 10 malformed: too deep
        format!(r#"{{"text": {}}}"#, nested(100_000)).into_bytes(), // 11 malformed
        b"{\"text\": \"raw \x01 control\"}".to_vec(),  // 12 malformed: raw control character
        br#"{"text": "escaped \u0000 nul and \u0007 bell are text"}"#.to_vec(), // 13 kept
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage".to_vec(), // 14 malformed: gzip magic
        b"\t\r".to_vec(),                              // blank
        [line(2), b"\r".to_vec()].concat(),            // 15 kept: CRLF
        br#"{"text": "the URL is a number", "url": 7}"#.to_vec(), // 16 kept
    ];
    let path = write(&tmp, "web.jsonl", &lines(&ls));
    let mut src = source("web", &path, "jsonl");
    src["urlField"] = json!("url");
    let p = select(vec![src.clone()]).expect("hostile lines are skipped");
    assert_eq!(
        p.stats.sources["web"],
        stats(16, 4, &[(DropReason::Malformed, 12)])
    );
    assert!(p.stats.balanced());
    let docs = kept(&p);
    assert!(
        docs.iter()
            .any(|d| d.contains('\u{0}') && d.contains('\u{7}')),
        "escaped control characters are text (normalizeUnicode is off): {docs:?}"
    );
    assert!(docs.iter().any(|d| d.starts_with("Record 1 ")), "{docs:?}");

    // The first malformed line stops a strict source, with serde's reason.
    let err = select(vec![strict(src)]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: line 2: no string at \"text\" (onError: fail)",
            path.display()
        )
    );
    let deep = write(&tmp, "deep.jsonl", &lines(&[nested(100_000).into_bytes()]));
    let err = select(vec![strict(source("deep", &deep, "jsonl"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source deep: {}: line 1: not JSON: recursion limit exceeded at line 1 column 128 (onError: fail)",
            deep.display()
        )
    );
}

#[test]
fn a_20_mb_record_is_read_whole_in_every_text_format() {
    let tmp = TempDir::new("hostile-big");
    // 20 MB of words on one line (C4 drops any line with a word over 1,000 bytes).
    let big = (0..2_300_000)
        .map(|i| format!("w{i:07}"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(big.len() > 20_000_000);
    let jsonl = write(
        &tmp,
        "big.jsonl",
        &lines(&[json!({"text": big}).to_string().into_bytes()]),
    );
    let array = write(
        &tmp,
        "big.json",
        json!([{"text": big}]).to_string().as_bytes(),
    );
    let plain = write(&tmp, "big.txt", big.as_bytes());
    let zst = write(
        &tmp,
        "big.jsonl.zst",
        &zstd::stream::encode_all(std::fs::read(&jsonl).expect("read").as_slice(), 3)
            .expect("zstd"),
    );
    for (path, format) in [
        (jsonl, "jsonl"),
        (array, "json"),
        (plain, "text"),
        (zst, "jsonl.zst"),
    ] {
        let p =
            select(vec![source("big", &path, format)]).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(p.stats.sources["big"], stats(1, 1, &[]), "{format}");
        assert_eq!(p.train.len(), 1, "{format}");
        assert_eq!(p.train[0].trim_end(), big, "{format}");
    }
}

#[test]
fn empty_and_blank_files_have_no_records_in_any_format() {
    let tmp = TempDir::new("hostile-empty");
    let blank = b" \n\n\t \r\n\n";
    let mut sources = vec![good_source(&tmp)];
    for (i, format) in [
        "jsonl",
        "jsonl.zst",
        "json",
        "text",
        "parquet",
        "stackexchange-xml",
    ]
    .into_iter()
    .enumerate()
    {
        let empty = write(&tmp, &format!("empty{i}"), b"");
        sources.push(source(&format!("empty{i}"), &empty, format));
        if format != "parquet" && format != "jsonl.zst" {
            let path = write(&tmp, &format!("blank{i}"), blank);
            sources.push(source(&format!("blank{i}"), &path, format));
        }
    }
    // A zstd frame of blank lines.
    let path = write(
        &tmp,
        "blank.jsonl.zst",
        &zstd::stream::encode_all(&blank[..], 3).expect("zstd"),
    );
    sources.push(source("blankzst", &path, "jsonl.zst"));
    let names: Vec<String> = sources
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let p = select(sources.into_iter().map(strict).collect()).expect("empty files are fine");
    for name in &names[1..] {
        assert_eq!(p.stats.sources[name], stats(0, 0, &[]), "{name}");
    }
    assert_eq!(p.stats.sources["good"], stats(3, 3, &[]));
    assert!(p.stats.broken_files.is_empty());

    // A Dataset with nothing but an empty source has nothing to keep.
    let empty = tmp.path().join("empty0");
    let err = select(vec![source("web", &empty, "jsonl")]).expect_err("nothing left");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("invalid data: no document left after filtering: "),
        "{err}"
    );
}

/// Two zstd frames: `whole` lines, then `cut` lines of which only the first half of the
/// compressed frame is kept. Returns the file's bytes and the decompressed length of the
/// first frame.
fn truncated_zstd(whole: std::ops::Range<usize>, cut: std::ops::Range<usize>) -> (Vec<u8>, u64) {
    let first: Vec<Vec<u8>> = whole.map(line).collect();
    let first = lines(&first);
    let second: Vec<Vec<u8>> = cut.map(line).collect();
    let mut bytes = zstd::stream::encode_all(first.as_slice(), 3).expect("zstd");
    let second = zstd::stream::encode_all(lines(&second).as_slice(), 3).expect("zstd");
    bytes.extend_from_slice(&second[..second.len() / 2]);
    (bytes, first.len() as u64)
}

#[test]
fn a_truncated_zstd_file_keeps_the_records_before_the_break() {
    let tmp = TempDir::new("hostile-zst");
    let (bytes, offset) = truncated_zstd(1..31, 31..51);
    let path = write(&tmp, "web.jsonl.zst", &bytes);

    let p = select(vec![source("web", &path, "jsonl.zst")]).expect("lenient");
    assert_eq!(p.stats.sources["web"], stats(30, 30, &[]));
    assert_eq!(
        p.stats.broken_files,
        vec![BrokenFile {
            source: "web".into(),
            file: path.display().to_string(),
            records: 30,
            byte_offset: Some(offset),
            error: "incomplete frame".into(),
        }]
    );
    assert_eq!(p.stats.broken_files_total, 1);
    assert!(p.stats.balanced());

    let err = select(vec![strict(source("web", &path, "jsonl.zst"))]).expect_err("strict");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: broke off at byte {offset} of the decompressed stream, after 30 records: incomplete frame (onError: fail)",
            path.display()
        )
    );
}

#[test]
fn zstd_magic_followed_by_junk_is_a_broken_file_and_no_magic_is_not_zstd() {
    let tmp = TempDir::new("hostile-zst-junk");
    // A frame header descriptor with its reserved bit set, then noise.
    let mut junk = vec![0x28, 0xB5, 0x2F, 0xFD, 0xFF];
    junk.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    let path = write(&tmp, "junk.jsonl.zst", &junk);
    let p = select(vec![good_source(&tmp), source("junk", &path, "jsonl.zst")])
        .expect("a damaged file is skipped");
    assert_eq!(p.stats.sources["junk"], stats(0, 0, &[]));
    assert_eq!(p.stats.broken_files.len(), 1);
    let broken = &p.stats.broken_files[0];
    assert_eq!(
        (broken.source.as_str(), broken.records, broken.byte_offset),
        ("junk", 0, Some(0))
    );
    assert_eq!(broken.error, "Unsupported frame parameter");
    let err = select(vec![
        good_source(&tmp),
        strict(source("junk", &path, "jsonl.zst")),
    ])
    .expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source junk: {}: broke off at byte 0 of the decompressed stream, after 0 records: Unsupported frame parameter (onError: fail)",
            path.display()
        )
    );

    // Invalid UTF-8 inside a good frame is one malformed line, as in plain JSON lines.
    let mut ls: Vec<Vec<u8>> = (1..=5).map(line).collect();
    ls[2] = invalid_utf8_line(3, &[0xC3, 0x28]);
    let path = write(
        &tmp,
        "utf8.jsonl.zst",
        &zstd::stream::encode_all(lines(&ls).as_slice(), 3).expect("zstd"),
    );
    let p = select(vec![source("web", &path, "jsonl.zst")]).expect("lenient");
    assert_eq!(
        p.stats.sources["web"],
        stats(5, 4, &[(DropReason::Malformed, 1)])
    );

    // A file without the magic is not zstd at all: a wrong format, in both modes.
    for bytes in [
        lines(&[line(1)]),
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03gzip, not zstd".to_vec(),
        b"\x28\xB5".to_vec(),
    ] {
        let path = write(&tmp, "plain.jsonl.zst", &bytes);
        let err = select(vec![source("web", &path, "jsonl.zst")]).expect_err("not zstd");
        assert!(matches!(err, PrepareError::Data(_)), "{err}");
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid data: source web: {}: not zstd: it starts with bytes {}, not a zstd frame (28 b5 2f fd)",
                path.display(),
                head.join(" ")
            )
        );
    }
}

#[test]
fn gzip_magic_in_a_jsonl_file_is_malformed_lines() {
    let tmp = TempDir::new("hostile-gz");
    let mut bytes = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xfe junk\n".to_vec();
    bytes.extend_from_slice(&lines(&[line(1)]));
    bytes.extend_from_slice(b"\x1f\x8b more junk \x80\x81");
    let path = write(&tmp, "web.jsonl", &bytes);
    let p = select(vec![source("web", &path, "jsonl")]).expect("lenient");
    assert_eq!(
        p.stats.sources["web"],
        stats(3, 1, &[(DropReason::Malformed, 2)])
    );
}

/// A JSON array's text from its elements' bytes.
fn array(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"[\n".to_vec();
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        out.extend_from_slice(e);
    }
    out.extend_from_slice(b"\n]\n");
    out
}

#[test]
fn json_array_elements_fail_one_at_a_time() {
    let tmp = TempDir::new("hostile-json");
    let elements: Vec<Vec<u8>> = vec![
        line(1),                                                     // 1 kept
        invalid_utf8_line(2, &[0xFF]),                               // 2 malformed
        br#"{"text": 42}"#.to_vec(),                                 // 3 malformed
        nested(100_000).into_bytes(),                                // 4 malformed: too deep
        br#"{"text": "a ] and a , and a \" in a string"}"#.to_vec(), // 5 kept
        br#""a string""#.to_vec(),                                   // 6 malformed
        b"{\"text\": \"raw \x07 bell\"}".to_vec(),                   // 7 malformed
        Vec::new(),                             // 8 malformed: nothing between commas
        br#"{"text": "unbalanced" ]"#.to_vec(), // 9 malformed
        line(3),                                // 10 kept
    ];
    let path = write(&tmp, "web.json", &array(&elements));
    let p = select(vec![source("web", &path, "json")]).expect("lenient");
    assert_eq!(
        p.stats.sources["web"],
        stats(10, 3, &[(DropReason::Malformed, 7)])
    );
    assert!(p.stats.broken_files.is_empty());
    assert!(
        kept(&p)
            .iter()
            .any(|d| d.starts_with("a ] and a , and a \" in a string")),
        "{:?}",
        kept(&p)
    );
    let err = select(vec![strict(source("web", &path, "json"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: element 2: invalid UTF-8 at byte 13 of the element (onError: fail)",
            path.display()
        )
    );

    // Not an array at all: a wrong format, in both modes.
    let path = write(&tmp, "object.json", &line(1));
    let err = select(vec![source("web", &path, "json")]).expect_err("not an array");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: not a JSON array of records: it starts with '{{' at byte 0, not '['",
            path.display()
        )
    );
}

#[test]
fn a_truncated_json_array_keeps_the_elements_before_the_cut() {
    let tmp = TempDir::new("hostile-json-cut");
    let mut bytes = array(&[line(1), line(2), line(3)]);
    let cut = bytes.len() - 20;
    bytes.truncate(cut);
    let path = write(&tmp, "web.json", &bytes);
    // Element 3 starts after the comma that replaces the `\n]\n` of a 2-element array.
    let third = array(&[line(1), line(2)]).len() as u64 - 2;
    let p = select(vec![source("web", &path, "json")]).expect("lenient");
    assert_eq!(p.stats.sources["web"], stats(2, 2, &[]));
    let error = format!("the file ends inside the array, in element 3 (from byte {third})");
    assert_eq!(
        p.stats.broken_files,
        vec![BrokenFile {
            source: "web".into(),
            file: path.display().to_string(),
            records: 2,
            byte_offset: Some(cut as u64),
            error: error.clone(),
        }]
    );
    let err = select(vec![strict(source("web", &path, "json"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: broke off at byte {cut}, after 2 records: {error} (onError: fail)",
            path.display()
        )
    );

    // Bytes after the closing bracket: every element is kept, the file is reported.
    let mut bytes = array(&[line(1), line(2)]);
    let end = bytes.len() as u64;
    bytes.extend_from_slice(b"\x00\xffjunk");
    let path = write(&tmp, "tail.json", &bytes);
    let p = select(vec![source("web", &path, "json")]).expect("lenient");
    assert_eq!(p.stats.sources["web"], stats(2, 2, &[]));
    assert_eq!(p.stats.broken_files[0].byte_offset, Some(end));
    assert_eq!(
        p.stats.broken_files[0].error,
        "bytes after the end of the array"
    );
}

#[test]
fn alpaca_records_of_the_wrong_shape_are_malformed() {
    let tmp = TempDir::new("hostile-alpaca");
    let record = |i: usize| {
        json!({"instruction": format!("Say thing {i}."), "input": "", "output": text(i)})
            .to_string()
            .into_bytes()
    };
    let mut bad_utf8 = br#"{"instruction": "Say it", "input": "", "output": "caf"#.to_vec();
    bad_utf8.extend_from_slice(b"\xE9\"}");
    let elements = vec![
        record(1),                                                                      // kept
        bad_utf8,                                                                       // malformed
        br#"{"instruction": 7, "output": "seven"}"#.to_vec(),                           // malformed
        br#"{"instruction": "Input is a list", "input": [1], "output": "x"}"#.to_vec(), // malformed
        br#"["instruction", "output"]"#.to_vec(),                                       // malformed
        nested(100_000).into_bytes(),                                                   // malformed
        br#"{"instruction": "", "output": "no instruction"}"#.to_vec(), // emptyInstruction
        record(2),                                                      // kept
    ];
    let path = write(&tmp, "alpaca.json", &array(&elements));
    let p = select_instructions(vec![source("alpaca", &path, "alpaca-json")]).expect("lenient");
    assert_eq!(
        p.stats.sources["alpaca"],
        stats(
            8,
            2,
            &[
                (DropReason::Malformed, 5),
                (DropReason::EmptyInstruction, 1)
            ]
        )
    );
    assert_eq!(p.train_records.len() + p.test_records.len(), 2);
    let err = select_instructions(vec![strict(source("alpaca", &path, "alpaca-json"))])
        .expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source alpaca: {}: element 2: invalid UTF-8 at byte 53 of the element (onError: fail)",
            path.display()
        )
    );
}

#[test]
fn a_text_paragraph_with_invalid_utf8_is_one_malformed_document() {
    let tmp = TempDir::new("hostile-text");
    let mut bytes = Vec::new();
    for i in 1..=5 {
        bytes.extend_from_slice(text(i).as_bytes());
        bytes.extend_from_slice(b"\nA second line of the paragraph.\n");
        if i == 3 {
            bytes.extend_from_slice(b"bad \xC0\xAF byte\n");
        }
        bytes.extend_from_slice(b"\n");
    }
    // Control characters are text; a lone CR ends no line.
    bytes.extend_from_slice(b"nul \x00 bell \x07 escape \x1b[31m carriage\rreturn\n");
    let path = write(&tmp, "book.txt", &bytes);
    let p = select(vec![source("book", &path, "text")]).expect("lenient");
    assert_eq!(
        p.stats.sources["book"],
        stats(6, 5, &[(DropReason::Malformed, 1)])
    );
    assert!(kept(&p).iter().all(|d| !d.contains("Record 3 ")));
    assert!(
        kept(&p)
            .iter()
            .any(|d| d.contains('\u{0}') && d.contains('\u{1b}')),
        "{:?}",
        kept(&p)
    );
    let err = select(vec![strict(source("book", &path, "text"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source book: {}: line 7: invalid UTF-8 at byte 4 of line 9 (onError: fail)",
            path.display()
        )
    );
}

/// A Parquet file of one optional UTF-8 column `text` (values as raw bytes, so they can
/// be invalid UTF-8; `None` is null), `per_group` rows per row group, uncompressed.
fn write_parquet(path: &Path, rows: &[Option<Vec<u8>>], per_group: usize) {
    let schema = Arc::new(
        parse_message_type("message doc { OPTIONAL BYTE_ARRAY text (UTF8); }").expect("schema"),
    );
    let props = Arc::new(WriterProperties::builder().build());
    let file = std::fs::File::create(path).expect("create");
    let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
    for group in rows.chunks(per_group) {
        let mut rg = writer.next_row_group().expect("row group");
        let mut col = rg.next_column().expect("column").expect("text");
        let values: Vec<ByteArray> = group
            .iter()
            .filter_map(|r| r.clone().map(ByteArray::from))
            .collect();
        let defs: Vec<i16> = group.iter().map(|r| i16::from(r.is_some())).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .expect("write");
        col.close().expect("close column");
        rg.close().expect("close row group");
    }
    writer.close().expect("close");
}

#[test]
fn a_parquet_row_with_invalid_utf8_is_malformed_and_its_row_group_broken() {
    let tmp = TempDir::new("hostile-parquet");
    let mut rows: Vec<Option<Vec<u8>>> = (1..=10).map(|i| Some(text(i).into_bytes())).collect();
    rows[2] = Some(b"caf\xE9 au lait".to_vec());
    rows[7] = None; // a null text: malformed, the row group reads on
    let path = tmp.path().join("web.parquet");
    write_parquet(&path, &rows, 5);

    let p = select(vec![source("web", &path, "parquet")]).expect("lenient");
    // Group 1: rows 1-2 kept, row 3 malformed, rows 4-5 unreachable; group 2: rows 6-10,
    // row 8 null.
    assert_eq!(
        p.stats.sources["web"],
        stats(8, 6, &[(DropReason::Malformed, 2)])
    );
    assert_eq!(p.stats.broken_files.len(), 1);
    let broken = &p.stats.broken_files[0];
    assert_eq!(
        (broken.records, broken.byte_offset),
        (3, None),
        "{broken:?}"
    );
    // The reader quotes the bad value; its message is cut to 200 characters.
    let reason = "Parquet error: Error reading BYTE_ARRAY as String. Bytes: [99, 97, 102, 233, 32, 97, 117, 32, 108, 97, 105, 116] Error: FromUtf8Error { bytes: [99, 97, 102, 233, 32, 97, 117, 32, 108, 97, 105, 116], e…";
    assert_eq!(
        broken.error,
        format!("row group 1: its last 2 rows are unreadable after row 3: {reason}")
    );
    assert!(p.stats.balanced());

    let err = select(vec![strict(source("web", &path, "parquet"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source web: {}: row 3: {reason} (onError: fail)",
            path.display()
        )
    );
}

#[test]
fn a_truncated_or_fake_parquet_file_is_not_parquet() {
    let tmp = TempDir::new("hostile-parquet-cut");
    let rows: Vec<Option<Vec<u8>>> = (1..=10).map(|i| Some(text(i).into_bytes())).collect();
    let whole = tmp.path().join("whole.parquet");
    write_parquet(&whole, &rows, 5);
    let bytes = std::fs::read(&whole).expect("read");
    let cut = write(&tmp, "cut.parquet", &bytes[..bytes.len() / 2]);
    let mut fake = b"PAR1".to_vec();
    fake.extend((0..300u32).map(|i| (i * 91 % 256) as u8));
    fake.extend_from_slice(&[0x10, 0, 0, 0]);
    fake.extend_from_slice(b"PAR1");
    let fake = write(&tmp, "fake.parquet", &fake);
    for (path, reason) in [
        (cut, "Invalid Parquet file. Corrupt footer"),
        (fake, "Required field version is missing"),
    ] {
        for src in [
            source("web", &path, "parquet"),
            strict(source("web", &path, "parquet")),
        ] {
            let err = select(vec![good_source(&tmp), src]).expect_err("no footer");
            assert!(matches!(err, PrepareError::Data(_)), "{err}");
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid data: source web: {}: not Parquet: Parquet error: {reason}",
                    path.display()
                )
            );
        }
    }
}

/// A StackExchange dump of `rows` (each a `<row …/>`), inside `<posts>`.
fn posts(rows: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<posts>\r\n".to_vec();
    for r in rows {
        out.extend_from_slice(b"  ");
        out.extend_from_slice(r);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"</posts>\r\n");
    out
}

fn question(id: usize) -> Vec<u8> {
    format!(
        r#"<row Id="{id}" PostTypeId="1" Score="3" Title="Question {id}" Body="&lt;p&gt;{}&lt;/p&gt;" />"#,
        text(id)
    )
    .into_bytes()
}

fn answer(id: usize, parent: usize) -> Vec<u8> {
    format!(r#"<row Id="{id}" PostTypeId="2" ParentId="{parent}" Score="1" Body="Answer {id}." />"#)
        .into_bytes()
}

#[test]
fn stackexchange_rows_with_invalid_utf8_are_malformed_rows() {
    let tmp = TempDir::new("hostile-xml");
    let mut bad = br#"<row Id="3" PostTypeId="1" Score="3" Title="Bad" Body="caf"#.to_vec();
    bad.extend_from_slice(b"\xE9\" />");
    let rows = vec![
        question(1),
        answer(2, 1),
        bad,
        question(4),
        br#"<row Id="5" PostTypeId="1" Score="2" Title="Bell" Body="bell &#7; raw "#
            .to_vec()
            .into_iter()
            .chain(b"\x01 control\" />".iter().copied())
            .collect(),
        br#"<row Id="x" PostTypeId="1" />"#.to_vec(),
    ];
    let bytes = posts(&rows);
    let first_bad = bytes
        .windows(11)
        .position(|w| w == b"<row Id=\"3\"")
        .expect("row 3");
    let path = write(&tmp, "posts.xml", &bytes);
    let p = select(vec![source("qa", &path, "stackexchange-xml")]).expect("lenient");
    assert_eq!(p.stats.sources["qa"], stats(3, 3, &[]));
    assert_eq!(p.stats.malformed_rows, 2);
    assert!(p.stats.broken_files.is_empty());
    assert!(
        kept(&p).iter().any(|d| d.contains('\u{1}')),
        "a raw control character is text: {:?}",
        kept(&p)
    );
    let err = select(vec![strict(source("qa", &path, "stackexchange-xml"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source qa: {}: 2 malformed rows, the first at byte {first_bad} (onError: fail)",
            path.display()
        )
    );
}

#[test]
fn a_truncated_stackexchange_dump_keeps_the_threads_before_the_cut() {
    let tmp = TempDir::new("hostile-xml-cut");
    let rows = vec![question(1), answer(2, 1), question(3), question(4)];
    let whole = posts(&rows);
    let fourth = whole
        .windows(11)
        .position(|w| w == b"<row Id=\"4\"")
        .expect("row 4");
    // Cut inside the fourth row's tag.
    let path = write(&tmp, "cut.xml", &whole[..fourth + 20]);
    let p = select(vec![source("qa", &path, "stackexchange-xml")]).expect("lenient");
    assert_eq!(p.stats.sources["qa"], stats(2, 2, &[]));
    assert_eq!(p.stats.broken_files.len(), 1);
    let broken = &p.stats.broken_files[0];
    assert_eq!(
        (broken.records, broken.byte_offset),
        (2, Some(fourth as u64)),
        "{broken:?}"
    );
    let error = "XML error: syntax error: tag not closed: `>` not found before end of input";
    assert_eq!(broken.error, error);
    let err = select(vec![strict(source("qa", &path, "stackexchange-xml"))]).expect_err("strict");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid data: source qa: {}: broke off at byte {fourth}, after 2 records: {error} (onError: fail)",
            path.display()
        )
    );

    // Cut between rows: no XML error, but `</posts>` never comes.
    let end = whole
        .windows(8)
        .position(|w| w == b"</posts>")
        .expect("end");
    let path = write(&tmp, "open.xml", &whole[..end]);
    let p = select(vec![source("qa", &path, "stackexchange-xml")]).expect("lenient");
    assert_eq!(p.stats.sources["qa"], stats(3, 3, &[]));
    assert_eq!(
        p.stats.broken_files[0].error,
        "the file ends inside 1 open element(s) (truncated?)"
    );
    assert_eq!(p.stats.broken_files[0].byte_offset, Some(end as u64));
}

#[test]
fn stackexchange_garbage_and_deep_nesting_do_not_crash() {
    let tmp = TempDir::new("hostile-xml-junk");
    // The XML declaration followed by junk.
    let mut junk = b"<?xml version=\"1.0\"?>\n<posts>\n".to_vec();
    junk.extend_from_slice(&question(1));
    junk.extend_from_slice(b"\n\x00\xff<<<>>>&&& </nope>");
    let path = write(&tmp, "junk.xml", &junk);
    let p = select(vec![source("qa", &path, "stackexchange-xml")]).expect("lenient");
    assert_eq!(p.stats.sources["qa"], stats(1, 1, &[]));
    // quick-xml takes `<<<>` for a tag and the bytes after it for text; the first `&` breaks it.
    assert_eq!(
        p.stats.broken_files,
        vec![BrokenFile {
            source: "qa".into(),
            file: path.display().to_string(),
            records: 1,
            byte_offset: Some(junk.len() as u64 - "&&& </nope>".len() as u64),
            error: "XML error: ill-formed document: entity or character reference not closed: `;` not found before end of input".into(),
        }]
    );

    // 100,000 nested elements around a row.
    let depth = 100_000;
    let mut deep = b"<posts>".to_vec();
    deep.extend_from_slice(&b"<a>".repeat(depth));
    deep.extend_from_slice(&question(1));
    deep.extend_from_slice(&b"</a>".repeat(depth));
    deep.extend_from_slice(b"</posts>");
    let path = write(&tmp, "deep.xml", &deep);
    let p = select(vec![source("qa", &path, "stackexchange-xml")]).expect("deep");
    assert_eq!(p.stats.sources["qa"], stats(1, 1, &[]));
    assert!(p.stats.broken_files.is_empty());
}
