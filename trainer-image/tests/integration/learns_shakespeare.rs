//! Evidence that the trainer learns: a small GPT on Tiny Shakespeare (byte-level tokens
//! until the dataset pipeline lands) goes well below the unigram baseline.

use candle_core::Device;
use taper_crds::{
    model::GptConfig,
    training::{Precision, ResolvedTraining},
};
use taper_trainer::{
    model::gpt::init_params,
    train::{
        data::{DatasetManifest, ShardInfo, TokenDtype, open_dataset, write_u16_shard},
        trainer::Trainer,
    },
};

/// Entropy (nats) of the byte distribution: the loss of the best model that ignores context.
fn unigram_entropy(tokens: &[u32]) -> f64 {
    let mut counts = [0u64; 256];
    for &t in tokens {
        counts[t as usize] += 1;
    }
    let n = tokens.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[test]
fn pretraining_on_tiny_shakespeare_beats_the_unigram_baseline() {
    let Some(data) = taper_e2e::shared_data_dir() else {
        eprintln!(
            "SKIP: ../shared/data is absent (a fresh clone); this test needs tinyshakespeare.txt"
        );
        return;
    };
    let text =
        std::fs::read(data.join("tinyshakespeare.txt")).expect("tinyshakespeare.txt is readable");
    let tokens: Vec<u32> = text.iter().map(|&b| b as u32).collect();
    let cut = tokens.len() * 9 / 10;
    let (train, test) = tokens.split_at(cut);

    let dir = std::env::temp_dir().join(format!("taper-learns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_u16_shard(&dir.join("train-00000.bin"), train).expect("write train shard");
    write_u16_shard(&dir.join("test-00000.bin"), test).expect("write test shard");
    let manifest = DatasetManifest {
        version: 1,
        tokenizer: "bytes".into(),
        vocab_size: 256,
        eot_token: 0,
        dtype: TokenDtype::Uint16,
        train: vec![ShardInfo {
            mask: None,
            file: "train-00000.bin".into(),
            tokens: train.len() as u64,
            sha256: String::new(),
        }],
        test: vec![ShardInfo {
            mask: None,
            file: "test-00000.bin".into(),
            tokens: test.len() as u64,
            sha256: String::new(),
        }],
        digest: String::new(),
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec(&manifest).expect("json"),
    )
    .expect("manifest");
    let (_, train_split, test_split) = open_dataset(&dir).expect("dataset opens");

    let cfg = GptConfig {
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        block_size: 64,
        vocab_size: 256,
        dropout: 0.0,
        bias: true,
    };
    let training = ResolvedTraining {
        batch_size: 16,
        gradient_accumulation_steps: 1,
        max_steps: 250,
        learning_rate: 3e-3,
        min_learning_rate: 3e-4,
        warmup_steps: 20,
        decay_steps: 250,
        weight_decay: 0.1,
        betas: [0.9, 0.95],
        grad_clip: 1.0,
        precision: Precision::F32,
        seed: 1337,
        eval_interval: 50,
        eval_iterations: 8,
    };
    let dev = Device::Cpu;
    let params = init_params(&cfg, 1337, &dev).expect("init");
    let mut trainer = Trainer::new(cfg, training.clone(), params, dev).expect("trainer");

    let baseline = unigram_entropy(train);
    let initial = trainer.evaluate(&test_split, 8, 99).expect("eval") as f64;
    let mut curve = vec![(0, initial)];
    for step in 1..=training.max_steps as u64 {
        let stats = trainer.step(&train_split).expect("step");
        assert_eq!(stats.step, step);
        assert!(stats.grad_norm.is_finite());
        if step % 50 == 0 {
            curve.push((
                step,
                trainer.evaluate(&test_split, 8, 99).expect("eval") as f64,
            ));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    let final_loss = curve.last().map(|c| c.1).expect("evaluated");
    eprintln!("unigram baseline {baseline:.3} nats; validation loss by step: {curve:?}");
    assert!(
        initial > 5.0,
        "an untrained model is near ln(256) = 5.55, got {initial}"
    );
    assert!(
        final_loss < baseline - 0.5,
        "validation loss {final_loss:.3} is not well below the unigram baseline {baseline:.3}"
    );
}
