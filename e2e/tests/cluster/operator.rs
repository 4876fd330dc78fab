//! The operator end to end, installed as [`crate::install`] does it (`helm install`, the
//! operator with the release's environment and ServiceAccount, never as admin): a Dataset
//! and a PretrainJob run to `Ready`/`Succeeded` through the Job controller and the pod runner, with shards and
//! checkpoints in MinIO and the live figures in status; a missing reference and a
//! permanently failing Dataset end with conditions that name the cause; a restarted
//! operator creates nothing twice.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{
    assert_event_reasons, eventually_or, kubectl, kubectl_json, ml_events, ok,
    wait_for_default_service_account,
};

/// Where the operator runs and what it talks to.
pub(crate) struct Setup {
    /// The admin kubeconfig (for the test's own checks).
    pub admin: PathBuf,
    /// The kubeconfig of `system:serviceaccount:taper-system:taper-operator`.
    pub operator: PathBuf,
    /// A folder for logs and the corpus.
    pub work: PathBuf,
    /// MinIO's endpoint, with a bucket `taper`.
    pub s3_endpoint: String,
    /// The pod runner's container logs (`<namespace>_<pod>_<container>.log`).
    pub pod_logs: PathBuf,
}

/// The logs of the trainer containers in namespace `ml`, for failure messages.
fn pod_logs(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("ml_") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("== {name}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

pub(crate) fn resource(kc: &Path, kind: &str, name: &str) -> Option<Value> {
    kubectl_json(
        kc,
        &[
            "get",
            kind,
            "-n",
            "ml",
            name,
            "-o",
            "json",
            "--show-managed-fields",
        ],
    )
}

pub(crate) fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

pub(crate) fn operator_checks(s: &Setup) {
    crate::install::install_chart(s);
    let corpus = s.work.join("words.txt");
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!(
            "Paragraph {i}: the operator builds a Job, and the Job runs pod number {i} which trains.\n\n"
        ));
    }
    std::fs::write(&corpus, text).expect("corpus");
    let setup = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml",
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "ml"},
            "stringData": {"AWS_ACCESS_KEY_ID": taper_e2e::minio::ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": taper_e2e::minio::SECRET_KEY}},
    ]});
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(&setup.to_string())),
        "namespace ml and its S3 Secret",
    );
    wait_for_default_service_account(&s.admin, "ml");
    let mut operator = crate::install::start_operator(s, "operator-a");
    let log = s.work.join("operator-a.log");
    let context = |what: &'static str| {
        let admin = s.admin.clone();
        let log = log.clone();
        let pod_logs_dir = s.pod_logs.clone();
        move || {
            let objs = kubectl(
                &admin,
                &["get", "ds,pj,fj,jobs,pods", "-n", "ml", "-o", "yaml"],
                None,
            );
            format!(
                "{what}\n{}\noperator log:\n{}\npod logs:\n{}",
                String::from_utf8_lossy(&objs.stdout),
                std::fs::read_to_string(&log).unwrap_or_default(),
                pod_logs(&pod_logs_dir)
            )
        }
    };

    let manifests = format!(
        "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata: {{name: words, namespace: ml}}\nspec:\n  \
         sources: [{{name: words, uri: \"file://{corpus}\", format: text}}]\n  \
         cleaning: {{disable: [gopherWordCount, gopherStopWords, c4TerminalPunctuation, c4ShortLines]}}\n  \
         dedup: {{minhash: {{enabled: false}}, decontamination: {{enabled: false}}}}\n  split: {{testSize: 0.1}}\n---\n\
         apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: gpt, namespace: ml}}\nspec:\n  \
         datasetRef: {{name: words}}\n  model: {{preset: tiny, nLayer: 1}}\n  \
         training: {{batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 20, warmupSteps: 2, precision: f32}}\n  \
         evaluation: {{interval: 10, iterations: 1}}\n  checkpoints: {{interval: 10, keep: 2}}\n  \
         resources: {{gpus: 0}}\n---\n\
         apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: orphan, namespace: ml}}\nspec:\n  \
         datasetRef: {{name: missing}}\n  model: {{preset: tiny}}\n---\n\
         apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata: {{name: broken, namespace: ml}}\nspec:\n  \
         sources: [{{name: gone, uri: \"file:///nonexistent/taper/corpus.txt\", format: text}}]\n",
        corpus = corpus.display()
    );
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(&manifests)),
        "Datasets and PretrainJobs",
    );

    // The Dataset: prepared by a Job's pod, shards in MinIO, counts in status.
    let ds = eventually_or(240, "Dataset words is Ready", context("words"), || {
        resource(&s.admin, "dataset", "words").filter(|d| d["status"]["phase"] == "Ready")
    });
    let st = &ds["status"];
    let logs = format!(
        "{}\nmanaged fields: {}",
        pod_logs(&s.pod_logs),
        ds["metadata"]["managedFields"]
    );
    assert!(
        st["documentsWritten"].as_i64().unwrap_or(0) > 200,
        "{st}\n{logs}"
    );
    assert!(st["trainTokens"].as_i64().unwrap_or(0) > 1000, "{st}");
    assert_eq!(
        st["manifest"], "s3://taper/ml/datasets/words/manifest.json",
        "{st}"
    );
    let ready = condition(&ds, "Ready").expect("Ready condition");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Published"))
    );

    // The PretrainJob: waits for the Dataset, then trains to maxSteps with live figures.
    let pj = eventually_or(360, "PretrainJob gpt Succeeded", context("gpt"), || {
        resource(&s.admin, "pretrainjob", "gpt").filter(|p| p["status"]["phase"] == "Succeeded")
    });
    let st = &pj["status"];
    assert_eq!(st["step"], 20, "{st}");
    assert!(st["trainLoss"].as_f64().is_some_and(f64::is_finite), "{st}");
    assert!(st["valLoss"].as_f64().is_some(), "{st}");
    assert_eq!(st["restarts"], 0, "{st}");
    assert_eq!(st["maxSteps"], 20, "{st}");
    assert!(st.get("eta").is_none(), "a finished run has no ETA: {st}");
    assert_eq!(
        st["latestCheckpoint"], "s3://taper/ml/pretrainjobs/gpt/checkpoints/step-000000020",
        "{st}"
    );
    let checkpoints = st["checkpoints"].as_array().expect("checkpoints");
    assert!(
        !checkpoints.is_empty() && checkpoints.len() <= 2,
        "keep 2 (the best may be one): {st}"
    );
    for c in checkpoints {
        assert_eq!(c["sha256"].as_str().map(str::len), Some(64), "{c}");
    }
    let ready = condition(&pj, "Ready").expect("Ready condition");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("MaxStepsReached"))
    );
    assert_eq!(
        condition(&pj, "InputsReady").expect("InputsReady")["status"],
        "True"
    );
    let job = kubectl_json(
        &s.admin,
        &["get", "job", "-n", "ml", "gpt-pretrain", "-o", "json"],
    )
    .expect("the Job");
    assert_eq!(job["spec"]["backoffLimit"], 3);
    let rules = job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .expect("pod failure policy");
    assert_eq!(rules[0]["action"], "FailJob");
    assert_eq!(rules[0]["onExitCodes"]["values"], json!([2, 3, 4]));
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "PretrainJob");
    // monitoring.annotations.enabled: the chart told the operator to annotate its pods.
    let annotations = &job["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{annotations}");
    assert_eq!(annotations["prometheus.io/port"], "9090", "{annotations}");
    let events = ml_events(&s.admin, "involvedObject.name=gpt");
    assert_event_reasons(&events, &["Created", "CheckpointSaved", "Succeeded"]);
    // Kubernetes folds repeats of an Event (same reason, same object) into one series with
    // a count: the first checkpoint's note stands for the series.
    assert!(
        events.contains(
            "checkpoint at step 10 saved to s3://taper/ml/pretrainjobs/gpt/checkpoints/step-000000010"
        ),
        "checkpoints are announced: {events}"
    );

    crate::finetune::finetune_checks(s, context("chat"));

    reclaim_checks(s, context("reclaimed"));

    // A missing reference: reported, no Job.
    let orphan = eventually_or(
        60,
        "orphan waits for its Dataset",
        context("orphan"),
        || {
            resource(&s.admin, "pretrainjob", "orphan").filter(|p| {
                condition(p, "InputsReady").is_some_and(|c| c["reason"] == "DatasetNotFound")
            })
        },
    );
    assert_eq!(orphan["status"]["phase"], "Pending");
    assert!(
        kubectl_json(
            &s.admin,
            &["get", "job", "-n", "ml", "orphan-pretrain", "-o", "json"]
        )
        .is_none()
    );

    // A permanent failure: exit 3 fails the Job at once, and the Dataset says why.
    let broken = eventually_or(180, "Dataset broken Failed", context("broken"), || {
        resource(&s.admin, "dataset", "broken").filter(|d| d["status"]["phase"] == "Failed")
    });
    let failed = condition(&broken, "Failed").expect("Failed condition");
    assert_eq!(failed["reason"], "InvalidData", "{broken}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nonexistent"),
        "{broken}"
    );

    // A lost pod: deleting it mid-run (SIGTERM: the trainer checkpoints and exits 75)
    // makes the Job start another, not counted, that resumes from the checkpoint.
    let long = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: long, namespace: ml}\nspec:\n  \
        datasetRef: {name: words}\n  model: {preset: tiny, nLayer: 1}\n  \
        training: {batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 100000, warmupSteps: 2, precision: f32}\n  \
        evaluation: {interval: 100000, iterations: 1}\n  checkpoints: {interval: 4, keep: 2}\n  resources: {gpus: 0}\n";
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(long)),
        "PretrainJob long",
    );
    let running = eventually_or(
        120,
        "long has a checkpoint and a live pod",
        context("long"),
        || {
            resource(&s.admin, "pretrainjob", "long").filter(|p| {
                p["status"]["latestCheckpoint"].is_string() && p["status"]["podName"].is_string()
            })
        },
    );
    let first_pod = running["status"]["podName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ok(
        &kubectl(
            &s.admin,
            &["delete", "pod", "-n", "ml", &first_pod, "--wait=false"],
            None,
        ),
        "delete the trainer pod",
    );
    let (p, started) = eventually_or(
        150,
        "a new pod resumed from a checkpoint",
        context("long"),
        || {
            let p = resource(&s.admin, "pretrainjob", "long")?;
            let pod = p["status"]["podName"].as_str()?.to_string();
            let log =
                std::fs::read_to_string(s.pod_logs.join(format!("ml_{pod}_trainer.log"))).ok()?;
            let started: Value = log
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["event"] == "started")?;
            (pod != first_pod && started["resumedFrom"].is_string()).then_some((p, started))
        },
    );
    let from = started["resumedFrom"].as_str().unwrap_or_default();
    let step_of = |uri: &str| {
        uri.rsplit("step-")
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(step_of(from) >= 4, "resumed from a checkpoint: {started}");
    assert_eq!(started["step"].as_u64(), Some(step_of(from)), "{started}");
    assert_eq!(
        p["status"]["restarts"], 0,
        "a lost pod is not counted: {}",
        p["status"]
    );

    // Suspend: the Job is suspended, its pod stopped with a checkpoint; un-suspending
    // starts a pod that resumes.
    ok(
        &kubectl(
            &s.admin,
            &[
                "patch",
                "pretrainjob",
                "-n",
                "ml",
                "long",
                "--type=merge",
                "-p",
                r#"{"spec":{"suspend":true}}"#,
            ],
            None,
        ),
        "suspend long",
    );
    let suspended = eventually_or(120, "long is Suspended", context("suspend"), || {
        resource(&s.admin, "pretrainjob", "long").filter(|p| p["status"]["phase"] == "Suspended")
    });
    assert_eq!(
        condition(&suspended, "Suspended").expect("Suspended")["status"],
        "True"
    );
    let before = suspended["status"]["latestCheckpoint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ok(
        &kubectl(
            &s.admin,
            &[
                "patch",
                "pretrainjob",
                "-n",
                "ml",
                "long",
                "--type=merge",
                "-p",
                r#"{"spec":{"suspend":false}}"#,
            ],
            None,
        ),
        "resume long",
    );
    eventually_or(
        120,
        "long runs again past its checkpoint",
        context("resume"),
        || {
            resource(&s.admin, "pretrainjob", "long").filter(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["latestCheckpoint"]
                        .as_str()
                        .is_some_and(|c| c > before.as_str())
            })
        },
    );

    // Deleting the resource deletes its Job and pod (owner references).
    ok(
        &kubectl(
            &s.admin,
            &[
                "delete",
                "pretrainjob",
                "-n",
                "ml",
                "long",
                "--wait=true",
                "--timeout=60s",
            ],
            None,
        ),
        "delete long",
    );
    eventually_or(
        90,
        "long's Job is garbage-collected",
        context("long"),
        || {
            kubectl_json(
                &s.admin,
                &["get", "job", "-n", "ml", "long-pretrain", "-o", "json"],
            )
            .is_none()
            .then_some(())
        },
    );

    // Kueue's part, played by the test: a queued resource gets a suspended Job with the
    // queue label, waits with AwaitingAdmission, and runs once the Job is admitted
    // (unsuspended); the operator does not suspend it again.
    let queued = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: queued, namespace: ml, labels: {kueue.x-k8s.io/queue-name: gpus}}\nspec:\n  \
        datasetRef: {name: words}\n  model: {preset: tiny, nLayer: 1}\n  \
        training: {batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 6, warmupSteps: 2, precision: f32}\n  \
        evaluation: {interval: 6, iterations: 1}\n  resources: {gpus: 0}\n";
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(queued)),
        "PretrainJob queued",
    );
    let waiting = eventually_or(60, "queued awaits admission", context("queued"), || {
        resource(&s.admin, "pretrainjob", "queued")
            .filter(|p| condition(p, "Ready").is_some_and(|c| c["reason"] == "AwaitingAdmission"))
    });
    assert_eq!(waiting["status"]["phase"], "Pending");
    let job = kubectl_json(
        &s.admin,
        &["get", "job", "-n", "ml", "queued-pretrain", "-o", "json"],
    )
    .expect("queued Job");
    assert_eq!(job["spec"]["suspend"], true);
    assert_eq!(
        job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "gpus"
    );
    ok(
        &kubectl(
            &s.admin,
            &[
                "patch",
                "job",
                "-n",
                "ml",
                "queued-pretrain",
                "--type=merge",
                "-p",
                r#"{"spec":{"suspend":false}}"#,
            ],
            None,
        ),
        "admit the queued Job",
    );
    eventually_or(180, "the admitted job Succeeded", context("queued"), || {
        resource(&s.admin, "pretrainjob", "queued").filter(|p| p["status"]["phase"] == "Succeeded")
    });

    crate::disruption::disruption_checks(&s.admin, &s.pod_logs, &log);

    // Two replicas: the second waits while the first leads, and takes over within 30 s
    // of the leader's death; neither creates anything twice.
    let count = |kind: &str| {
        kubectl_json(&s.admin, &["get", kind, "-n", "ml", "-o", "json"])
            .and_then(|l| l["items"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    eventually_or(90, "long's pods are gone", context("long pods"), || {
        kubectl_json(
            &s.admin,
            &[
                "get",
                "pods",
                "-n",
                "ml",
                "-l",
                "taper.dev/job=long",
                "-o",
                "json",
            ],
        )
        .filter(|l| l["items"].as_array().is_some_and(Vec::is_empty))
    });
    let (jobs, pods) = (count("jobs"), count("pods"));
    let mut standby = crate::install::start_operator(s, "operator-b");
    let standby_log = s.work.join("operator-b.log");
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        !std::fs::read_to_string(&standby_log)
            .unwrap_or_default()
            .contains("leading"),
        "the standby does not lead while the leader lives"
    );
    operator.stop();
    let stopped = std::time::Instant::now();
    eventually_or(40, "the standby leads", context("failover"), || {
        std::fs::read_to_string(&standby_log)
            .ok()
            .filter(|l| l.contains("leading"))
    });
    let failover = stopped.elapsed().as_secs_f64();
    println!("  failover took {failover:.1} s");
    assert!(failover < 30.0, "failover took {failover:.1} s");
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(
        (count("jobs"), count("pods")),
        (jobs, pods),
        "no duplicate Jobs or pods"
    );
    assert_eq!(
        resource(&s.admin, "pretrainjob", "gpt").map(|p| p["status"]["phase"].clone()),
        Some(json!("Succeeded"))
    );
    standby.stop();
}

/// The keys under `prefix` in the suite's MinIO bucket `taper`.
pub(crate) fn s3_keys(endpoint: &str, prefix: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = crate::support::minio_client(endpoint);
    rt.block_on(async {
        let listed = client
            .list_objects_v2()
            .bucket("taper")
            .prefix(prefix)
            .send()
            .await
            .expect("list the bucket");
        listed
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    })
}

/// `reclaimPolicy: Delete`: the finalizer holds a deleted PretrainJob until a cleanup Job
/// has emptied its checkpoint prefix; the default, `Retain`, leaves `gpt`'s in place.
fn reclaim_checks(s: &Setup, describe: impl Fn() -> String) {
    let manifest = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: reclaimed, namespace: ml}\n\
        spec:\n  datasetRef: {name: words}\n  model: {preset: tiny, nLayer: 1}\n  \
        training: {batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 4, warmupSteps: 2, precision: f32}\n  \
        evaluation: {interval: 2, iterations: 1}\n  checkpoints: {interval: 2, keep: 2}\n  \
        resources: {gpus: 0}\n  reclaimPolicy: Delete\n";
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(manifest)),
        "PretrainJob reclaimed",
    );
    let pj = eventually_or(240, "PretrainJob reclaimed Succeeded", describe, || {
        resource(&s.admin, "pretrainjob", "reclaimed")
            .filter(|p| p["status"]["phase"] == "Succeeded")
    });
    assert_eq!(
        pj["metadata"]["finalizers"],
        json!(["taper.dev/storage"]),
        "{pj}"
    );
    let prefix = "ml/pretrainjobs/reclaimed/";
    let stored = s3_keys(&s.s3_endpoint, prefix);
    assert!(
        stored
            .iter()
            .any(|k| k.ends_with("step-000000004/manifest.json")),
        "the job's checkpoints are in the store: {stored:?}"
    );
    let gpt_before = s3_keys(&s.s3_endpoint, "ml/pretrainjobs/gpt/");
    ok(
        &kubectl(
            &s.admin,
            &[
                "delete",
                "pretrainjob",
                "-n",
                "ml",
                "reclaimed",
                "--wait=true",
                "--timeout=180s",
            ],
            None,
        ),
        "delete PretrainJob reclaimed (waits for its finalizer)",
    );
    let left = s3_keys(&s.s3_endpoint, prefix);
    assert!(
        left.is_empty(),
        "the cleanup Job deleted everything: {left:?}"
    );
    assert_eq!(
        s3_keys(&s.s3_endpoint, "ml/pretrainjobs/gpt/"),
        gpt_before,
        "Retain (the default) leaves other jobs' data alone"
    );
    let events = ml_events(&s.admin, "involvedObject.name=reclaimed");
    assert_event_reasons(&events, &["DeletingStorage", "StorageDeleted"]);
}
