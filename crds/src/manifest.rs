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

    /// The Dataset, if this is one.
    pub fn as_dataset(&self) -> Option<&Dataset> {
        match self {
            Self::Dataset(o) => Some(o),
            _ => None,
        }
    }

    /// The PretrainJob, if this is one.
    pub fn as_pretrain_job(&self) -> Option<&PretrainJob> {
        match self {
            Self::PretrainJob(o) => Some(o),
            _ => None,
        }
    }

    /// The FinetuneJob, if this is one.
    pub fn as_finetune_job(&self) -> Option<&FinetuneJob> {
        match self {
            Self::FinetuneJob(o) => Some(o),
            _ => None,
        }
    }
}

/// Why [`find_one`] found no single object.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No object of the kind (with the name, when one was given).
    #[error("the file holds no {kind}{}", .name.as_ref().map(|n| format!(" named {n}")).unwrap_or_default())]
    Missing {
        /// The kind looked for.
        kind: String,
        /// The name looked for.
        name: Option<String>,
    },
    /// Several objects of the kind and no name to choose between them.
    #[error("the file holds several {kind}s; choose one with --name")]
    Several {
        /// The kind looked for.
        kind: String,
    },
}

/// The one object of `objects` that `pick` accepts (e.g. [`TaperObject::as_dataset`]),
/// named `name` when a name is given: the lookup every command that reads a manifest
/// file makes.
pub fn find_one<'a, T: kube::Resource<DynamicType = ()>>(
    objects: &'a [TaperObject],
    pick: impl Fn(&'a TaperObject) -> Option<&'a T>,
    name: Option<&str>,
) -> Result<&'a T, LookupError> {
    let found: Vec<&T> = objects
        .iter()
        .filter_map(pick)
        .filter(|o| name.is_none_or(|n| o.meta().name.as_deref() == Some(n)))
        .collect();
    let kind = || T::kind(&()).to_string();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(LookupError::Missing {
            kind: kind(),
            name: name.map(str::to_string),
        }),
        _ => Err(LookupError::Several { kind: kind() }),
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

    #[test]
    fn find_one_picks_by_kind_and_name_and_says_why_it_cannot() {
        let doc = |kind: &str, name: &str| {
            format!(
                "apiVersion: taper.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n{}",
                if kind == "Dataset" {
                    "  format: pretraining\n  sources: [{name: s, uri: 'file:///x', format: text}]\n"
                } else {
                    "  datasetRef: {name: a}\n  model: {preset: tiny}\n"
                }
            )
        };
        let text = [
            doc("Dataset", "a"),
            doc("Dataset", "b"),
            doc("PretrainJob", "p"),
        ]
        .join("---\n");
        let objects = parse_manifests(&text).expect("parse");
        let pj = find_one(&objects, TaperObject::as_pretrain_job, None).expect("one PretrainJob");
        assert_eq!(pj.metadata.name.as_deref(), Some("p"));
        let b = find_one(&objects, TaperObject::as_dataset, Some("b")).expect("Dataset b");
        assert_eq!(b.metadata.name.as_deref(), Some("b"));
        assert_eq!(
            find_one(&objects, TaperObject::as_dataset, None),
            Err(LookupError::Several {
                kind: "Dataset".into()
            })
        );
        let missing = find_one(&objects, TaperObject::as_dataset, Some("c")).expect_err("no c");
        assert_eq!(missing.to_string(), "the file holds no Dataset named c");
        let none = find_one(&objects, TaperObject::as_finetune_job, None).expect_err("none");
        assert_eq!(none.to_string(), "the file holds no FinetuneJob");
        assert_eq!(
            LookupError::Several {
                kind: "Dataset".into()
            }
            .to_string(),
            "the file holds several Datasets; choose one with --name"
        );
    }
}
