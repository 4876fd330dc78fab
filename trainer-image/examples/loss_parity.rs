//! Taper's half of `scripts/bench/compare_loss.py`: train a GPT with the library's
//! `Trainer` and write everything a reference implementation needs to train the very same
//! run — the initial weights (Hugging Face GPT-2 names and layout) and every batch in
//! order — next to the loss of each step.
//!
//! ```text
//! cargo run --release -p taper-trainer --example loss_parity -- \
//!     --data DATASET_DIR --out OUT_DIR [--steps 2000] [--layers 4] [--heads 4] [--embd 128]
//!     [--block 128] [--batch 12] [--lr 1e-3] [--min-lr 1e-4] [--warmup 100]
//!     [--weight-decay 0.1] [--grad-clip 1.0] [--seed 1337]
//! ```
//!
//! Writes `OUT_DIR/init.safetensors`, `OUT_DIR/batches.bin` (per step, the inputs then
//! the targets, `[batch, block]` little-endian u16 each), `OUT_DIR/run.json` (the recipe)
//! and `OUT_DIR/taper.csv` (`step,loss,grad_norm,lr`).

use std::{collections::BTreeMap, io::Write, path::PathBuf, time::Instant};

use candle_core::Device;
use taper_crds::{
    model::GptConfig,
    training::{Precision, ResolvedTraining},
};
use taper_trainer::{
    model::gpt::init_params,
    train::{
        data::{BatchSampler, open_dataset},
        trainer::Trainer,
    },
};

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let mut opts: BTreeMap<String, String> = BTreeMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let key = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        opts.insert(key.to_string(), value);
    }
    let get = |k: &str, default: &str| opts.get(k).cloned().unwrap_or_else(|| default.into());
    let num = |k: &str, default: &str| -> Result<f64, BoxError> {
        get(k, default)
            .parse::<f64>()
            .map_err(|e| format!("--{k}: {e}").into())
    };
    let data = PathBuf::from(opts.get("data").ok_or("--data DATASET_DIR is required")?);
    let out = PathBuf::from(opts.get("out").ok_or("--out OUT_DIR is required")?);
    std::fs::create_dir_all(&out)?;
    let steps = num("steps", "2000")? as usize;
    let (manifest, train, _test) = open_dataset(&data)?;
    let cfg = GptConfig {
        n_layer: num("layers", "4")? as i64,
        n_head: num("heads", "4")? as i64,
        n_embd: num("embd", "128")? as i64,
        block_size: num("block", "128")? as i64,
        vocab_size: manifest.vocab_size as i64,
        dropout: 0.0,
        bias: true,
    };
    let training = ResolvedTraining {
        batch_size: num("batch", "12")? as i64,
        gradient_accumulation_steps: 1,
        max_steps: steps as i64,
        learning_rate: num("lr", "1e-3")?,
        min_learning_rate: num("min-lr", "1e-4")?,
        warmup_steps: num("warmup", "100")? as i64,
        decay_steps: steps as i64,
        weight_decay: num("weight-decay", "0.1")?,
        betas: [0.9, 0.95],
        grad_clip: num("grad-clip", "1.0")?,
        precision: Precision::F32,
        seed: num("seed", "1337")? as i64,
        eval_interval: i64::MAX,
        eval_iterations: 1,
    };
    let dev = Device::Cpu;
    let params = init_params(&cfg, training.seed as u64, &dev)?;
    params.save(&out.join("init.safetensors"))?;
    std::fs::write(
        out.join("run.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "model": cfg, "training": training, "adamEps": 1e-8,
            "decay": "tensors of two or more dimensions (weights and embeddings)",
        }))?,
    )?;

    // The batches the trainer will draw: its sampler is seeded by the run's seed, so a
    // second sampler with that seed, asked the same questions, gives the same answers.
    let (batch, block) = (training.batch_size as usize, cfg.block_size as usize);
    let mut sampler = BatchSampler::new(training.seed as u64);
    let mut batches = std::io::BufWriter::new(std::fs::File::create(out.join("batches.bin"))?);
    for _ in 0..steps {
        let (x, y) = sampler.windows(&train, batch, block, &dev)?;
        for t in [x, y] {
            for id in t.flatten_all()?.to_vec1::<u32>()? {
                let id = u16::try_from(id).map_err(|_| format!("token {id} exceeds u16"))?;
                batches.write_all(&id.to_le_bytes())?;
            }
        }
    }
    batches.flush()?;

    let mut trainer = Trainer::new(cfg, training, params, dev)?;
    let mut csv = std::io::BufWriter::new(std::fs::File::create(out.join("taper.csv"))?);
    writeln!(csv, "step,loss,grad_norm,lr")?;
    let started = Instant::now();
    for _ in 0..steps {
        let s = trainer.step(&train)?;
        writeln!(csv, "{},{},{},{}", s.step, s.loss, s.grad_norm, s.lr)?;
        if s.step % 100 == 0 {
            eprintln!(
                "taper step {} loss {:.4} ({:.0} ms/step)",
                s.step,
                s.loss,
                started.elapsed().as_secs_f64() * 1e3 / s.step as f64
            );
        }
    }
    csv.flush()?;
    Ok(())
}
