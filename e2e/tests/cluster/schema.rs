//! Every check of the CRDs' structural schema, in the real API server: each manifest that
//! `crds/tests/schema_cases` derives from the installed CRDs (one per `minimum`, `maximum`,
//! `enum`, `maxLength`, `required`, `type`, closed object, `nullable` … of the schema;
//! the crds tests run the same ones through the client-side validator) is created once
//! with `dryRun=All&fieldValidation=Strict`, what `kubectl apply` sends, and kube-apiserver
//! must refuse it with the very error `taper_crds::schema` gives for that field (same path,
//! same words), or accept it where the validator accepts it. Then the two ends of the
//! user's path: `kubectl apply` and the trainer's manifest reader refuse a negative batch
//! size and a misspelt field with the same text.

use std::path::Path;

use futures::{StreamExt, stream};
use kube::Client;
use serde_json::{Value, json};
use taper_e2e::workspace_root;

use crate::{
    cel_cases::Table,
    schema_cases::{self, SchemaCase},
    support::kubectl,
};

/// The kinds, their resource names and CRD files.
const KINDS: [(&str, &str, &str); 3] = [
    ("Dataset", "datasets", "datasets.taper.dev.yaml"),
    ("PretrainJob", "pretrainjobs", "pretrainjobs.taper.dev.yaml"),
    ("FinetuneJob", "finetunejobs", "finetunejobs.taper.dev.yaml"),
];

/// Where the dry-run creates go (created by the CEL checks).
const NAMESPACE: &str = "cel";

/// Create `manifest` as `kind` in dry-run with strict field validation: `Ok` or the API
/// server's message.
async fn create(client: &Client, plural: &str, name: &str, manifest: &Value) -> Result<(), String> {
    let mut obj = manifest.clone();
    obj["metadata"]["name"] = json!(name);
    let request = http::Request::post(format!(
        "/apis/taper.dev/v1alpha1/namespaces/{NAMESPACE}/{plural}?dryRun=All&fieldValidation=Strict"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&obj).expect("JSON"))
    .expect("request");
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(e) => panic!("create {plural}/{name}: {e}"),
    }
}

/// Why the API server's answer to `case` is not the validator's, if it is not.
fn disagreement(case: &SchemaCase, server: &Result<(), String>) -> Option<String> {
    let local = taper_crds::schema::validate(&case.manifest);
    match (case.refused_by, server) {
        // A CEL rule may still refuse the object elsewhere (a reference set to null leaves
        // `baseModel` with neither of its two): the field itself must not be named.
        (None, Err(message)) if message.contains(&format!("{}: ", case.field)) => Some(format!(
            "{}: kube-apiserver refused the field: {message}",
            case.name
        )),
        (None, _) => local.err().map(|e| {
            format!(
                "{}: the validator refused what the derivation accepts: {e}",
                case.name
            )
        }),
        (Some(_), Ok(())) => Some(format!("{}: kube-apiserver accepted it", case.name)),
        (Some(check), Err(message)) => {
            let Some(expected) = local.as_ref().err().and_then(|e| {
                e.errors()
                    .iter()
                    .find(|x| x.field == case.field && x.check.keyword() == check)
            }) else {
                return Some(format!(
                    "{}: the validator did not refuse {} by {check}: {local:?}",
                    case.name, case.field
                ));
            };
            let expected = expected.to_string();
            (!message.contains(&expected)).then(|| {
                format!(
                    "{}:\n    validator:      {expected}\n    kube-apiserver: {message}",
                    case.name
                )
            })
        }
    }
}

pub(crate) async fn check_schema_checks(client: &Client, kubeconfig: &Path) {
    let table = Table::load();
    let crds = workspace_root().join("charts/taper/crds");
    let mut cases: Vec<SchemaCase> = Vec::new();
    let mut counted = 0;
    for (kind, _, file) in KINDS {
        let crd: Value =
            serde_yaml::from_str(&std::fs::read_to_string(crds.join(file)).expect("read CRD"))
                .expect("CRD YAML");
        counted += schema_cases::count_checks(&crd).values().sum::<usize>();
        cases.extend(schema_cases::derive(kind, &crd, &table.base(kind)));
    }
    assert!(!cases.is_empty(), "no case derived from the installed CRDs");
    assert_eq!(
        cases.len(),
        counted,
        "every check of the installed schemas has its case"
    );

    // One request per case, four at a time.
    let answers: Vec<Result<(), String>> = stream::iter(cases.iter().enumerate())
        .map(|(i, case)| async move {
            let Some((_, plural, _)) = KINDS.iter().find(|(kind, ..)| *kind == case.kind) else {
                unreachable!("cases are derived per kind of KINDS")
            };
            create(client, plural, &format!("schema-{i}"), &case.manifest).await
        })
        .buffered(4)
        .collect()
        .await;
    let gaps: Vec<String> = cases
        .iter()
        .zip(&answers)
        .filter_map(|(case, answer)| disagreement(case, answer))
        .collect();
    let refused = answers.iter().filter(|a| a.is_err()).count();
    assert!(
        gaps.is_empty(),
        "{} of {} derived manifests: kube-apiserver and taper_crds::schema disagree:\n{}",
        gaps.len(),
        cases.len(),
        gaps.join("\n")
    );
    let mut by_keyword = std::collections::BTreeMap::<&str, usize>::new();
    for case in &cases {
        *by_keyword.entry(case.keyword).or_default() += 1;
    }
    println!(
        "  {} derived manifests ({by_keyword:?}): {refused} refused by kube-apiserver with the \
         validator's field and words, the rest accepted by both",
        cases.len()
    );

    // The user's two paths: `kubectl apply -f` and the trainer's reader of the same file.
    let base = serde_yaml::to_string(&table.base("PretrainJob")).expect("YAML");
    for (name, change, needle) in [
        (
            "negative-batch",
            json!({"training": {"batchSize": -4}}),
            "spec.training.batchSize: Invalid value: -4: spec.training.batchSize in body \
             should be greater than or equal to 1",
        ),
        (
            "misspelt",
            json!({"training": {"batchSzie": 4}}),
            "strict decoding error: unknown field \"spec.training.batchSzie\"",
        ),
    ] {
        let mut doc: Value = serde_yaml::from_str(&base).expect("base");
        doc["metadata"]["name"] = json!(name);
        if let (Some(spec), Value::Object(change)) = (doc["spec"].as_object_mut(), change) {
            spec.extend(change);
        }
        let text = serde_yaml::to_string(&doc).expect("YAML");
        let out = kubectl(
            kubeconfig,
            &["apply", "-n", NAMESPACE, "-f", "-"],
            Some(&text),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "kubectl apply of {name}: expected {needle:?}, got: {stderr}"
        );
        let local = taper_crds::parse_manifests(&text).expect_err("the trainer refuses it too");
        assert!(
            local.to_string().contains(needle),
            "taper's reader of {name}: expected {needle:?}, got: {local}"
        );
    }
}
