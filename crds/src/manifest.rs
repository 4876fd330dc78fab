//! Reading Taper objects from YAML manifests (what `kubectl apply -f` would send).

use serde::Deserialize;

use crate::{API_VERSION, Dataset, FinetuneJob, PretrainJob};

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("document {index}: {source}")]
    Yaml {
        /// Zero-based index of the document in the stream.
        index: usize,
        /// The parser's error, with line and column.
        source: serde_yaml::Error,
    },
    /// A document does not match its kind's schema.
    #[error("document {index} ({kind}): {path}: {message}")]
    Field {
        /// Zero-based index of the document in the stream.
        index: usize,
        /// The document's kind.
        kind: &'static str,
        /// Dotted path of the offending field, e.g. `spec.training.maxSteps`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A document is of a kind Taper does not know.
    #[error(
        "document {index}: expected apiVersion {API_VERSION} and kind Dataset, PretrainJob or FinetuneJob, found {api_version} {kind}"
    )]
    UnknownKind {
        /// Zero-based index of the document in the stream.
        index: usize,
        /// The document's `apiVersion`.
        api_version: String,
        /// The document's `kind`.
        kind: String,
    },
}

/// One Taper object read from a manifest.
#[derive(Clone, Debug, PartialEq)]
pub enum TaperObject {
    /// A Dataset.
    Dataset(Box<Dataset>),
    /// A PretrainJob.
    PretrainJob(Box<PretrainJob>),
    /// A FinetuneJob.
    FinetuneJob(Box<FinetuneJob>),
}

impl TaperObject {
    /// The object's `metadata.name`, or an empty string.
    pub fn name(&self) -> &str {
        let meta = match self {
            Self::Dataset(o) => &o.metadata,
            Self::PretrainJob(o) => &o.metadata,
            Self::FinetuneJob(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }

    /// The object's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dataset(_) => "Dataset",
            Self::PretrainJob(_) => "PretrainJob",
            Self::FinetuneJob(_) => "FinetuneJob",
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Parse every document of a YAML stream into typed Taper objects. Empty documents are skipped.
pub fn parse_manifests(text: &str) -> Result<Vec<TaperObject>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta = serde_yaml::from_value(value.clone())
            .map_err(|source| ManifestError::Yaml { index, source })?;
        let object = match (meta.api_version.as_str(), meta.kind.as_str()) {
            (API_VERSION, "Dataset") => TaperObject::Dataset(typed(index, "Dataset", value)?),
            (API_VERSION, "PretrainJob") => {
                TaperObject::PretrainJob(typed(index, "PretrainJob", value)?)
            }
            (API_VERSION, "FinetuneJob") => {
                TaperObject::FinetuneJob(typed(index, "FinetuneJob", value)?)
            }
            _ => {
                return Err(ManifestError::UnknownKind {
                    index,
                    api_version: meta.api_version,
                    kind: meta.kind,
                });
            }
        };
        out.push(object);
    }
    Ok(out)
}

/// Deserialize `value` as `T`, reporting the path of the first field that does not fit.
fn typed<T: serde::de::DeserializeOwned>(
    index: usize,
    kind: &'static str,
    value: serde_yaml::Value,
) -> Result<Box<T>, ManifestError> {
    serde_path_to_error::deserialize(value)
        .map(Box::new)
        .map_err(|e| ManifestError::Field {
            index,
            kind,
            path: e.path().to_string(),
            message: e.into_inner().to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kinds_are_refused_with_their_name() {
        let err = parse_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
            .expect_err("a Pod is not a Taper object");
        assert!(err.to_string().contains("v1 Pod"), "{err}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: x}\n\
                    spec:\n  datasetRef: {name: d}\n  model: {preset: gpt2-small}\n  training: {maxSteps: many}\n";
        let err = parse_manifests(text).expect_err("maxSteps is a number");
        assert!(err.to_string().contains("spec.training.maxSteps"), "{err}");
    }
}
