//! `taper prepare` on real text from `../shared/data` (skipped, and counted as skipped,
//! when that folder is absent, as in a user's fresh clone). MinHash's recall and precision
//! against generated ground truth are tested beside the code, in `prepare/dedup/tests.rs`.

use serde_json::json;
use taper_crds::Dataset;

use crate::common::{all_rules_off, dataset, runtime, shared};
use taper_crds::{
    dataset::QualityRule,
    report::{DropReason, Normalization},
};
use taper_trainer::prepare::{self, PrepareReport};

fn web(file: &str, format: &str, cleaning: serde_json::Value, minhash: bool) -> Dataset {
    let data = shared().expect("checked by the caller");
    dataset(json!({
        "sources": [{"name": "web", "uri": format!("file://{}", data.join(file).display()),
                     "format": format, "urlField": "metadata.url"}],
        "cleaning": cleaning,
        "dedup": {"minhash": {"enabled": minhash}, "decontamination": {"enabled": false}},
        "split": {"testSize": 0.05},
    }))
}

#[test]
fn web_sample_has_27_empty_texts_and_9_exact_duplicate_copies() {
    if shared().is_none() {
        return;
    }
    let p = prepare::select_documents(
        &runtime(),
        &web("webtext-sample.jsonl", "jsonl", all_rules_off(), false),
    )
    .expect("prepare");
    let s = &p.stats;
    assert_eq!(s.documents_read, 697);
    assert_eq!(
        s.dropped.get(&DropReason::Empty),
        Some(&27),
        "{:?}",
        s.dropped
    );
    assert_eq!(
        s.dropped.get(&DropReason::ExactDuplicate),
        Some(&9),
        "{:?}",
        s.dropped
    );
    assert_eq!(
        s.dropped.get(&DropReason::UrlDuplicate),
        None,
        "no URL appears twice"
    );
    assert_eq!(s.train_documents + s.test_documents, 661);
    assert!(s.balanced(), "{s:?}");

    // The zstd copy reads the same documents.
    let z = prepare::select_documents(
        &runtime(),
        &web(
            "webtext-sample.jsonl.zst",
            "jsonl.zst",
            all_rules_off(),
            false,
        ),
    )
    .expect("prepare zst");
    assert_eq!(z.stats.dropped, p.stats.dropped);
    assert_eq!(z.stats.sources, p.stats.sources);
    assert_eq!(z.train, p.train);
}

/// The README's figures for a run over the web sample with every default (cleaning, quality
/// rules, exact, URL, MinHash and decontamination dedup), pinned.
#[test]
fn default_cleaning_accounts_for_every_web_document() {
    let Some(data) = shared() else { return };
    let defaults = dataset(json!({
        "sources": [{"name": "web",
                     "uri": format!("file://{}", data.join("webtext-sample.jsonl").display()),
                     "format": "jsonl", "urlField": "metadata.url"}],
    }));
    let p = prepare::select_documents(&runtime(), &defaults).expect("prepare");
    let s: &PrepareReport = &p.stats;
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&s.dropped).unwrap_or_default()
    );
    assert!(
        s.balanced(),
        "every document is kept or dropped for a reason: {s:?}"
    );
    assert_eq!(s.documents_read, 697);
    let dropped = |r: DropReason| s.dropped.get(&r).copied().unwrap_or(0);
    // As the README states them.
    assert_eq!(dropped(DropReason::Empty), 27, "{:?}", s.dropped);
    assert_eq!(
        dropped(DropReason::EmptyAfterCleaning),
        2,
        "{:?}",
        s.dropped
    );
    assert_eq!(dropped(DropReason::ExactDuplicate), 8, "{:?}", s.dropped);
    assert_eq!(dropped(DropReason::NearDuplicate), 1, "{:?}", s.dropped);
    let quality: u64 = s
        .dropped
        .iter()
        .filter(|(k, _)| matches!(k, DropReason::Rule(_)))
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(quality, 423, "{:?}", s.dropped);
    assert_eq!(
        dropped(DropReason::Rule(QualityRule::GopherStopWords)),
        190,
        "{:?}",
        s.dropped
    );
    assert_eq!(s.train_documents + s.test_documents, 236);
    assert!(
        s.examples
            .values()
            .all(|e| e.len() <= 3 && e.iter().all(|x| x.text.chars().count() <= 200))
    );
    assert_eq!(s.minhash, Some([5, 14, 8]));
    // Cleaning removed markup-free boilerplate lines and normalised whitespace.
    assert!(
        p.train
            .iter()
            .all(|d| !d.contains("\r\n") && !d.contains("  "))
    );
}

#[test]
fn malformed_records_are_counted_and_skipped() {
    let dir = std::env::temp_dir().join(format!("taper-prepare-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = "The cat sat with the dog and looked at the garden of the house. ".repeat(10);
    let lines = [
        json!({"text": good}).to_string(),
        "{not json".to_string(),
        json!({"body": "no text field"}).to_string(),
        json!({"text": 42}).to_string(),
        String::new(),
        json!({"text": format!("{good} And one more sentence for a change of the text.")})
            .to_string(),
    ];
    std::fs::write(dir.join("in.jsonl"), lines.join("\n")).expect("write");
    let ds = dataset(json!({
        "sources": [{"name": "mixed", "uri": format!("file://{}", dir.join("in.jsonl").display()), "format": "jsonl"}],
        "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
        "split": {"testSize": 1},
    }));
    let p = prepare::select_documents(&runtime(), &ds).expect("prepare");
    assert_eq!(p.stats.dropped.get(&DropReason::Malformed), Some(&3));
    assert_eq!(p.stats.documents_read, 5, "blank lines are not records");
    assert_eq!(p.train.len() + p.test.len(), 2);
    assert!(p.stats.balanced());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stackexchange_dumps_become_question_threads() {
    let Some(data) = shared() else {
        return;
    };
    let ds = dataset(json!({
        "sources": [
            {"name": "beer", "uri": format!("file://{}", data.join("qa-sample.xml").display()),
             "format": "stackexchange-xml", "quality": {"field": "Score", "minimum": 1}},
            {"name": "coffee", "uri": format!("file://{}", data.join("qa-sample-coffee.xml").display()),
             "format": "stackexchange-xml"},
        ],
        "cleaning": all_rules_off(),
        "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
        "split": {"testSize": 0.1},
    }));
    let p = prepare::select_documents(&runtime(), &ds).expect("prepare");
    let s = &p.stats;
    assert_eq!(
        s.sources["beer"].read, 663,
        "one document per question: {s:?}"
    );
    assert!(
        s.sources["beer"]
            .dropped
            .get(&DropReason::QualityThreshold)
            .is_some_and(|&n| n > 0)
    );
    assert!(s.sources["coffee"].read > 0);
    assert!(s.balanced());
    // The BOM, CRLF and escaped HTML are gone; questions carry their answers.
    let citra = p
        .train
        .iter()
        .chain(&p.test)
        .find(|d| d.starts_with("What is a citra hop"));
    let citra = citra.expect("the first beer question");
    assert!(!citra.contains('\u{FEFF}') && !citra.contains('\r') && !citra.contains("&lt;"));
    assert!(
        citra.split("\n\n").count() >= 3,
        "title, question and at least one answer: {citra}"
    );
}

#[test]
fn json_arrays_stream_records() {
    let Some(data) = shared() else {
        return;
    };
    let ds = dataset(json!({
        "sources": [{"name": "alpaca", "uri": format!("file://{}", data.join("alpaca-sample.json").display()),
                     "format": "json", "textField": "output"}],
        "cleaning": all_rules_off(),
        "dedup": {"exact": false, "minhash": {"enabled": false}, "decontamination": {"enabled": false}},
        "split": {"testSize": 0.1},
    }));
    let p = prepare::select_documents(&runtime(), &ds).expect("prepare");
    assert_eq!(p.stats.documents_read, 5000);
    assert_eq!(
        p.stats.dropped.get(&DropReason::Empty),
        Some(&2),
        "the sample has 2 empty outputs"
    );
    assert_eq!(p.train.len() + p.test.len(), 4998);
}

#[test]
fn a_mixed_dataset_publishes_shards_the_trainer_reads() {
    let Some(data) = shared() else {
        return;
    };
    let out = std::env::temp_dir().join(format!("taper-prepare-mixed-{}", std::process::id()));
    let src = |name: &str, file: &str, format: &str| json!({"name": name, "uri": format!("file://{}", data.join(file).display()), "format": format});
    let ds = dataset(json!({
        "sources": [
            src("web", "webtext-sample.jsonl", "jsonl"),
            src("beer", "qa-sample.xml", "stackexchange-xml"),
            src("coffee", "qa-sample-coffee.xml", "stackexchange-xml"),
            src("wiki", "wikitext2-test.raw", "text"),
        ],
        "split": {"testSize": 0.05},
        "output": {"uri": format!("file://{}", out.display())},
    }));
    let rt = runtime();
    let stats = prepare::prepare(&rt, &ds).expect("prepare");
    eprintln!("{}", stats.summary_table());
    assert!(stats.balanced(), "every document accounted for: {stats:?}");
    for name in ["web", "beer", "coffee", "wiki"] {
        assert!(
            stats.sources[name].kept > 0,
            "{name} contributes: {stats:?}"
        );
    }
    let (manifest, train, test) =
        taper_trainer::train::data::open_dataset(&out).expect("the trainer reads it");
    assert_eq!(train.len(), stats.train_tokens);
    assert_eq!(test.len(), stats.test_tokens);
    assert_eq!(manifest.tokenizer, "gpt2");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("stats.json")).expect("stats.json"))
            .expect("json");
    assert_eq!(written["trainTokens"], stats.train_tokens);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn alpaca_records_become_masked_examples() {
    let Some(data) = shared() else {
        return;
    };
    let out = std::env::temp_dir().join(format!("taper-prepare-alpaca-{}", std::process::id()));
    let ds = dataset(json!({
        "format": "instruction",
        "sources": [{"name": "alpaca", "uri": format!("file://{}", data.join("alpaca-sample.json").display()),
                     "format": "alpaca-json"}],
        "split": {"testSize": 100},
        "instruction": {"maxSeqLength": 256},
        "output": {"uri": format!("file://{}", out.display())},
    }));
    let rt = runtime();
    let stats = prepare::prepare(&rt, &ds).expect("prepare");
    assert_eq!(stats.documents_read, 5000);
    assert_eq!(
        stats.dropped.get(&DropReason::EmptyOutput),
        Some(&2),
        "{:?}",
        stats.dropped
    );
    // `No input`, `Noinput`, `<no input>`, `< noinput >`, `N/A`, `None`, …: 49 in the sample.
    assert_eq!(
        stats.normalized.get(&Normalization::PlaceholderInput),
        Some(&49)
    );
    assert!(
        stats.truncated.is_some_and(|t| t > 0 && t < 500),
        "{:?}",
        stats.truncated
    );
    // Examples whose prompt alone fills the 256 tokens are dropped, not cut: they would
    // leave no response token to learn from.
    let too_long = stats
        .dropped
        .get(&DropReason::PromptTooLong)
        .copied()
        .unwrap_or(0);
    eprintln!(
        "promptTooLong: {too_long}, truncated: {:?}",
        stats.truncated
    );
    assert!(too_long > 0 && too_long < 50, "{too_long}");
    assert_eq!(
        stats.train_documents + stats.test_documents + too_long,
        4998
    );
    assert!(stats.test_documents <= 100);
    assert!(stats.balanced());

    let manifest: taper_trainer::train::data::DatasetManifest =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    let shard = &manifest.train[0];
    let mask_info = shard
        .mask
        .as_ref()
        .expect("instruction shards carry a mask");
    let tokens: Vec<u16> = std::fs::read(out.join(&shard.file))
        .expect("tokens")
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let mask = std::fs::read(out.join(&mask_info.file)).expect("mask");
    assert_eq!(tokens.len(), mask.len());
    assert_eq!(tokens.len() as u64, shard.tokens);
    // Every example: a prompt (mask 0) then a response (mask 1) ending in EOT (kept even
    // when the example is cut), at most 256 tokens.
    let bpe = tiktoken_rs::r50k_base().expect("bpe");
    let mut start = 0;
    let mut examples = 0;
    while start < tokens.len() {
        let len = tokens[start..]
            .iter()
            .position(|&t| t == 50256)
            .map(|p| p + 1)
            .unwrap_or(tokens.len() - start);
        // A truncated example has no EOT: it runs into the next prompt; stop checking there.
        if len > 256 {
            break;
        }
        let (t, m) = (&tokens[start..start + len], &mask[start..start + len]);
        let first_response = m.iter().position(|&x| x == 1).expect("a response");
        assert!(
            m[..first_response].iter().all(|&x| x == 0)
                && m[first_response..].iter().all(|&x| x == 1)
        );
        let prompt = bpe
            .decode(
                &t[..first_response]
                    .iter()
                    .map(|&x| u32::from(x))
                    .collect::<Vec<u32>>(),
            )
            .expect("decode");
        assert!(prompt.starts_with("Below is an instruction"), "{prompt}");
        // Every prompt is whole: a cut falls in the response.
        assert!(prompt.ends_with("### Response:\n"), "{prompt}");
        examples += 1;
        start += len;
    }
    assert_eq!(
        examples, stats.train_documents,
        "every train example is separable"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Exact-substring dedup on the web sample with exact dedup off: the exact copies are now
/// repeats through and through, and every token is accounted for.
#[test]
fn exact_substring_dedup_cuts_repeated_spans() {
    let Some(data) = shared() else { return };
    let out = crate::common::TempDir::new("substring");
    let ds = dataset(json!({
        "sources": [{"name": "web", "format": "jsonl", "urlField": "metadata.url",
                     "uri": format!("file://{}", data.join("webtext-sample.jsonl").display())}],
        "cleaning": all_rules_off(),
        "dedup": {"exact": false, "minhash": {"enabled": false},
                  "decontamination": {"enabled": false}, "substring": {"enabled": true}},
        "split": {"testSize": 0.05},
        "output": {"uri": format!("file://{}", out.path().display())},
    }));
    let rt = runtime();
    let stats = prepare::prepare(&rt, &ds).expect("prepare");
    eprintln!("{}", stats.summary_table());
    let sub = stats.substring.clone().expect("substring stats");
    eprintln!("{sub:?}");
    assert_eq!(sub.min_length, 50);
    assert!(sub.tokens_removed > 0, "{sub:?}");
    let emptied = stats
        .dropped
        .get(&DropReason::SubstringDuplicate)
        .copied()
        .unwrap_or(0);
    // The sample's exact copies: 6 of a 3-word page and 1 of a 4-word one, shorter than
    // 50 tokens and so kept, and 2 of a 250-word page, emptied.
    assert_eq!(emptied, 2, "{:?}", stats.dropped);
    assert!(sub.documents_changed >= emptied);
    assert!(stats.balanced(), "{stats:?}");
    let kept = stats.train_documents + stats.test_documents;
    assert_eq!(
        stats.train_tokens + stats.test_tokens,
        sub.tokens_in - sub.tokens_removed + kept,
        "every token kept or removed, one end-of-text per kept document"
    );
    let (_, train, test) =
        taper_trainer::train::data::open_dataset(out.path()).expect("the trainer reads it");
    assert_eq!(
        train.len() + test.len(),
        stats.train_tokens + stats.test_tokens
    );
    // In chunks of at most 100,000 tokens (12 suffix arrays here), merged: the same cuts.
    let chunked_out = crate::common::TempDir::new("substring-chunked");
    let mut chunked_ds = ds.clone();
    chunked_ds.spec.output = Some(
        serde_json::from_value(json!({
            "uri": format!("file://{}", chunked_out.path().display())
        }))
        .expect("output"),
    );
    let options = prepare::Options {
        substring_chunk_tokens: Some(100_000),
        ..prepare::Options::default()
    };
    let chunked = prepare::prepare_with(&rt, &chunked_ds, &options).expect("prepare in chunks");
    let csub = chunked.substring.clone().expect("substring stats");
    assert!(csub.chunks >= 10, "{csub:?}");
    assert_eq!(
        (
            csub.tokens_in,
            csub.tokens_removed,
            csub.spans_removed,
            csub.documents_changed
        ),
        (
            sub.tokens_in,
            sub.tokens_removed,
            sub.spans_removed,
            sub.documents_changed
        )
    );
    let digest = |dir: &std::path::Path| {
        taper_trainer::train::data::open_dataset(dir)
            .expect("the trainer reads it")
            .0
            .digest
    };
    assert_eq!(
        digest(out.path()),
        digest(chunked_out.path()),
        "the same shards"
    );
}
