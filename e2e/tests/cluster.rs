//! The e2e suite against a real control plane: etcd, kube-apiserver and
//! kube-controller-manager built by `e2e/scripts/build-tools.sh`, kubectl, and the pod
//! runner standing in for the kubelet.
//!
//! One cluster serves every check (starting one takes ~15 s on 2 cores); each check is a
//! named step, and the test ends by asserting that no component process is left.

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::{Value, json};
use taper_crds::pod;
use taper_e2e::{
    cluster::{self, ClusterOptions, ControlPlane},
    runner::{PodRunner, RunnerOptions},
    workspace_root,
};

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl is installed");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("write kubectl stdin");
    }
    child.wait_with_output().expect("kubectl runs")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Retry `f` until it returns `Some` or `secs` pass.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// [`eventually`], printing `context()` when it times out.
fn eventually_or<T>(
    secs: u64,
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

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

/// Every CEL rule of one CRD: (JSON path of the schema node, message, fieldPath).
fn cel_rules(crd_file: &Path) -> Vec<(String, String, String)> {
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(crd_file).expect("read CRD"))
        .expect("CRD YAML");
    fn walk(s: &Value, path: &str, out: &mut Vec<(String, String, String)>) {
        for v in s["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            out.push((
                path.to_string(),
                v["message"].as_str().unwrap_or_default().to_string(),
                v["fieldPath"].as_str().unwrap_or_default().to_string(),
            ));
        }
        for (k, sub) in s["properties"].as_object().into_iter().flatten() {
            walk(sub, &format!("{path}.{k}"), out);
        }
        if s["items"].is_object() {
            walk(&s["items"], &format!("{path}[]"), out);
        }
    }
    let mut out = Vec::new();
    walk(
        &doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        "",
        &mut out,
    );
    out
}

/// Set a JSON-pointer path, creating objects on the way.
fn set(v: &mut Value, pointer: &str, value: Value) {
    let mut cur = v;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        cur = match cur {
            Value::Array(items) => {
                let idx: usize = p.parse().expect("array index");
                if idx == items.len() {
                    items.push(json!({}));
                }
                if last {
                    items[idx] = value;
                    return;
                }
                &mut items[idx]
            }
            other => {
                if !other.is_object() {
                    *other = json!({});
                }
                let map = other.as_object_mut().expect("object");
                if last {
                    map.insert(p.to_string(), value);
                    return;
                }
                map.entry(p.to_string()).or_insert_with(|| json!({}))
            }
        };
    }
}

fn base(kind: &str) -> Value {
    match kind {
        "Dataset" => json!({"apiVersion": "taper.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "bad"},
            "spec": {"sources": [{"name": "web", "uri": "s3://corpora/web/*.jsonl.zst", "format": "jsonl.zst"}]}}),
        "PretrainJob" => json!({"apiVersion": "taper.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "bad"},
            "spec": {"datasetRef": {"name": "d"}, "model": {"preset": "tiny"}}}),
        _ => json!({"apiVersion": "taper.dev/v1alpha1", "kind": "FinetuneJob",
            "metadata": {"name": "bad"},
            "spec": {"baseModel": {"pretrainJobRef": {"name": "p"}}, "datasetRef": {"name": "alpaca"}}}),
    }
}

/// A bad manifest for the rule at `path` of `kind`: (changes, whether it is an update of
/// the base object). Every rule of the CRDs must have one (checked below).
fn bad_case(kind: &str, path: &str, message: &str) -> Option<(Vec<(&'static str, Value)>, bool)> {
    let endpoint = |p: &'static str, uri: &str| {
        vec![(
            p,
            json!({"uri": uri, "access": {"secretName": "s3", "endpoint": "ftp://minio:9000"}}),
        )]
    };
    let immutable = message.contains("immutable");
    Some(match (kind, path) {
        ("Dataset", ".spec.dedup.minhash.threshold") => (
            vec![("/spec/dedup", json!({"minhash": {"threshold": 1.0}}))],
            false,
        ),
        ("Dataset", ".spec.output.access.endpoint") => {
            (endpoint("/spec/output", "s3://b/out"), false)
        }
        ("Dataset", ".spec.output.uri") => {
            (vec![("/spec/output", json!({"uri": "gs://b/out"}))], false)
        }
        ("Dataset", ".spec.sources") if message.contains("unique") => (
            vec![(
                "/spec/sources/1",
                json!({"name": "web", "uri": "s3://c/other", "format": "text"}),
            )],
            false,
        ),
        ("Dataset", ".spec.sources") => (vec![("/spec/sources", json!([]))], false),
        ("Dataset", ".spec.sources[].access.endpoint") => (
            vec![(
                "/spec/sources/0/access",
                json!({"secretName": "s3", "endpoint": "ftp://minio"}),
            )],
            false,
        ),
        ("Dataset", ".spec.sources[].name") => {
            (vec![("/spec/sources/0/name", json!("Web_Text"))], false)
        }
        ("Dataset", ".spec.sources[].uri") => (
            vec![("/spec/sources/0/uri", json!("gs://corpora/web"))],
            false,
        ),
        ("Dataset", ".spec.sources[].weight") => {
            (vec![("/spec/sources/0/weight", json!(0.0))], false)
        }
        ("Dataset", ".spec.split.testSize") => {
            (vec![("/spec/split", json!({"testSize": 0.7}))], false)
        }
        ("Dataset", ".spec.tokenizer") => (
            vec![("/spec/tokenizer", json!({"type": "huggingface"}))],
            false,
        ),
        ("Dataset", ".spec.tokenizer.access.endpoint") => (
            vec![(
                "/spec/tokenizer",
                json!({"type": "huggingface", "uri": "s3://m/tokenizer.json", "access": {"secretName": "s3", "endpoint": "ftp://minio"}}),
            )],
            false,
        ),
        ("Dataset", ".spec.tokenizer.uri") => (
            vec![(
                "/spec/tokenizer",
                json!({"type": "huggingface", "uri": "gs://m/tokenizer.json"}),
            )],
            false,
        ),
        (_, ".spec.checkpoints.access.endpoint") => {
            (endpoint("/spec/checkpoints", "s3://b/ckpt"), false)
        }
        (_, ".spec.checkpoints.uri") => (
            vec![("/spec/checkpoints", json!({"uri": "gs://b/ckpt"}))],
            false,
        ),
        (_, ".spec.datasetRef") => (vec![("/spec/datasetRef", json!({"name": "other"}))], true),
        ("PretrainJob", ".spec.model") if !immutable => (
            vec![("/spec/model", json!({"preset": "gpt2-small", "nHead": 7}))],
            false,
        ),
        ("PretrainJob", ".spec.model") => (
            vec![("/spec/model", json!({"preset": "tiny", "nLayer": 3}))],
            true,
        ),
        ("PretrainJob", ".spec.model.dropout") => {
            (vec![("/spec/model/dropout", json!(1.0))], false)
        }
        (_, ".spec.overfitting.factor") => (
            vec![(
                "/spec/overfitting",
                json!({"action": "ReduceLearningRate", "factor": 1.5}),
            )],
            false,
        ),
        (_, ".spec.overfitting.minDelta") => (
            vec![("/spec/overfitting", json!({"minDelta": -0.1}))],
            false,
        ),
        (_, ".spec.training") => (
            vec![(
                "/spec/training",
                json!({"learningRate": 1e-4, "minLearningRate": 1e-3, "maxSteps": 100, "warmupSteps": 200}),
            )],
            false,
        ),
        (_, ".spec.training.betas") => (
            vec![("/spec/training", json!({"betas": [0.9, 1.0]}))],
            false,
        ),
        (_, ".spec.training.gradClip") => {
            (vec![("/spec/training", json!({"gradClip": -1.0}))], false)
        }
        (_, ".spec.training.learningRate") => (
            vec![(
                "/spec/training",
                json!({"learningRate": 0.0, "minLearningRate": 0.0}),
            )],
            false,
        ),
        (_, ".spec.training.minLearningRate") => (
            vec![("/spec/training", json!({"minLearningRate": -1.0}))],
            false,
        ),
        (_, ".spec.training.weightDecay") => (
            vec![("/spec/training", json!({"weightDecay": -0.1}))],
            false,
        ),
        ("FinetuneJob", ".spec.baseModel") if immutable => (
            vec![(
                "/spec/baseModel",
                json!({"pretrainJobRef": {"name": "other"}}),
            )],
            true,
        ),
        ("FinetuneJob", ".spec.baseModel") => (
            vec![(
                "/spec/baseModel",
                json!({"pretrainJobRef": {"name": "p"}, "uri": "s3://models/gpt2"}),
            )],
            false,
        ),
        ("FinetuneJob", ".spec.baseModel.access.endpoint") => (
            vec![(
                "/spec/baseModel",
                json!({"uri": "s3://models/gpt2", "access": {"secretName": "s3", "endpoint": "ftp://minio"}}),
            )],
            false,
        ),
        ("FinetuneJob", ".spec.baseModel.uri") => (
            vec![("/spec/baseModel", json!({"uri": "hf://gpt2"}))],
            false,
        ),
        ("FinetuneJob", ".spec.method.lora.alpha") => (
            vec![(
                "/spec/method",
                json!({"type": "lora", "lora": {"alpha": 0.0}}),
            )],
            false,
        ),
        ("FinetuneJob", ".spec.method.lora.dropout") => (
            vec![(
                "/spec/method",
                json!({"type": "lora", "lora": {"dropout": 1.0}}),
            )],
            false,
        ),
        ("FinetuneJob", ".spec.method.lora.r") => (
            vec![("/spec/method", json!({"type": "lora", "lora": {"r": 0}}))],
            false,
        ),
        ("FinetuneJob", ".spec.output.location.access.endpoint") => {
            (endpoint("/spec/output/location", "s3://b/out"), false)
        }
        ("FinetuneJob", ".spec.output.location.uri") => (
            vec![("/spec/output", json!({"location": {"uri": "gs://b/out"}}))],
            false,
        ),
        _ => return None,
    })
}

/// The field path kubectl reports for a rule at `path` with `field_path`, e.g.
/// `spec.sources[0].uri` or `spec.training.minLearningRate`.
fn reported_path(path: &str, field_path: &str) -> String {
    format!(
        "{}{field_path}",
        path.trim_start_matches('.').replace("[]", "[0]")
    )
}

fn check_cel_rules(kubeconfig: &Path) {
    let crds = workspace_root().join("charts/taper/crds");
    let mut checked = 0;
    // The same rule at a parent can hold several messages (the training cross-field rules):
    // the bad case breaks all of them at once and each message must appear.
    for (kind, file) in [
        ("Dataset", "datasets.taper.dev.yaml"),
        ("PretrainJob", "pretrainjobs.taper.dev.yaml"),
        ("FinetuneJob", "finetunejobs.taper.dev.yaml"),
    ] {
        for (path, message, field_path) in cel_rules(&crds.join(file)) {
            let (changes, update) = bad_case(kind, &path, &message).unwrap_or_else(|| {
                panic!("no e2e case for the {kind} rule at {path} ({message}): add one to bad_case")
            });
            let name = format!("cel-{checked}");
            let mut obj = base(kind);
            obj["metadata"]["name"] = json!(name);
            if update {
                let text = serde_json::to_string(&obj).expect("json");
                ok(
                    &kubectl(kubeconfig, &["apply", "-n", "cel", "-f", "-"], Some(&text)),
                    "apply the base object",
                );
            }
            for (pointer, value) in &changes {
                set(&mut obj, pointer, value.clone());
            }
            let text = serde_json::to_string(&obj).expect("json");
            let out = kubectl(kubeconfig, &["apply", "-n", "cel", "-f", "-"], Some(&text));
            let stderr = String::from_utf8_lossy(&out.stderr);
            let field = reported_path(&path, &field_path);
            assert!(
                !out.status.success() && stderr.contains(&message) && stderr.contains(&field),
                "{kind} rule at {path}: expected kubectl apply to be refused naming {field} with {message:?}; got: {stderr}"
            );
            checked += 1;
        }
    }
    println!("  {checked} CEL rules refused bad manifests through kubectl apply");
    assert_eq!(
        checked, 49,
        "the CRDs hold 49 CEL rules; update this count with the cases"
    );
}

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

fn step(name: &str) {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = *last {
        println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
    *last = Some(Instant::now());
    println!("step: {name}");
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
        RunnerOptions::new(cluster::NODE_NAME, taper.clone(), work.clone()),
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
    tokio::task::spawn_blocking(move || cluster_checks(&kc))
        .await
        .expect("cluster checks");

    step("a `taper --version` pod in a restricted namespace runs to Succeeded");
    let admin = plane.client(cluster::ADMIN).await.expect("admin client");
    let kc = kubeconfig.clone();
    tokio::task::spawn_blocking(move || pod_checks(&kc))
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
    tokio::task::spawn_blocking(move || trainer_pod_checks(&kc, &taper2, &corpus, &log, &bad_log))
        .await
        .expect("trainer pod checks");

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

fn cluster_checks(kubeconfig: &Path) {
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
    assert!(table.contains("shakespeare-mini"), "{table}");
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
                "shakespeare-mini",
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        ),
        "uid",
    );
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "owned", "ownerReferences": [{"apiVersion": "taper.dev/v1alpha1",
            "kind": "PretrainJob", "name": "shakespeare-mini", "uid": uid, "controller": true}]},
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
            &["delete", "pj", "-n", "e2e", "shakespeare-mini"],
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

/// Wait until the controller manager has made the `default` service account of `ns`
/// (pods are refused before it exists).
fn wait_for_default_service_account(kubeconfig: &Path, ns: &str) {
    eventually(
        60,
        &format!("the default service account exists in {ns}"),
        || {
            kubectl(
                kubeconfig,
                &["get", "serviceaccount", "-n", ns, "default"],
                None,
            )
            .status
            .success()
            .then_some(())
        },
    );
}

/// A container security context that the `restricted` Pod Security Standard admits.
fn restricted_container_security() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
}

fn pod_checks(kubeconfig: &Path) {
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

fn trainer_pod_checks(kubeconfig: &Path, taper: &Path, corpus: &Path, log: &Path, bad_log: &Path) {
    // A small synthetic corpus, prepared on the host with the same binary.
    std::fs::create_dir_all(corpus).expect("corpus dir");
    let mut text = String::new();
    for i in 0..400 {
        text.push_str(&format!(
            "Paragraph {i}: the operator turns each resource into pods, and pod {i} trains a model.\n\n"
        ));
    }
    std::fs::write(corpus.join("corpus.txt"), text).expect("corpus");
    let data = corpus.join("dataset");
    let dataset = format!(
        "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata:\n  name: synthetic\nspec:\n  sources:\n    - name: synthetic\n      uri: file://{}\n      format: text\n  cleaning:\n    disable: [gopherWordCount, gopherStopWords, c4TerminalPunctuation, c4ShortLines]\n  dedup:\n    minhash:\n      enabled: false\n  split:\n    testSize: 0.1\n  output:\n    uri: file://{}\n",
        corpus.join("corpus.txt").display(),
        data.display()
    );
    std::fs::write(corpus.join("dataset.yaml"), dataset).expect("dataset yaml");
    let out = Command::new(taper)
        .args(["prepare", "--job"])
        .arg(corpus.join("dataset.yaml"))
        .output()
        .expect("taper prepare runs");
    assert!(
        out.status.success(),
        "taper prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let job = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata:\n  name: e2e\nspec:\n  datasetRef:\n    name: synthetic\n  model:\n    preset: tiny\n  training:\n    batchSize: 2\n    maxSteps: 100000\n    warmupSteps: 10\n  evaluation:\n    interval: 100000\n    iterations: 1\n  checkpoints:\n    interval: 100000\n";
    let bad = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata:\n  name: bad\nspec:\n  datasetRef:\n    name: synthetic\n  model:\n    preset: tiny\n  training:\n    learningRate: 0.0\n";
    let metrics_port = taper_e2e::minio::free_port().expect("port");
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "train",
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "metrics", "namespace": "train"},
            "stringData": {"addr": format!("127.0.0.1:{metrics_port}")}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "job", "namespace": "train"},
            "data": {"job.yaml": job, "bad.yaml": bad, "data": data.display().to_string()}},
    ]});
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "-f", "-"],
            Some(&objects.to_string()),
        ),
        "namespace, secret, configmap",
    );
    wait_for_default_service_account(kubeconfig, "train");
    let secure = restricted_container_security();
    let pod = |name: &str, args: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "train"},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 60,
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "job", "configMap": {"name": "job", "items": [
                            {"key": "job.yaml", "path": "job.yaml"}, {"key": "bad.yaml", "path": "bad.yaml"}]}},
                        {"name": "work", "emptyDir": {}}],
            "containers": [{"name": "trainer", "image": "taper-trainer:0.1.0", "args": args,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "env": [
                    {"name": pod::env::METRICS_ADDR, "valueFrom": {"secretKeyRef": {"name": "metrics", "key": "addr"}}},
                    {"name": pod::env::NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "DATA", "valueFrom": {"configMapKeyRef": {"name": "job", "key": "data"}}},
                ],
                "volumeMounts": [{"name": "job", "mountPath": pod::JOB_MOUNT_PATH}, {"name": "work", "mountPath": pod::WORK_MOUNT_PATH}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                "securityContext": secure}]}})
    };
    let train = pod(
        "pretrain",
        json!([
            "pretrain",
            "--job",
            pod::job_path(),
            "--data",
            "file://$(DATA)",
            "--checkpoints",
            "file:///work/checkpoints",
            "--work-dir",
            "/work/tmp",
            "--device",
            "cpu"
        ]),
    );
    ok(
        &kubectl(kubeconfig, &["apply", "-f", "-"], Some(&train.to_string())),
        "pretrain pod",
    );
    // The metrics address came from the Secret and the namespace label from the downward API.
    let describe = || {
        let pod = kubectl(
            kubeconfig,
            &["get", "pod", "-n", "train", "pretrain", "-o", "yaml"],
            None,
        );
        format!(
            "{}\nlog:\n{}",
            String::from_utf8_lossy(&pod.stdout),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    };
    let scraped = eventually_or(
        120,
        "the trainer pod serves metrics with step >= 2",
        describe,
        || {
            let phase = kubectl(
                kubeconfig,
                &[
                    "get",
                    "pod",
                    "-n",
                    "train",
                    "pretrain",
                    "-o",
                    "jsonpath={.status.phase}",
                ],
                None,
            );
            assert_ne!(
                String::from_utf8_lossy(&phase.stdout),
                "Failed",
                "the trainer pod failed:\n{}",
                describe()
            );
            let (status, body) = taper_e2e::http::get(metrics_port, "/metrics")?;
            let prefix = format!("{}{{", pod::metric::TRAIN_STEP);
            let step = body.lines().find(|l| l.starts_with(&prefix))?;
            let value: f64 = step.rsplit(' ').next()?.parse().ok()?;
            (status == 200 && value >= 2.0).then_some(body)
        },
    );
    assert!(scraped.contains("namespace=\"train\""), "{scraped}");
    let phase = ok(
        &kubectl(
            kubeconfig,
            &[
                "get",
                "pod",
                "-n",
                "train",
                "pretrain",
                "-o",
                "jsonpath={.status.phase}",
            ],
            None,
        ),
        "phase",
    );
    assert_eq!(phase, "Running");
    ok(
        &kubectl(
            kubeconfig,
            &[
                "delete",
                "pod",
                "-n",
                "train",
                "pretrain",
                "--wait=true",
                "--timeout=120s",
            ],
            None,
        ),
        "delete the running trainer pod",
    );
    let text = std::fs::read_to_string(log).expect("trainer log");
    assert!(
        text.contains("\"event\":\"checkpoint\""),
        "no checkpoint after SIGTERM:\n{text}"
    );
    assert!(
        text.contains("\"reason\":\"Interrupted\""),
        "not interrupted by SIGTERM:\n{text}"
    );
    assert!(
        taper_e2e::http::get(metrics_port, "/metrics").is_none(),
        "the trainer outlived its pod"
    );

    // A failing container: exit code and a termination message from its log.
    let failing = pod(
        "bad-job",
        json!([
            "validate",
            "--job",
            format!("{}/bad.yaml", pod::JOB_MOUNT_PATH)
        ]),
    );
    ok(
        &kubectl(
            kubeconfig,
            &["apply", "-f", "-"],
            Some(&failing.to_string()),
        ),
        "bad-job pod",
    );
    let term = eventually(90, "the bad-job pod fails", || {
        let out = ok(
            &kubectl(
                kubeconfig,
                &["get", "pod", "-n", "train", "bad-job", "-o", "json"],
                None,
            ),
            "get pod",
        );
        let pod: Value = serde_json::from_str(&out).ok()?;
        (pod["status"]["phase"] == "Failed")
            .then(|| pod["status"]["containerStatuses"][0]["state"]["terminated"].clone())
    });
    assert_eq!(term["exitCode"], 2, "{term}");
    assert!(
        term["message"]
            .as_str()
            .is_some_and(|m| m.contains("learningRate")),
        "{term}"
    );
    assert!(std::fs::read_to_string(bad_log).is_ok_and(|l| l.contains("learningRate")));
}
