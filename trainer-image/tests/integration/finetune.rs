//! LoRA finetuning: only the adapters train and only they get gradients (checked against
//! finite differences), the merged model is the adapted one, a finetuning run resumes
//! bit-identically, and finetuning on Alpaca lowers the held-out loss.

use std::collections::BTreeMap;

use crate::common::{
    TempDir, byte_instruction_dataset, quick_training, runtime, shared, tiny_model, tiny_run,
};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use taper_crds::{finetune::Lora, model::GptConfig};
use taper_trainer::{
    model::{
        Arch, Model,
        gpt::{ForwardCtx, Gpt, init_params},
        lora,
        params::ParamStore,
    },
    prepare,
    store::LocalStore,
    train::{
        checkpoint::Checkpointer,
        data::{BatchSampler, open_dataset},
        pretrain::{self, BaseModel, ModelInit, Outcome, PretrainError, PretrainRun},
        trainer::{Trainer, Tuning, batch_loss},
    },
};

fn settings(r: i64, dropout: f64) -> Lora {
    Lora {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        targets: vec!["c_attn".into(), "c_proj".into(), "c_fc".into()],
    }
}

/// A base of `cfg` from `seed` with fresh adapters.
fn with_adapters(cfg: &GptConfig, seed: u64, l: &Lora, dtype: DType) -> ParamStore {
    let mut params = init_params(cfg, seed, &Device::Cpu)
        .and_then(|p| p.to_dtype(dtype))
        .expect("init");
    lora::add_adapters(&mut params, cfg, l, 99, &Device::Cpu).expect("adapters");
    if dtype != DType::F32 {
        params = params.to_dtype(dtype).expect("dtype");
    }
    params
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values")
}

#[test]
fn lora_trains_the_adapters_only_and_the_merged_model_is_the_adapted_one() {
    let tmp = TempDir::new("lora-only");
    byte_instruction_dataset(tmp.path());
    let (_, train, test) = open_dataset(tmp.path()).expect("dataset");
    assert!(train.is_masked() && train.examples() == 400);
    let cfg = tiny_model();
    let l = settings(4, 0.0);
    let params = with_adapters(&cfg, 1, &l, DType::F32);
    let before: BTreeMap<String, Vec<f64>> = params
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), values(t)))
        .collect();
    let mut trainer = Trainer::with_tuning(
        cfg,
        quick_training(6),
        params,
        Device::Cpu,
        Tuning::Lora(l.clone()),
    )
    .expect("trainer");
    let trained: Vec<String> = trainer.trained_tensors().into_keys().collect();
    // 3 targets match 4 layers of the one block (c_proj: attention's and the MLP's).
    assert_eq!(trained.len(), 8, "{trained:?}");
    assert!(trained.iter().all(|n| lora::is_adapter(n)), "{trained:?}");
    let loss_before = trainer.evaluate(&test, 4, 1).expect("eval");
    for _ in 0..6 {
        trainer.step(&train).expect("step");
    }
    assert!(trainer.evaluate(&test, 4, 1).expect("eval") < loss_before);
    for (name, t) in trainer.params().tensors() {
        let changed = values(&t) != before[&name];
        assert_eq!(
            changed,
            lora::is_adapter(&name),
            "{name}: only adapters may change"
        );
    }

    // The merged model computes what base + adapters compute.
    let merged =
        lora::merge(&trainer.params().tensors(), &trainer.trained_tensors(), &l).expect("merge");
    let mut store = ParamStore::new();
    for (name, t) in &merged {
        store
            .insert_tensor(name, &t.copy().expect("copy"))
            .expect("insert");
    }
    let plain = Gpt::new(cfg, &store).expect("merged model");
    let batch = BatchSampler::new(3)
        .batch(&test, 4, cfg.block_size as usize, &Device::Cpu)
        .expect("batch");
    let a = trainer
        .eval_model()
        .forward(&batch.x, &mut ForwardCtx::default())
        .expect("adapted");
    let b = plain
        .forward(&batch.x, &mut ForwardCtx::default())
        .expect("merged");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(diff < 2e-5, "merged logits differ by {diff}");
}

#[test]
fn gradients_reach_every_adapter_match_finite_differences_and_spare_the_base() {
    let tmp = TempDir::new("lora-grad");
    byte_instruction_dataset(tmp.path());
    let (_, train, _) = open_dataset(tmp.path()).expect("dataset");
    let cfg = tiny_model();
    let l = settings(2, 0.0);
    // f64 so that finite differences resolve; B made non-zero (it starts at zero, which
    // leaves A without a gradient on the first step, as in PEFT).
    let params = with_adapters(&cfg, 2, &l, DType::F64);
    for (name, var) in params.iter() {
        if name.ends_with("lora_B.weight") {
            let t = (Tensor::randn(0f64, 0.05, var.shape(), &Device::Cpu).expect("randn"))
                .to_dtype(DType::F64)
                .expect("f64");
            var.set(&t).expect("set");
        }
    }
    let batch = BatchSampler::new(5)
        .batch(&train, 3, 24, &Device::Cpu)
        .expect("batch");
    let loss_of = |p: &ParamStore| -> f64 {
        let m = Model::Gpt(Gpt::with_lora(cfg, p, &l).expect("model"));
        batch_loss(&m, &batch, &mut ForwardCtx::default())
            .and_then(|l| Ok(l.to_scalar::<f64>()?))
            .expect("loss")
    };
    let model = Model::Gpt(Gpt::with_lora(cfg, &params, &l).expect("model"));
    let grads = batch_loss(&model, &batch, &mut ForwardCtx::default())
        .expect("loss")
        .backward()
        .expect("backward");
    let mut checked = 0;
    for (name, var) in params.iter() {
        let g = grads.get(var.as_tensor());
        if !lora::is_adapter(name) {
            assert!(g.is_none(), "{name}: the frozen base gets no gradient");
            continue;
        }
        let g = values(g.unwrap_or_else(|| panic!("{name}: no gradient")));
        assert!(g.iter().any(|v| *v != 0.0), "{name}: zero gradient");
        // Central differences on three elements of each adapter.
        let base = values(var.as_tensor());
        for i in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("t"))
                    .expect("set");
                let loss = loss_of(&params);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).expect("t"))
                    .expect("reset");
                loss
            };
            let eps = 1e-5;
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{name}[{i}]: backward {} vs finite differences {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 8);
}

#[test]
fn a_finetuning_run_resumes_bit_identically_and_only_onto_its_base() {
    let rt = runtime();
    let tmp = TempDir::new("lora-resume");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("dir");
    let manifest = byte_instruction_dataset(&data);
    let (_, train, test) = open_dataset(&data).expect("dataset");
    let cfg = tiny_model();
    let run = |store: &LocalStore, stop_after, staging: &str, l: &Lora| {
        pretrain::run(
            &rt,
            PretrainRun {
                init: ModelInit::Base(Box::new(BaseModel {
                    params: with_adapters(&cfg, 4, l, DType::F32),
                    tuning: Tuning::Lora(l.clone()),
                    identity: "file://base".into(),
                    arch: Arch::Gpt2,
                })),
                stop_after,
                ..tiny_run(
                    &manifest,
                    &train,
                    &test,
                    store,
                    tmp.path().join(staging),
                    10,
                )
            },
        )
    };
    let read = |store: &LocalStore, staging: &str| {
        let loaded = rt
            .block_on(Checkpointer::new(store, tmp.path().join(staging)).resume(&Device::Cpu))
            .expect("resume")
            .expect("a checkpoint");
        let w: Vec<(String, Vec<f64>)> = loaded
            .model
            .iter()
            .map(|(k, t)| (k.clone(), values(t)))
            .collect();
        (loaded.state, w)
    };
    // LoRA dropout on: its masks come from the checkpointed stream.
    let l = settings(4, 0.1);
    let straight = LocalStore::new(tmp.path().join("straight"));
    assert_eq!(
        run(&straight, None, "a", &l).expect("run"),
        Outcome::MaxStepsReached { step: 10 }
    );
    let resumed = LocalStore::new(tmp.path().join("resumed"));
    assert_eq!(
        run(&resumed, Some(5), "b", &l).expect("run"),
        Outcome::Interrupted { step: 5 }
    );
    // Another LoRA setting is another run: refused, not mixed in.
    let other = settings(8, 0.1);
    assert!(matches!(
        run(&resumed, None, "c", &other),
        Err(PretrainError::Mismatch(..))
    ));
    assert_eq!(
        run(&resumed, None, "d", &l).expect("run"),
        Outcome::MaxStepsReached { step: 10 }
    );
    let (state_a, wa) = read(&straight, "e");
    let (state_b, wb) = read(&resumed, "f");
    assert_eq!((state_a.step, state_b.step), (10, 10));
    assert_eq!(state_a.lora.as_ref(), Some(&l));
    assert_eq!(state_a.base.as_deref(), Some("file://base"));
    assert!(
        wa.iter().all(|(n, _)| lora::is_adapter(n)) && wa.len() == 8,
        "a LoRA checkpoint holds the adapters only"
    );
    assert!(wa == wb, "the resumed run ends with identical adapters");
}

/// A 2-layer GPT on GPT-2's vocabulary finetuned in full (`method: full`; LoRA on a random
/// base has too little to adapt, the quickstart shows LoRA on a pretrained one) on the
/// instruction split of `../shared/data/alpaca-sample.json` as `taper prepare` makes it.
#[test]
fn finetuning_on_alpaca_lowers_the_held_out_loss() {
    let Some(data) = shared() else {
        return;
    };
    let tmp = TempDir::new("lora-alpaca");
    let out = tmp.path().join("alpaca");
    let ds = crate::common::dataset(json!({
        "format": "instruction",
        "sources": [{"name": "alpaca", "uri": format!("file://{}", data.join("alpaca-sample.json").display()),
                     "format": "alpaca-json"}],
        "dedup": {"minhash": {"enabled": false}},
        "split": {"testSize": 100},
        "instruction": {"maxSeqLength": 128},
        "output": {"uri": format!("file://{}", out.display())},
    }));
    prepare::prepare(&runtime(), &ds).expect("prepare");
    let (_, train, test) = open_dataset(&out).expect("dataset");
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        block_size: 128,
        vocab_size: 50304,
        dropout: 0.0,
        bias: true,
    };
    let training = taper_crds::training::ResolvedTraining {
        batch_size: 4,
        gradient_accumulation_steps: 1,
        learning_rate: 3e-3,
        min_learning_rate: 3e-4,
        warmup_steps: 2,
        ..quick_training(25)
    };
    let mut trainer = Trainer::with_tuning(
        cfg,
        training,
        init_params(&cfg, 5, &Device::Cpu).expect("init"),
        Device::Cpu,
        Tuning::Full,
    )
    .expect("trainer");
    let held_out = |t: &Trainer| t.evaluate(&test, 8, 11).expect("eval");
    let before = held_out(&trainer);
    for _ in 0..25 {
        trainer.step(&train).expect("step");
    }
    let after = held_out(&trainer);
    eprintln!("held-out loss on Alpaca responses: {before:.3} -> {after:.3}");
    assert!(
        after < before - 2.0,
        "held-out loss {before:.3} -> {after:.3}"
    );
}

/// A batch of an instruction split is whole examples: the inputs start at a prompt, and
/// the targets the mask keeps spell exactly the answer and its end-of-text, nothing of the
/// prompt or the padding.
#[test]
fn instruction_batches_are_whole_examples_with_the_loss_on_the_answers() {
    let tmp = TempDir::new("lora-batch");
    byte_instruction_dataset(tmp.path());
    let (_, train, _) = open_dataset(tmp.path()).expect("dataset");
    let batch = BatchSampler::new(7)
        .batch(&train, 8, 32, &Device::Cpu)
        .expect("batch");
    let x = batch.x.to_vec2::<u32>().expect("x");
    let y = batch.y.to_vec2::<u32>().expect("y");
    let mask = batch.mask.expect("masked").to_vec2::<f32>().expect("mask");
    let mut real = 0;
    for ((x, y), m) in x.iter().zip(&y).zip(&mask) {
        let text: String = x.iter().map(|&b| b as u8 as char).collect();
        assert!(text.starts_with("Q: "), "{text:?}");
        let kept: Vec<u32> = y
            .iter()
            .zip(m)
            .filter(|(_, m)| **m == 1.0)
            .map(|(t, _)| *t)
            .collect();
        let (answer, eot) = kept.split_at(kept.len() - 1);
        assert_eq!(eot, [0], "the end-of-text is learned");
        let answer: String = answer.iter().map(|&b| b as u8 as char).collect();
        let (a, b) = text[3..]
            .split_once('?')
            .and_then(|(q, _)| q.split_once('+'))
            .expect("a question");
        let sum: u32 = a.parse::<u32>().expect("a") + b.parse::<u32>().expect("b");
        assert_eq!(answer, sum.to_string(), "{text:?}");
        // Real tokens: the example up to its end-of-text (the rest is padding).
        real += y.iter().position(|&t| t == 0).map_or(0, |i| i + 1);
    }
    assert_eq!(
        batch.tokens, real as u64,
        "tokens count the unpadded inputs"
    );
}
