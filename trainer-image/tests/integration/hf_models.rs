//! Models in Hugging Face GPT-2 layout: one saved by `transformers` (sharded safetensors
//! with an index, `scripts/reference/hf_gpt2_fixture.py`) loads and gives the logits
//! `transformers` computed; what `taper finetune` exports loads back to the same model;
//! a folder that does not fit its `config.json` is refused naming the tensor.

use std::path::PathBuf;

use crate::common::{TempDir, runtime};
use candle_core::{Device, Tensor};
use taper_crds::finetune::CheckpointChoice;
use taper_trainer::{
    finetune::{base, export},
    model::gpt::{ForwardCtx, Gpt},
    store::LocalStore,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny")
}

fn load(dir: &std::path::Path, staging: &std::path::Path) -> Result<base::LoadedModel, String> {
    base::load(
        &runtime(),
        &format!("file://{}", dir.display()),
        None,
        CheckpointChoice::Latest,
        &Device::Cpu,
        staging,
    )
    .map_err(|e| e.to_string())
}

fn logits(m: &base::LoadedModel, ids: &Tensor) -> Vec<f32> {
    Gpt::new(m.cfg, &m.params)
        .expect("model")
        .forward(ids, &mut ForwardCtx::default())
        .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward")
}

#[test]
fn a_gpt2_saved_by_transformers_gives_its_logits_and_exports_back() {
    let tmp = TempDir::new("hf-gpt2");
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let shards = std::fs::read_dir(fixture())
        .expect("fixture")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("model-"))
        })
        .count();
    assert!(shards >= 2, "the fixture is sharded ({shards} shards)");
    let model = load(&fixture(), &tmp.path().join("a")).expect("loads");
    assert_eq!(
        (
            model.cfg.n_layer,
            model.cfg.n_embd,
            model.cfg.vocab_size,
            model.cfg.block_size
        ),
        (2, 32, 96, 16)
    );
    assert_eq!(model.tokenizer, "gpt2", "no tokenizer.json: GPT-2's BPE");
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).expect("ids");
    let ids = Tensor::new(ids, &Device::Cpu).expect("ids");
    let want: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(expected["logits"].clone()).expect("logits");
    let want: Vec<f32> = want.into_iter().flatten().flatten().collect();
    let got = logits(&model, &ids);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");

    // Exported as `taper finetune` publishes a model, it loads back to the same logits.
    let store = LocalStore::new(tmp.path().join("out"));
    let files = vec![
        (
            "model.safetensors",
            export::File::Tensors(
                export::hf_tensors(&model.cfg, &model.params.tensors()).expect("tensors"),
            ),
        ),
        (
            "config.json",
            export::File::Bytes(
                serde_json::to_vec(&export::gpt2_config_json(&model.cfg, 95)).expect("json"),
            ),
        ),
    ];
    runtime()
        .block_on(export::publish(
            &store,
            "model",
            files,
            &tmp.path().join("stage"),
        ))
        .expect("publish");
    let back = load(&tmp.path().join("out/model"), &tmp.path().join("b")).expect("reloads");
    assert_eq!(back.cfg, model.cfg);
    assert!(
        logits(&back, &ids) == got,
        "the exported model is the same model"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("out/model/manifest.json")).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["files"].as_array().map(Vec::len), Some(2));

    // A config.json the weights do not fit: the missing tensor is named.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).expect("dir");
    for entry in std::fs::read_dir(fixture()).expect("fixture").flatten() {
        std::fs::copy(entry.path(), bad.join(entry.file_name())).expect("copy");
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bad.join("config.json")).expect("config"))
            .expect("json");
    config["n_layer"] = 3.into();
    std::fs::write(bad.join("config.json"), config.to_string()).expect("write");
    let err = load(&bad, &tmp.path().join("c")).expect_err("refused");
    assert!(err.contains("h.2.") && err.contains("missing"), "{err}");
}
