//! From a job file to a run: pick the job, find its dataset and checkpoint store, fetch
//! the data (see [`crate::dataset`]), and classify failures into the documented exit
//! codes ([`JobError::category`]).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use taper_crds::{TaperObject, exit::Category, manifest::find_one};

use crate::{
    metrics::Metrics,
    model::ModelError,
    prepare::PrepareError,
    store::{self, StoreError},
    tokenizer::TokenizerError,
    train::{
        checkpoint::CheckpointError,
        data::{DataError, DatasetManifest, TokenSplit, open_dataset},
        pretrain::{self, Outcome, PretrainError, PretrainRun},
        trainer::StepError,
    },
};

/// Why a job could not run, classified by what a retry can do.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job file is wrong (missing reference, ambiguous job, unsupported setting).
    #[error("invalid spec: {0}")]
    Spec(String),
    /// The dataset is unusable.
    #[error("invalid data: {0}")]
    Data(String),
    /// The object store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Training failed.
    #[error(transparent)]
    Pretrain(#[from] PretrainError),
    /// Preparing a dataset failed.
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// A tokenizer could not be loaded or used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The job file could not be read or is invalid.
    #[error(transparent)]
    Manifest(#[from] crate::manifests::ManifestFileError),
    /// Anything else.
    #[error("internal: {0}")]
    Internal(String),
}

impl JobError {
    /// The kind of failure: decides the exit code, bounded for metric labels.
    pub fn category(&self) -> Category {
        match self {
            Self::Spec(_) => Category::InvalidSpec,
            Self::Data(_) => Category::InvalidData,
            Self::Store(e) => e.category(),
            Self::Internal(_) => Category::Internal,
            Self::Prepare(e) => e.category(),
            Self::Tokenizer(e) => e.category(),
            Self::Manifest(_) => Category::InvalidSpec,
            Self::Pretrain(e) => match e {
                PretrainError::Diverged(..) => Category::LossDiverged,
                PretrainError::Mismatch(..) => Category::InvalidSpec,
                PretrainError::Data(_) | PretrainError::Step(StepError::Data(_)) => {
                    Category::InvalidData
                }
                PretrainError::Model(ModelError::Config(_))
                | PretrainError::Step(StepError::Model(ModelError::Config(_))) => {
                    Category::InvalidSpec
                }
                PretrainError::Checkpoint(CheckpointError::Store(s)) => s.category(),
                PretrainError::Export(e) => e.category(),
                _ => Category::Internal,
            },
        }
    }

    /// The process exit code for this error (see [`taper_crds::exit`]).
    pub fn exit_code(&self) -> u8 {
        self.category().exit_code()
    }
}

/// Options of `taper pretrain` and `taper finetune` beyond the job file.
#[derive(Debug)]
pub struct PretrainOptions {
    /// Which PretrainJob, when the file holds several.
    pub name: Option<String>,
    /// Dataset location override.
    pub data: Option<String>,
    /// Checkpoint location override.
    pub checkpoints: Option<String>,
    /// Local working folder.
    pub work_dir: PathBuf,
    /// Where to serve metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// Peak FLOP/s for MFU.
    pub peak_flops: Option<f64>,
    /// Stop after this step (demo of resume).
    pub stop_after: Option<u64>,
    /// Namespace label for metrics.
    pub namespace: String,
    /// `cpu`, `cuda` or `cuda:N`; default: the first GPU when there is one.
    pub device: Option<String>,
    /// Set on SIGTERM.
    pub stop: Arc<AtomicBool>,
}

/// Run the PretrainJob of `objects` (the job file's contents).
pub fn pretrain(
    rt: &tokio::runtime::Runtime,
    objects: &[TaperObject],
    opts: PretrainOptions,
) -> Result<Outcome, JobError> {
    let job = find_one(objects, TaperObject::as_pretrain_job, opts.name.as_deref())
        .map_err(|e| JobError::Spec(e.to_string()))?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let dataset = find_one(
        objects,
        TaperObject::as_dataset,
        Some(&job.spec.dataset_ref.name),
    )
    .ok();
    let ckpt_uri = opts
        .checkpoints
        .clone()
        .or_else(|| job.spec.checkpoints.uri.clone())
        .ok_or_else(|| {
            JobError::Spec("spec.checkpoints.uri is unset; pass --checkpoints".into())
        })?;
    let (manifest, train, test) = open_data(rt, dataset, &job.spec.dataset_ref.name, &opts)?;
    let model = job.spec.model.resolve();
    if (model.vocab_size as u64) < manifest.vocab_size as u64 {
        return Err(JobError::Spec(format!(
            "model.vocabSize {} is smaller than the dataset's vocabulary ({})",
            model.vocab_size, manifest.vocab_size
        )));
    }
    let device = crate::device::select_device(opts.device.as_deref())?;
    let mut training = job.spec.resolved_training();
    // Unset, the precision is bf16 on a GPU and f32 on a CPU (where bf16 is emulated).
    if device.is_cpu() && job.spec.training.precision.is_none() {
        training.precision = taper_crds::training::Precision::F32;
    }
    let store = rt.block_on(store::open(&ckpt_uri, job.spec.checkpoints.access.as_ref()))?;
    let metrics = serve_metrics("PretrainJob", &name, &opts)?;
    let eval_interval = training.eval_interval as u64;
    let run = PretrainRun {
        model,
        init: pretrain::ModelInit::Fresh,
        export: None,
        training,
        overfitting: job.spec.overfitting.clone(),
        checkpoint_interval: job
            .spec
            .checkpoints
            .interval
            .map(|i| i as u64)
            .unwrap_or(eval_interval),
        keep: job.spec.checkpoints.keep.max(1) as usize,
        train: &train,
        test: &test,
        dataset_digest: manifest.digest.clone(),
        tokenizer: manifest.tokenizer.clone(),
        store: store.as_ref(),
        staging: opts.work_dir.join("staging").join(&name),
        device,
        peak_flops: opts.peak_flops,
        stop: opts.stop,
        metrics: Some(&metrics),
        stop_after: opts.stop_after,
        events: None,
    };
    run_reporting::<taper_crds::PretrainJob>(rt, &name, run)
}

/// Open the dataset a job trains on: `--data`, else the output of the Dataset `name` of
/// the job file; fetched to the work folder when remote.
pub(crate) fn open_data(
    rt: &tokio::runtime::Runtime,
    dataset: Option<&taper_crds::Dataset>,
    name: &str,
    opts: &PretrainOptions,
) -> Result<(DatasetManifest, TokenSplit, TokenSplit), JobError> {
    let (data_uri, data_access) = match (&opts.data, dataset.and_then(|d| d.spec.output.as_ref())) {
        (Some(uri), _) => (uri.clone(), None),
        (None, Some(out)) => (out.uri.clone(), out.access.clone()),
        (None, None) => {
            return Err(JobError::Spec(format!(
                "Dataset {name} (spec.datasetRef) is not in the job file with an output URI; pass --data"
            )));
        }
    };
    let data_dir =
        crate::dataset::local_dataset(rt, &data_uri, data_access.as_ref(), &opts.work_dir)?;
    open_dataset(&data_dir).map_err(|e| match e {
        DataError::Io { .. } | DataError::Manifest { .. } | DataError::Invalid(_) => {
            JobError::Data(e.to_string())
        }
        other => JobError::Internal(other.to_string()),
    })
}

/// The job's metrics, served on `--metrics-addr`. Metrics are for watching, not for
/// training: a port that cannot be bound is reported and the run goes on.
pub(crate) fn serve_metrics(
    kind: &str,
    name: &str,
    opts: &PretrainOptions,
) -> Result<Metrics, JobError> {
    let metrics =
        Metrics::new(kind, &opts.namespace, name).map_err(|e| JobError::Internal(e.to_string()))?;
    if let Some(addr) = opts.metrics_addr {
        match metrics.serve(addr) {
            Ok(bound) => tracing::info!("metrics on http://{bound}/metrics"),
            Err(e) => tracing::warn!("no metrics: cannot serve them on {addr}: {e}"),
        }
    }
    Ok(metrics)
}

/// Run `run`, reporting live status to the `K` called `name` when the pod has API
/// credentials.
pub(crate) fn run_reporting<K: kube::Resource<DynamicType = ()>>(
    rt: &tokio::runtime::Runtime,
    name: &str,
    run: PretrainRun<'_>,
) -> Result<Outcome, JobError> {
    // The run's last figures reach Prometheus before the pod exits.
    let metrics = run.metrics;
    let finish = || {
        if let Some(m) = metrics {
            m.await_final_scrape();
        }
    };
    let Some(target) = crate::status::Target::from_env::<K>(rt, name) else {
        let outcome = pretrain::run(rt, run);
        finish();
        return Ok(outcome?);
    };
    let reporter = crate::status::JobReporter::start(rt, target);
    let sink = reporter.sink();
    let outcome = pretrain::run(
        rt,
        PretrainRun {
            events: Some(pretrain::EventSink(&sink)),
            ..run
        },
    );
    drop(sink);
    reporter.finish(rt);
    finish();
    Ok(outcome?)
}
