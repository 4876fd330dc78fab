//! Validation and resolution, pure: a resource and the objects it references become a
//! [`Plan`] — the job file with every reference made concrete and every default filled
//! in — or a reason to wait, or a reason it can never run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use taper_crds::{
    Dataset, FinetuneJob, PretrainJob, TaperObject,
    conditions::{ConditionReason, DatasetPhase, JobPhase},
    dataset::DatasetFormat,
    finetune::CheckpointChoice,
    job::RunPolicy,
    store::{ObjectLocation, StoreAccess},
};

use crate::{build::Plan, config::Config};

/// What the referenced objects are, as read from the API server.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The Dataset of `spec.datasetRef`, when it exists.
    pub dataset: Option<Dataset>,
    /// The PretrainJob of a FinetuneJob's `baseModel.pretrainJobRef`, when it exists.
    pub base: Option<PretrainJob>,
}

/// The outcome of resolution.
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    /// Everything is there: build and apply.
    Ready(Box<Plan>),
    /// An input is missing or not ready yet; the condition says which.
    Waiting(ConditionReason, String),
    /// The resource cannot run as written.
    Invalid(ConditionReason, String),
}

/// Metadata of an object inside a job file: its name and namespace only.
fn file_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        ..ObjectMeta::default()
    }
}

/// `<default output>/<namespace>/<path>` with the operator's S3 access, if it has a
/// default output.
fn default_location(cfg: &Config, namespace: &str, path: &str) -> Option<ObjectLocation> {
    let base = cfg.default_output_uri.trim_end_matches('/');
    if base.is_empty() {
        return None;
    }
    Some(ObjectLocation {
        uri: format!("{base}/{namespace}/{path}"),
        access: operator_access(cfg),
    })
}

/// The operator's S3 access settings (endpoint, region, Secret), if any is set.
fn operator_access(cfg: &Config) -> Option<StoreAccess> {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let access = StoreAccess {
        secret_name: some(&cfg.s3_credentials_secret),
        endpoint: some(&cfg.s3_endpoint),
        region: some(&cfg.s3_region),
    };
    (access != StoreAccess::default()).then_some(access)
}

/// The Secret a pod loads: the resource's own, else the operator's.
pub(crate) fn secret_of(access: Option<&StoreAccess>, cfg: &Config) -> Option<String> {
    access.and_then(|a| a.secret_name.clone()).or_else(|| {
        (!cfg.s3_credentials_secret.is_empty()).then(|| cfg.s3_credentials_secret.clone())
    })
}

/// The Dataset with `spec.output` filled in, and metadata cut to name and namespace.
pub fn resolve_dataset(ds: &Dataset, cfg: &Config) -> Result<Dataset, String> {
    let mut out = ds.clone();
    out.metadata = file_meta(&ds.metadata);
    out.status = None;
    if out.spec.output.is_none() {
        let ns = ds.namespace().unwrap_or_default();
        out.spec.output = Some(
            default_location(cfg, &ns, &format!("datasets/{}", ds.name_any())).ok_or_else(
                || {
                    "spec.output is unset and the operator has no default output URI (TAPER_DEFAULT_OUTPUT_URI)"
                        .to_string()
                },
            )?,
        );
    }
    Ok(out)
}

/// A Dataset's plan: `taper prepare` on itself.
pub fn plan_dataset(ds: &Dataset, cfg: &Config) -> Readiness {
    let resolved = match resolve_dataset(ds, cfg) {
        Ok(r) => r,
        Err(m) => return Readiness::Invalid(ConditionReason::InvalidSpec, m),
    };
    let store_secret = secret_of(
        resolved
            .spec
            .output
            .as_ref()
            .and_then(|o| o.access.as_ref())
            .or_else(|| resolved.spec.sources.iter().find_map(|s| s.access.as_ref())),
        cfg,
    );
    Readiness::Ready(Box::new(Plan {
        objects: vec![TaperObject::Dataset(Box::new(resolved.clone()))],
        command: "prepare",
        resources: resolved.spec.resources.clone(),
        default_gpus: 0,
        image: resolved.spec.image.clone(),
        run: RunPolicy::default(),
        store_secret,
    }))
}

/// The referenced Dataset, Ready and of `format`, or why not.
fn ready_dataset<'a>(
    inputs: &'a Inputs,
    name: &str,
    format: DatasetFormat,
) -> Result<&'a Dataset, Readiness> {
    let Some(ds) = &inputs.dataset else {
        return Err(Readiness::Waiting(
            ConditionReason::DatasetNotFound,
            format!("Dataset {name} does not exist in this namespace"),
        ));
    };
    if ds.spec.format != format {
        return Err(Readiness::Invalid(
            ConditionReason::DatasetFormatMismatch,
            format!(
                "Dataset {name} has format {}, this job needs {}",
                serde_json::to_string(&ds.spec.format).unwrap_or_default(),
                serde_json::to_string(&format).unwrap_or_default()
            ),
        ));
    }
    let phase = ds.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase != DatasetPhase::Ready {
        return Err(Readiness::Waiting(
            ConditionReason::DatasetNotReady,
            format!("Dataset {name} is {phase:?}, not Ready yet"),
        ));
    }
    Ok(ds)
}

/// A PretrainJob's plan: `taper pretrain` on itself and its Ready Dataset.
pub fn plan_pretrain(pj: &PretrainJob, inputs: &Inputs, cfg: &Config) -> Readiness {
    let name = &pj.spec.dataset_ref.name;
    let ds = match ready_dataset(inputs, name, DatasetFormat::Pretraining) {
        Ok(ds) => ds,
        Err(r) => return r,
    };
    let ds = match resolve_dataset(ds, cfg) {
        Ok(d) => d,
        Err(m) => return Readiness::Invalid(ConditionReason::InvalidSpec, m),
    };
    let mut job = pj.clone();
    job.metadata = file_meta(&pj.metadata);
    job.status = None;
    if job.spec.checkpoints.uri.is_none() {
        let ns = pj.namespace().unwrap_or_default();
        match default_location(
            cfg,
            &ns,
            &format!("pretrainjobs/{}/checkpoints", pj.name_any()),
        ) {
            Some(loc) => {
                job.spec.checkpoints.uri = Some(loc.uri);
                if job.spec.checkpoints.access.is_none() {
                    job.spec.checkpoints.access = loc.access;
                }
            }
            None => {
                return Readiness::Invalid(
                    ConditionReason::InvalidSpec,
                    "spec.checkpoints.uri is unset and the operator has no default output URI (TAPER_DEFAULT_OUTPUT_URI)".into(),
                );
            }
        }
    }
    let store_secret = secret_of(job.spec.checkpoints.access.as_ref(), cfg);
    Readiness::Ready(Box::new(Plan {
        command: "pretrain",
        resources: job.spec.resources.clone(),
        default_gpus: 1,
        image: job.spec.run.image.clone(),
        run: job.spec.run.clone(),
        store_secret,
        objects: vec![
            TaperObject::PretrainJob(Box::new(job)),
            TaperObject::Dataset(Box::new(ds)),
        ],
    }))
}

/// A FinetuneJob's plan: `taper finetune` on itself, its instruction Dataset, and its
/// base (a Succeeded PretrainJob with the chosen checkpoint, or a model URI).
pub fn plan_finetune(fj: &FinetuneJob, inputs: &Inputs, cfg: &Config) -> Readiness {
    let name = &fj.spec.dataset_ref.name;
    let ds = match ready_dataset(inputs, name, DatasetFormat::Instruction) {
        Ok(ds) => ds,
        Err(r) => return r,
    };
    let ds = match resolve_dataset(ds, cfg) {
        Ok(d) => d,
        Err(m) => return Readiness::Invalid(ConditionReason::InvalidSpec, m),
    };
    // The base, resolved: the chosen checkpoint's folder URI replaces the reference.
    let mut base_model = fj.spec.base_model.clone();
    if let Some(r) = &fj.spec.base_model.pretrain_job_ref {
        let Some(base) = &inputs.base else {
            return Readiness::Waiting(
                ConditionReason::BaseModelNotFound,
                format!("PretrainJob {} does not exist in this namespace", r.name),
            );
        };
        let status = base.status.clone().unwrap_or_default();
        let checkpoint = match r.checkpoint {
            CheckpointChoice::Best => status.best_checkpoint.or(status.latest_checkpoint),
            CheckpointChoice::Latest => status.latest_checkpoint,
        };
        if status.phase != JobPhase::Succeeded || checkpoint.is_none() {
            return Readiness::Waiting(
                ConditionReason::BaseModelNotReady,
                format!(
                    "PretrainJob {} is {:?} with no {:?} checkpoint yet",
                    r.name, status.phase, r.checkpoint
                ),
            );
        }
        // The access its pod used: its own, or the operator's with the default location.
        let access = base.spec.checkpoints.access.clone().or_else(|| {
            base.spec
                .checkpoints
                .uri
                .is_none()
                .then(|| operator_access(cfg))
                .flatten()
        });
        base_model = taper_crds::finetune::BaseModel {
            pretrain_job_ref: None,
            uri: checkpoint,
            architecture: fj.spec.base_model.architecture,
            access,
        };
    }
    let mut job = fj.clone();
    job.metadata = file_meta(&fj.metadata);
    job.status = None;
    job.spec.base_model = base_model;
    if job.spec.output.location.is_none() {
        let ns = fj.namespace().unwrap_or_default();
        match default_location(cfg, &ns, &format!("finetunejobs/{}", fj.name_any())) {
            Some(loc) => job.spec.output.location = Some(loc),
            None => {
                return Readiness::Invalid(
                    ConditionReason::InvalidSpec,
                    "spec.output.location is unset and the operator has no default output URI (TAPER_DEFAULT_OUTPUT_URI)".into(),
                );
            }
        }
    }
    let store_secret = secret_of(
        job.spec
            .output
            .location
            .as_ref()
            .and_then(|l| l.access.as_ref()),
        cfg,
    );
    let all = vec![
        TaperObject::FinetuneJob(Box::new(job.clone())),
        TaperObject::Dataset(Box::new(ds)),
    ];
    Readiness::Ready(Box::new(Plan {
        command: "finetune",
        resources: job.spec.resources.clone(),
        default_gpus: 1,
        image: job.spec.run.image.clone(),
        run: job.spec.run.clone(),
        store_secret,
        objects: all,
    }))
}
