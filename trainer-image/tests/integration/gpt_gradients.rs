//! The GPT's gradients are complete and correct: every parameter gets one, they match
//! finite differences, and forward, loss and gradients match PyTorch on a fixed model.

use candle_core::{DType, Device, Tensor};
use rand::{SeedableRng, seq::index::sample};
use rand_chacha::ChaCha8Rng;
use taper_crds::model::GptConfig;
use taper_trainer::model::{
    gpt::{ForwardCtx, Gpt, init_params},
    ops::cross_entropy,
    params::ParamStore,
};

fn tiny(bias: bool) -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 8,
        vocab_size: 24,
        dropout: 0.0,
        bias,
    }
}

fn batch(dev: &Device) -> (Tensor, Tensor) {
    let x: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % 24).collect();
    let y: Vec<u32> = (0..16).map(|i| (i * 5 + 1) % 24).collect();
    (
        Tensor::from_vec(x, (2, 8), dev).expect("inputs"),
        Tensor::from_vec(y, (2, 8), dev).expect("targets"),
    )
}

fn loss(model: &Gpt, x: &Tensor, y: &Tensor) -> Tensor {
    loss_with(model, x, y, &mut ForwardCtx::default())
}

fn loss_with(model: &Gpt, x: &Tensor, y: &Tensor, ctx: &mut ForwardCtx<'_>) -> Tensor {
    let logits = model.forward(x, ctx).expect("forward");
    let (b, t, v) = logits.dims3().expect("3-D logits");
    cross_entropy(
        &logits.reshape((b * t, v)).expect("reshape"),
        &y.flatten_all().expect("flat"),
        None,
    )
    .expect("loss")
}

#[test]
fn every_parameter_receives_a_non_zero_gradient() {
    let dev = Device::Cpu;
    for bias in [true, false] {
        let cfg = tiny(bias);
        let params = init_params(&cfg, 7, &dev).expect("init");
        let model = Gpt::new(cfg, &params).expect("model");
        let (x, y) = batch(&dev);
        let grads = loss(&model, &x, &y).backward().expect("backward");
        let mut missing = Vec::new();
        for (name, var) in params.iter() {
            match grads.get(var.as_tensor()) {
                None => missing.push(format!("{name}: no gradient")),
                Some(g) => {
                    let norm = g
                        .sqr()
                        .and_then(|s| s.sum_all())
                        .and_then(|s| s.to_scalar::<f32>())
                        .expect("norm");
                    if !(norm > 0.0 && norm.is_finite()) {
                        missing.push(format!("{name}: gradient norm {norm}"));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "bias={bias}: {missing:#?}");
    }
}

/// Elements probed per tensor by the finite-difference check (all of a smaller tensor).
const PROBES: usize = 24;

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let mut total = 0;
    // With biases, without them, and with dropout at a fixed mask (the same RNG state for
    // every forward, so the loss is a deterministic function of the weights).
    for (bias, dropout) in [(true, 0.0), (false, 0.0), (true, 0.3)] {
        let cfg = GptConfig {
            dropout,
            ..tiny(bias)
        };
        // f64 parameters with a random (non-trivial) init so every path carries signal.
        let params = init_params(&cfg, 11, &dev)
            .expect("init")
            .to_dtype(DType::F64)
            .expect("f64");
        // Seeded, so the probes see the same weights on every run.
        let mut jitter_rng = ChaCha8Rng::seed_from_u64(13);
        let mut normal = |var: &candle_core::Var, std: f64| -> Tensor {
            let n = var.as_tensor().elem_count();
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    let z: f64 = rand_distr::Distribution::sample(
                        &rand_distr::StandardNormal,
                        &mut jitter_rng,
                    );
                    std * z
                })
                .collect();
            Tensor::from_vec(v, var.shape(), &dev).expect("tensor")
        };
        for (name, var) in params.iter() {
            if name.contains("ln_") {
                let jitter = (normal(var, 0.3) + var.as_tensor()).expect("add");
                var.set(&jitter).expect("set");
            } else if name.ends_with(".bias") {
                var.set(&normal(var, 0.1)).expect("set");
            }
        }
        let model = Gpt::new(cfg, &params).expect("model");
        let (x, y) = batch(&dev);
        let mask_rng = ChaCha8Rng::seed_from_u64(99);
        let fixed_loss = || -> Tensor {
            let mut rng = mask_rng.clone();
            let mut ctx = ForwardCtx {
                dropout_rng: (dropout > 0.0).then_some(&mut rng),
            };
            loss_with(&model, &x, &y, &mut ctx)
        };
        let grads = fixed_loss().backward().expect("backward");
        let eps = 1e-5;
        let (mut worst, mut checked, mut expected) = (0.0f64, 0, 0);
        let mut picker = ChaCha8Rng::seed_from_u64(5);
        for (name, var) in params.iter() {
            let g = grads
                .get(var.as_tensor())
                .expect("gradient")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("vec");
            let base = var
                .as_tensor()
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("vec");
            // The first and last elements and a random sample of the rest.
            let n = base.len();
            let probes: Vec<usize> = if n <= PROBES {
                (0..n).collect()
            } else {
                let inner = sample(&mut picker, n - 2, PROBES - 2)
                    .into_iter()
                    .map(|i| i + 1);
                [0, n - 1].into_iter().chain(inner).collect()
            };
            expected += PROBES.min(n);
            for &i in &probes {
                let probe = |delta: f64| -> f64 {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &dev).expect("tensor"))
                        .expect("set");
                    fixed_loss().to_scalar::<f64>().expect("scalar")
                };
                let numeric = (probe(eps) - probe(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).expect("tensor"))
                    .expect("restore");
                // Relative to the pair. The floor covers gradients that are zero in exact
                // arithmetic (the key biases: softmax ignores a per-row shift; dropped
                // units), where both sides are rounding noise: the loss (about 3) is exact to
                // about 1e-15, so the difference quotient to about 1e-10.
                let err = (numeric - g[i]).abs() / (numeric.abs() + g[i].abs()).max(1e-4);
                assert!(
                    err < 1e-5,
                    "bias={bias} dropout={dropout} {name}[{i}]: analytic {} vs numeric \
                     {numeric} (rel err {err:.2e})",
                    g[i]
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
        assert_eq!(
            checked, expected,
            "bias={bias}: every tensor got {PROBES} probes (or all its elements)"
        );
        eprintln!(
            "finite differences (bias={bias}, dropout={dropout}): {checked} probes over {} \
             tensors, worst relative error {worst:.2e}",
            params.len()
        );
        total += checked;
    }
    assert!(total > 0);
}

/// Fixture written by `scripts/reference/gpt2_fixture.py` with PyTorch: parameters under
/// Hugging Face GPT-2 names, inputs, logits, loss and the gradient of every parameter.
#[test]
fn forward_loss_and_gradients_match_pytorch() {
    let dev = Device::Cpu;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpt2_tiny.safetensors");
    let tensors: std::collections::BTreeMap<String, Tensor> =
        candle_core::safetensors::load(&path, &dev)
            .expect("fixture loads")
            .into_iter()
            .collect();
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        vocab_size: 96,
        dropout: 0.0,
        bias: true,
    };
    let params: ParamStore = init_params(&cfg, 0, &dev).expect("init");
    params
        .load_from(&tensors)
        .expect("fixture has every parameter");
    let model = Gpt::new(cfg, &params).expect("model");
    let x = tensors["fixture.input_ids"]
        .to_dtype(DType::U32)
        .expect("ids");
    let y = tensors["fixture.targets"]
        .to_dtype(DType::U32)
        .expect("targets");

    let logits = model
        .forward(&x, &mut ForwardCtx::default())
        .expect("forward");
    let diff = (&logits - &tensors["fixture.logits"])
        .expect("diff")
        .abs()
        .expect("abs");
    let max_diff = diff
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(max_diff < 1e-4, "logits differ from PyTorch by {max_diff}");

    let l = cross_entropy(
        &logits.reshape((32, 96)).expect("reshape"),
        &y.flatten_all().expect("flat"),
        None,
    )
    .expect("loss");
    let want = tensors["fixture.loss"]
        .flatten_all()
        .expect("flat")
        .to_vec1::<f32>()
        .expect("vec")[0];
    let got = l.to_scalar::<f32>().expect("scalar");
    assert!((got - want).abs() < 1e-4, "loss {got} vs PyTorch {want}");

    let grads = l.backward().expect("backward");
    let mut compared = 0;
    let mut worst = (0.0f32, String::new());
    for (name, var) in params.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let reference = &tensors[&format!("grad.{name}")];
        assert_eq!(g.shape(), reference.shape(), "{name}");
        let scale = reference
            .abs()
            .and_then(|a| a.flatten_all())
            .and_then(|a| a.max(0))
            .and_then(|m| m.to_scalar::<f32>())
            .expect("scale");
        assert!(scale > 0.0, "{name}: the reference gradient is zero");
        let err = (g - reference)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|m| m.to_scalar::<f32>())
            .expect("err");
        // Relative to this tensor's own largest gradient: f32 rounding gives about 1e-6
        // here, while a wrong sign or a missing term in one head changes some elements by
        // a sizeable fraction of the scale.
        let rel = err / scale;
        assert!(
            rel <= 1e-5,
            "{name}: gradient differs from PyTorch by {err} ({rel:.1e} of its scale {scale})"
        );
        if rel > worst.0 {
            worst = (rel, name.to_string());
        }
        compared += 1;
    }
    assert_eq!(compared, params.len());
    assert_eq!(
        params.len(),
        tensors.keys().filter(|k| k.starts_with("grad.")).count(),
        "one PyTorch gradient per parameter"
    );
    eprintln!(
        "PyTorch gradients: {compared} tensors, worst {:.1e} of scale ({})",
        worst.0, worst.1
    );
}
