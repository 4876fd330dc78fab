//! Reading Taper objects from YAML manifests (what `kubectl apply -f` would send), checked
//! against their CRD's structural schema as the API server checks them ([`crate::schema`]).

use serde::Deserialize;
use serde_json::Value;

use crate::{API_VERSION, Dataset, FinetuneJob, PretrainJob, schema::SchemaErrors};

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
    /// A document breaks its CRD's structural schema: fields it does not declare, values of
    /// the wrong type or out of bounds, required fields missing. The API server refuses it
    /// at `kubectl apply` with the same fields and messages.
    #[error("document {index} ({kind} {name}) is invalid: {errors}")]
    Schema {
        /// Zero-based index of the document in the stream.
        index: usize,
        /// The document's kind.
        kind: &'static str,
        /// The document's `metadata.name`, or an empty string.
        name: String,
        /// Every field the schema refuses.
        errors: SchemaErrors,
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

/// Parse every document of a YAML stream into typed Taper objects. Empty documents are
/// skipped. Each document is first checked against its CRD's structural schema as the API
/// server checks what `kubectl apply` sends ([`crate::schema::validate_against`]: unknown
/// fields, types, bounds, required fields), with the API server's field paths and
/// messages; the CEL rules are not evaluated here (`crate::validate`).
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
        let kind = match (meta.api_version.as_str(), meta.kind.as_str()) {
            (API_VERSION, "Dataset") => "Dataset",
            (API_VERSION, "PretrainJob") => "PretrainJob",
            (API_VERSION, "FinetuneJob") => "FinetuneJob",
            _ => {
                return Err(ManifestError::UnknownKind {
                    index,
                    api_version: meta.api_version,
                    kind: meta.kind,
                });
            }
        };
        let value = checked(index, kind, &value)?;
        let object = match kind {
            "Dataset" => TaperObject::Dataset(typed(index, kind, value)?),
            "PretrainJob" => TaperObject::PretrainJob(typed(index, kind, value)?),
            _ => TaperObject::FinetuneJob(typed(index, kind, value)?),
        };
        out.push(object);
    }
    Ok(out)
}

/// The document as JSON as `kubectl apply` sends it (fields set to `null` dropped, integral
/// floats as integers), checked against the schema of `kind`.
fn checked(
    index: usize,
    kind: &'static str,
    value: &serde_yaml::Value,
) -> Result<Value, ManifestError> {
    let mut json = serde_json::to_value(value).map_err(|e| ManifestError::Field {
        index,
        kind,
        path: ".".into(),
        message: e.to_string(),
    })?;
    as_kubectl_apply_sends(&mut json);
    let Some(schema) = crate::schema::schema(kind) else {
        unreachable!("every Taper kind has a generated schema")
    };
    crate::schema::validate_against(schema, &json).map_err(|errors| ManifestError::Schema {
        index,
        kind,
        name: json["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        errors,
    })?;
    Ok(json)
}

/// What `kubectl apply` does to a manifest before sending it: it drops every object field
/// set to `null` (so `precision: null` means "unset", and a required field set to `null`
/// is missing), and it turns YAML into JSON through Go's float64, so `2.0` reaches the API
/// server as the integer `2`. `null` items of a list stay.
fn as_kubectl_apply_sends(v: &mut Value) {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e18
            {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(as_kubectl_apply_sends),
        Value::Object(map) => {
            map.retain(|_, field| !field.is_null());
            map.values_mut().for_each(as_kubectl_apply_sends);
        }
        _ => {}
    }
}

/// Deserialize `value` as `T`, reporting the path of the first field that does not fit.
fn typed<T: serde::de::DeserializeOwned>(
    index: usize,
    kind: &'static str,
    value: Value,
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

    /// The operator writes the objects it read from the API server (server metadata,
    /// status and all) into the pod's job file: the trainer's reader accepts them as read.
    #[test]
    fn objects_as_the_api_server_returns_them_pass_the_schema() {
        use k8s_openapi::{
            apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time},
            jiff::Timestamp,
        };

        let examples = concat!(
            include_str!("../../examples/gpt2-small/dataset-pretraining.yaml"),
            "---\n",
            include_str!("../../examples/gpt2-small/pretrain.yaml"),
        );
        let mut objects = parse_manifests(examples).expect("examples parse");
        let now = Time(Timestamp::UNIX_EPOCH);
        let mut text = String::new();
        for object in &mut objects {
            let meta = match object {
                TaperObject::Dataset(ds) => {
                    ds.status = Some(crate::DatasetStatus {
                        train_tokens: 12,
                        ..Default::default()
                    });
                    &mut ds.metadata
                }
                TaperObject::PretrainJob(pj) => {
                    pj.status = Some(crate::JobStatus {
                        step: Some(3),
                        train_loss: Some(2.5),
                        ..Default::default()
                    });
                    &mut pj.metadata
                }
                TaperObject::FinetuneJob(fj) => &mut fj.metadata,
            };
            meta.uid = Some("11111111-2222-3333-4444-555555555555".into());
            meta.resource_version = Some("42".into());
            meta.generation = Some(1);
            meta.creation_timestamp = Some(now.clone());
            meta.managed_fields = Some(vec![ManagedFieldsEntry {
                manager: Some("kubectl".into()),
                operation: Some("Apply".into()),
                ..Default::default()
            }]);
            text.push_str(
                &match object {
                    TaperObject::Dataset(o) => serde_yaml::to_string(o.as_ref()),
                    TaperObject::PretrainJob(o) => serde_yaml::to_string(o.as_ref()),
                    TaperObject::FinetuneJob(o) => serde_yaml::to_string(o.as_ref()),
                }
                .expect("YAML"),
            );
            text.push_str("---\n");
        }
        let read = parse_manifests(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(read.len(), 2);
        assert_eq!(read[0], objects[0]);
    }

    #[test]
    fn schema_bounds_and_unknown_fields_are_refused_as_the_api_server_refuses_them() {
        let doc = |training: &str| {
            format!(
                "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: x}}\n\
                 spec:\n  datasetRef: {{name: d}}\n  model: {{preset: tiny}}\n  training: {training}\n"
            )
        };
        let err = parse_manifests(&doc("{batchSize: -4}")).expect_err("batchSize >= 1");
        assert_eq!(
            err.to_string(),
            "document 0 (PretrainJob x) is invalid: spec.training.batchSize: Invalid value: -4: \
             spec.training.batchSize in body should be greater than or equal to 1"
        );
        let err = parse_manifests(&doc("{batchSzie: 4}")).expect_err("a typo");
        assert!(
            err.to_string()
                .ends_with("strict decoding error: unknown field \"spec.training.batchSzie\""),
            "{err}"
        );
        // As kubectl apply sends it: 2.0 is the integer 2, and a field set to null is unset
        // (precision has an enum, which the API server would check on a null it received).
        let objects = parse_manifests(&doc("{batchSize: 2.0, maxSteps: null, precision: null}"))
            .expect("valid");
        let pj = objects[0].as_pretrain_job().expect("a PretrainJob");
        assert_eq!(pj.spec.training.batch_size, Some(2));
        assert_eq!(pj.spec.training.max_steps, None);
        let objects = parse_manifests(&doc("null")).expect("training: null is unset: the default");
        assert_eq!(objects.len(), 1);
        let err = parse_manifests(&doc("{betas: [null, 0.5]}")).expect_err("null items stay");
        assert!(
            err.to_string()
                .contains("spec.training.betas[0]: Invalid value: \"null\""),
            "{err}"
        );
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
