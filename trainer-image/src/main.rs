//! `taper`: the trainer binary that every Taper pod runs, and the local quickstart.
//!
//! Today it validates manifests exactly as the API server does and shows the quickstart
//! plan; `prepare`, `pretrain`, `finetune` and `generate` arrive with their issues.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use taper_crds::{TaperObject, parse_manifests};

/// The quickstart pipeline, embedded so that `taper quickstart` needs no file.
const QUICKSTART: &str = include_str!("../../examples/quickstart/pipeline.yaml");

/// Exit code of a permanent error: a retry cannot help (bad spec, bad input).
const EXIT_PERMANENT: u8 = 2;

/// Taper's trainer: prepares datasets, pretrains and finetunes GPTs.
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
    /// Show the embedded quickstart pipeline (a tiny CPU run: Tiny Shakespeare → a 7M GPT →
    /// a LoRA on Alpaca) after validating it.
    Quickstart,
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

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Validate { job } => {
            let text = std::fs::read_to_string(&job).map_err(|source| CliError::Read {
                path: job.clone(),
                source,
            })?;
            for object in load(&job.display().to_string(), &text)? {
                println!("ok  {}", describe(&object));
            }
        }
        Command::Quickstart => {
            let objects = load("embedded quickstart", QUICKSTART)?;
            println!("The quickstart pipeline (examples/quickstart/pipeline.yaml) is valid:");
            for object in &objects {
                println!("  {}", describe(object));
            }
            println!(
                "Running it locally needs `taper prepare` and `taper pretrain`, which are not built yet; \
                 until then this command validates the pipeline and shows what it will run."
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taper: {e}");
            ExitCode::from(EXIT_PERMANENT)
        }
    }
}
