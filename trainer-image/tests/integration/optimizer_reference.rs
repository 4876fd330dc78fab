//! AdamW, the learning-rate schedule and gradient clipping reproduce `torch.optim.AdamW`,
//! nanoGPT's `get_lr` and `clip_grad_norm_` step by step. The numbers come from
//! `tests/fixtures/adamw_reference.json`, written by `scripts/reference/adamw_fixture.py`
//! with PyTorch in float64: four clipped steps, then four under the norm.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde_json::Value;
use taper_trainer::{
    model::params::ParamStore,
    train::{
        optim::{AdamW, AdamWConfig, Grads},
        schedule::CosineSchedule,
    },
};

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/adamw_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture readable"))
        .expect("fixture is JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("float")],
        other => panic!("not a number: {other}"),
    }
}

fn tensor(v: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_vec(floats(v), shape, &Device::Cpu).expect("tensor")
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Value, what: &str) {
    let got = got
        .flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .expect("values");
    let want = floats(want);
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values vs PyTorch's {}",
        got.len(),
        want.len()
    );
    assert!(!want.is_empty(), "{what}: the fixture holds no values");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs PyTorch {w}"
        );
    }
}

#[test]
fn schedule_matches_nanogpt_get_lr() {
    let f = fixture();
    let h = &f["hyper"];
    let s = CosineSchedule {
        max_lr: h["lr"].as_f64().expect("lr"),
        min_lr: h["min_lr"].as_f64().expect("min_lr"),
        warmup_steps: h["warmup_steps"].as_u64().expect("warmup"),
        decay_steps: h["max_steps"].as_u64().expect("decay"),
    };
    for entry in f["schedule"].as_array().expect("schedule") {
        let it = entry["it"].as_u64().expect("it");
        let want = entry["lr"].as_f64().expect("lr");
        assert!(
            (s.lr(it) - want).abs() < 1e-15,
            "lr({it}) = {} vs {want}",
            s.lr(it)
        );
    }
}

#[test]
fn adamw_with_clipping_matches_pytorch_step_by_step() {
    let f = fixture();
    let h = &f["hyper"];
    let mut params = ParamStore::new();
    params
        .insert_tensor("w", &tensor(&f["inputs"]["w"], &[2, 3]))
        .expect("w");
    params
        .insert_tensor("b", &tensor(&f["inputs"]["b"], &[3]))
        .expect("b");
    let betas = floats(&h["betas"]);
    let cfg = AdamWConfig {
        beta1: betas[0],
        beta2: betas[1],
        eps: h["eps"].as_f64().expect("eps"),
        weight_decay: h["weight_decay"]["w"].as_f64().expect("decay"),
    };
    assert_eq!(
        h["weight_decay"]["b"].as_f64(),
        Some(0.0),
        "1-D tensors are not decayed"
    );
    let mut opt = AdamW::new(&params, cfg, |_| true).expect("optimizer");
    let max_norm = h["max_grad_norm"].as_f64().expect("max norm");
    let steps = f["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 8, "the fixture's steps");
    let clipped: Vec<bool> = steps
        .iter()
        .map(|s| s["clipped"].as_bool().expect("clipped"))
        .collect();
    assert_eq!(
        clipped,
        [true, true, true, true, false, false, false, false],
        "both paths are compared: clipped and unclipped steps"
    );

    for step in steps {
        let mut grads = Grads::new();
        grads.insert("w", tensor(&step["grad_w_pre_clip"], &[2, 3]));
        grads.insert("b", tensor(&step["grad_b_pre_clip"], &[3]));
        let norm = grads.clip_global_norm(max_norm).expect("clip");
        let want_norm = step["grad_norm_pre_clip"].as_f64().expect("norm");
        assert!(
            (norm - want_norm).abs() < 1e-12,
            "pre-clip norm {norm} vs {want_norm}"
        );
        assert_close(
            grads.get("w").expect("w grad"),
            &step["grad_w_post_clip"],
            "clipped grad w",
        );
        assert_close(
            grads.get("b").expect("b grad"),
            &step["grad_b_post_clip"],
            "clipped grad b",
        );
        if !step["clipped"].as_bool().expect("clipped") {
            // Under the norm the gradients pass through unchanged.
            assert_close(
                grads.get("w").expect("w grad"),
                &step["grad_w_pre_clip"],
                "unclipped grad w",
            );
        }

        opt.step(&grads, step["lr"].as_f64().expect("lr"))
            .expect("step");
        assert_close(params.get("w").expect("w").as_tensor(), &step["w"], "w");
        assert_close(params.get("b").expect("b").as_tensor(), &step["b"], "b");
        let state = opt.state_tensors();
        for p in ["w", "b"] {
            assert_close(
                &state[&format!("m.{p}")],
                &step["state"][p]["exp_avg"],
                "exp_avg",
            );
            assert_close(
                &state[&format!("v.{p}")],
                &step["state"][p]["exp_avg_sq"],
                "exp_avg_sq",
            );
        }
        assert_eq!(
            opt.step_count() as f64,
            step["state"]["w"]["step"].as_f64().expect("step")
        );
    }
}

#[test]
fn optimizer_state_round_trips_and_resumes_identically() {
    let dev = Device::Cpu;
    let make = || {
        let mut p = ParamStore::new();
        p.insert_tensor(
            "w",
            &Tensor::new(&[[0.5f64, -0.25], [0.125, 1.0]], &dev).expect("w"),
        )
        .expect("insert");
        p
    };
    let grad = |k: f64| {
        let mut g = Grads::new();
        g.insert(
            "w",
            Tensor::new(&[[1.0f64 * k, -2.0], [0.5, 0.25 * k]], &dev).expect("g"),
        );
        g
    };
    // Uninterrupted: three steps.
    let a = make();
    let mut opt_a = AdamW::new(&a, AdamWConfig::default(), |_| true).expect("opt");
    for k in 1..=3 {
        opt_a.step(&grad(k as f64), 1e-2).expect("step");
    }
    // Interrupted after one step: state saved, a fresh optimizer restores it.
    let b = make();
    let mut opt_b = AdamW::new(&b, AdamWConfig::default(), |_| true).expect("opt");
    opt_b.step(&grad(1.0), 1e-2).expect("step");
    let saved: BTreeMap<String, Tensor> = opt_b.state_tensors();
    let mut opt_c = AdamW::new(&b, AdamWConfig::default(), |_| true).expect("opt");
    opt_c
        .load_state(&saved, opt_b.step_count())
        .expect("restore");
    for k in 2..=3 {
        opt_c.step(&grad(k as f64), 1e-2).expect("step");
    }
    let wa = a
        .tensor("w")
        .expect("w")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .expect("v");
    let wb = b
        .tensor("w")
        .expect("w")
        .flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .expect("v");
    assert_eq!(wa, wb, "a resumed optimizer continues exactly");
    assert!(
        opt_c.load_state(&BTreeMap::new(), 0).is_err(),
        "missing state is an error"
    );
}
