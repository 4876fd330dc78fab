//! `taper`: the trainer binary that every Taper pod runs, and the local quickstart. This
//! file is the command line and the dispatch; each command's work lives in the library.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use clap::{Parser, Subcommand};
use std::io::Write;
use taper_crds::{TaperObject, exit, manifest::find_one, pod};

use taper_trainer::{
    chat, cleanup, device,
    generate::{self, SampleOptions},
    job::{self, JobError},
    manifests, model, prepare, quickstart,
    train::pretrain::Outcome,
};

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
    /// Delete everything a PretrainJob or FinetuneJob wrote to its store prefixes (its
    /// checkpoints, and a FinetuneJob's output): the operator's cleanup Job runs this
    /// when a job with `reclaimPolicy: Delete` is deleted. Refuses a whole bucket.
    Cleanup {
        /// The resolved job file.
        #[arg(long)]
        job: PathBuf,
        /// Which job of the file, when it holds several.
        #[arg(long)]
        name: Option<String>,
    },
    /// Pretrain a GPT: the program of every PretrainJob pod. Resumes from the newest
    /// complete checkpoint; on SIGTERM finishes the step, checkpoints and exits 75.
    Pretrain(TrainArgs),
    /// Finetune a model on an instruction Dataset, by LoRA or in full: the program of every
    /// FinetuneJob pod. Resumes as `pretrain` does; at the end publishes the adapter (and
    /// the merged model) under `spec.output.location`.
    Finetune(TrainArgs),
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
        /// The model: a job's checkpoint prefix (its newest checkpoint), a checkpoint
        /// folder, or a model folder (`config.json`, `model.safetensors`, as `taper
        /// finetune` exports); `file://…` or `s3://…`.
        #[arg(long, alias = "model")]
        checkpoint: String,
        /// Text to continue.
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// `alpaca` wraps the prompt in the instruction template (for finetuned models).
        #[arg(long, value_enum, default_value = "none")]
        template: chat::Template,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Talk to a model: a REPL on a terminal, one answer per question line over a pipe.
    Chat {
        /// The model, as for `generate` (typically the folder `taper finetune` exported).
        #[arg(long)]
        model: String,
        /// How a question becomes a prompt.
        #[arg(long, value_enum, default_value = "alpaca")]
        template: chat::Template,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Compare the fused kernels (softmax, cross-entropy) with their composed references on
    /// a device, in value and gradient, and time both; exits 1 when one is off.
    CheckKernels {
        /// `cpu`, `cuda` or `cuda:N`; by default the first GPU when there is one.
        #[arg(long, env = pod::env::DEVICE)]
        device: Option<String>,
    },
    /// The Helm chart's Grafana dashboards (defined in `taper_trainer::dashboards`).
    Dashboards {
        #[command(subcommand)]
        action: DashboardsAction,
    },
    /// Run the embedded quickstart pipeline on this CPU, nothing downloaded: write a small
    /// invented world, prepare it, pretrain a small GPT on it, finetune it with LoRA to
    /// answer questions (resuming if stopped), and ask it the held-out questions.
    Quickstart {
        /// Local working folder.
        #[arg(long, default_value = ".taper/quickstart/work")]
        work_dir: PathBuf,
        /// Stop (with a checkpoint, exit 75) after this step; run again to resume.
        #[arg(long)]
        stop_after: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum DashboardsAction {
    /// Write each dashboard's Grafana JSON into a folder (the chart's is
    /// charts/taper/files/dashboards).
    Json {
        /// The folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw each panel of the dashboards from a Prometheus over a time range as PNG
    /// charts: `<out>/<dashboard>.png` (the whole dashboard, on Grafana's grid) and
    /// `<out>/<dashboard>/<NN>-<panel>.png`. Prints a JSON summary per dashboard.
    Render {
        /// The Prometheus to ask (its HTTP API).
        #[arg(long, default_value = "http://localhost:9090")]
        prometheus: String,
        /// Dashboards to draw (`training`, `operator`); default: all.
        #[arg(long = "dashboard")]
        dashboards: Vec<String>,
        /// A variable's value, e.g. `--var namespace=ml --var job=gpt`; a variable not
        /// given takes its first value in Prometheus, as Grafana does.
        #[arg(long = "var", value_parser = parse_var)]
        vars: Vec<(String, String)>,
        /// How far back from the end the range starts, e.g. `30m`, `6h`, `2d`.
        #[arg(long, default_value = "1h", conflicts_with = "start")]
        since: String,
        /// Start of the range (unix seconds); instead of --since.
        #[arg(long)]
        start: Option<f64>,
        /// End of the range (unix seconds); default: now.
        #[arg(long)]
        end: Option<f64>,
        /// Prometheus' scrape interval, for `$__rate_interval`, e.g. `30s`.
        #[arg(long, default_value = "30s")]
        scrape_interval: String,
        /// Width of a dashboard's PNG in pixels.
        #[arg(long, default_value_t = 1600)]
        width: u32,
        /// A TrueType font for the text; default: DejaVu Sans or Liberation Sans.
        #[arg(long)]
        font: Option<PathBuf>,
        /// The folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `name=value` of `--var`.
fn parse_var(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.trim_start_matches('$').to_string(), v.to_string()))
        .ok_or_else(|| format!("expected name=value, got {text:?}"))
}

/// Seconds of `90s`, `15m`, `6h`, `2d` (or plain seconds).
fn parse_duration(text: &str) -> Result<f64, JobError> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let factor = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 604_800.0,
        _ => {
            return Err(JobError::Spec(format!(
                "duration {text:?}: unit must be s, m, h, d or w"
            )));
        }
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0)
        .map(|n| n * factor)
        .ok_or_else(|| JobError::Spec(format!("duration {text:?}: expected e.g. 90s, 15m, 6h")))
}

/// Sampling options of `generate` and `chat`.
#[derive(Debug, clap::Args)]
struct SamplingArgs {
    /// Tokens to generate at most (generation also stops at the end-of-text token).
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; lower is more conservative, 0 always takes the likeliest token.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 200)]
    top_k: usize,
    /// Sample only from the most likely tokens that together reach this probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

impl SamplingArgs {
    fn options(&self) -> SampleOptions {
        SampleOptions {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// A PretrainJob or FinetuneJob manifest (with its Dataset, and a FinetuneJob's base
    /// PretrainJob, in the same file), or the resolved spec the operator writes.
    #[arg(long)]
    job: PathBuf,
    /// Which job of the file, when it holds several.
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

/// `taper pretrain` and `taper finetune`: run the job, exit 75 when interrupted.
fn train(args: TrainArgs, finetune: bool) -> Result<u8, JobError> {
    let objects = manifests::read(&args.job)?;
    let stop = stop_on_signals()?;
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
    let outcome = if finetune {
        taper_trainer::finetune::run(&rt, &objects, opts)?
    } else {
        job::pretrain(&rt, &objects, opts)?
    };
    tracing::info!("{outcome:?}");
    Ok(match outcome {
        Outcome::Interrupted { .. } => exit::RETRYABLE,
        _ => exit::SUCCESS,
    })
}

/// Set when SIGTERM or SIGINT arrives: the trainer finishes the step, checkpoints and
/// exits 75.
fn stop_on_signals() -> Result<Arc<AtomicBool>, JobError> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .map_err(|e| JobError::Internal(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(stop)
}

fn runtime() -> Result<tokio::runtime::Runtime, JobError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| JobError::Internal(format!("tokio runtime: {e}")))
}

/// Logs go to stderr (stdout carries the JSON lines for the operator); `RUST_LOG`
/// overrides the default level, `info`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<u8, JobError> {
    match cli.command {
        Command::Validate { job } => {
            for object in manifests::read(&job)? {
                println!("ok  {}", manifests::describe(&object));
            }
        }
        Command::Cleanup { job, name } => {
            let objects = manifests::read(&job)?;
            let prefixes = cleanup::prefixes(&objects, name.as_deref())?;
            let rt = runtime()?;
            let deleted = rt.block_on(cleanup::delete(&prefixes))?;
            tracing::info!(
                prefixes = ?deleted.prefixes,
                objects = deleted.objects,
                bytes = deleted.bytes,
                "deleted the job's stored data"
            );
        }
        Command::Pretrain(args) => return train(args, false),
        Command::Finetune(args) => return train(args, true),
        Command::Generate {
            checkpoint,
            prompt,
            template,
            sampling,
        } => {
            let rt = runtime()?;
            let generator = generate::Generator::load(&rt, &checkpoint)?;
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{prompt}");
            let _ = out.flush();
            generator.stream(
                &template.apply(&prompt),
                &sampling.options(),
                &mut |piece| {
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                },
            )?;
            let _ = writeln!(out);
        }
        Command::Chat {
            model,
            template,
            sampling,
        } => {
            let rt = runtime()?;
            let generator = generate::Generator::load(&rt, &model)?;
            chat::run(&generator, template, &sampling.options(), &model)?;
        }
        Command::Prepare {
            job,
            name,
            dry_run,
            sample,
            clusters,
        } => {
            let objects = manifests::read(&job)?;
            let ds = find_one(&objects, TaperObject::as_dataset, name.as_deref())
                .map_err(|e| JobError::Spec(e.to_string()))?;
            let mut options = prepare::Options {
                clusters,
                ..prepare::Options::default()
            };
            let rt = runtime()?;
            if dry_run {
                options.limit = Some(sample);
                let selected = prepare::select_documents_with(&rt, ds, &options)?;
                println!(
                    "Dry run on the first {sample} records of each source (nothing written):\n"
                );
                print!("{}", selected.stats.summary_table());
                return Ok(exit::SUCCESS);
            }
            let report = prepare::prepare_with(&rt, ds, &options)?;
            if let Some(target) = taper_trainer::status::Target::from_env::<taper_crds::Dataset>(
                &rt,
                ds.metadata.name.as_deref().unwrap_or_default(),
            ) {
                target.report_dataset(&rt, &report);
            }
            // The report as one JSON line on stdout for the operator; a table for people
            // on stderr.
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            eprint!("{}", report.summary_table());
        }
        Command::Quickstart {
            work_dir,
            stop_after,
        } => {
            let stop = stop_on_signals()?;
            let rt = runtime()?;
            return quickstart::run(&rt, work_dir, stop_after, stop);
        }
        Command::Dashboards {
            action: DashboardsAction::Json { out },
        } => {
            std::fs::create_dir_all(&out)
                .map_err(|e| JobError::Internal(format!("{}: {e}", out.display())))?;
            for d in taper_trainer::dashboards::all() {
                let path = out.join(format!("{}.json", d.file));
                std::fs::write(&path, d.to_file())
                    .map_err(|e| JobError::Internal(format!("{}: {e}", path.display())))?;
                println!("{}", path.display());
            }
        }
        Command::Dashboards {
            action:
                DashboardsAction::Render {
                    prometheus,
                    dashboards,
                    vars,
                    since,
                    start,
                    end,
                    scrape_interval,
                    width,
                    font,
                    out,
                },
        } => {
            use taper_trainer::dashboards::{self, draw, prom::Prometheus, render};
            let spec = |e: render::RenderError| JobError::Spec(e.to_string());
            let end = match end {
                Some(t) => t,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .map_err(|e| JobError::Internal(format!("clock: {e}")))?,
            };
            let start = match start {
                Some(t) => t,
                None => end - parse_duration(&since)?,
            };
            let window = render::Window::new(start, end).map_err(spec)?;
            let scrape = parse_duration(&scrape_interval)?;
            let all = dashboards::all();
            let chosen: Vec<&dashboards::Dashboard> = if dashboards.is_empty() {
                all.iter().collect()
            } else {
                dashboards
                    .iter()
                    .map(|name| {
                        all.iter().find(|d| d.file == name.as_str()).ok_or_else(|| {
                            JobError::Spec(format!(
                                "no dashboard {name:?}; there are: {}",
                                all.iter().map(|d| d.file).collect::<Vec<_>>().join(", ")
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?
            };
            let font = draw::load_font(font.as_deref()).map_err(spec)?;
            eprintln!("font: {}", font.display());
            let given: std::collections::BTreeMap<String, String> = vars.into_iter().collect();
            let prom = Prometheus::new(&prometheus).map_err(spec)?;
            let rt = runtime()?;
            for d in chosen {
                let fetched = rt
                    .block_on(render::fetch(&prom, d, &given, &window, scrape))
                    .map_err(|e| JobError::Internal(e.to_string()))?;
                let rendered = render::write(d, &fetched, &window, width, &out)
                    .map_err(|e| JobError::Internal(e.to_string()))?;
                eprintln!("{} → {}", rendered.dashboard, rendered.png.display());
                for p in &rendered.panels {
                    let note = match (p.series, p.needs) {
                        (0, "dcgm") => "no data: needs dcgm-exporter",
                        (0, _) => "no data",
                        _ => "",
                    };
                    eprintln!(
                        "  {:<44} {:>3} series {:>6} points  {note}",
                        p.title, p.series, p.points
                    );
                }
                println!("{}", serde_json::to_string(&rendered).unwrap_or_default());
            }
        }
        Command::CheckKernels { device } => {
            let device = device::select_device(device.as_deref())?;
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
    taper_trainer::keep_freed_memory();
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!(category = e.category().label(), "{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
