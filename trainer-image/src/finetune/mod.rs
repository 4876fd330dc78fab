//! `taper finetune`: instruction finetuning of a pretrained GPT by LoRA or in full, through
//! the pretraining loop ([`crate::train::pretrain::run`]: the same checkpoints, resume,
//! signals, metrics, progress and overfitting policy), on the examples of an
//! `instruction` Dataset with the loss on the response tokens; at the end the best
//! checkpoint's weights are published (see [`export`]).

pub mod base;
pub mod export;

use taper_crds::{
    FinetuneJob, TaperObject,
    finetune::{CheckpointChoice, MethodType},
    manifest::find_one,
    report::{Exported, ProgressEvent},
};

use crate::{
    job::{JobError, PretrainOptions, open_data, run_reporting, serve_metrics},
    model::lora,
    store::{self, join},
    tokenizer::Tokenizer,
    train::{
        checkpoint::Checkpointer,
        pretrain::{BaseModel, ModelInit, Outcome, PretrainError, PretrainRun},
        trainer::{Trainer, Tuning},
    },
};

/// Where a FinetuneJob's base model is: its URI (a checkpoint prefix of a PretrainJob of
/// the job file, or `baseModel.uri`), its store access and which checkpoint.
fn base_location(
    objects: &[TaperObject],
    job: &FinetuneJob,
) -> Result<
    (
        String,
        Option<taper_crds::store::StoreAccess>,
        CheckpointChoice,
    ),
    JobError,
> {
    let base = &job.spec.base_model;
    if let Some(uri) = &base.uri {
        return Ok((uri.clone(), base.access.clone(), CheckpointChoice::Latest));
    }
    let Some(r) = &base.pretrain_job_ref else {
        return Err(JobError::Spec(
            "spec.baseModel sets neither pretrainJobRef nor uri".into(),
        ));
    };
    let pj = find_one(objects, TaperObject::as_pretrain_job, Some(&r.name)).map_err(|e| {
        JobError::Spec(format!(
            "spec.baseModel.pretrainJobRef: {e}; put the PretrainJob in the job file or set baseModel.uri"
        ))
    })?;
    let uri = pj.spec.checkpoints.uri.clone().ok_or_else(|| {
        JobError::Spec(format!(
            "PretrainJob {} has no spec.checkpoints.uri to take the base model from",
            r.name
        ))
    })?;
    Ok((uri, pj.spec.checkpoints.access.clone(), r.checkpoint))
}

/// Whether the tokenizers named `a` and `b` (`gpt2`, or `tokenizer.json` URIs) are the
/// same: the same name, the same file contents, or the same ids for a probe text and the
/// same vocabulary and end-of-text token (a GPT-2 folder's `tokenizer.json` against the
/// built-in `gpt2`).
fn same_tokenizer(rt: &tokio::runtime::Runtime, a: &str, b: &str) -> Result<bool, JobError> {
    if a == b {
        return Ok(true);
    }
    let (ta, tb) = (Tokenizer::load(rt, a, None)?, Tokenizer::load(rt, b, None)?);
    let probe = "Taper's tokenizer check: naïve café, 1234 + 5678 = 6912.\n\tdef f(x): return x**2";
    Ok(ta.vocab_size() == tb.vocab_size()
        && ta.eot() == tb.eot()
        && ta.encode(probe)? == tb.encode(probe)?)
}

/// Run the FinetuneJob of `objects` (the job file's contents).
pub fn run(
    rt: &tokio::runtime::Runtime,
    objects: &[TaperObject],
    opts: PretrainOptions,
) -> Result<Outcome, JobError> {
    let job = find_one(objects, TaperObject::as_finetune_job, opts.name.as_deref())
        .map_err(|e| JobError::Spec(e.to_string()))?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let ds_name = &job.spec.dataset_ref.name;
    let dataset = find_one(objects, TaperObject::as_dataset, Some(ds_name)).ok();
    let (manifest, train, test) = open_data(rt, dataset, ds_name, &opts)?;
    for (split, data) in [("train", &train), ("test", &test)] {
        if !data.is_masked() {
            return Err(JobError::Spec(format!(
                "Dataset {ds_name} is not an instruction dataset (format: instruction): its {split} shards have no loss masks"
            )));
        }
        if data.examples() == 0 {
            return Err(JobError::Data(format!(
                "Dataset {ds_name}: its {split} split holds no example (none ends with the end-of-text token {})",
                manifest.eot_token
            )));
        }
    }
    let output = job
        .spec
        .output
        .location
        .as_ref()
        .ok_or_else(|| JobError::Spec("spec.output.location is unset".into()))?;
    // Checkpoints go to `spec.checkpoints`, else beside the output (with its access).
    let (ckpt_uri, ckpt_access) = match opts
        .checkpoints
        .clone()
        .or_else(|| job.spec.checkpoints.uri.clone())
    {
        Some(uri) => (uri, job.spec.checkpoints.access.clone()),
        None => (join(&output.uri, "checkpoints"), output.access.clone()),
    };
    let device = crate::device::select_device(opts.device.as_deref())?;
    let staging = opts.work_dir.join("staging").join(&name);

    let (base_uri, base_access, choice) = base_location(objects, job)?;
    let base = base::load(
        rt,
        &base_uri,
        base_access.as_ref(),
        choice,
        &device,
        &staging,
    )?;
    eprintln!(
        "Base model: {} ({} layers, {} wide, context {})",
        base.identity, base.cfg.n_layer, base.cfg.n_embd, base.cfg.block_size
    );
    if let Some(want) = job.spec.base_model.architecture {
        let is = match base.arch {
            crate::model::Arch::Gpt2 => taper_crds::finetune::Architecture::Gpt2,
            crate::model::Arch::Llama(_) => taper_crds::finetune::Architecture::Llama,
        };
        if want != is {
            return Err(JobError::Spec(format!(
                "spec.baseModel.architecture is {want:?}, but {base_uri} is a {is:?} model"
            )));
        }
    }
    if base.tokenizer.is_empty() {
        return Err(JobError::Spec(format!(
            "{base_uri} has no tokenizer.json; a Llama is finetuned with its own tokenizer (put it beside config.json)"
        )));
    }
    if !same_tokenizer(rt, &base.tokenizer, &manifest.tokenizer)? {
        return Err(JobError::Spec(format!(
            "the base model's tokenizer ({}) is not the dataset's ({}); prepare the Dataset with the base's tokenizer",
            base.tokenizer, manifest.tokenizer
        )));
    }
    if (base.cfg.vocab_size as u64) < manifest.vocab_size as u64 {
        return Err(JobError::Spec(format!(
            "the base model's vocabulary ({}) is smaller than the dataset's ({})",
            base.cfg.vocab_size, manifest.vocab_size
        )));
    }
    // The base's dropout is off, as lit-gpt finetunes; LoRA has its own.
    let cfg = taper_crds::model::GptConfig {
        dropout: 0.0,
        ..base.cfg
    };
    let mut training = job.spec.resolved_training();
    if device.is_cpu() && job.spec.training.precision.is_none() {
        training.precision = taper_crds::training::Precision::F32;
    }
    let mut params = base.params;
    let tuning = match job.spec.method.type_ {
        MethodType::Full => Tuning::Full,
        MethodType::Lora => {
            let settings = job.spec.method.lora.clone();
            let linears = base.arch.linears(&cfg);
            lora::add_adapters_to(
                &mut params,
                &linears,
                &settings,
                training.seed as u64,
                &device,
            )
            .map_err(|e| JobError::Spec(e.to_string()))?;
            Tuning::Lora(settings)
        }
    };
    let store = rt.block_on(store::open(&ckpt_uri, ckpt_access.as_ref()))?;
    let out_store = rt.block_on(store::open(&output.uri, output.access.as_ref()))?;
    let metrics = serve_metrics("FinetuneJob", &name, &opts)?;
    let merge = job.spec.output.merge;
    let tokenizer = manifest.tokenizer.clone();
    let eot = manifest.eot_token;
    let identity = base.identity.clone();
    let arch = base.arch;
    let export_staging = staging.join("export");
    let export = |trainer: &Trainer| -> Result<ProgressEvent, PretrainError> {
        // The best checkpoint's weights (the one evaluation liked most), else the last.
        let ckpt = Checkpointer::new(store.as_ref(), export_staging.join("best"));
        let best = rt.block_on(ckpt.best())?;
        let (step, trained) = match best {
            Some(listed) => {
                let loaded = rt.block_on(ckpt.load(&listed, &device))?;
                (loaded.state.step, loaded.model)
            }
            None => (trainer.step_count(), trainer.trained_tensors()),
        };
        let mut event = Exported {
            step,
            adapter_uri: None,
            adapter_sha256: None,
            model_uri: None,
            model_sha256: None,
        };
        let mut weights = trainer.params().tensors();
        if let Some(settings) = trainer.tuning().lora() {
            let files = export::adapter_files(&trained, settings, &identity, &arch, &cfg)
                .map_err(Box::new)?;
            let (uri, sha) = rt
                .block_on(export::publish(
                    out_store.as_ref(),
                    "adapter",
                    files,
                    &export_staging,
                ))
                .map_err(Box::new)?;
            event.adapter_uri = Some(uri);
            event.adapter_sha256 = Some(sha);
            weights = lora::merge(&weights, &trained, settings)?;
        } else {
            weights.extend(trained);
        }
        if merge || trainer.tuning().lora().is_none() {
            let mut files = export::model_files(&arch, &cfg, &weights, eot).map_err(Box::new)?;
            // A tokenizer.json travels with the model (`gpt2` is built in everywhere).
            let spool = crate::prepare::sources::Spool::new();
            if tokenizer.contains("://") {
                let file =
                    crate::prepare::sources::fetch_one(rt, &spool, "tokenizer", &tokenizer, None)
                        .map_err(|e| Box::new(export::ExportError::from(e)))?;
                files.push(("tokenizer.json", export::File::Copy(file.path.clone())));
            }
            let (uri, sha) = rt
                .block_on(export::publish(
                    out_store.as_ref(),
                    "model",
                    files,
                    &export_staging,
                ))
                .map_err(Box::new)?;
            event.model_uri = Some(uri);
            event.model_sha256 = Some(sha);
        }
        Ok(ProgressEvent::Exported(event))
    };
    let eval_interval = training.eval_interval as u64;
    let run = PretrainRun {
        model: cfg,
        init: ModelInit::Base(Box::new(BaseModel {
            params,
            tuning,
            identity: base.identity.clone(),
            arch,
        })),
        export: Some(&export),
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
        staging: staging.clone(),
        device: device.clone(),
        peak_flops: opts.peak_flops,
        stop: opts.stop,
        metrics: Some(&metrics),
        stop_after: opts.stop_after,
        events: None,
    };
    run_reporting::<FinetuneJob>(rt, &name, run)
}
