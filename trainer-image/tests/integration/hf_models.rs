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

fn llama_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-llama-tiny")
}

/// A Llama saved by `transformers` (grouped-query attention, rotary embeddings, RMSNorm,
/// SwiGLU, untied head): the same logits; with LoRA on every projection, gradients reach
/// every adapter and no base weight, and the merged model (in Llama's `[out, in]` layout,
/// reloaded) computes what base + adapters compute.
#[test]
fn a_llama_saved_by_transformers_gives_its_logits_and_takes_a_lora() {
    use taper_crds::finetune::Lora;
    use taper_trainer::model::{Arch, Model, lora, params::ParamStore};
    let tmp = TempDir::new("hf-llama");
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(llama_fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let model = load(&llama_fixture(), &tmp.path().join("a")).expect("loads");
    let Arch::Llama(cfg) = model.arch else {
        panic!("not read as a Llama: {:?}", model.arch)
    };
    assert_eq!(
        (cfg.n_head, cfg.n_kv_head, cfg.tie_embeddings),
        (4, 2, false)
    );
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).expect("ids");
    let ids = Tensor::new(ids, &Device::Cpu).expect("ids");
    let want: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(expected["logits"].clone()).expect("logits");
    let want: Vec<f32> = want.into_iter().flatten().flatten().collect();
    let forward = |m: &Model| -> Vec<f32> {
        m.forward(&ids, &mut ForwardCtx::default())
            .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
            .expect("forward")
    };
    let plain = Model::build(&model.arch, model.cfg, &model.params, None).expect("model");
    let got = forward(&plain);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");

    // LoRA on every projection (B made non-zero, as after some training).
    let settings = Lora {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    };
    let mut params = ParamStore::new();
    for (name, t) in model.params.tensors() {
        params
            .insert_tensor(&name, &t.copy().expect("copy"))
            .expect("insert");
    }
    lora::add_adapters_to(&mut params, &cfg.linears(), &settings, 1, &Device::Cpu)
        .expect("adapters");
    for (name, var) in params.iter() {
        if name.ends_with("lora_B.weight") {
            var.set(&Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).expect("randn"))
                .expect("set");
        }
    }
    let adapted = Model::build(&model.arch, model.cfg, &params, Some(&settings)).expect("lora");
    let loss = adapted
        .forward(&ids, &mut ForwardCtx::default())
        .and_then(|l| Ok(l.sqr()?.mean_all()?))
        .expect("loss");
    let grads = loss.backward().expect("backward");
    let mut adapters = 0;
    for (name, var) in params.iter() {
        let g = grads.get(var.as_tensor());
        if lora::is_adapter(name) {
            let g = g.unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .sqr()
                .and_then(|g| g.sum_all())
                .and_then(|g| g.to_scalar::<f32>());
            assert!(norm.expect("norm") > 0.0, "{name}: zero gradient");
            adapters += 1;
        } else {
            assert!(g.is_none(), "{name}: the frozen base gets no gradient");
        }
    }
    assert_eq!(
        adapters,
        2 * 7 * 2,
        "two tensors on seven projections in two layers"
    );

    let trained: std::collections::BTreeMap<_, _> = params
        .tensors()
        .into_iter()
        .filter(|(n, _)| lora::is_adapter(n))
        .collect();
    let merged = lora::merge(&params.tensors(), &trained, &settings).expect("merge");
    let store = LocalStore::new(tmp.path().join("out"));
    let files = export::model_files(&model.arch, &model.cfg, &merged, 2).expect("files");
    runtime()
        .block_on(export::publish(
            &store,
            "model",
            files,
            &tmp.path().join("stage"),
        ))
        .expect("publish");
    let back = load(&tmp.path().join("out/model"), &tmp.path().join("b")).expect("reloads");
    assert_eq!(back.arch, model.arch);
    let reloaded = Model::build(&back.arch, back.cfg, &back.params, None).expect("model");
    let (a, b) = (forward(&adapted), forward(&reloaded));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 2e-5, "merged Llama differs by {diff}");
    assert!(a != got, "the adapters change the model");

    // The adapter as PEFT loads it: the default `c_attn` resolves to Llama's names.
    let default = Lora {
        targets: vec!["c_attn".into()],
        ..settings
    };
    let files = export::adapter_files(&trained, &default, "base", &model.arch, &model.cfg)
        .expect("adapter files");
    let config = files
        .iter()
        .find_map(|(name, f)| match (name, f) {
            (&"adapter_config.json", export::File::Bytes(b)) => {
                serde_json::from_slice::<serde_json::Value>(b).ok()
            }
            _ => None,
        })
        .expect("adapter_config.json");
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["k_proj", "q_proj", "v_proj"])
    );
    assert_eq!(config["fan_in_fan_out"], false);
}
