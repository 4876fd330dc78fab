//! `taper`: the trainer binary that every Taper pod runs, and the local quickstart.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use clap::{Parser, Subcommand};
use taper_crds::{TaperObject, exit, manifest::find_one, parse_manifests, pod};
use taper_trainer::{
    generate::{self, SampleOptions},
    job::{self, JobError},
    model, prepare,
};

/// The quickstart pipeline, embedded so that `taper quickstart` needs no file.
const QUICKSTART: &str = include_str!("../../examples/quickstart/pipeline.yaml");

/// Taper's trainer: prepares datasets, pretrains and finetunes GPTs.
///
/// Exit codes: 0 success; 1 internal error; 2 invalid spec; 3 invalid data; 4 loss
/// diverged; 75 retryable (interrupted after a checkpoint, or a transient store failure).
#[derive(Debug, Parser)]
#[command(name = "taper", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a manifest (Dataset, PretrainJob, FinetuneJob) against the CRDs' rules, as the
    /// API server would at `kubectl apply`.
    Validate {
        /// YAML file with one or more Taper objects.
        #[arg(long)]
        job: PathBuf,
    },
    /// Pretrain a GPT: the program of every PretrainJob pod. Resumes from the newest
    /// complete checkpoint; on SIGTERM finishes the step, checkpoints and exits 75.
    Pretrain(PretrainArgs),
    /// Prepare a Dataset: read its sources, split, tokenize and publish shards and a manifest.
    Prepare {
        /// A Dataset manifest (or a file holding one).
        #[arg(long)]
        job: PathBuf,
        /// Which Dataset of the file, when it holds several.
        #[arg(long)]
        name: Option<String>,
        /// Report what each stage would drop on a sample, without tokenizing or writing.
        #[arg(long)]
        dry_run: bool,
        /// Records read per source in a dry run.
        #[arg(long, default_value_t = 1000)]
        sample: u64,
        /// Write the MinHash near-duplicate clusters to this file: a JSON line per
        /// document in a cluster of two or more (cluster, kept, source, url, text).
        #[arg(long)]
        clusters: Option<PathBuf>,
    },
    /// Sample text from a checkpoint.
    Generate {
        /// Checkpoint prefix of a job (`file://…` or `s3://…`); the newest checkpoint is used.
        #[arg(long)]
        checkpoint: String,
        /// Text to continue.
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        /// Softmax temperature; lower is more conservative.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only from the k most likely tokens (0: all).
        #[arg(long, default_value_t = 200)]
        top_k: usize,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
    },
    /// Compare the fused kernels (softmax, cross-entropy) with their composed references on
    /// a device, in value and gradient, and time both; exits 1 when one is off.
    CheckKernels {
        /// `cpu`, `cuda` or `cuda:N`; by default the first GPU when there is one.
        #[arg(long, env = pod::env::DEVICE)]
        device: Option<String>,
    },
    /// Run the embedded quickstart pipeline on this CPU: prepare Tiny Shakespeare, pretrain a
    /// 7M-parameter GPT on it (resuming if stopped), and sample from it.
    Quickstart {
        /// Local working folder.
        #[arg(long, default_value = ".taper/quickstart/work")]
        work_dir: PathBuf,
        /// Stop (with a checkpoint, exit 75) after this step; run again to resume.
        #[arg(long)]
        stop_after: Option<u64>,
    },
}

#[derive(Debug, clap::Args)]
struct PretrainArgs {
    /// A PretrainJob manifest (with its Dataset in the same file), or the resolved spec the
    /// operator writes.
    #[arg(long)]
    job: PathBuf,
    /// Which PretrainJob of the file, when it holds several.
    #[arg(long)]
    name: Option<String>,
    /// Dataset location (a prefix with `manifest.json`); default: the output of the
    /// Dataset named by `datasetRef` in the job file.
    #[arg(long)]
    data: Option<String>,
    /// Checkpoint prefix; default: `spec.checkpoints.uri`.
    #[arg(long)]
    checkpoints: Option<String>,
    /// Local working folder (dataset cache, checkpoint staging).
    #[arg(long, env = pod::env::WORK_DIR, default_value = ".taper/work")]
    work_dir: PathBuf,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9090).
    #[arg(long, env = pod::env::METRICS_ADDR)]
    metrics_addr: Option<SocketAddr>,
    /// Peak FLOP/s of the device in TFLOPS, for MFU (H100 bf16 dense: 989).
    #[arg(long, env = pod::env::PEAK_TFLOPS)]
    peak_tflops: Option<f64>,
    /// Stop (with a checkpoint, exit 75) after this step: for demos of resume.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Namespace label of the metrics.
    #[arg(long, env = pod::env::NAMESPACE, default_value = "local")]
    namespace: String,
    /// Device to train on: `cpu`, `cuda` or `cuda:N` (default: the first GPU if any).
    #[arg(long, env = pod::env::DEVICE)]
    device: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Manifest {
        origin: String,
        source: taper_crds::ManifestError,
    },
    #[error("{origin}: no Dataset, PretrainJob or FinetuneJob in it")]
    Empty { origin: String },
    #[error("{origin}: {kind} {name} is invalid: {errors}")]
    Invalid {
        origin: String,
        kind: &'static str,
        name: String,
        errors: kube::core::cel::ValidationErrors,
    },
    #[error(transparent)]
    Job(#[from] JobError),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Job(e) => e.exit_code(),
            _ => exit::INVALID_SPEC,
        }
    }
}

fn load(origin: &str, text: &str) -> Result<Vec<TaperObject>, CliError> {
    let objects = parse_manifests(text).map_err(|source| CliError::Manifest {
        origin: origin.to_string(),
        source,
    })?;
    if objects.is_empty() {
        return Err(CliError::Empty {
            origin: origin.to_string(),
        });
    }
    for object in &objects {
        taper_crds::validate(object).map_err(|errors| CliError::Invalid {
            origin: origin.to_string(),
            kind: object.kind(),
            name: object.name().to_string(),
            errors,
        })?;
    }
    Ok(objects)
}

fn read_objects(path: &PathBuf) -> Result<Vec<TaperObject>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.clone(),
        source,
    })?;
    load(&path.display().to_string(), &text)
}

fn describe(object: &TaperObject) -> String {
    match object {
        TaperObject::Dataset(ds) => {
            let sources: Vec<&str> = ds.spec.sources.iter().map(|s| s.uri.as_str()).collect();
            format!(
                "Dataset {}: {} from {}",
                ds.metadata.name.as_deref().unwrap_or_default(),
                serde_json::to_string(&ds.spec.format).unwrap_or_default(),
                sources.join(", ")
            )
        }
        TaperObject::PretrainJob(pj) => {
            let m = pj.spec.model.resolve();
            let t = pj.spec.resolved_training();
            format!(
                "PretrainJob {}: GPT {}L/{}H/{}E, block {}, {} steps of {}×{} sequences at lr {:e}",
                pj.metadata.name.as_deref().unwrap_or_default(),
                m.n_layer,
                m.n_head,
                m.n_embd,
                m.block_size,
                t.max_steps,
                t.batch_size,
                t.gradient_accumulation_steps,
                t.learning_rate
            )
        }
        TaperObject::FinetuneJob(fj) => {
            let t = fj.spec.resolved_training();
            format!(
                "FinetuneJob {}: {:?} on {}, {} steps at lr {:e}",
                fj.metadata.name.as_deref().unwrap_or_default(),
                fj.spec.method.type_,
                fj.spec.dataset_ref.name,
                t.max_steps,
                t.learning_rate
            )
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Job(JobError::Internal(format!("tokio runtime: {e}"))))
}

fn pick_dataset<'a>(
    objects: &'a [TaperObject],
    name: Option<&str>,
) -> Result<&'a taper_crds::Dataset, CliError> {
    find_one(objects, TaperObject::as_dataset, name)
        .map_err(|e| JobError::Spec(e.to_string()).into())
}

/// The quickstart: the embedded pipeline's pretraining half, on this machine's CPU.
fn quickstart(work_dir: PathBuf, stop_after: Option<u64>) -> Result<u8, CliError> {
    let objects = load("embedded quickstart", QUICKSTART)?;
    println!("Quickstart (examples/quickstart/pipeline.yaml):");
    for object in &objects {
        println!("  {}", describe(object));
    }
    let rt = runtime()?;
    let pj = find_one(&objects, TaperObject::as_pretrain_job, None)
        .map_err(|e| JobError::Spec(format!("the quickstart: {e}")))?;
    let ds = pick_dataset(&objects, Some(&pj.spec.dataset_ref.name))?;
    let out = ds
        .spec
        .output
        .as_ref()
        .ok_or_else(|| JobError::Spec("the quickstart Dataset has no output".into()))?;
    let store = rt
        .block_on(taper_trainer::store::open(&out.uri, None))
        .map_err(JobError::from)?;
    if rt.block_on(store.get("manifest.json")).is_ok() {
        println!(
            "\n[1/3] Dataset {} is already prepared at {}",
            ds.metadata.name.as_deref().unwrap_or_default(),
            out.uri
        );
    } else {
        println!(
            "\n[1/3] Preparing Dataset {} → {}",
            ds.metadata.name.as_deref().unwrap_or_default(),
            out.uri
        );
        let stats = prepare::prepare(&rt, ds)?;
        println!(
            "      {} documents → {} train / {} test tokens",
            stats.documents_read, stats.train_tokens, stats.test_tokens
        );
    }
    let ckpt = pj.spec.checkpoints.uri.clone().unwrap_or_default();
    println!(
        "\n[2/3] Pretraining {} (progress as JSON lines; Ctrl-C checkpoints and stops, run again to resume)",
        pj.metadata.name.as_deref().unwrap_or_default()
    );
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| JobError::Internal(format!("cannot install the signal handler: {e}")))?;
    }
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
    let outcome = job::pretrain(&rt, &objects, opts)?;
    if let taper_trainer::train::pretrain::Outcome::Interrupted { step } = outcome {
        println!(
            "\nStopped at step {step} with a checkpoint in {ckpt}; run the quickstart again to resume."
        );
        return Ok(exit::RETRYABLE);
    }
    println!("\n[3/3] A sample from the model ({ckpt}):\n");
    let text = generate::from_checkpoint(
        &rt,
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

fn run(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Validate { job } => {
            for object in read_objects(&job)? {
                println!("ok  {}", describe(&object));
            }
        }
        Command::Pretrain(args) => {
            let objects = read_objects(&args.job)?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(signal, stop.clone()).map_err(|e| {
                    JobError::Internal(format!("cannot install the signal handler: {e}"))
                })?;
            }
            let rt = runtime()?;
            let opts = job::PretrainOptions {
                name: args.name,
                data: args.data,
                checkpoints: args.checkpoints,
                work_dir: args.work_dir,
                metrics_addr: args.metrics_addr,
                peak_flops: args.peak_tflops.map(|t| t * 1e12),
                stop_after: args.stop_after,
                namespace: args.namespace,
                device: args.device,
                stop,
            };
            let outcome = job::pretrain(&rt, &objects, opts)?;
            eprintln!("taper: {outcome:?}");
            return Ok(match outcome {
                taper_trainer::train::pretrain::Outcome::Interrupted { .. } => exit::RETRYABLE,
                _ => exit::SUCCESS,
            });
        }
        Command::Generate {
            checkpoint,
            prompt,
            max_tokens,
            temperature,
            top_k,
            seed,
        } => {
            let rt = runtime()?;
            let text = generate::from_checkpoint(
                &rt,
                &checkpoint,
                &prompt,
                &SampleOptions {
                    max_tokens,
                    temperature,
                    top_k,
                    seed,
                },
            )?;
            println!("{text}");
        }
        Command::Prepare {
            job,
            name,
            dry_run,
            sample,
            clusters,
        } => {
            let objects = read_objects(&job)?;
            let ds = pick_dataset(&objects, name.as_deref())?;
            let mut options = prepare::Options {
                clusters,
                ..prepare::Options::default()
            };
            if dry_run {
                options.limit = Some(sample);
                let selected = prepare::select_documents_with(ds, &options)?;
                println!(
                    "Dry run on the first {sample} records of each source (nothing written):\n"
                );
                print!("{}", prepare::summary_table(&selected.stats));
                return Ok(exit::SUCCESS);
            }
            let rt = runtime()?;
            let stats = prepare::prepare_with(&rt, ds, &options)?;
            // JSON on stdout for the operator; a table for people on stderr.
            println!("{}", serde_json::to_string(&stats).unwrap_or_default());
            eprint!("{}", prepare::summary_table(&stats));
        }
        Command::Quickstart {
            work_dir,
            stop_after,
        } => return quickstart(work_dir, stop_after),
        Command::CheckKernels { device } => {
            let device = job::select_device(device.as_deref())?;
            // GPT-2 small's shapes: attention scores of 2 sequences × 12 heads at block
            // 1024, and the logits of 1,024 positions over the padded GPT-2 vocabulary.
            let checks = model::check::check_fused_ops(&device, (2, 12, 1024), (1024, 50304))
                .map_err(|e| JobError::Internal(format!("kernel check: {e}")))?;
            print!("{}", model::check::table(&device, &checks));
            if !checks.iter().all(model::check::KernelCheck::passed) {
                return Ok(exit::INTERNAL);
            }
        }
    }
    Ok(exit::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("taper: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
