//! Every check of the CRDs' structural schema, client-side: for each `minimum`, `maximum`,
//! `enum`, `maxLength`, `required`, `type`, closed object … of the generated CRDs, a
//! manifest that breaks it (derived by `schema_cases`, which the e2e suite also sends to a
//! real kube-apiserver) is refused by `taper_crds::schema` naming that field and that
//! check, and nothing else; `nullable` fields accept `null`; `status` is not validated.
//! The derived cases must cover every check a plain walk of the schema counts.

mod schema_cases;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use schema_cases::SchemaCase;
use serde_json::Value;
use taper_crds::schema;

/// The valid object of each kind that the CEL table's cases also start from.
fn bases() -> BTreeMap<String, Value> {
    let table: Value =
        serde_yaml::from_str(include_str!("cel_cases/invalid-manifests.yaml")).expect("table");
    serde_json::from_value(table["bases"].clone()).expect("bases by kind")
}

fn crds() -> Vec<(String, Value)> {
    taper_crds::crds()
        .into_iter()
        .map(|crd| {
            let kind = crd.spec.names.kind.clone();
            (kind, serde_json::to_value(&crd).expect("CRD as JSON"))
        })
        .collect()
}

fn cases() -> Vec<SchemaCase> {
    let bases = bases();
    crds()
        .iter()
        .flat_map(|(kind, crd)| schema_cases::derive(kind, crd, &bases[kind]))
        .collect()
}

/// Why the validator's verdict on `case` is not the expected one, if it is not.
fn verdict_gap(case: &SchemaCase) -> Option<String> {
    assert_eq!(case.manifest["kind"], case.kind.as_str(), "{}", case.name);
    match (schema::validate(&case.manifest), case.refused_by) {
        (Ok(()), None) => None,
        (Ok(()), Some(_)) => Some(format!("{}: accepted", case.name)),
        (Err(e), None) => Some(format!("{}: refused: {e}", case.name)),
        (Err(e), Some(check)) => {
            let named = e
                .errors()
                .iter()
                .any(|x| x.field == case.field && x.check.keyword() == check);
            let elsewhere = e.errors().iter().any(|x| x.field != case.field);
            (!named || elsewhere).then(|| {
                format!(
                    "{}: expected only errors at {} including a {check} one, got: {e}",
                    case.name, case.field
                )
            })
        }
    }
}

#[test]
fn every_check_of_the_schema_refuses_its_derived_manifest_naming_the_field() {
    let mut counted: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, crd) in crds() {
        for (keyword, n) in schema_cases::count_checks(&crd) {
            *counted.entry(keyword).or_default() += n;
        }
    }
    let cases = cases();
    let mut derived: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        *derived.entry(case.keyword).or_default() += 1;
    }
    let total: usize = counted.values().sum();
    println!("{} checks in the schemas: {counted:?}", total);
    assert!(!cases.is_empty(), "no case derived from the schemas");
    assert_eq!(
        derived, counted,
        "derived cases by keyword (left) against the checks the schemas hold (right)"
    );
    assert_eq!(cases.len(), total);
    // The bounds the issue is about, at least, are there.
    for keyword in [
        "minimum",
        "maximum",
        "enum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "required",
        "type",
        "unknownField",
        "nullable",
    ] {
        assert!(
            derived.get(keyword).is_some_and(|n| *n > 0),
            "no {keyword} case"
        );
    }
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names are unique");

    let gaps: Vec<String> = cases.iter().filter_map(verdict_gap).collect();
    assert!(
        gaps.is_empty(),
        "{} of {} derived cases got the wrong verdict:\n{}",
        gaps.len(),
        cases.len(),
        gaps.join("\n")
    );
}

#[test]
fn the_bases_and_every_example_pass_the_schema() {
    for (kind, base) in bases() {
        assert_eq!(schema::validate(&base), Ok(()), "base {kind}");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(files.len() >= 5, "examples: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if doc.is_null() {
                continue;
            }
            if let Err(e) = schema::validate(&doc) {
                panic!(
                    "{}: {} {}: {e}",
                    file.display(),
                    doc["kind"],
                    doc["metadata"]["name"]
                );
            }
        }
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("examples folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn negative_batch_sizes_and_gpus_are_refused_as_the_api_server_refuses_them() {
    let mut pj = bases()["PretrainJob"].clone();
    pj["spec"]["training"] = serde_json::json!({"batchSize": -4});
    pj["spec"]["resources"] = serde_json::json!({"gpus": -1});
    let err = schema::validate(&pj).expect_err("out of bounds");
    let got: Vec<String> = err.errors().iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "spec.resources.gpus: Invalid value: -1: spec.resources.gpus in body should be greater than or equal to 0",
            "spec.training.batchSize: Invalid value: -4: spec.training.batchSize in body should be greater than or equal to 1",
        ]
    );
}
