//! Pods on the pod runner: PodSecurity admission in a `restricted` namespace, a
//! `taper --version` pod that runs to Succeeded, and a pod of another image that stays
//! Pending with `ErrImageNeverPull`.

use std::path::Path;

use serde_json::{Value, json};

use crate::support::{eventually, kubectl, ok, wait_for_default_service_account};

/// A container security context that the `restricted` Pod Security Standard admits.
pub(crate) fn restricted_container_security() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
}

pub(crate) fn pod_checks(kubeconfig: &Path) {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "restricted",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    ok(
        &kubectl(kubeconfig, &["apply", "-f", "-"], Some(&ns.to_string())),
        "restricted namespace",
    );
    wait_for_default_service_account(kubeconfig, "restricted");
    let secure = restricted_container_security();
    // PodSecurity refuses a pod that breaks the restricted profile.
    let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "taper", "image": "taper-trainer:0.1.0", "args": ["--version"]}]}});
    let out = kubectl(
        kubeconfig,
        &["apply", "-n", "restricted", "-f", "-"],
        Some(&bad.to_string()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("violates PodSecurity \"restricted"),
        "{stderr}"
    );

    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "taper-version"},
        "spec": {"restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "taper", "image": "ghcr.io/taper-dev/taper-trainer:0.1.0",
                                 "command": ["taper"], "args": ["--version"],
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}},
                                 "securityContext": secure}]}});
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "-n", "restricted", "-f", "-"],
            Some(&pod.to_string()),
        ),
        "taper --version pod",
    );
    eventually(90, "the taper --version pod succeeds", || {
        let phase = ok(
            &kubectl(
                kubeconfig,
                &[
                    "get",
                    "pod",
                    "-n",
                    "restricted",
                    "taper-version",
                    "-o",
                    "jsonpath={.status.phase}",
                ],
                None,
            ),
            "pod phase",
        );
        assert_ne!(phase, "Failed", "the taper --version pod failed");
        (phase == "Succeeded").then_some(())
    });
    let other = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-ours"},
        "spec": {"securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "shell", "image": "busybox:1.36", "command": ["sleep", "3600"],
                                 "securityContext": secure}]}});
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "-n", "restricted", "-f", "-"],
            Some(&other.to_string()),
        ),
        "busybox pod",
    );
    eventually(
        60,
        "the busybox pod is reported Pending with ErrImageNeverPull",
        || {
            let reason = ok(
                &kubectl(
                    kubeconfig,
                    &[
                        "get",
                        "pod",
                        "-n",
                        "restricted",
                        "not-ours",
                        "-o",
                        "jsonpath={.status.containerStatuses[0].state.waiting.reason}",
                    ],
                    None,
                ),
                "waiting reason",
            );
            (reason == "ErrImageNeverPull").then_some(())
        },
    );
}
