//! The quickstart: the embedded pipeline (`examples/quickstart/pipeline.yaml`) run on
//! this machine's CPU — prepare Tiny Shakespeare, pretrain a small GPT on it (resuming
//! if stopped), and sample from it.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use taper_crds::{TaperObject, exit, manifest::find_one};

use crate::{
    generate::{self, SampleOptions},
    job::{self, JobError},
    manifests, prepare,
    train::pretrain::Outcome,
};

/// The quickstart pipeline, embedded so that `taper quickstart` needs no file.
pub const PIPELINE: &str = include_str!("../../examples/quickstart/pipeline.yaml");

/// Run the quickstart in `work_dir`; `stop` is set by the signal handler. Returns the
/// exit code: 0 when it sampled, 75 when it stopped with a checkpoint.
pub fn run(
    rt: &tokio::runtime::Runtime,
    work_dir: PathBuf,
    stop_after: Option<u64>,
    stop: Arc<AtomicBool>,
) -> Result<u8, JobError> {
    let objects = manifests::load("embedded quickstart", PIPELINE)?;
    println!("Quickstart (examples/quickstart/pipeline.yaml):");
    for object in &objects {
        println!("  {}", manifests::describe(object));
    }
    let pj = find_one(&objects, TaperObject::as_pretrain_job, None)
        .map_err(|e| JobError::Spec(format!("the quickstart: {e}")))?;
    let ds = find_one(
        &objects,
        TaperObject::as_dataset,
        Some(&pj.spec.dataset_ref.name),
    )
    .map_err(|e| JobError::Spec(format!("the quickstart: {e}")))?;
    let ds_name = ds.metadata.name.as_deref().unwrap_or_default();
    let out = ds
        .spec
        .output
        .as_ref()
        .ok_or_else(|| JobError::Spec("the quickstart Dataset has no output".into()))?;
    let store = rt.block_on(crate::store::open(&out.uri, None))?;
    if rt.block_on(store.get("manifest.json")).is_ok() {
        println!(
            "\n[1/3] Dataset {ds_name} is already prepared at {}",
            out.uri
        );
    } else {
        println!("\n[1/3] Preparing Dataset {ds_name} → {}", out.uri);
        let report = prepare::prepare(rt, ds)?;
        println!(
            "      {} documents → {} train / {} test tokens",
            report.documents_read, report.train_tokens, report.test_tokens
        );
    }
    let ckpt = pj.spec.checkpoints.uri.clone().unwrap_or_default();
    println!(
        "\n[2/3] Pretraining {} (progress as JSON lines; Ctrl-C checkpoints and stops, run again to resume)",
        pj.metadata.name.as_deref().unwrap_or_default()
    );
    let opts = job::PretrainOptions {
        name: None,
        data: None,
        checkpoints: None,
        work_dir,
        metrics_addr: None,
        peak_flops: None,
        stop_after,
        namespace: "local".into(),
        device: None,
        stop,
    };
    if let Outcome::Interrupted { step } = job::pretrain(rt, &objects, opts)? {
        println!(
            "\nStopped at step {step} with a checkpoint in {ckpt}; run the quickstart again to resume."
        );
        return Ok(exit::RETRYABLE);
    }
    println!("\n[3/3] A sample from the model ({ckpt}):\n");
    let text = generate::from_checkpoint(
        rt,
        &ckpt,
        "ROMEO:",
        &SampleOptions {
            max_tokens: 100,
            temperature: 0.8,
            top_k: 200,
            seed: 1,
        },
    )?;
    println!("{text}\n");
    println!(
        "Next: `taper generate --checkpoint {ckpt} --prompt ...`. The quickstart's FinetuneJob (LoRA on Alpaca) needs `taper finetune`, which is not built yet."
    );
    Ok(exit::SUCCESS)
}
