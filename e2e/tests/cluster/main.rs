//! The e2e suite against a real control plane: etcd, kube-apiserver and
//! kube-controller-manager built by `e2e/scripts/build-tools.sh`, kubectl, and the pod
//! runner standing in for the kubelet.
//!
//! One cluster serves every check (starting one takes ~15 s on 2 cores); each check is a
//! named step, and the test ends by asserting that no component process is left.
//!
//! The checks, by concern: `crds` (the CRDs in the API server), `cel` (every CEL rule
//! against the bad manifests of `crds/tests/cel_cases/invalid-manifests.yaml`, the table
//! the crds tests share), `schema` (every bound, type, required field and closed object of
//! the CRDs' structural schema against the manifests `crds/tests/schema_cases` derives,
//! refused with the client-side validator's words), `pods` (admission and the pod runner),
//! `trainer` (a training pod end to end), `operator` (the operator end to end) and
//! `disruption` (preempted and evicted pods, run within the operator's checks);
//! `support` holds kubectl and the retry helpers.

#[path = "../../../crds/tests/cel_cases/mod.rs"]
mod cel_cases;
#[path = "../../../crds/tests/schema_cases/mod.rs"]
mod schema_cases;

mod cel;
mod crds;
mod disruption;
mod finetune;
mod install;
mod monitoring;
mod operator;
mod pods;
mod schema;
mod support;
mod trainer;

use std::{path::Path, process::Command, time::Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use taper_e2e::{
    cluster::{self, ClusterOptions, ControlPlane},
    runner::{PodRunner, RunnerOptions},
};

use crate::support::{kubectl, ok, step};

fn tools_present() -> bool {
    let dir = taper_e2e::minio::tools_dir();
    let missing: Vec<_> = ["etcd", "kube-apiserver", "kube-controller-manager"]
        .into_iter()
        .filter(|t| !dir.join(t).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} in {}: run e2e/scripts/build-tools.sh (make test does)",
        dir.display()
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_suite() {
    assert!(tools_present());
    let taper = taper_e2e::taper_bin();
    assert!(
        taper.exists(),
        "{} is missing: cargo test --workspace builds it (or cargo build -p taper-trainer)",
        taper.display()
    );
    let started = Instant::now();
    step("start etcd, kube-apiserver and kube-controller-manager");
    let plane = ControlPlane::start(ClusterOptions {
        service_accounts: vec![("taper-system".into(), "taper-operator".into())],
        // TAPER_E2E_KEEP=1 keeps certificates, logs and pod folders for a post-mortem.
        keep_dir: std::env::var_os("TAPER_E2E_KEEP").is_some(),
        ..Default::default()
    })
    .await
    .expect("control plane starts");
    let pids = plane.pids();
    println!(
        "  ready in {:.1} s at {}",
        started.elapsed().as_secs_f64(),
        plane.server()
    );
    let kubeconfig = plane.kubeconfig();
    let version = ok(
        &kubectl(&kubeconfig, &["version", "-o", "json"], None),
        "kubectl version",
    );
    assert!(version.contains("v1.34"), "server version: {version}");

    step("start the pod runner (node + binding)");
    let work = plane.dir().join("runner");
    let runner = PodRunner::start(
        plane
            .client(&cluster::node_user(cluster::NODE_NAME))
            .await
            .expect("node client"),
        plane
            .client("system:kube-scheduler")
            .await
            .expect("scheduler client"),
        RunnerOptions {
            // Pods reach the API server as in a cluster, through KUBERNETES_SERVICE_*.
            api_host_port: plane
                .server()
                .trim_start_matches("https://")
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?))),
            ..RunnerOptions::new(cluster::NODE_NAME, taper.clone(), work.clone())
        },
    )
    .await
    .expect("pod runner starts");
    let nodes = ok(
        &kubectl(&kubeconfig, &["get", "nodes", "-o", "json"], None),
        "get nodes",
    );
    assert!(
        nodes.contains("\"nvidia.com/gpu\": \"8\""),
        "node advertises GPUs: {nodes}"
    );

    let kc = kubeconfig.clone();
    tokio::task::spawn_blocking(move || crds::cluster_checks(&kc))
        .await
        .expect("cluster checks");

    step("every check of the CRDs' structural schema: kube-apiserver refuses as taper's validator");
    let admin = plane.client(cluster::ADMIN).await.expect("admin client");
    schema::check_schema_checks(&admin, &kubeconfig).await;

    step("a `taper --version` pod in a restricted namespace runs to Succeeded");
    let kc = kubeconfig.clone();
    tokio::task::spawn_blocking(move || pods::pod_checks(&kc))
        .await
        .expect("pod checks");
    let log = std::fs::read_to_string(runner.log_path("restricted", "taper-version", "taper"))
        .expect("container log");
    assert!(log.contains("taper "), "log of taper --version: {log}");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "restricted");
    let pod = pods.get("taper-version").await.expect("pod");
    let status = pod.status.expect("status");
    let cs = &status.container_statuses.expect("container statuses")[0];
    let term = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("terminated");
    assert_eq!(term.exit_code, 0);

    step("pods of other images stay Pending with a clear reason");
    let pending = pods.get("not-ours").await.expect("pod");
    let waiting = pending
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c[0].state.clone())
        .and_then(|s| s.waiting)
        .expect("waiting state");
    assert_eq!(waiting.reason.as_deref(), Some("ErrImageNeverPull"));
    assert!(waiting.message.unwrap_or_default().contains("busybox"));

    step("a deleted pod is removed for good by the runner (the kubelet's final delete)");
    let kc = kubeconfig.clone();
    tokio::task::spawn_blocking(move || {
        ok(
            &kubectl(
                &kc,
                &[
                    "delete",
                    "pod",
                    "-n",
                    "restricted",
                    "not-ours",
                    "--wait=true",
                    "--timeout=60s",
                ],
                None,
            ),
            "delete pending pod",
        );
    })
    .await
    .expect("delete");

    step(
        "a trainer pod: Secret/ConfigMap env, fieldRef, volumes; deletion sends SIGTERM and it checkpoints",
    );
    let kc = kubeconfig.clone();
    let taper2 = taper.clone();
    let corpus = plane.dir().join("corpus");
    let log = runner.log_path("train", "pretrain", "trainer");
    let bad_log = runner.log_path("train", "bad-job", "trainer");
    tokio::task::spawn_blocking(move || {
        trainer::trainer_pod_checks(&kc, &taper2, &corpus, &log, &bad_log)
    })
    .await
    .expect("trainer pod checks");

    step(
        "helm install; the operator with the chart's values, as its ServiceAccount: a Dataset and a PretrainJob run to completion through Jobs",
    );
    let minio = taper_e2e::minio::Minio::start().expect("MinIO starts");
    let s3 = support::minio_client(&minio.endpoint());
    s3.create_bucket()
        .bucket("taper")
        .send()
        .await
        .expect("bucket taper");
    let setup = operator::Setup {
        admin: kubeconfig.clone(),
        operator: plane.kubeconfig_path_for(&cluster::service_account_user(
            "taper-system",
            "taper-operator",
        )),
        work: plane.dir().join("operator"),
        s3_endpoint: minio.endpoint(),
        pod_logs: runner
            .log_path("ml", "x", "y")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    std::fs::create_dir_all(&setup.work).expect("operator work dir");
    let (kc, work) = (kubeconfig.clone(), setup.work.clone());
    let monitoring = tokio::task::spawn_blocking(move || monitoring::start(&kc, &work))
        .await
        .expect("Prometheus with the chart's scrape configuration");
    tokio::task::spawn_blocking(move || operator::operator_checks(&setup))
        .await
        .expect("operator checks");
    step("the chart's dashboards and alerts against Prometheus' data of that run");
    tokio::task::spawn_blocking(move || monitoring.check())
        .await
        .expect("monitoring checks");
    drop(minio);

    step("stop everything; no component process is left");
    runner.shutdown().await;
    drop(admin);
    drop(plane);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {pid} outlived the control plane"
        );
    }
    // Also anything an earlier test binary of this run leaked (MinIO, Prometheus): a
    // component of the suite whose parent is this process or gone (re-parented to init).
    let me = std::process::id().to_string();
    for name in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "minio",
        "prometheus",
    ] {
        let out = Command::new("pgrep")
            .args(["-x", name])
            .output()
            .expect("pgrep");
        let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|pid| {
                let ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    ["taper-cluster-", "taper-minio-", "taper-prometheus-"]
                        .iter()
                        .any(|m| c.contains(m))
                });
                let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit(") ").next()?.split(' ').nth(1).map(str::to_string));
                ours && ppid.is_some_and(|p| p == "1" || p == me)
            })
            .map(str::to_string)
            .collect();
        assert!(
            left.is_empty(),
            "pgrep found {name} still running: {left:?}"
        );
    }
    println!("  suite took {:.1} s", started.elapsed().as_secs_f64());
}
