//! Training-step throughput of the GPT: forward, backward, clipping and AdamW on random
//! tokens, the same work as `../shared/bench/torch_gpt_ref.py`.
//!
//! `cargo bench -p taper-trainer --bench gpt_step` prints one `RESULT` line; set
//! `TAPER_BENCH` to `layers,heads,embd,block,vocab,batch,steps` to change the shape
//! (default: the baby config `6,6,384,256,65,12,20`). `scripts/bench/pretrain_bench.py`
//! runs it next to PyTorch and prints a table. `TAPER_BENCH_DEVICE` (`cpu`, `cuda`) and
//! `TAPER_BENCH_DTYPE` (`f32`, `bf16`: mixed precision) choose where and how; with
//! `TAPER_BENCH_PHASES=1` the device is synchronised between the phases of a step
//! (forward, loss, backward, gradient gathering, clipping, AdamW) and a `PHASES` line
//! gives each one's median milliseconds, which is where a step's time goes.

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use taper_crds::model::GptConfig;
use taper_trainer::{
    model::{
        gpt::{ForwardCtx, Gpt, init_params},
        ops::cross_entropy,
    },
    train::optim::{AdamW, AdamWConfig, Grads},
};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    taper_trainer::keep_freed_memory();
    let spec = std::env::var("TAPER_BENCH").unwrap_or_else(|_| "6,6,384,256,65,12,20".into());
    let v: Vec<i64> = spec.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let [layers, heads, embd, block, vocab, batch, steps] = v[..] else {
        return Err(
            "TAPER_BENCH needs 7 numbers: layers,heads,embd,block,vocab,batch,steps".into(),
        );
    };
    let warmup = 3;
    let cfg = GptConfig {
        n_layer: layers,
        n_head: heads,
        n_embd: embd,
        block_size: block,
        vocab_size: vocab,
        dropout: 0.0,
        bias: true,
    };
    let dev = taper_trainer::device::select_device(
        std::env::var("TAPER_BENCH_DEVICE")
            .ok()
            .as_deref()
            .or(Some("cpu")),
    )?;
    let dtype = match std::env::var("TAPER_BENCH_DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        Ok("f32") | Err(_) => DType::F32,
        Ok(other) => return Err(format!("TAPER_BENCH_DTYPE={other}: f32 or bf16").into()),
    };
    let phases = std::env::var("TAPER_BENCH_PHASES").is_ok_and(|v| v == "1");
    let params = init_params(&cfg, 0, &dev)?;
    let model = Gpt::new(cfg, &params)?.with_compute_dtype(dtype);
    let mut opt = AdamW::new(
        &params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        |_| true,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let (b, t) = (batch as usize, block as usize);
    let mut times = Vec::new();
    let mut phase_times: [Vec<f64>; 6] = Default::default();
    let mut last = 0.0f32;
    for step in 0..warmup + steps as usize {
        let toks: Vec<u32> = (0..b * (t + 1))
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let data = Tensor::from_vec(toks, (b, t + 1), &dev)?;
        let x = data.narrow(1, 0, t)?.contiguous()?;
        let y = data.narrow(1, 1, t)?.contiguous()?;
        let started = Instant::now();
        // Phase boundaries: the device is synchronised first when phases are timed.
        let mut marks = Vec::with_capacity(6);
        let mut mark = || -> candle_core::Result<()> {
            if phases {
                dev.synchronize()?;
                marks.push(started.elapsed().as_secs_f64());
            }
            Ok(())
        };
        let logits = model.forward(&x, &mut ForwardCtx::default())?;
        mark()?;
        let loss = cross_entropy(
            &logits.reshape((b * t, vocab as usize))?,
            &y.flatten_all()?,
            None,
        )?;
        mark()?;
        let store = loss.backward()?;
        mark()?;
        let mut grads = Grads::new();
        grads.accumulate(&store, opt.vars())?;
        mark()?;
        grads.clip_global_norm(1.0)?;
        mark()?;
        opt.step(&grads, 1e-3)?;
        last = loss.to_scalar::<f32>()?;
        mark()?;
        if step >= warmup {
            times.push(started.elapsed().as_secs_f64());
            if phases {
                let mut prev = 0.0;
                for (i, m) in marks.iter().enumerate() {
                    phase_times[i].push(m - prev);
                    prev = *m;
                }
            }
        }
    }
    if phases {
        let names = ["forward", "loss", "backward", "gather", "clip", "adamw"];
        let parts: Vec<String> = names
            .iter()
            .zip(phase_times.iter_mut())
            .map(|(n, v)| {
                v.sort_by(f64::total_cmp);
                format!("{n}_ms={:.1}", v[v.len() / 2] * 1e3)
            })
            .collect();
        println!("PHASES {}", parts.join(" "));
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "RESULT taper candle-{} {dtype:?} params={:.2}M B={b} T={t} ms_per_step={:.1} tokens_per_s={:.0} peak_rss_mib={:.0} final_loss={last:.4}",
        if dev.is_cuda() { "cuda" } else { "cpu" },
        params.numel() as f64 / 1e6,
        med * 1e3,
        (b * t) as f64 / med,
        peak_rss_mib()
    );
    Ok(())
}
