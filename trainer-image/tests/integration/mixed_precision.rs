//! bf16 mixed precision on the CPU, for what a CPU can show: the bf16 model tracks the
//! f32 one, gradients reach the f32 master weights, the optimizer and the checkpoints stay
//! f32, and a bf16 run resumes bit-identically.

use candle_core::{DType, Device, Tensor};
use taper_crds::training::Precision;
use taper_trainer::{
    model::{
        gpt::{ForwardCtx, Gpt, init_params},
        ops::cross_entropy,
    },
    store::LocalStore,
    train::{
        checkpoint::Checkpointer,
        data::open_dataset,
        pretrain::{self, Outcome, PretrainRun},
        trainer::Trainer,
    },
};

use crate::common::{
    TempDir, byte_dataset, byte_dataset_dir, quick_training, runtime, tiny_model, tiny_run,
};

fn batch(dev: &Device) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..4 * 32).map(|i| (i * 7 + 3) % 256).collect();
    let x = Tensor::from_vec(ids.clone(), (4, 32), dev).expect("x");
    let y = Tensor::from_vec(ids.iter().map(|i| (i + 1) % 256).collect(), (4, 32), dev).expect("y");
    (x, y)
}

#[test]
fn the_bf16_forward_tracks_f32_and_its_gradients_reach_every_f32_master_weight() {
    let dev = Device::Cpu;
    let cfg = tiny_model();
    let params = init_params(&cfg, 3, &dev).expect("init");
    let f32_model = Gpt::new(cfg, &params).expect("model");
    let bf16_model = Gpt::new(cfg, &params)
        .expect("model")
        .with_compute_dtype(DType::BF16);
    let (x, y) = batch(&dev);
    let l32 = f32_model
        .forward(&x, &mut ForwardCtx::default())
        .expect("f32");
    let l16 = bf16_model
        .forward(&x, &mut ForwardCtx::default())
        .expect("bf16");
    assert_eq!(l32.dtype(), DType::F32);
    assert_eq!(l16.dtype(), DType::BF16, "the LM head runs in bf16");
    let scale = l32
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max");
    let diff = (l16.to_dtype(DType::F32).expect("up") - &l32)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    // bf16 keeps 8 bits of mantissa: each rounding is ≤ 2^-9 relative.
    assert!(
        diff < 0.02 * scale,
        "bf16 logits differ by {diff} (scale {scale})"
    );
    assert!(diff > 0.0, "the bf16 model computed in f32");

    let loss = |m: &Gpt| {
        let logits = m.forward(&x, &mut ForwardCtx::default()).expect("forward");
        cross_entropy(
            &logits.reshape((4 * 32, 256)).expect("reshape"),
            &y.flatten_all().expect("flat"),
            None,
        )
        .expect("loss")
    };
    let g32 = loss(&f32_model).backward().expect("backward");
    let g16 = loss(&bf16_model).backward().expect("backward");
    for (name, var) in params.iter() {
        assert_eq!(var.dtype(), DType::F32, "{name}: master weights are f32");
        let a = g32.get(var.as_tensor()).expect("f32 gradient");
        let b = g16
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} gets no gradient in bf16"));
        assert_eq!(
            b.dtype(),
            DType::F32,
            "{name}: the gradient reaches the master as f32"
        );
        let norm = |t: &Tensor| {
            t.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("norm")
                .sqrt()
        };
        let rel = norm(&(b - a).expect("sub")) / norm(a);
        assert!(norm(b) > 0.0, "{name}: zero gradient in bf16");
        assert!(
            rel < 0.05,
            "{name}: bf16 gradient is {rel:.4} away from f32 (relative)"
        );
    }
}

fn losses(precision: Precision, steps: i64) -> (Vec<f32>, Trainer) {
    let tmp = TempDir::new("bf16-track");
    byte_dataset(tmp.path());
    let (_, train, _) = open_dataset(tmp.path()).expect("dataset");
    let cfg = tiny_model();
    let training = taper_crds::training::ResolvedTraining {
        precision,
        ..quick_training(steps)
    };
    let params = init_params(&cfg, 11, &Device::Cpu).expect("init");
    let mut trainer = Trainer::new(cfg, training, params, Device::Cpu).expect("trainer");
    let curve = (0..steps)
        .map(|_| trainer.step(&train).expect("step").loss)
        .collect();
    (curve, trainer)
}

#[test]
fn a_bf16_run_tracks_the_f32_run_over_200_steps_and_keeps_f32_state() {
    let (f32_curve, _) = losses(Precision::F32, 200);
    let (bf16_curve, trainer) = losses(Precision::Bf16, 200);
    // Mean over windows of 20 steps (single steps are noisy in both).
    let windows = |c: &[f32]| -> Vec<f32> {
        c.chunks(20)
            .map(|w| w.iter().sum::<f32>() / w.len() as f32)
            .collect()
    };
    let (a, b) = (windows(&f32_curve), windows(&bf16_curve));
    eprintln!("f32 loss by 20-step window: {a:?}\nbf16: {b:?}");
    assert!(a[9] < a[0] - 1.0, "the f32 run learns: {a:?}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 0.01 * x.abs(),
            "window {i}: bf16 {y:.4} vs f32 {x:.4} (tolerance 1%)"
        );
    }
    assert_ne!(f32_curve, bf16_curve, "the bf16 run computed in f32");
    for (name, var) in trainer.params().iter() {
        assert_eq!(var.dtype(), DType::F32, "{name}: master weights stay f32");
    }
    for (name, t) in trainer.optimizer().state_tensors() {
        assert_eq!(t.dtype(), DType::F32, "{name}: optimizer state stays f32");
    }
}

#[test]
fn a_bf16_run_checkpoints_f32_and_resumes_bit_identically() {
    let rt = runtime();
    let tmp = TempDir::new("bf16-resume");
    let data = byte_dataset_dir(&tmp);
    let (manifest, train, test) = open_dataset(&data).expect("dataset");
    let run = |store: &LocalStore, staging: &str, stop_after: Option<u64>| {
        let mut r: PretrainRun<'_> = tiny_run(
            &manifest,
            &train,
            &test,
            store,
            tmp.path().join(staging),
            12,
        );
        r.training.precision = Precision::Bf16;
        r.stop_after = stop_after;
        pretrain::run(&rt, r).expect("run")
    };
    let straight = LocalStore::new(tmp.path().join("straight"));
    assert_eq!(
        run(&straight, "s1", None),
        Outcome::MaxStepsReached { step: 12 }
    );
    let resumed = LocalStore::new(tmp.path().join("resumed"));
    assert_eq!(
        run(&resumed, "s2", Some(5)),
        Outcome::Interrupted { step: 5 }
    );
    assert_eq!(
        run(&resumed, "s3", None),
        Outcome::MaxStepsReached { step: 12 }
    );

    let load = |store: &LocalStore, staging: &str| {
        rt.block_on(Checkpointer::new(store, tmp.path().join(staging)).resume(&Device::Cpu))
            .expect("resume")
            .expect("a checkpoint")
    };
    let (a, b) = (load(&straight, "r1"), load(&resumed, "r2"));
    assert_eq!((a.state.step, b.state.step), (12, 12));
    for (name, t) in a.model.iter().chain(a.optimizer.iter()) {
        assert_eq!(t.dtype(), DType::F32, "{name} is saved as f32");
    }
    for (name, t) in &a.model {
        let (x, y) = (
            t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a"),
            b.model[name]
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("b"),
        );
        assert_eq!(
            x, y,
            "{name}: the resumed bf16 run ends with the same weights"
        );
    }
}
