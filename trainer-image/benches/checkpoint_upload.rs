//! Checkpoint throughput against a real MinIO (built by `e2e/scripts/build-tools.sh
//! minio`): a GPT-2 small checkpoint (124M parameters and AdamW's two moments, 1.49 GB)
//! written by `Checkpointer::save`, next to plain multipart PUTs (`put_file`, 32 MiB
//! parts, 4 in flight) of the same three files already on disk, alternated A/B/A/B; and
//! how long a training step waits for the snapshot (`Snapshot::take`, here a host copy).
//!
//! `scripts/bench/checkpoint_bench.sh` builds MinIO if needed and runs
//! `cargo bench --profile dev -p taper-trainer --bench checkpoint_upload`; `TAPER_BENCH_ROUNDS` sets
//! the rounds (default 3) and `TAPER_BENCH_PRESET` the model (default `gpt2-small`).

use std::{collections::BTreeMap, time::Instant};

use candle_core::{Device, Tensor};
use taper_crds::{
    model::{GptConfig, Preset},
    training::{Evaluation, PRETRAIN_DEFAULTS, Training},
};
use taper_e2e::minio::Minio;
use taper_trainer::{
    model::gpt::init_params,
    store::{ObjectStore, S3Settings, S3Store},
    train::{
        checkpoint::{Checkpointer, FILES, Snapshot, TrainerState},
        data::SamplerState,
        optim::{AdamW, AdamWConfig},
    },
};

type BoxError = Box<dyn std::error::Error>;

fn state(model: GptConfig, step: u64) -> TrainerState {
    TrainerState {
        step,
        tokens: 0,
        sampler: SamplerState {
            seed: 1,
            word_pos: 0,
        },
        dropout: None,
        best_val_loss: None,
        best_step: None,
        val_loss: None,
        evals_without_improvement: 0,
        lr_scale: 1.0,
        model,
        training: Training::default().resolve(&Evaluation::default(), &PRETRAIN_DEFAULTS),
        dataset_digest: "bench".into(),
        tokenizer: "gpt2".into(),
        base: None,
        lora: None,
        llama: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    let rounds: usize = std::env::var("TAPER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let preset: Preset = serde_json::from_value(serde_json::Value::String(
        std::env::var("TAPER_BENCH_PRESET").unwrap_or_else(|_| "gpt2-small".into()),
    ))?;
    let cfg = preset.config();
    let minio = Minio::start()?;
    // Credentials and endpoint through the standard AWS environment, before any thread.
    minio.export_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let settings = S3Settings {
        endpoint: Some(minio.endpoint()),
        ..S3Settings::default()
    };
    let store = rt.block_on(S3Store::connect("bench", "ckpt", settings));
    rt.block_on(store.client().create_bucket().bucket("bench").send())?;

    eprintln!("initialising {} ({} layers)…", preset.name(), cfg.n_layer);
    let params = init_params(&cfg, 1, &Device::Cpu)?;
    let optim = AdamW::new(&params, AdamWConfig::default(), |_| true)?;
    // Moments as training leaves them: not zeros (which a store could compress).
    let moments: BTreeMap<String, Tensor> = optim
        .state_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.randn_like(0.0, 1e-3)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let model = params.tensors();

    let staging = std::env::temp_dir().join(format!("taper-ckpt-bench-{}", std::process::id()));
    let raw_dir = staging.join("raw");
    std::fs::create_dir_all(&raw_dir)?;
    // The raw files: exactly what a checkpoint uploads.
    let to_map = |m: &BTreeMap<String, Tensor>| -> std::collections::HashMap<String, Tensor> {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    candle_core::safetensors::save(&to_map(&model), raw_dir.join(FILES[0]))?;
    candle_core::safetensors::save(&to_map(&moments), raw_dir.join(FILES[1]))?;
    std::fs::write(
        raw_dir.join(FILES[2]),
        serde_json::to_vec_pretty(&state(cfg, 0))?,
    )?;
    let bytes: u64 = FILES
        .iter()
        .map(|f| std::fs::metadata(raw_dir.join(f)).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;

    let ckpt = Checkpointer::new(&store, staging.join("staging"));
    let (mut raw, mut saves, mut snaps) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // A: plain multipart PUTs of the files on disk.
        let started = Instant::now();
        for f in FILES {
            rt.block_on(store.put_file(&format!("raw-{round}/{f}"), &raw_dir.join(f)))?;
        }
        raw.push(started.elapsed().as_secs_f64());
        // B: a checkpoint, snapshot first (what a training step waits for).
        let started = Instant::now();
        let snap = Snapshot::take(state(cfg, round as u64 + 1), &model, &moments)?;
        snaps.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        rt.block_on(ckpt.save(&snap.state, &snap.model, &snap.optimizer))?;
        saves.push(started.elapsed().as_secs_f64());
        eprintln!(
            "round {}: raw PUT {:.2} s, snapshot {:.2} s, checkpoint {:.2} s",
            round + 1,
            raw[round],
            snaps[round],
            saves[round]
        );
    }
    let _ = std::fs::remove_dir_all(&staging);
    let mb = bytes as f64 / 1e6;
    let (raw_s, save_s, snap_s) = (median(raw), median(saves), median(snaps));
    println!(
        "\n{} checkpoint, {mb:.0} MB, MinIO on loopback, median of {rounds} A/B rounds\n",
        preset.name()
    );
    println!("| what | seconds | MB/s | vs raw PUT |");
    println!("|---|---:|---:|---:|");
    println!(
        "| plain multipart PUT of the 3 files (`put_file`) | {raw_s:.2} | {:.0} | 100 % |",
        mb / raw_s
    );
    println!(
        "| checkpoint upload (`Checkpointer::save`: serialise, hash, upload, manifest) | {save_s:.2} | {:.0} | {:.0} % |",
        mb / save_s,
        100.0 * raw_s / save_s
    );
    println!("| training stall (`Snapshot::take`, host copy) | {snap_s:.2} | | |");
    Ok(())
}
