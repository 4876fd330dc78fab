//! The chart as a platform team installs it, into the suite's API server (`helm install`
//! with monitoring on, after prometheus-operator's CRDs), and the operator started with
//! the installed Deployment's environment, authenticated as the release's ServiceAccount.

use std::process::Command;

use taper_e2e::process::Proc;

use crate::{
    operator::Setup,
    support::{kubectl, kubectl_json, ok},
};

/// The operator as a host process started with the environment of the container in the
/// Deployment that `helm install` created: only what a process on this host must differ
/// in is replaced (the pod's name and namespace, which the API server would fill in, and
/// the listen addresses, so that two replicas can share the host); it authenticates as the
/// chart's ServiceAccount.
pub(crate) fn start_operator(s: &Setup, log: &str) -> Proc {
    let bin = taper_e2e::operator_bin();
    assert!(
        bin.exists(),
        "{} is missing: cargo test --workspace builds it",
        bin.display()
    );
    let port = |_| taper_e2e::minio::free_port().expect("port");
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", &s.operator);
    for (name, value) in chart_env(s) {
        cmd.env(name, value);
    }
    cmd.env("POD_NAMESPACE", "taper-system")
        .env("POD_NAME", log)
        .env("TAPER_METRICS_ADDR", format!("127.0.0.1:{}", port(0)))
        .env("TAPER_HEALTH_ADDR", format!("127.0.0.1:{}", port(1)));
    Proc::spawn("taper-operator", cmd, &s.work.join(format!("{log}.log"))).expect("operator starts")
}

/// The literal environment of the operator container of the installed Deployment.
fn chart_env(s: &Setup) -> Vec<(String, String)> {
    let deployment = kubectl_json(
        &s.admin,
        &[
            "get",
            "deployment",
            "-n",
            "taper-system",
            "taper-operator",
            "-o",
            "json",
        ],
    )
    .expect("the chart's Deployment is installed");
    let containers = &deployment["spec"]["template"]["spec"]["containers"];
    containers[0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// `helm install` of the chart into the suite's API server, with the values a platform
/// team would give for this cluster: two replicas (so leader election), the MinIO as
/// default output, the S3 Secret's name, and monitoring on ([`crate::monitoring::VALUES`]:
/// monitors, rules, dashboards, scrape configuration and annotations). The monitors need
/// prometheus-operator's CRDs, applied first as a cluster with kube-prometheus-stack has
/// them (`e2e/scripts/build-tools.sh monitoring-crds`).
pub(crate) fn install_chart(s: &Setup) {
    let crds = taper_e2e::minio::tool("monitoring-crds")
        .display()
        .to_string();
    ok(
        &kubectl(&s.admin, &["apply", "--server-side", "-f", &crds], None),
        "prometheus-operator's CRDs",
    );
    ok(
        &kubectl(
            &s.admin,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/podmonitors.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ],
            None,
        ),
        "the monitoring CRDs are served",
    );
    let values = format!(
        "replicas=2,storage.defaultOutputUri=s3://taper,storage.endpoint={},\
         storage.region=us-east-1,storage.credentialsSecret=s3,\
         trainer.terminationGracePeriodSeconds=60,{}",
        s.s3_endpoint,
        crate::monitoring::VALUES
    );
    let out = taper_e2e::helm::command()
        .arg("--kubeconfig")
        .arg(&s.admin)
        .args(["install", "taper"])
        .arg(taper_e2e::helm::chart())
        .args(["--namespace", "taper-system", "--create-namespace"])
        .args(["--set", &values])
        .output()
        .expect("helm runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helm install: {text}");
    // NOTES.txt tells a person what to apply next.
    assert!(text.contains("STATUS: deployed"), "{text}");
    assert!(text.contains("kubectl apply"), "NOTES.txt: {text}");
    let env: std::collections::BTreeMap<String, String> = chart_env(s).into_iter().collect();
    assert_eq!(
        env.get("TAPER_LEADER_ELECTION").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        env.get("TAPER_S3_ENDPOINT").map(String::as_str),
        Some(s.s3_endpoint.as_str())
    );
    let release = kubectl_json(
        &s.admin,
        &[
            "get",
            "serviceaccount,role,rolebinding,service",
            "-n",
            "taper-system",
            "-o",
            "json",
        ],
    )
    .expect("the release's objects");
    let kinds: Vec<&str> = release["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    for kind in ["ServiceAccount", "Role", "RoleBinding", "Service"] {
        assert!(
            kinds.contains(&kind),
            "helm install created a {kind}: {kinds:?}"
        );
    }
}
