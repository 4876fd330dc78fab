//! The CRDs in a real API server: established, explained by `kubectl explain`, the
//! quickstart pipeline applied with its printer columns, every CEL rule refusing bad
//! manifests, and garbage collection of what a PretrainJob owns.

use std::path::Path;

use serde_json::{Value, json};
use taper_e2e::workspace_root;

use crate::{
    cel::check_cel_rules,
    support::{eventually, kubectl, ok, step},
};

/// The printer columns of a CRD: (upper-cased name, priority).
fn printer_columns(crd_file: &Path) -> Vec<(String, i64)> {
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(crd_file).expect("read CRD"))
        .expect("CRD YAML");
    doc["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let name = c["name"].as_str()?.to_uppercase();
            Some((name, c["priority"].as_i64().unwrap_or(0)))
        })
        .collect()
}

pub(crate) fn cluster_checks(kubeconfig: &Path) {
    step("the CRDs are accepted and established");
    let crds = workspace_root().join("charts/taper/crds");
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "--server-side", "-f", &crds.display().to_string()],
            None,
        ),
        "apply CRDs",
    );
    for crd in [
        "datasets.taper.dev",
        "pretrainjobs.taper.dev",
        "finetunejobs.taper.dev",
    ] {
        ok(
            &kubectl(
                kubeconfig,
                &[
                    "wait",
                    "--for=condition=Established",
                    &format!("crd/{crd}"),
                    "--timeout=60s",
                ],
                None,
            ),
            "CRD established",
        );
    }

    step("kubectl explain pretrainjob.spec.training prints the field docs");
    let explain = eventually(60, "kubectl explain finds the CRD", || {
        let out = kubectl(kubeconfig, &["explain", "pretrainjob.spec.training"], None);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    for needle in [
        "learningRate",
        "warmupSteps",
        "Clip the global gradient norm",
    ] {
        assert!(
            explain.contains(needle),
            "explain lacks {needle:?}:\n{explain}"
        );
    }

    step("the quickstart pipeline applies and `kubectl get pj` shows the printer columns");
    ok(
        &kubectl(kubeconfig, &["create", "namespace", "e2e"], None),
        "create namespace",
    );
    let pipeline = workspace_root().join("examples/quickstart/pipeline.yaml");
    ok(
        &kubectl(
            kubeconfig,
            &[
                "apply",
                "--server-side",
                "-n",
                "e2e",
                "-f",
                &pipeline.display().to_string(),
            ],
            None,
        ),
        "apply the quickstart pipeline",
    );
    let table = ok(
        &kubectl(kubeconfig, &["get", "pj", "-n", "e2e"], None),
        "kubectl get pj",
    );
    let wide = ok(
        &kubectl(kubeconfig, &["get", "pj", "-n", "e2e", "-o", "wide"], None),
        "kubectl get pj -o wide",
    );
    let header = table.lines().next().unwrap_or_default().to_string();
    let wide_header = wide.lines().next().unwrap_or_default().to_string();
    for (col, priority) in printer_columns(&crds.join("pretrainjobs.taper.dev.yaml")) {
        if priority == 0 {
            assert!(
                header.contains(&col),
                "`kubectl get pj` header {header:?} lacks {col}"
            );
        }
        assert!(
            wide_header.contains(&col),
            "`kubectl get pj -o wide` header {wide_header:?} lacks {col}"
        );
    }
    assert!(table.contains("world-gpt"), "{table}");
    for (short, kind) in [("ds", "Dataset"), ("fj", "FinetuneJob")] {
        let out = kubectl(kubeconfig, &["get", short, "-n", "e2e"], None);
        assert!(
            out.status.success(),
            "kubectl get {short} ({kind}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    step("every CEL rule refuses a bad manifest through kubectl apply");
    ok(
        &kubectl(kubeconfig, &["create", "namespace", "cel"], None),
        "create namespace",
    );
    check_cel_rules(kubeconfig);

    step("garbage collection: an owned ConfigMap goes with its PretrainJob");
    let uid = ok(
        &kubectl(
            kubeconfig,
            &[
                "get",
                "pj",
                "-n",
                "e2e",
                "world-gpt",
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        ),
        "uid",
    );
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "owned", "ownerReferences": [{"apiVersion": "taper.dev/v1alpha1",
            "kind": "PretrainJob", "name": "world-gpt", "uid": uid, "controller": true}]},
        "data": {"k": "v"}});
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "-n", "e2e", "-f", "-"],
            Some(&cm.to_string()),
        ),
        "owned configmap",
    );
    ok(
        &kubectl(
            kubeconfig,
            &["delete", "pj", "-n", "e2e", "world-gpt"],
            None,
        ),
        "delete pj",
    );
    eventually(
        60,
        "the garbage collector deletes the owned ConfigMap",
        || {
            let out = kubectl(
                kubeconfig,
                &["get", "configmap", "-n", "e2e", "owned"],
                None,
            );
            (!out.status.success()).then_some(())
        },
    );
}
