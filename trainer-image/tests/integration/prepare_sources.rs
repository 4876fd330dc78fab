//! `taper prepare` sources beyond local JSON: Parquet files (written here with the parquet
//! crate in the Hugging Face layout: flat UTF-8 columns), folders and globs, and HTTP
//! downloads that retry and resume after a connection is cut.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::Path,
    sync::{Arc, Mutex},
};

use parquet::{
    basic::Compression,
    data_type::{ByteArray, ByteArrayType},
    file::{properties::WriterProperties, writer::SerializedFileWriter},
    schema::parser::parse_message_type,
};
use serde_json::{Value, json};
use taper_crds::report::DropReason;
use taper_trainer::prepare::{self, PrepareError};

use crate::common::{TempDir, all_rules_off, dataset, runtime, shared};

fn web_from(uri: &str, format: &str, url_field: &str) -> taper_crds::Dataset {
    dataset(json!({
        "sources": [{"name": "web", "uri": uri, "format": format, "urlField": url_field}],
        "cleaning": all_rules_off(),
        "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
        "split": {"testSize": 0.05},
    }))
}

/// Write `rows` (each a value per column, `None` for null) to a Snappy-compressed Parquet
/// file of optional UTF-8 columns, `rows_per_group` rows per row group.
fn write_parquet(
    path: &Path,
    columns: &[&str],
    rows: &[Vec<Option<String>>],
    rows_per_group: usize,
) {
    let fields: String = columns
        .iter()
        .map(|c| format!("OPTIONAL BYTE_ARRAY {c} (UTF8);"))
        .collect();
    let schema =
        Arc::new(parse_message_type(&format!("message doc {{ {fields} }}")).expect("schema"));
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).expect("create parquet");
    let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
    for group in rows.chunks(rows_per_group) {
        let mut rg = writer.next_row_group().expect("row group");
        let mut c = 0;
        while let Some(mut col) = rg.next_column().expect("column") {
            let values: Vec<ByteArray> = group
                .iter()
                .filter_map(|r| r[c].as_deref().map(ByteArray::from))
                .collect();
            let defs: Vec<i16> = group.iter().map(|r| i16::from(r[c].is_some())).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .expect("write column");
            col.close().expect("close column");
            c += 1;
        }
        rg.close().expect("close row group");
    }
    writer.close().expect("close parquet");
}

fn web_records(data: &Path) -> Vec<Value> {
    std::fs::read_to_string(data.join("webtext-sample.jsonl"))
        .expect("web sample")
        .lines()
        .map(|l| serde_json::from_str(l).expect("sample line is JSON"))
        .collect()
}

#[test]
fn parquet_reads_like_json_lines() {
    let Some(data) = shared() else { return };
    let tmp = TempDir::new("parquet");
    let rows: Vec<Vec<Option<String>>> = web_records(&data)
        .iter()
        .map(|r| {
            vec![
                r["text"].as_str().map(str::to_string),
                r["metadata"]["url"].as_str().map(str::to_string),
            ]
        })
        .collect();
    let file = tmp.path().join("web.parquet");
    write_parquet(&file, &["text", "url"], &rows, 200);

    let local = prepare::select_documents(
        &runtime(),
        &web_from(
            &format!("file://{}", data.join("webtext-sample.jsonl").display()),
            "jsonl",
            "metadata.url",
        ),
    )
    .expect("jsonl");
    let p = prepare::select_documents(
        &runtime(),
        &web_from(&format!("file://{}", file.display()), "parquet", "url"),
    )
    .expect("parquet");
    assert_eq!(p.stats.documents_read, 697);
    assert_eq!(p.stats.dropped, local.stats.dropped);
    assert_eq!(p.train, local.train);
    assert_eq!(p.test, local.test);

    // A file that is not Parquet is an error naming it.
    let bad = tmp.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 but not really").expect("write");
    let err = prepare::select_documents(
        &runtime(),
        &web_from(&format!("file://{}", bad.display()), "parquet", "url"),
    )
    .expect_err("not parquet");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert!(err.to_string().contains("bad.parquet"), "{err}");
}

#[test]
fn alpaca_parquet_becomes_instruction_examples() {
    let Some(data) = shared() else { return };
    let tmp = TempDir::new("alpaca-parquet");
    let records: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(data.join("alpaca-sample.json")).expect("alpaca sample"),
    )
    .expect("alpaca JSON");
    let cols = ["instruction", "input", "output"];
    let rows: Vec<Vec<Option<String>>> = records
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| r[c].as_str().map(str::to_string))
                .collect()
        })
        .collect();
    let file = tmp.path().join("alpaca.parquet");
    write_parquet(&file, &cols, &rows, 1000);
    let spec = |uri: String, format: &str| {
        dataset(json!({"format": "instruction",
            "sources": [{"name": "alpaca", "uri": uri, "format": format}],
            "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
            "split": {"testSize": 0.05}}))
    };
    let json = prepare::select_documents(
        &runtime(),
        &spec(
            format!("file://{}", data.join("alpaca-sample.json").display()),
            "alpaca-json",
        ),
    )
    .expect("alpaca json");
    let pq = prepare::select_documents(
        &runtime(),
        &spec(format!("file://{}", file.display()), "parquet"),
    )
    .expect("alpaca parquet");
    assert_eq!(pq.stats.documents_read, records.len() as u64);
    assert_eq!(pq.stats.dropped, json.stats.dropped);
    assert_eq!(pq.train_records, json.train_records);
    assert!(pq.stats.balanced());
}

#[test]
fn folders_and_globs_name_every_file_they_read() {
    let Some(data) = shared() else { return };
    let tmp = TempDir::new("globs");
    let text = std::fs::read_to_string(data.join("webtext-sample.jsonl")).expect("web sample");
    let lines: Vec<&str> = text.lines().collect();
    let dir = tmp.path().join("web");
    std::fs::create_dir_all(dir.join("more")).expect("mkdir");
    let (a, b) = lines.split_at(300);
    std::fs::write(dir.join("a.jsonl"), a.join("\n")).expect("write");
    std::fs::write(dir.join("more/b.jsonl"), b.join("\n")).expect("write");
    for uri in [
        format!("file://{}", dir.display()),
        format!("file://{}/**/*.jsonl", dir.display()),
    ] {
        let p = prepare::select_documents(&runtime(), &web_from(&uri, "jsonl", "metadata.url"))
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(p.stats.documents_read, 697, "{uri}");
        assert_eq!(
            p.stats.dropped.get(&DropReason::ExactDuplicate),
            Some(&9),
            "{uri}"
        );
    }
    let err = prepare::select_documents(
        &runtime(),
        &web_from(
            &format!("file://{}/*.parquet", dir.display()),
            "jsonl",
            "metadata.url",
        ),
    )
    .expect_err("no match");
    assert!(err.to_string().contains("no file matches"), "{err}");
}

/// A small HTTP/1.1 server for one file: the first GET gets the headers of the whole file
/// but only `cut` bytes of it before the connection closes; `503` is answered to the
/// second request; later requests with `Range: bytes=N-` get `206` and the rest. Every
/// request line and range is recorded.
fn flaky_server(body: Vec<u8>, cut: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request = String::new();
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if request.is_empty() {
                    request = line.trim().to_string();
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = v.trim().trim_end_matches('-').parse::<usize>().ok();
                }
            }
            seen.lock()
                .expect("log")
                .push(format!("{request} range={range:?}"));
            let len = body.len();
            let _ = if !request.starts_with("GET /web.jsonl ") {
                stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
            } else if n == 0 {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\naccept-ranges: bytes\r\nconnection: close\r\n\r\n"
                );
                stream
                    .write_all(head.as_bytes())
                    .and_then(|_| stream.write_all(&body[..cut]))
            } else if n == 1 {
                stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            } else {
                let from = range.unwrap_or(0);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {from}-{}/{len}\r\nconnection: close\r\n\r\n",
                    len - from,
                    len - 1
                );
                stream
                    .write_all(head.as_bytes())
                    .and_then(|_| stream.write_all(&body[from..]))
            };
        }
    });
    (port, log)
}

#[test]
fn http_downloads_retry_and_resume_where_they_were_cut() {
    let Some(data) = shared() else { return };
    let body = std::fs::read(data.join("webtext-sample.jsonl")).expect("web sample");
    let (port, log) = flaky_server(body, 1_000_000);
    let p = prepare::select_documents(
        &runtime(),
        &web_from(
            &format!("http://127.0.0.1:{port}/web.jsonl"),
            "jsonl",
            "metadata.url",
        ),
    )
    .expect("download");
    assert_eq!(p.stats.documents_read, 697);
    assert_eq!(p.stats.dropped.get(&DropReason::ExactDuplicate), Some(&9));
    let requests = log.lock().expect("log").clone();
    assert_eq!(
        requests,
        [
            "GET /web.jsonl HTTP/1.1 range=None",
            "GET /web.jsonl HTTP/1.1 range=Some(1000000)",
            "GET /web.jsonl HTTP/1.1 range=Some(1000000)",
        ],
        "a cut, a 503, then the rest from byte 1000000"
    );

    // A missing file is a permanent error that names the URL and the status.
    let err = prepare::select_documents(
        &runtime(),
        &web_from(
            &format!("http://127.0.0.1:{port}/missing.jsonl"),
            "jsonl",
            "metadata.url",
        ),
    )
    .expect_err("404");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert!(
        err.to_string().contains("/missing.jsonl: HTTP 404"),
        "{err}"
    );
}
