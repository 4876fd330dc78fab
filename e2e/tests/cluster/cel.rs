//! Every CEL rule of the CRDs, in the real API server: each bad manifest of the shared
//! table (`crds/tests/cel_cases/invalid-manifests.yaml`, which the crds tests evaluate
//! client-side) is refused by `kubectl apply` with the whole message and the field path of
//! every rule it breaks, and every rule of the installed CRDs has a case.

use std::{collections::BTreeMap, path::Path};

use serde_json::{Value, json};
use taper_e2e::workspace_root;

use crate::{
    cel_cases::{self, Rule, Side, Table},
    support::{kubectl, ok},
};

/// How many CEL rules the CRDs hold, so that a rule lost from the generated schema fails.
const RULES: usize = 49;

/// The field path kubectl reports for a rule at `path` with `field_path`, e.g.
/// `spec.sources[0].uri` or `spec.training.minLearningRate`.
fn reported_path(path: &str, field_path: &str) -> String {
    format!(
        "{}{field_path}",
        path.trim_start_matches('.').replace("[]", "[0]")
    )
}

/// Apply `obj` in the `cel` namespace.
fn apply(kubeconfig: &Path, obj: &Value) -> std::process::Output {
    let text = serde_json::to_string(obj).expect("json");
    kubectl(kubeconfig, &["apply", "-n", "cel", "-f", "-"], Some(&text))
}

pub(crate) fn check_cel_rules(kubeconfig: &Path) {
    let table = Table::load();
    let crds = workspace_root().join("charts/taper/crds");
    let mut rules: BTreeMap<&str, Vec<Rule>> = BTreeMap::new();
    let mut gaps = Vec::new();
    for (kind, file) in [
        ("Dataset", "datasets.taper.dev.yaml"),
        ("PretrainJob", "pretrainjobs.taper.dev.yaml"),
        ("FinetuneJob", "finetunejobs.taper.dev.yaml"),
    ] {
        let crd: Value =
            serde_yaml::from_str(&std::fs::read_to_string(crds.join(file)).expect("read CRD"))
                .expect("CRD YAML");
        gaps.extend(table.gaps(kind, &crd, Side::Server));
        rules.insert(kind, cel_cases::rules(&crd));
    }
    assert!(gaps.is_empty(), "{}", gaps.join("\n"));
    let total: usize = rules.values().map(Vec::len).sum();
    let mut checked = 0;
    for (i, case) in table.cases_for(Side::Server).enumerate() {
        let name = format!("cel-{i}");
        if case.update {
            let mut base = table.base(&case.kind);
            base["metadata"]["name"] = json!(name);
            ok(&apply(kubeconfig, &base), "apply the base object");
        }
        let mut obj = case.manifest(&table);
        obj["metadata"]["name"] = json!(name);
        let out = apply(kubeconfig, &obj);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "case {}: kubectl apply accepted {obj}",
            case.name
        );
        // A case can break several rules of one node (the training cross-field rules): the
        // refusal names each, with its whole message.
        for refusal in &case.refused {
            let Some(rule) = rules[case.kind.as_str()].iter().find(|r| refusal.breaks(r)) else {
                unreachable!("gaps() found every refusal's rule")
            };
            let field = reported_path(&rule.path, &rule.field_path);
            assert!(
                stderr.contains(&rule.message)
                    && stderr.contains(&field)
                    && stderr.contains(&refusal.field),
                "case {}: {} rule at {}: expected kubectl apply to be refused naming {field} \
                 ({:?}) with {:?}; got: {stderr}",
                case.name,
                case.kind,
                rule.path,
                refusal.field,
                rule.message
            );
        }
        checked += 1;
    }
    println!("  {checked} bad manifests refused through kubectl apply, covering {total} CEL rules");
    assert_eq!(
        total, RULES,
        "the CRDs hold {RULES} CEL rules; update this count with the cases"
    );
}
