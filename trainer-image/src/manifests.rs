//! Job files as the CLI reads them: Taper objects validated as the API server validates
//! them at `kubectl apply` (first the CRDs' structural schema: unknown fields, types,
//! bounds, required fields, with the API server's field paths and words; then the CEL
//! rules), and a one-line description of each for people.

use std::path::Path;

use taper_crds::{TaperObject, parse_manifests};

/// Why a job file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The YAML is not Taper objects, or breaks their CRD's structural schema.
    #[error("{origin}: {source}")]
    Manifest {
        /// The file (or "embedded quickstart").
        origin: String,
        /// The parser's or the schema's error, naming the field.
        source: taper_crds::ManifestError,
    },
    /// No object in it.
    #[error("{origin}: no Dataset, PretrainJob or FinetuneJob in it")]
    Empty {
        /// The file.
        origin: String,
    },
    /// An object breaks a CRD rule.
    #[error("{origin}: {kind} {name} is invalid: {errors}")]
    Invalid {
        /// The file.
        origin: String,
        /// The object's kind.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The rules it breaks.
        errors: kube::core::cel::ValidationErrors,
    },
}

/// The objects of `text` (from `origin`), each validated as the API server would: against
/// its CRD's structural schema while parsing (`taper_crds::parse_manifests`), then against
/// the CEL rules.
pub fn load(origin: &str, text: &str) -> Result<Vec<TaperObject>, ManifestFileError> {
    let objects = parse_manifests(text).map_err(|source| ManifestFileError::Manifest {
        origin: origin.to_string(),
        source,
    })?;
    if objects.is_empty() {
        return Err(ManifestFileError::Empty {
            origin: origin.to_string(),
        });
    }
    for object in &objects {
        taper_crds::validate(object).map_err(|errors| ManifestFileError::Invalid {
            origin: origin.to_string(),
            kind: object.kind(),
            name: object.name().to_string(),
            errors,
        })?;
    }
    Ok(objects)
}

/// The validated objects of the file at `path`.
pub fn read(path: &Path) -> Result<Vec<TaperObject>, ManifestFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    load(&path.display().to_string(), &text)
}

/// One line about `object` for people: its kind, name and what it will do.
pub fn describe(object: &TaperObject) -> String {
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
