//! Dropout is applied in training and only there: masks at the configured rate, scaled to
//! keep the expectation, different on every training forward, absent from evaluation.

use crate::common::{TempDir, byte_dataset_dir, quick_training, tiny_model};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use taper_crds::model::GptConfig;
use taper_trainer::{
    model::gpt::{ForwardCtx, Gpt, dropout, init_params},
    train::{data::open_dataset, trainer::Trainer},
};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
}

#[test]
fn the_fraction_dropped_matches_the_rate_and_the_rest_is_rescaled() {
    let n = 1_000_000;
    let ones = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).expect("ones");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for p in [0.1, 0.5] {
        let out = values(&dropout(&ones, p, Some(&mut rng)).expect("dropout"));
        let zeros = out.iter().filter(|v| **v == 0.0).count();
        let fraction = zeros as f64 / n as f64;
        // Five standard deviations of a binomial proportion.
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (fraction - p).abs() < 5.0 * sigma,
            "p={p}: dropped {fraction} (σ {sigma:.1e})"
        );
        let kept = (1.0 / (1.0 - p)) as f32;
        assert!(
            out.iter().all(|v| *v == 0.0 || *v == kept),
            "p={p}: kept elements are scaled by 1/(1-p)"
        );
    }
    // Without an RNG (evaluation) or at p = 0 it is the identity.
    assert_eq!(
        values(&dropout(&ones, 0.5, None).expect("eval")),
        values(&ones)
    );
    assert_eq!(
        values(&dropout(&ones, 0.0, Some(&mut rng)).expect("p=0")),
        values(&ones)
    );
}

#[test]
fn training_forwards_differ_and_evaluation_forwards_agree() {
    let dev = Device::Cpu;
    let cfg = GptConfig {
        dropout: 0.2,
        ..tiny_model()
    };
    let params = init_params(&cfg, 1, &dev).expect("init");
    let model = Gpt::new(cfg, &params).expect("model");
    let x = Tensor::from_vec((0..64u32).collect::<Vec<_>>(), (2, 32), &dev).expect("ids");
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut train = || {
        let mut ctx = ForwardCtx {
            dropout_rng: Some(&mut rng),
        };
        values(&model.forward(&x, &mut ctx).expect("forward"))
    };
    let (a, b) = (train(), train());
    assert_ne!(a, b, "two training forwards draw different masks");
    let eval = || {
        values(
            &model
                .forward(&x, &mut ForwardCtx::default())
                .expect("forward"),
        )
    };
    let (c, d) = (eval(), eval());
    assert_eq!(c, d, "evaluation forwards are deterministic");
    assert_ne!(a, c, "training forwards are not evaluation forwards");

    // The same model without dropout gives the evaluation output in training mode.
    let plain = Gpt::new(
        GptConfig {
            dropout: 0.0,
            ..cfg
        },
        &params,
    )
    .expect("model");
    let mut ctx = ForwardCtx {
        dropout_rng: Some(&mut rng),
    };
    assert_eq!(values(&plain.forward(&x, &mut ctx).expect("forward")), c);
}

#[test]
fn the_trainer_applies_dropout_in_steps_and_not_in_evaluation() {
    let tmp = TempDir::new("dropout-trainer");
    let data = byte_dataset_dir(&tmp);
    let (_, train, test) = open_dataset(&data).expect("dataset");
    let run = |dropout: f64| {
        let cfg = GptConfig {
            dropout,
            ..tiny_model()
        };
        let params = init_params(&cfg, 1, &Device::Cpu).expect("init");
        let mut trainer =
            Trainer::new(cfg, quick_training(4), params, Device::Cpu).expect("trainer");
        let losses: Vec<f32> = (0..4)
            .map(|_| trainer.step(&train).expect("step").loss)
            .collect();
        let evals = [
            trainer.evaluate(&test, 2, 9).expect("eval"),
            trainer.evaluate(&test, 2, 9).expect("eval"),
        ];
        (losses, evals)
    };
    let (plain, plain_eval) = run(0.0);
    let (dropped, dropped_eval) = run(0.3);
    assert_ne!(
        plain[0].to_bits(),
        dropped[0].to_bits(),
        "the first step's loss (same weights, same batch) changes with dropout: {plain:?} vs \
         {dropped:?}"
    );
    assert_eq!(plain_eval[0], plain_eval[1]);
    assert_eq!(
        dropped_eval[0], dropped_eval[1],
        "evaluation with dropout configured is deterministic"
    );
}
