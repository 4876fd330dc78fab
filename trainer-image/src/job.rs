//! From a job file to a run: pick the job, find its dataset and checkpoint store, fetch
//! the data, and map failures to the documented exit codes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
};

use candle_core::Device;
use taper_crds::{TaperObject, exit, manifest::find_one, store::StoreAccess};

use crate::{
    metrics::Metrics,
    model::ModelError,
    store::{self, ObjectStore, StoreError},
    train::{
        checkpoint::CheckpointError,
        data::{DataError, DatasetManifest, open_dataset},
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
    /// Anything else.
    #[error("internal: {0}")]
    Internal(String),
}

fn store_exit(e: &StoreError) -> u8 {
    match e {
        StoreError::BadUri(_) => exit::INVALID_SPEC,
        StoreError::NotFound(_) => exit::INVALID_DATA,
        _ => exit::RETRYABLE,
    }
}

impl JobError {
    /// The process exit code for this error (see [`taper_crds::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Spec(_) => exit::INVALID_SPEC,
            Self::Data(_) => exit::INVALID_DATA,
            Self::Store(e) => store_exit(e),
            Self::Internal(_) => exit::INTERNAL,
            Self::Pretrain(e) => match e {
                PretrainError::Diverged(..) => exit::LOSS_DIVERGED,
                PretrainError::Mismatch(..) => exit::INVALID_SPEC,
                PretrainError::Data(_) | PretrainError::Step(StepError::Data(_)) => {
                    exit::INVALID_DATA
                }
                PretrainError::Model(ModelError::Config(_))
                | PretrainError::Step(StepError::Model(ModelError::Config(_))) => {
                    exit::INVALID_SPEC
                }
                PretrainError::Checkpoint(CheckpointError::Store(s)) => store_exit(s),
                _ => exit::INTERNAL,
            },
        }
    }
}

/// Options of `taper pretrain` beyond the job file.
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

/// The device to train on: the first GPU when built with CUDA and one is present.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// The device named by `spec` (`cpu`, `cuda`, `cuda:N`), or [`default_device`] for `None`.
/// Naming a GPU that this build or machine does not have is an error, never a silent
/// fallback to the CPU.
pub fn select_device(spec: Option<&str>) -> Result<Device, JobError> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(default_device());
    };
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                JobError::Spec(format!("device {spec:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(JobError::Spec(format!(
                "device {spec:?}: expected cpu, cuda or cuda:N"
            )));
        }
    };
    Device::new_cuda(ordinal)
        .map_err(|e| JobError::Spec(format!("device {spec:?} is not available: {e}")))
}

/// Make the dataset at `uri` available locally: a `file://` folder is used in place; an
/// object-store prefix is downloaded (once, verified against the manifest's sha256).
pub fn local_dataset(
    rt: &tokio::runtime::Runtime,
    uri: &str,
    access: Option<&StoreAccess>,
    cache: &Path,
) -> Result<PathBuf, JobError> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    let store: Arc<dyn ObjectStore> = rt.block_on(store::open(uri, access))?;
    let manifest_bytes = rt.block_on(store.get("manifest.json"))?;
    let manifest: DatasetManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| JobError::Data(format!("{uri}/manifest.json: {e}")))?;
    let dir = cache.join("datasets").join(&manifest.digest);
    for shard in manifest.train.iter().chain(&manifest.test) {
        let path = dir.join(&shard.file);
        if crate::train::data::verify_sha256(&path, &shard.sha256).unwrap_or(false) {
            continue;
        }
        rt.block_on(store.get_file(&shard.file, &path))?;
        if !crate::train::data::verify_sha256(&path, &shard.sha256)
            .map_err(|e| JobError::Data(e.to_string()))?
        {
            return Err(JobError::Data(format!(
                "{uri}/{}: sha256 does not match the manifest",
                shard.file
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| JobError::Data(format!("{}: {e}", dir.display())))?;
    std::fs::write(dir.join("manifest.json"), &manifest_bytes)
        .map_err(|e| JobError::Data(format!("{}: {e}", dir.display())))?;
    Ok(dir)
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
    let (data_uri, data_access) = match (&opts.data, dataset.and_then(|d| d.spec.output.as_ref())) {
        (Some(uri), _) => (uri.clone(), None),
        (None, Some(out)) => (out.uri.clone(), out.access.clone()),
        (None, None) => {
            return Err(JobError::Spec(format!(
                "Dataset {} (spec.datasetRef) is not in the job file with an output URI; pass --data",
                job.spec.dataset_ref.name
            )));
        }
    };
    let ckpt_uri = opts
        .checkpoints
        .clone()
        .or_else(|| job.spec.checkpoints.uri.clone())
        .ok_or_else(|| {
            JobError::Spec("spec.checkpoints.uri is unset; pass --checkpoints".into())
        })?;

    let data_dir = local_dataset(rt, &data_uri, data_access.as_ref(), &opts.work_dir)?;
    let (manifest, train, test) = open_dataset(&data_dir).map_err(|e| match e {
        DataError::Io { .. } | DataError::Manifest { .. } | DataError::Invalid(_) => {
            JobError::Data(e.to_string())
        }
        other => JobError::Internal(other.to_string()),
    })?;
    let model = job.spec.model.resolve();
    if (model.vocab_size as u64) < manifest.vocab_size as u64 {
        return Err(JobError::Spec(format!(
            "model.vocabSize {} is smaller than the dataset's vocabulary ({})",
            model.vocab_size, manifest.vocab_size
        )));
    }
    let device = select_device(opts.device.as_deref())?;
    let mut training = job.spec.resolved_training();
    // Unset, the precision is bf16 on a GPU and f32 on a CPU (where bf16 is emulated).
    if device.is_cpu() && job.spec.training.precision.is_none() {
        training.precision = taper_crds::training::Precision::F32;
    }
    let store = rt.block_on(store::open(&ckpt_uri, job.spec.checkpoints.access.as_ref()))?;
    let metrics = Metrics::new("PretrainJob", &opts.namespace, &name)
        .map_err(|e| JobError::Internal(e.to_string()))?;
    if let Some(addr) = opts.metrics_addr {
        let bound = metrics
            .serve(addr)
            .map_err(|e| JobError::Internal(format!("metrics on {addr}: {e}")))?;
        eprintln!("taper: metrics on http://{bound}/metrics");
    }
    let eval_interval = training.eval_interval as u64;
    let run = PretrainRun {
        model,
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
    };
    Ok(pretrain::run(rt, run)?)
}
