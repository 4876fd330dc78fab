//! Every CEL rule of the CRDs, evaluated client-side on a good and a bad object.
//!
//! The same rules run in the API server (the e2e suite proves that with `kubectl apply`);
//! here kube's `cel` feature evaluates them against the generated schema, with schema
//! defaults applied first, as admission does.

use kube::{
    CustomResourceExt,
    core::cel::{ValidationErrors, validate_cel, validate_cel_update},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use taper_crds::{Dataset, FinetuneJob, PretrainJob};

fn dataset() -> Value {
    json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "d", "namespace": "default"},
        "spec": {
            "sources": [
                {"name": "web", "uri": "s3://corpora/web/*.jsonl.zst", "format": "jsonl.zst"},
                {"name": "wiki", "uri": "file:///data/wiki.parquet", "format": "parquet"}
            ]
        }
    })
}

fn pretrain() -> Value {
    json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"datasetRef": {"name": "d"}, "model": {"preset": "gpt2-small"}}
    })
}

fn finetune() -> Value {
    json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "FinetuneJob",
        "metadata": {"name": "f", "namespace": "default"},
        "spec": {"baseModel": {"pretrainJobRef": {"name": "p"}}, "datasetRef": {"name": "alpaca"}}
    })
}

/// `base` with the JSON-pointer paths set to the given values.
fn with(mut base: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
        let slot = base
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent} exists in the fixture"));
        match slot {
            Value::Object(map) => {
                map.insert(key.to_string(), value.clone());
            }
            Value::Array(items) => {
                let i: usize = key.parse().expect("array index");
                items[i] = value.clone();
            }
            other => panic!("{parent} is {other}, not a container"),
        }
    }
    base
}

fn typed<T: DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).expect("fixture deserializes into the typed struct")
}

fn check<T: CustomResourceExt + Serialize + DeserializeOwned>(
    v: &Value,
) -> Result<(), ValidationErrors> {
    validate_cel(&typed::<T>(v))
}

fn check_update<T: CustomResourceExt + Serialize + DeserializeOwned>(
    new: &Value,
    old: &Value,
) -> Result<(), ValidationErrors> {
    validate_cel_update(&typed::<T>(new), &typed::<T>(old))
}

/// Assert the object is refused, by a rule whose message or path names `field`.
#[track_caller]
fn assert_refused(result: Result<(), ValidationErrors>, field: &str, message: &str) {
    let errors = match result {
        Ok(()) => panic!("expected a refusal naming {field}, but the object was accepted"),
        Err(e) => e,
    };
    let text = errors.to_string();
    assert!(
        errors.iter().any(|e| e.message.contains(message)
            && (e.message.contains(field) || e.field_path.contains(field))),
        "expected an error naming {field} with {message:?}, got: {text}"
    );
}

#[track_caller]
fn assert_accepted(result: Result<(), ValidationErrors>) {
    if let Err(e) = result {
        panic!("expected the object to be accepted, got: {e}");
    }
}

#[test]
fn fixtures_are_valid() {
    assert_accepted(check::<Dataset>(&dataset()));
    assert_accepted(check::<PretrainJob>(&pretrain()));
    assert_accepted(check::<FinetuneJob>(&finetune()));
}

#[test]
fn dataset_sources_must_be_non_empty() {
    let bad = with(dataset(), &[("/spec/sources", json!([]))]);
    assert_refused(check::<Dataset>(&bad), "sources", "at least one source");
}

#[test]
fn dataset_source_names_must_be_unique() {
    let bad = with(dataset(), &[("/spec/sources/1/name", json!("web"))]);
    assert_refused(check::<Dataset>(&bad), "sources", "must be unique");
}

#[test]
fn dataset_source_names_are_dns_labels() {
    let bad = with(dataset(), &[("/spec/sources/0/name", json!("Web_Text"))]);
    assert_refused(check::<Dataset>(&bad), "name", "DNS label");
}

#[test]
fn uris_must_use_a_supported_scheme() {
    for uri in ["http://insecure.example/x", "gs://bucket/x", "/no/scheme"] {
        let bad = with(dataset(), &[("/spec/sources/0/uri", json!(uri))]);
        assert_refused(check::<Dataset>(&bad), "uri", "s3://, https:// or file://");
    }
    let bad = with(dataset(), &[("/spec/output", json!({"uri": "ftp://x"}))]);
    assert_refused(check::<Dataset>(&bad), "uri", "s3://, https:// or file://");
    let ok = with(
        dataset(),
        &[("/spec/output", json!({"uri": "https://host/x"}))],
    );
    assert_accepted(check::<Dataset>(&ok));

    let bad = with(
        pretrain(),
        &[("/spec/checkpoints", json!({"uri": "gs://x"}))],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "uri",
        "s3://, https:// or file://",
    );
    let bad = with(
        finetune(),
        &[("/spec/baseModel", json!({"uri": "hf://gpt2"}))],
    );
    assert_refused(
        check::<FinetuneJob>(&bad),
        "uri",
        "s3://, https:// or file://",
    );
}

#[test]
fn source_weight_must_be_positive() {
    let bad = with(dataset(), &[("/spec/sources/0/weight", json!(0.0))]);
    assert_refused(check::<Dataset>(&bad), "weight", "greater than 0");
}

#[test]
fn test_size_is_a_fraction_or_a_count() {
    for good in [0.0005, 0.5, 1.0, 2000.0] {
        let ok = with(dataset(), &[("/spec/split", json!({"testSize": good}))]);
        assert_accepted(check::<Dataset>(&ok));
    }
    for bad in [0.0, -1.0, 0.6, 0.99, 12.5] {
        let v = with(dataset(), &[("/spec/split", json!({"testSize": bad}))]);
        assert_refused(check::<Dataset>(&v), "testSize", "fraction in (0, 0.5]");
    }
}

#[test]
fn huggingface_tokenizer_needs_a_uri() {
    let bad = with(
        dataset(),
        &[("/spec/tokenizer", json!({"type": "huggingface"}))],
    );
    assert_refused(check::<Dataset>(&bad), "uri", "tokenizer.uri is required");
    let ok = with(
        dataset(),
        &[(
            "/spec/tokenizer",
            json!({"type": "huggingface", "uri": "s3://m/tokenizer.json"}),
        )],
    );
    assert_accepted(check::<Dataset>(&ok));
}

#[test]
fn minhash_threshold_is_a_similarity() {
    let bad = with(
        dataset(),
        &[("/spec/dedup", json!({"minhash": {"threshold": 1.0}}))],
    );
    assert_refused(check::<Dataset>(&bad), "threshold", "(0, 1)");
}

#[test]
fn n_head_must_divide_n_embd_with_the_preset_filling_gaps() {
    let bad = with(
        pretrain(),
        &[("/spec/model", json!({"preset": "gpt2-small", "nHead": 7}))],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "nHead",
        "nHead must divide nEmbd",
    );
    let bad = with(
        pretrain(),
        &[("/spec/model", json!({"preset": "baby", "nEmbd": 100}))],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "nHead",
        "nHead must divide nEmbd",
    );
    let bad = with(
        pretrain(),
        &[(
            "/spec/model",
            json!({"preset": "tiny", "nEmbd": 96, "nHead": 5}),
        )],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "nHead",
        "nHead must divide nEmbd",
    );

    let ok = with(
        pretrain(),
        &[("/spec/model", json!({"preset": "gpt2-small", "nHead": 8}))],
    );
    assert_accepted(check::<PretrainJob>(&ok));
    let ok = with(
        pretrain(),
        &[("/spec/model", json!({"nEmbd": 96, "nHead": 3}))],
    );
    assert_accepted(check::<PretrainJob>(&ok));
    for preset in taper_crds::model::Preset::ALL {
        let ok = with(
            pretrain(),
            &[("/spec/model", json!({"preset": preset.name()}))],
        );
        assert_accepted(check::<PretrainJob>(&ok));
    }
}

#[test]
fn min_learning_rate_must_not_exceed_learning_rate_including_defaults() {
    let bad = with(
        pretrain(),
        &[(
            "/spec/training",
            json!({"learningRate": 1e-4, "minLearningRate": 1e-3}),
        )],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "minLearningRate",
        "minLearningRate must be <= learningRate",
    );
    // Only one of the two set: compared with the kind's default (6e-4 for pretraining).
    let bad = with(
        pretrain(),
        &[("/spec/training", json!({"minLearningRate": 7e-4}))],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "minLearningRate",
        "minLearningRate must be <= learningRate",
    );
    let ok = with(
        pretrain(),
        &[("/spec/training", json!({"minLearningRate": 5e-4}))],
    );
    assert_accepted(check::<PretrainJob>(&ok));
    let bad = with(
        pretrain(),
        &[("/spec/training", json!({"learningRate": 1e-5}))],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "minLearningRate",
        "minLearningRate must be <= learningRate",
    );

    // FinetuneJob compares with its own default learning rate (3e-4).
    let bad = with(
        finetune(),
        &[("/spec/training", json!({"minLearningRate": 5e-4}))],
    );
    assert_refused(
        check::<FinetuneJob>(&bad),
        "minLearningRate",
        "minLearningRate must be <= learningRate",
    );
}

#[test]
fn learning_rate_must_be_positive() {
    let bad = with(
        pretrain(),
        &[(
            "/spec/training",
            json!({"learningRate": 0.0, "minLearningRate": 0.0}),
        )],
    );
    assert_refused(check::<PretrainJob>(&bad), "learningRate", "greater than 0");
}

#[test]
fn warmup_must_not_exceed_max_steps_including_defaults() {
    let bad = with(
        pretrain(),
        &[(
            "/spec/training",
            json!({"maxSteps": 100, "warmupSteps": 200}),
        )],
    );
    assert_refused(
        check::<PretrainJob>(&bad),
        "warmupSteps",
        "warmupSteps must be <= maxSteps",
    );
    // Default warmup (2000) against a short run.
    let bad = with(pretrain(), &[("/spec/training", json!({"maxSteps": 500}))]);
    assert_refused(
        check::<PretrainJob>(&bad),
        "warmupSteps",
        "warmupSteps must be <= maxSteps",
    );
    let ok = with(
        pretrain(),
        &[(
            "/spec/training",
            json!({"maxSteps": 500, "warmupSteps": 50}),
        )],
    );
    assert_accepted(check::<PretrainJob>(&ok));
    let bad = with(
        finetune(),
        &[("/spec/training", json!({"warmupSteps": 5000}))],
    );
    assert_refused(
        check::<FinetuneJob>(&bad),
        "warmupSteps",
        "warmupSteps must be <= maxSteps",
    );
}

#[test]
fn betas_are_two_numbers_below_one() {
    let bad = with(
        pretrain(),
        &[("/spec/training", json!({"betas": [0.9, 1.0]}))],
    );
    assert_refused(check::<PretrainJob>(&bad), "betas", "[0, 1)");
}

#[test]
fn model_dropout_is_a_probability() {
    let bad = with(
        pretrain(),
        &[("/spec/model", json!({"preset": "tiny", "dropout": 1.0}))],
    );
    assert_refused(check::<PretrainJob>(&bad), "dropout", "[0, 1)");
}

#[test]
fn overfitting_factor_is_below_one() {
    let bad = with(
        pretrain(),
        &[(
            "/spec/overfitting",
            json!({"action": "ReduceLearningRate", "factor": 1.5}),
        )],
    );
    assert_refused(check::<PretrainJob>(&bad), "factor", "(0, 1)");
}

#[test]
fn base_model_needs_exactly_one_source() {
    let both = with(
        finetune(),
        &[(
            "/spec/baseModel",
            json!({"pretrainJobRef": {"name": "p"}, "uri": "s3://models/gpt2"}),
        )],
    );
    assert_refused(
        check::<FinetuneJob>(&both),
        "baseModel",
        "exactly one of pretrainJobRef and uri",
    );
    let neither = with(finetune(), &[("/spec/baseModel", json!({}))]);
    assert_refused(
        check::<FinetuneJob>(&neither),
        "baseModel",
        "exactly one of pretrainJobRef and uri",
    );
    let uri = with(
        finetune(),
        &[(
            "/spec/baseModel",
            json!({"uri": "s3://models/gpt2", "architecture": "gpt2"}),
        )],
    );
    assert_accepted(check::<FinetuneJob>(&uri));
}

#[test]
fn lora_hyper_parameters_are_bounded() {
    let lora = |l: Value| {
        with(
            finetune(),
            &[("/spec/method", json!({"type": "lora", "lora": l}))],
        )
    };
    assert_refused(
        check::<FinetuneJob>(&lora(json!({"r": 0}))),
        "lora.r",
        "greater than 0",
    );
    assert_refused(
        check::<FinetuneJob>(&lora(json!({"alpha": 0.0}))),
        "lora.alpha",
        "greater than 0",
    );
    assert_refused(
        check::<FinetuneJob>(&lora(json!({"dropout": 1.0}))),
        "lora.dropout",
        "[0, 1)",
    );
    assert_refused(
        check::<FinetuneJob>(&lora(json!({"dropout": -0.1}))),
        "lora.dropout",
        "[0, 1)",
    );
    assert_accepted(check::<FinetuneJob>(&lora(
        json!({"r": 16, "alpha": 32, "dropout": 0.0}),
    )));
}

#[test]
fn references_and_architecture_are_immutable() {
    let old = pretrain();
    let moved = with(
        old.clone(),
        &[("/spec/datasetRef", json!({"name": "other"}))],
    );
    assert_refused(
        check_update::<PretrainJob>(&moved, &old),
        "datasetRef",
        "datasetRef is immutable",
    );
    let resized = with(
        old.clone(),
        &[("/spec/model", json!({"preset": "gpt2-medium"}))],
    );
    assert_refused(
        check_update::<PretrainJob>(&resized, &old),
        "model",
        "model is immutable",
    );
    // Hyper-parameters may change (for example to extend a run).
    let longer = with(
        old.clone(),
        &[("/spec/training", json!({"maxSteps": 700000}))],
    );
    assert_accepted(check_update::<PretrainJob>(&longer, &old));

    let old = finetune();
    let rebased = with(
        old.clone(),
        &[("/spec/baseModel", json!({"uri": "s3://models/gpt2"}))],
    );
    assert_refused(
        check_update::<FinetuneJob>(&rebased, &old),
        "baseModel",
        "baseModel is immutable",
    );
    let moved = with(
        old.clone(),
        &[("/spec/datasetRef", json!({"name": "other"}))],
    );
    assert_refused(
        check_update::<FinetuneJob>(&moved, &old),
        "datasetRef",
        "datasetRef is immutable",
    );
    assert_accepted(check_update::<FinetuneJob>(&old, &old));
}
