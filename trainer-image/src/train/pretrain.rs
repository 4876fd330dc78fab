//! The pretraining loop: resume, train, evaluate, apply the overfitting policy,
//! checkpoint, report — until `maxSteps`, an early stop, or SIGTERM.
//!
//! Checkpoints are written off the critical path: the step that saves waits only for a
//! snapshot of the weights and optimizer state in host memory; a background thread
//! serialises, hashes and uploads it (files, then the manifest, then `latest.json`, then
//! retention) while training goes on. At most one upload is in flight: the next save
//! waits for the previous one, and so does every way out of the loop (the end, an early
//! stop, SIGTERM), so a run never exits with its last checkpoint half written. An upload
//! that fails fails the run at the next step, as a synchronous save did.

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use candle_core::Device;
use taper_crds::{
    model::GptConfig,
    report::{
        self, CheckpointSaved, Done, EvalAction, EvalReport, NonFiniteLoss, ProgressEvent, Started,
        StepReport,
    },
    training::{Overfitting, ResolvedTraining},
};

pub use super::overfitting::{Decision, Tracker};
use super::{
    checkpoint::{CheckpointError, Checkpointer, Snapshot, TrainerState},
    data::{DataError, TokenSplit},
    trainer::{StepError, Trainer, Tuning},
};
use crate::{
    metrics::Metrics,
    model::{
        Arch, ModelError,
        gpt::{flops_per_token, init_params},
        params::ParamStore,
    },
    store::ObjectStore,
};

/// Consecutive non-finite steps tolerated (each skipped, with fresh batches) before the
/// run is declared diverged.
pub const MAX_NON_FINITE_STEPS: u32 = 3;

/// Where a run's weights start.
#[derive(Debug, Default)]
pub enum ModelInit {
    /// Fresh weights from the seed (pretraining).
    #[default]
    Fresh,
    /// A base model to finetune.
    Base(Box<BaseModel>),
}

/// A model to finetune.
#[derive(Debug)]
pub struct BaseModel {
    /// Its weights, with fresh adapters for LoRA.
    pub params: ParamStore,
    /// Its architecture (the run's `model` is GPT-2's shape, or a Llama's summary).
    pub arch: Arch,
    /// What is trained.
    pub tuning: Tuning,
    /// Its identity (URI, and the sha256 of a checkpoint's manifest), recorded in
    /// checkpoints: a run resumes only onto the same base.
    pub identity: String,
}

/// What a finished finetuning run publishes (the adapter, the merged model), given the
/// trainer at the end; its event is emitted before `done`.
pub type Export<'a> = &'a (dyn Fn(&Trainer) -> Result<ProgressEvent, PretrainError> + Sync);

/// Everything a training run needs (pretraining, or finetuning with [`ModelInit::Base`]).
pub struct PretrainRun<'a> {
    /// Architecture.
    pub model: GptConfig,
    /// Where the weights start.
    pub init: ModelInit,
    /// Finetuning: publish the result at the end (not after an interruption).
    pub export: Option<Export<'a>>,
    /// Training settings.
    pub training: ResolvedTraining,
    /// Overfitting policy.
    pub overfitting: Overfitting,
    /// Save every this many steps.
    pub checkpoint_interval: u64,
    /// Newest checkpoints kept (plus the best).
    pub keep: usize,
    /// Train split.
    pub train: &'a TokenSplit,
    /// Test split.
    pub test: &'a TokenSplit,
    /// Digest of the dataset, recorded in checkpoints.
    pub dataset_digest: String,
    /// Tokenizer of the dataset, recorded in checkpoints for `taper generate`.
    pub tokenizer: String,
    /// Where checkpoints go.
    pub store: &'a dyn ObjectStore,
    /// Local staging folder for checkpoint files.
    pub staging: PathBuf,
    /// Device to train on.
    pub device: Device,
    /// Peak FLOP/s of the device, for MFU; `None` leaves MFU unreported.
    pub peak_flops: Option<f64>,
    /// Set by the SIGTERM handler: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Metrics to update.
    pub metrics: Option<&'a Metrics>,
    /// Stop after this step even if `maxSteps` is later (for tests and demos).
    pub stop_after: Option<u64>,
    /// Also given every progress event (the live status reporter).
    pub events: Option<EventSink<'a>>,
}

impl std::fmt::Debug for PretrainRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PretrainRun")
            .field("model", &self.model)
            .field("init", &self.init)
            .field("training", &self.training)
            .finish_non_exhaustive()
    }
}

/// A receiver of progress events besides stdout.
#[derive(Clone, Copy)]
pub struct EventSink<'a>(pub &'a (dyn Fn(&ProgressEvent) + Sync));

impl std::fmt::Debug for EventSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `maxSteps` reached.
    MaxStepsReached {
        /// Final step.
        step: u64,
    },
    /// The overfitting policy stopped training.
    StoppedEarly {
        /// Final step.
        step: u64,
    },
    /// SIGTERM (or `stop_after`): a checkpoint was saved; a new run resumes from it.
    Interrupted {
        /// Step of the saved checkpoint.
        step: u64,
    },
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A step failed.
    #[error(transparent)]
    Step(#[from] StepError),
    /// A checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// Data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The loss stayed NaN or infinite.
    #[error("loss diverged: {0} consecutive non-finite steps (last at step {1})")]
    Diverged(u32, u64),
    /// The checkpoint to resume from belongs to another model or dataset.
    #[error("checkpoint {0} does not match this job: {1}")]
    Mismatch(String, String),
    /// The thread writing a checkpoint panicked.
    #[error("the checkpoint upload thread panicked")]
    UploadPanicked,
    /// The finetuned model could not be published.
    #[error("export: {0}")]
    Export(#[from] Box<crate::finetune::export::ExportError>),
}

/// The checkpoint being written in the background, if any.
type Upload<'scope> = std::thread::ScopedJoinHandle<'scope, Result<(), PretrainError>>;

/// Wait for the upload in flight, if any, and return its error.
fn finish_upload(upload: &mut Option<Upload<'_>>) -> Result<(), PretrainError> {
    match upload.take() {
        None => Ok(()),
        Some(handle) => handle.join().map_err(|_| PretrainError::UploadPanicked)?,
    }
}

/// One line of machine-readable progress (JSON on stdout), also given to `sink`.
fn emit_to(sink: Option<EventSink<'_>>, event: ProgressEvent) {
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", event.to_line());
        let _ = out.flush();
    }
    if let Some(EventSink(sink)) = sink {
        sink(&event);
    }
}

impl Outcome {
    /// The outcome as the progress stream reports it.
    pub fn reason(&self) -> report::Outcome {
        match self {
            Self::MaxStepsReached { .. } => report::Outcome::MaxStepsReached,
            Self::StoppedEarly { .. } => report::Outcome::StoppedEarly,
            Self::Interrupted { .. } => report::Outcome::Interrupted,
        }
    }

    /// The last step taken.
    pub fn step(&self) -> u64 {
        match self {
            Self::MaxStepsReached { step }
            | Self::StoppedEarly { step }
            | Self::Interrupted { step } => *step,
        }
    }
}

/// Run (or resume) pretraining. Progress goes to stdout as JSON lines, one
/// [`ProgressEvent`] each: `started`, then `step`, `eval`, `checkpoint` and
/// `nonFiniteLoss` as they happen, and a final `done`.
pub fn run(rt: &tokio::runtime::Runtime, run: PretrainRun<'_>) -> Result<Outcome, PretrainError> {
    let sink = run.events;
    let emit = |event: ProgressEvent| emit_to(sink, event);
    let ckpt = Checkpointer::new(run.store, run.staging.clone());
    let (params, tuning, base, arch) = match run.init {
        ModelInit::Fresh => (
            init_params(&run.model, run.training.seed as u64, &run.device)?,
            Tuning::Full,
            None,
            Arch::Gpt2,
        ),
        ModelInit::Base(b) => (b.params, b.tuning, Some(b.identity), b.arch),
    };
    let llama = match arch {
        Arch::Llama(l) => Some(l),
        Arch::Gpt2 => None,
    };
    // nanoGPT counts a GPT-2's parameters without the position embedding.
    let n_params = match arch {
        Arch::Gpt2 => params
            .numel()
            .saturating_sub((run.model.block_size * run.model.n_embd) as usize),
        Arch::Llama(_) => params.numel(),
    };
    let lora = tuning.lora().cloned();
    let mut trainer = Trainer::build(
        run.model,
        &arch,
        run.training.clone(),
        params,
        run.device.clone(),
        tuning,
    )?;
    let trained: usize = trainer
        .trained_tensors()
        .values()
        .map(|t| t.elem_count())
        .sum();
    let total = trainer.params().numel();
    if trained < total {
        eprintln!(
            "Training {trained} of {total} parameters ({:.3} %); the base is frozen.",
            100.0 * trained as f64 / total as f64
        );
    }
    let mut tracker = Tracker::default();
    let mut resumed_from = None;

    if let Some(loaded) = rt.block_on(ckpt.resume(&run.device))? {
        if loaded.state.model != run.model {
            return Err(PretrainError::Mismatch(
                loaded.dir,
                "the model architecture differs".into(),
            ));
        }
        if loaded.state.base != base || loaded.state.lora != lora {
            return Err(PretrainError::Mismatch(
                loaded.dir,
                "it finetunes another base model or another LoRA setting".into(),
            ));
        }
        if loaded.state.dataset_digest != run.dataset_digest {
            return Err(PretrainError::Mismatch(
                loaded.dir,
                "it was trained on another dataset digest".into(),
            ));
        }
        trainer.restore(&loaded.state, &loaded.model, &loaded.optimizer)?;
        tracker = Tracker {
            best: loaded.state.best_val_loss,
            best_step: loaded.state.best_step,
            bad_evals: loaded.state.evals_without_improvement,
        };
        resumed_from = Some(ckpt.uri_of(&loaded.dir));
    }
    emit(ProgressEvent::Started(Started {
        step: trainer.step_count(),
        tokens: trainer.tokens(),
        max_steps: run.training.max_steps as u64,
        parameters: if trained < total { trained } else { n_params } as u64,
        total_parameters: (trained < total).then_some(total as u64),
        resumed_from,
    }));

    let max_steps = run.training.max_steps as u64;
    if let Some(m) = run.metrics {
        m.max_steps
            .set(i64::try_from(max_steps).unwrap_or(i64::MAX));
    }
    let eval_every = run.training.eval_interval.max(1) as u64;
    let ckpt_every = run.checkpoint_interval.max(1);
    let flops = flops_per_token(&run.model, n_params);
    let mut non_finite = 0u32;
    // Validation losses in a row above the one before (`taper_rising_val_losses`).
    let (mut prev_val, mut rises) = (None::<f32>, 0i64);
    // Human progress on a terminal; the JSON lines on stdout are for machines.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(max_steps).with_position(trainer.step_count());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });

    // What a checkpoint holds besides tensors, as of now.
    let state_of = |trainer: &Trainer, tracker: &Tracker, val_loss: Option<f32>| TrainerState {
        step: trainer.step_count(),
        tokens: trainer.tokens(),
        sampler: trainer.sampler_state(),
        dropout: Some(trainer.dropout_state()),
        best_val_loss: tracker.best,
        best_step: tracker.best_step,
        val_loss,
        evals_without_improvement: tracker.bad_evals,
        lr_scale: trainer.lr_scale(),
        model: run.model,
        training: run.training.clone(),
        dataset_digest: run.dataset_digest.clone(),
        tokenizer: run.tokenizer.clone(),
        base: base.clone(),
        lora: lora.clone(),
        llama,
    };
    // Write a snapshot to the store and apply retention; runs on the upload thread.
    let upload = |snapshot: Snapshot, stall: f64| -> Result<(), PretrainError> {
        let started = Instant::now();
        let saved = rt
            .block_on(ckpt.save(&snapshot.state, &snapshot.model, &snapshot.optimizer))
            .inspect_err(|_| run.metrics.iter().for_each(|m| m.checkpoint_failures.inc()))?;
        let deleted = rt.block_on(ckpt.retain(run.keep))?;
        let secs = started.elapsed().as_secs_f64();
        if let Some(m) = run.metrics {
            m.checkpoint_save.observe(secs);
            let bytes: u64 = saved.manifest.files.iter().map(|f| f.size).sum();
            m.set_checkpoint_size(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let state = &snapshot.state;
        emit(ProgressEvent::Checkpoint(CheckpointSaved {
            step: state.step,
            tokens: state.tokens,
            uri: saved.uri,
            val_loss: state.val_loss.map(f64::from),
            sha256: saved.sha256,
            seconds: secs,
            stall_seconds: stall,
            deleted: deleted.iter().map(|dir| ckpt.uri_of(dir)).collect(),
        }));
        Ok(())
    };

    std::thread::scope(|scope| {
        let mut in_flight: Option<Upload<'_>> = None;
        // What a save waits for: a copy of the state in host memory.
        let snapshot = |trainer: &Trainer,
                        tracker: &Tracker,
                        val_loss: Option<f32>|
         -> Result<(Snapshot, f64), PretrainError> {
            let started = Instant::now();
            let snapshot = Snapshot::take(
                state_of(trainer, tracker, val_loss),
                &trainer.trained_tensors(),
                &trainer.optimizer().state_tensors(),
            )?;
            Ok((snapshot, started.elapsed().as_secs_f64()))
        };
        let outcome = (|| -> Result<Outcome, PretrainError> {
            loop {
                // An upload that failed fails the run now, not at the next save.
                if in_flight.as_ref().is_some_and(|h| h.is_finished()) {
                    finish_upload(&mut in_flight)?;
                }
                let step = trainer.step_count();
                if step >= max_steps {
                    return Ok(Outcome::MaxStepsReached { step });
                }
                let started = Instant::now();
                let stats = match trainer.step(run.train) {
                    Ok(s) => {
                        non_finite = 0;
                        s
                    }
                    Err(StepError::NonFiniteLoss(value, at)) => {
                        non_finite += 1;
                        if let Some(m) = run.metrics {
                            m.nonfinite_losses.inc();
                        }
                        emit(ProgressEvent::NonFiniteLoss(NonFiniteLoss {
                            step: at,
                            value: value.to_string(),
                            consecutive: non_finite,
                        }));
                        if non_finite >= MAX_NON_FINITE_STEPS {
                            return Err(PretrainError::Diverged(non_finite, at));
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let secs = started.elapsed().as_secs_f64();
                let tok_s = stats.tokens as f64 / secs.max(1e-9);
                let mfu = run.peak_flops.map(|peak| flops * tok_s / peak);
                if let Some(m) = run.metrics {
                    m.set_step(stats.loss as f64, stats.lr);
                    m.step.set(stats.step as i64);
                    m.tokens.inc_by(stats.tokens);
                    m.step_duration.observe(secs);
                    if let Some(mfu) = mfu {
                        m.mfu.set(mfu);
                    }
                }
                if let Some(bar) = &bar {
                    bar.set_position(stats.step);
                    bar.set_message(format!("loss {:.3}  {:.0} tok/s", stats.loss, tok_s));
                }
                // With a bar on an interactive terminal, per-step JSON would only scroll past it.
                if bar.is_none() || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    emit(ProgressEvent::Step(StepReport {
                        step: stats.step,
                        loss: f64::from(stats.loss),
                        lr: stats.lr,
                        grad_norm: stats.grad_norm,
                        tokens: trainer.tokens(),
                        tokens_per_second: tok_s,
                        mfu,
                        seconds: secs,
                    }));
                }

                let at_end = stats.step >= max_steps;
                let mut stop_early = false;
                let mut improved = false;
                let mut last_val = None;
                if stats.step % eval_every == 0 || at_end {
                    let iters = run.training.eval_iterations.max(1) as usize;
                    let eval_seed = run.training.seed as u64 ^ 0x5eed_e7a1;
                    let train_loss = trainer.evaluate(run.train, iters, eval_seed)?;
                    let val_loss = trainer.evaluate(run.test, iters, eval_seed)?;
                    last_val = Some(val_loss);
                    let decision = tracker.observe(stats.step, val_loss, &run.overfitting);
                    rises = match prev_val {
                        Some(p) if val_loss > p => rises + 1,
                        _ => 0,
                    };
                    prev_val = Some(val_loss);
                    if let Some(m) = run.metrics {
                        m.set_val_loss(val_loss as f64);
                        m.val_loss_rises.set(rises);
                    }
                    improved = decision == Decision::Improved;
                    let action = match decision {
                        Decision::ReduceLearningRate => {
                            trainer.scale_lr(run.overfitting.factor);
                            EvalAction::ReduceLearningRate
                        }
                        Decision::StopEarly => {
                            stop_early = true;
                            EvalAction::StopEarly
                        }
                        Decision::Improved | Decision::Continue => EvalAction::None,
                    };
                    emit(ProgressEvent::Eval(EvalReport {
                        step: stats.step,
                        train_loss: f64::from(train_loss),
                        val_loss: f64::from(val_loss),
                        best_val_loss: tracker.best.map(f64::from),
                        best_step: tracker.best_step,
                        action,
                    }));
                }

                let interrupted = run.stop.load(Ordering::SeqCst)
                    || run.stop_after.is_some_and(|s| stats.step >= s);
                // A new best is saved at once (as nanoGPT does), so the best checkpoint always exists.
                if stats.step % ckpt_every == 0 || improved || at_end || stop_early || interrupted {
                    // At most one upload in flight: wait for the previous one first.
                    finish_upload(&mut in_flight)?;
                    let (snap, stall) = snapshot(&trainer, &tracker, last_val)?;
                    in_flight = Some(scope.spawn(move || upload(snap, stall)));
                }
                if stop_early {
                    return Ok(Outcome::StoppedEarly { step: stats.step });
                }
                if interrupted && !at_end {
                    return Ok(Outcome::Interrupted { step: stats.step });
                }
            }
        })();
        // Every way out waits for the checkpoint in flight; "done" comes after it.
        let uploaded = finish_upload(&mut in_flight);
        let outcome = outcome?;
        uploaded?;
        if let Some(export) = run.export
            && !matches!(outcome, Outcome::Interrupted { .. })
        {
            emit(export(&trainer)?);
        }
        emit(ProgressEvent::Done(Done {
            reason: outcome.reason(),
            step: outcome.step(),
        }));
        Ok(outcome)
    })
}
