//! A trainer pod end to end: a corpus prepared on the host, a `taper pretrain` pod with
//! Secret, ConfigMap and downward-API configuration and volumes that serves metrics, is
//! stopped by its deletion (SIGTERM, then it checkpoints), and a failing pod whose
//! termination message comes from its log.

use std::{path::Path, process::Command};

use serde_json::{Value, json};
use taper_crds::pod;

use crate::{
    pods::restricted_container_security,
    support::{eventually, eventually_or, kubectl, ok, wait_for_default_service_account},
};

pub(crate) fn trainer_pod_checks(
    kubeconfig: &Path,
    taper: &Path,
    corpus: &Path,
    log: &Path,
    bad_log: &Path,
) {
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
        "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata:\n  name: synthetic\nspec:\n  sources:\n    - name: synthetic\n      uri: file://{}\n      format: text\n  cleaning:\n    disable: [gopherWordCount, gopherStopWords, c4TerminalPunctuation, c4ShortLines]\n  dedup:\n    minhash:\n      enabled: false\n    decontamination:\n      enabled: false\n  split:\n    testSize: 0.1\n  output:\n    uri: file://{}\n",
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

    let job = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata:\n  name: e2e\nspec:\n  datasetRef:\n    name: synthetic\n  model:\n    preset: tiny\n  training:\n    batchSize: 2\n    maxSteps: 100000\n    warmupSteps: 10\n  evaluation:\n    interval: 2\n    iterations: 1\n  checkpoints:\n    interval: 100000\n";
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
    // The suite's real Prometheus scrapes the pod; the figures are read back through its
    // HTTP API, as a dashboard would.
    let prometheus = taper_e2e::prometheus::Prometheus::start(
        "taper-trainer",
        &[format!("127.0.0.1:{metrics_port}")],
    )
    .expect("prometheus starts (e2e/scripts/build-tools.sh prometheus)");
    let sample = |promql: &str| -> Option<(Value, f64)> {
        let answer = prometheus.query(promql).ok()?;
        let result = answer["data"]["result"].as_array()?;
        let [one] = result.as_slice() else {
            return None;
        };
        let value: f64 = one["value"][1].as_str()?.parse().ok()?;
        Some((one["metric"].clone(), value))
    };
    let (step_labels, step) = eventually_or(
        120,
        "Prometheus has scraped the trainer pod at step >= 2 with a validation loss",
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
            let (labels, step) = sample(&format!(
                "{}{{namespace=\"train\"}}",
                pod::metric::TRAIN_STEP
            ))?;
            // The gauge reads 0 until the first evaluation (at step 2) sets it.
            let (_, val_loss) =
                sample(&format!("{}{{namespace=\"train\"}}", pod::metric::VAL_LOSS))?;
            (step >= 2.0 && val_loss > 0.0).then_some((labels, step))
        },
    );
    // The series carries the job's bounded labels and nothing unbounded (the scrape adds
    // `job` and `instance`).
    let mut keys: Vec<&str> = step_labels
        .as_object()
        .expect("labels")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["__name__", "instance", "job", "kind", "name", "namespace"],
        "{step_labels}"
    );
    assert_eq!(step_labels["kind"], "PretrainJob", "{step_labels}");
    assert_eq!(step_labels["name"], "e2e", "{step_labels}");
    assert_eq!(step_labels["namespace"], "train", "{step_labels}");
    assert_eq!(step_labels["job"], "taper-trainer", "{step_labels}");
    assert!(step.fract() == 0.0, "the step is a whole number: {step}");
    for metric in [pod::metric::TRAIN_LOSS, pod::metric::VAL_LOSS] {
        let (_, loss) = sample(&format!("{metric}{{namespace=\"train\",name=\"e2e\"}}"))
            .unwrap_or_else(|| panic!("{metric} is in Prometheus"));
        // An untrained tiny GPT starts near ln(50304) = 10.8.
        assert!(
            loss.is_finite() && loss > 0.0 && loss < 12.0,
            "{metric} = {loss}"
        );
    }
    drop(prometheus);
    // The raw endpoint serves the same series.
    // (Retried: on a loaded machine one request can time out between two steps.)
    let (status, scraped) = eventually_or(30, "the pod serves /metrics", describe, || {
        taper_e2e::http::get(metrics_port, "/metrics")
    });
    assert_eq!(status, 200);
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
