//! `taper prepare` with a Hugging Face `tokenizer.json`: ids above 65,535 make the shards
//! `uint32`, the tokenizer's own end-of-text token separates documents, and the trainer
//! reads the result.

use std::collections::BTreeMap;

use serde_json::json;
use taper_crds::exit::Category;
use taper_trainer::{prepare, train::data::TokenDtype};

use crate::common::{TempDir, dataset, runtime, shared};

/// A word-level `tokenizer.json` (whitespace split) whose ids for `words` start at
/// `first_id`; ids below are fillers, `</s>` is 0 and `[UNK]` is 1.
pub(crate) fn word_level(words: &[String], first_id: usize, eos: &str) -> serde_json::Value {
    let mut vocab = BTreeMap::new();
    vocab.insert(eos.to_string(), 0);
    vocab.insert("[UNK]".to_string(), 1);
    for i in 2..first_id {
        vocab.insert(format!("<filler-{i}>"), i);
    }
    for w in words {
        let next = vocab.len().max(first_id);
        vocab.entry(w.clone()).or_insert(next);
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": eos, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    })
}

#[test]
fn a_hugging_face_tokenizer_with_a_large_vocabulary_writes_uint32_shards() {
    let Some(data) = shared() else { return };
    let tmp = TempDir::new("hf-tokenizer");
    let wiki = data.join("wikitext2-test.raw");
    let text = std::fs::read_to_string(&wiki).expect("wikitext");
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    let tokenizer = tmp.path().join("tokenizer.json");
    let spec = word_level(&words, 70_000, "</s>");
    std::fs::write(&tokenizer, serde_json::to_vec(&spec).expect("json")).expect("write");
    let out = tmp.path().join("out");
    let ds = dataset(json!({
        "sources": [{"name": "wiki", "uri": format!("file://{}", wiki.display()), "format": "text"}],
        "tokenizer": {"type": "huggingface", "uri": format!("file://{}", tokenizer.display())},
        "cleaning": {"normalizeUnicode": false, "stripHtml": false, "removeBoilerplate": false},
        "dedup": {"minhash": {"enabled": false}},
        "split": {"testSize": 0.05},
        "output": {"uri": format!("file://{}", out.display())},
    }));
    let rt = runtime();
    let stats = prepare::prepare(&rt, &ds).expect("prepare");
    assert!(stats.balanced());
    let (manifest, train, test) =
        taper_trainer::train::data::open_dataset(&out).expect("the trainer reads it");
    assert_eq!(manifest.dtype, TokenDtype::Uint32);
    assert_eq!(manifest.eot_token, 0);
    assert!(manifest.vocab_size > 70_000, "{}", manifest.vocab_size);
    assert_eq!(
        manifest.tokenizer,
        format!("file://{}", tokenizer.display())
    );
    assert_eq!(train.len(), stats.train_tokens);
    assert_eq!(test.len(), stats.test_tokens);

    // The shard holds each train document's words, in order, each document followed by
    // `</s>`: decode it with the vocabulary and compare.
    let vocab: BTreeMap<u32, String> = spec["model"]["vocab"]
        .as_object()
        .expect("vocab")
        .iter()
        .map(|(w, id)| (id.as_u64().expect("id") as u32, w.clone()))
        .collect();
    let shard = std::fs::read(out.join(&manifest.train[0].file)).expect("shard");
    let ids: Vec<u32> = shard
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(ids.iter().any(|&id| id > u32::from(u16::MAX)));
    let docs = prepare::select_documents(&runtime(), &ds)
        .expect("select")
        .train;
    let mut expected = Vec::new();
    for d in &docs {
        expected.extend(d.split_whitespace().map(str::to_string));
        expected.push("</s>".to_string());
    }
    let decoded: Vec<String> = ids.iter().map(|id| vocab[id].clone()).collect();
    assert_eq!(decoded.len(), expected.len());
    assert!(
        decoded == expected,
        "the shard decodes to the train documents"
    );

    // A tokenizer without an end-of-text token is refused, naming it.
    let odd = tmp.path().join("odd.json");
    std::fs::write(
        &odd,
        serde_json::to_vec(&word_level(&words, 2, "<end>")).expect("json"),
    )
    .expect("write");
    let mut bad = ds.clone();
    bad.spec.tokenizer.uri = Some(format!("file://{}", odd.display()));
    let err = prepare::prepare(&rt, &bad).expect_err("no end-of-text token");
    assert_eq!(err.category(), Category::InvalidData, "{err}");
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(err.to_string().contains("odd.json"), "{err}");
}
