//! Every CEL rule of the CRDs, evaluated client-side on good and bad objects.
//!
//! The bad objects are the shared table `cel_cases/invalid-manifests.yaml`, which the e2e
//! suite also applies to a real API server with `kubectl apply`; here kube's `cel` feature
//! evaluates the rules against the generated schema, with schema defaults applied first,
//! as admission does. The good objects (each rule's accepted counterparts) are below.

mod cel_cases;

use cel_cases::{Case, Side, Table};
use kube::{
    CustomResourceExt,
    core::cel::{ValidationErrors, validate_cel, validate_cel_update},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use taper_crds::{Dataset, FinetuneJob, PretrainJob};

fn dataset() -> Value {
    Table::load().base("Dataset")
}

fn pretrain() -> Value {
    Table::load().base("PretrainJob")
}

fn finetune() -> Value {
    Table::load().base("FinetuneJob")
}

/// `base` with the JSON-pointer paths set to the given values.
fn with(mut base: Value, changes: &[(&str, Value)]) -> Value {
    for (pointer, value) in changes {
        cel_cases::set(&mut base, pointer, value.clone());
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

#[track_caller]
fn assert_accepted(result: Result<(), ValidationErrors>) {
    if let Err(e) = result {
        panic!("expected the object to be accepted, got: {e}");
    }
}

/// Evaluate a case of the table: a create, or an update of its kind's base.
fn evaluate(table: &Table, case: &Case) -> Result<(), ValidationErrors> {
    fn run<T: CustomResourceExt + Serialize + DeserializeOwned>(
        new: &Value,
        old: Option<&Value>,
    ) -> Result<(), ValidationErrors> {
        match old {
            Some(old) => check_update::<T>(new, old),
            None => check::<T>(new),
        }
    }
    let new = case.manifest(table);
    let old = case.update.then(|| table.base(&case.kind));
    match case.kind.as_str() {
        "Dataset" => run::<Dataset>(&new, old.as_ref()),
        "PretrainJob" => run::<PretrainJob>(&new, old.as_ref()),
        "FinetuneJob" => run::<FinetuneJob>(&new, old.as_ref()),
        other => panic!("case {}: unknown kind {other}", case.name),
    }
}

/// Why `case` was not refused as the table says, if it was not: every rule it lists must
/// be named by an error whose message holds the rule's `message` and whose message or
/// field path holds its `field`.
fn refusal_gaps(table: &Table, case: &Case) -> Option<String> {
    let errors = match evaluate(table, case) {
        Ok(()) => return Some(format!("{}: accepted", case.name)),
        Err(e) => e,
    };
    let missing: Vec<String> = case
        .refused
        .iter()
        .filter(|r| {
            !errors.iter().any(|e| {
                e.message.contains(&r.message)
                    && (e.message.contains(&r.field) || e.field_path.contains(&r.field))
            })
        })
        .map(|r| format!("an error naming {} with {:?}", r.field, r.message))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{}: expected {}, got: {errors}",
            case.name,
            missing.join(" and ")
        )
    })
}

#[test]
fn every_invalid_manifest_is_refused() {
    let table = Table::load();
    let failures: Vec<String> = table
        .cases_for(Side::Client)
        .filter_map(|case| refusal_gaps(&table, case))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of the table's cases were not refused as listed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_cel_rule_has_an_invalid_manifest() {
    let table = Table::load();
    let mut gaps = Vec::new();
    for crd in taper_crds::crds() {
        let kind = crd.spec.names.kind.clone();
        let crd = serde_json::to_value(&crd).expect("CRD as JSON");
        gaps.extend(table.gaps(&kind, &crd, Side::Client));
    }
    assert!(gaps.is_empty(), "{}", gaps.join("\n"));
}

#[test]
fn fixtures_are_valid() {
    assert_accepted(check::<Dataset>(&dataset()));
    assert_accepted(check::<PretrainJob>(&pretrain()));
    assert_accepted(check::<FinetuneJob>(&finetune()));
}

#[test]
fn uris_with_a_supported_scheme_are_accepted() {
    let ok = with(
        dataset(),
        &[("/spec/output", json!({"uri": "https://host/x"}))],
    );
    assert_accepted(check::<Dataset>(&ok));
}

#[test]
fn test_size_is_a_fraction_or_a_count() {
    for good in [0.0005, 0.5, 1.0, 2000.0] {
        let ok = with(dataset(), &[("/spec/split", json!({"testSize": good}))]);
        assert_accepted(check::<Dataset>(&ok));
    }
}

#[test]
fn huggingface_tokenizer_with_a_uri_is_accepted() {
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
fn n_head_dividing_n_embd_is_accepted_with_the_preset_filling_gaps() {
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
fn min_learning_rate_below_the_default_learning_rate_is_accepted() {
    let ok = with(
        pretrain(),
        &[("/spec/training", json!({"minLearningRate": 5e-4}))],
    );
    assert_accepted(check::<PretrainJob>(&ok));
}

#[test]
fn warmup_within_max_steps_is_accepted() {
    let ok = with(
        pretrain(),
        &[(
            "/spec/training",
            json!({"maxSteps": 500, "warmupSteps": 50}),
        )],
    );
    assert_accepted(check::<PretrainJob>(&ok));
}

#[test]
fn base_model_from_a_uri_is_accepted() {
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
fn lora_hyper_parameters_in_bounds_are_accepted() {
    let ok = with(
        finetune(),
        &[(
            "/spec/method",
            json!({"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}),
        )],
    );
    assert_accepted(check::<FinetuneJob>(&ok));
}

#[test]
fn hyper_parameters_may_change_in_an_update() {
    // For example to extend a run; references and the architecture may not (the table).
    let old = pretrain();
    let longer = with(
        old.clone(),
        &[("/spec/training", json!({"maxSteps": 700000}))],
    );
    assert_accepted(check_update::<PretrainJob>(&longer, &old));
    let old = finetune();
    assert_accepted(check_update::<FinetuneJob>(&old, &old));
}
