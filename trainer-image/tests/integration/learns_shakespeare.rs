//! Evidence that the trainer learns: a small GPT on Tiny Shakespeare (byte-level tokens)
//! goes clearly below the best bigram model of the same split, which a model that uses no
//! context beyond the current token cannot do.

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

/// Cross-entropy (nats) on `test` of a byte bigram model counted on `train`: the loss a
/// model that sees only the current token can reach. Smoothed toward the unigram
/// distribution, `p(b|a) = (c(a,b) + k·p(b)) / (c(a) + k)`, with the `k` that is best on
/// `test` itself, so the bar is the strongest bigram, not a weak one.
fn bigram_cross_entropy(train: &[u32], test: &[u32]) -> f64 {
    let mut pair = vec![[0u64; 256]; 256];
    let mut first = [0u64; 256];
    let mut unigram = [0u64; 256];
    for w in train.windows(2) {
        pair[w[0] as usize][w[1] as usize] += 1;
        first[w[0] as usize] += 1;
    }
    for &t in train {
        unigram[t as usize] += 1;
    }
    let n = train.len() as f64;
    // Add-one on the unigram so a byte unseen in training has a finite loss.
    let p_uni = |b: usize| (unigram[b] as f64 + 1.0) / (n + 256.0);
    [0.01, 0.1, 1.0, 10.0, 100.0]
        .iter()
        .map(|&k| {
            let total: f64 = test
                .windows(2)
                .map(|w| {
                    let (a, b) = (w[0] as usize, w[1] as usize);
                    let p = (pair[a][b] as f64 + k * p_uni(b)) / (first[a] as f64 + k);
                    -p.ln()
                })
                .sum();
            total / (test.len() - 1) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// How far below the bigram model the GPT must end (nats).
const MARGIN: f64 = 0.2;

#[test]
fn pretraining_on_tiny_shakespeare_beats_a_bigram_model() {
    let Some(data) = taper_e2e::shared_data_or_skip() else {
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
        max_steps: 600,
        learning_rate: 3e-3,
        min_learning_rate: 3e-4,
        warmup_steps: 20,
        decay_steps: 600,
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
    let bigram = bigram_cross_entropy(train, test);
    let initial = trainer.evaluate(&test_split, 8, 99).expect("eval") as f64;
    let mut curve = vec![(0, initial)];
    for step in 1..=training.max_steps as u64 {
        let stats = trainer.step(&train_split).expect("step");
        assert_eq!(stats.step, step);
        assert!(stats.grad_norm.is_finite());
        if step % 100 == 0 {
            curve.push((
                step,
                trainer.evaluate(&test_split, 8, 99).expect("eval") as f64,
            ));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    let final_loss = curve.last().map(|c| c.1).expect("evaluated");
    // The final figure over more batches than the curve's, so noise cannot carry it.
    let final_loss = final_loss.max(trainer.evaluate(&test_split, 64, 7).expect("eval") as f64);
    eprintln!(
        "unigram {baseline:.3} nats, bigram {bigram:.3} nats; validation loss by step: \
         {curve:?}, final {final_loss:.3}"
    );
    assert!(
        initial > 5.0,
        "an untrained model is near ln(256) = 5.55, got {initial}"
    );
    assert!(
        bigram < baseline - 0.5,
        "the bigram model ({bigram:.3}) is well below the unigram one ({baseline:.3})"
    );
    assert!(
        final_loss < bigram - MARGIN,
        "validation loss {final_loss:.3} is not {MARGIN} nats below the bigram model's \
         {bigram:.3}: the model does not use its context"
    );
}
