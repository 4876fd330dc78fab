//! Disrupted pods, with the operator running: a PretrainJob's trainer pod preempted by the
//! scheduler and then one evicted by the kubelet, both as the pod runner does it on
//! request (`DisruptionTarget=True` on a `Failed` pod, see `taper_e2e::runner`), are
//! replaced by the Job without counting a restart, each new pod resumes from the latest
//! checkpoint, and the PretrainJob ends `Succeeded` with no restart counted.
//!
//! Last, a PretrainJob past its `activeDeadlineSeconds` fails with `DeadlineExceeded`.
//!
//! The eviction is a hard one (grace period 0): the trainer is killed (137) before it can
//! save a checkpoint, so only the Job's `DisruptionTarget` rule keeps it from counting
//! (the graceful preemption ends with 75, which the exit-code rule ignores as well).

use std::path::Path;

use serde_json::Value;
use taper_e2e::runner::{
    DISRUPT_ANNOTATION, DISRUPT_GRACE_ANNOTATION, DISRUPTION_TARGET, EVICTED,
    PREEMPTION_BY_SCHEDULER, TERMINATION_BY_KUBELET,
};

use crate::support::{eventually_or, kubectl, kubectl_json, ml_events, ok};

const NAME: &str = "disrupted";
const JOB: &str = "disrupted-pretrain";
const MAX_STEPS: u64 = 48;

fn pretrain_job(admin: &Path) -> Option<Value> {
    kubectl_json(
        admin,
        &["get", "pretrainjob", "-n", "ml", NAME, "-o", "json"],
    )
}

fn job(admin: &Path) -> Option<Value> {
    kubectl_json(admin, &["get", "job", "-n", "ml", JOB, "-o", "json"])
}

/// The Job's pods.
fn pods(admin: &Path) -> Vec<Value> {
    kubectl_json(
        admin,
        &[
            "get",
            "pods",
            "-n",
            "ml",
            "-l",
            &format!("batch.kubernetes.io/job-name={JOB}"),
            "-o",
            "json",
        ],
    )
    .and_then(|l| l["items"].as_array().cloned())
    .unwrap_or_default()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap_or_default().into()
}

/// The Job's running pod, if one runs and is not being deleted.
fn running(admin: &Path) -> Option<String> {
    pods(admin)
        .into_iter()
        .find(|p| p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| name(&p))
}

/// The step of a checkpoint URI (`…/step-000000012`).
fn step_of(uri: &str) -> Option<u64> {
    uri.rsplit_once("step-")?.1.parse().ok()
}

/// The step of the PretrainJob's newest checkpoint.
fn latest_checkpoint(admin: &Path) -> Option<u64> {
    step_of(pretrain_job(admin)?["status"]["latestCheckpoint"].as_str()?)
}

/// The trainer's progress events in the log of `pod`.
fn events(pod_logs: &Path, pod: &str) -> Vec<Value> {
    std::fs::read_to_string(pod_logs.join(format!("ml_{pod}_trainer.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"].is_string())
        .collect()
}

/// The step `pod`'s trainer resumed from (its `started` event's checkpoint).
fn resumed_from(pod_logs: &Path, pod: &str) -> Option<u64> {
    let events = events(pod_logs, pod);
    let started = events.iter().find(|e| e["event"] == "started")?;
    let step = step_of(started["resumedFrom"].as_str()?)?;
    (started["step"].as_u64() == Some(step)).then_some(step)
}

/// Annotate `pod` for the runner to disrupt it.
fn disrupt(admin: &Path, pod: &str, reason: &str, grace: Option<u32>) {
    let mut args = vec![
        "annotate".to_string(),
        "pod".into(),
        "-n".into(),
        "ml".into(),
        pod.into(),
        format!("{DISRUPT_ANNOTATION}={reason}"),
    ];
    if let Some(g) = grace {
        args.push(format!("{DISRUPT_GRACE_ANNOTATION}={g}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&kubectl(admin, &args, None), "annotate the pod to disrupt");
}

/// The Job's `status.failed`: pod failures counted against `backoffLimit`.
fn counted_failures(job: &Value) -> i64 {
    job["status"]["failed"].as_i64().unwrap_or(0)
}

pub(crate) fn disruption_checks(admin: &Path, pod_logs: &Path, operator_log: &Path) {
    let context = |what: &'static str| {
        move || {
            let objs = kubectl(
                admin,
                &[
                    "get",
                    &format!("pj/{NAME},job/{JOB}"),
                    "-n",
                    "ml",
                    "-o",
                    "yaml",
                ],
                None,
            );
            let pods = pods(admin);
            let mut logs = String::new();
            for p in &pods {
                let n = name(p);
                logs.push_str(&format!("== {n}\n"));
                for e in events(pod_logs, &n).iter().filter(|e| e["event"] != "step") {
                    logs.push_str(&format!("{e}\n"));
                }
            }
            let operator = std::fs::read_to_string(operator_log).unwrap_or_default();
            let operator: Vec<&str> = operator.lines().rev().take(30).collect();
            format!(
                "{what}\n{}\npods: {}\ntrainer events:\n{logs}\noperator log (last lines, newest first):\n{}",
                String::from_utf8_lossy(&objs.stdout),
                serde_json::to_string_pretty(&pods).unwrap_or_default(),
                operator.join("\n")
            )
        }
    };
    let manifest = format!(
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: {NAME}, namespace: ml}}\nspec:\n  \
         datasetRef: {{name: words}}\n  model: {{preset: tiny, nLayer: 1}}\n  \
         training: {{batchSize: 2, gradientAccumulationSteps: 1, maxSteps: {MAX_STEPS}, warmupSteps: 2, precision: f32}}\n  \
         evaluation: {{interval: {MAX_STEPS}, iterations: 1}}\n  checkpoints: {{interval: 4, keep: 3}}\n  \
         resources: {{gpus: 0}}\n"
    );
    ok(
        &kubectl(admin, &["apply", "-f", "-"], Some(&manifest)),
        "PretrainJob disrupted",
    );

    // Preemption: the scheduler marks the pod and deletes it; the trainer saves a
    // checkpoint on SIGTERM and exits 75; the Job starts another, which resumes there.
    let (first, saved) = eventually_or(
        150,
        "disrupted has a checkpoint and a running pod",
        context("first pod"),
        || Some((running(admin)?, latest_checkpoint(admin)?)),
    );
    disrupt(admin, &first, PREEMPTION_BY_SCHEDULER, None);
    let (second, resumed) = eventually_or(
        150,
        "a new pod resumed after the preemption",
        context("preemption"),
        || {
            let pod = running(admin).filter(|p| *p != first)?;
            Some((pod.clone(), resumed_from(pod_logs, &pod)?))
        },
    );
    let first_events = events(pod_logs, &first);
    let done = first_events
        .iter()
        .rfind(|e| e["event"] == "done")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        done["reason"],
        "Interrupted",
        "the preempted trainer stopped on SIGTERM: {done}\n{}",
        context("preempted")()
    );
    assert!(
        resumed >= saved && Some(resumed) == done["step"].as_u64(),
        "the new pod resumes from the checkpoint saved on SIGTERM (step {}), at least the last one seen before ({saved}); it resumed from {resumed}",
        done["step"]
    );
    assert_eq!(
        counted_failures(&job(admin).expect("the Job")),
        0,
        "a preempted pod is not counted\n{}",
        context("preempted")()
    );

    // Hard eviction by the kubelet: killed at once (137), no checkpoint on the way out;
    // only the DisruptionTarget rule keeps the Job from counting it.
    let before = eventually_or(
        120,
        "the second pod saves a checkpoint",
        context("second pod"),
        || latest_checkpoint(admin).filter(|s| *s > resumed),
    );
    disrupt(admin, &second, TERMINATION_BY_KUBELET, Some(0));
    let evicted = eventually_or(60, "the second pod is evicted", context("eviction"), || {
        pods(admin)
            .into_iter()
            .find(|p| name(p) == second && p["status"]["phase"] == "Failed")
    });
    let status = &evicted["status"];
    assert_eq!(status["reason"], EVICTED, "{status}");
    let condition = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == DISRUPTION_TARGET))
        .unwrap_or_else(|| panic!("a DisruptionTarget condition: {status}"));
    assert_eq!(
        (&condition["status"], condition["reason"].as_str()),
        (&Value::from("True"), Some(TERMINATION_BY_KUBELET)),
        "{status}"
    );
    assert_eq!(
        status["containerStatuses"][0]["state"]["terminated"]["exitCode"], 137,
        "killed without a grace period: {status}"
    );
    let (third, resumed_again) = eventually_or(
        150,
        "a new pod resumed after the eviction",
        context("eviction"),
        || {
            pods(admin)
                .iter()
                .map(name)
                .filter(|p| *p != first && *p != second)
                .find_map(|p| Some((p.clone(), resumed_from(pod_logs, &p)?)))
        },
    );
    assert!(
        resumed_again >= before,
        "{third} resumes from the latest complete checkpoint (at least step {before}), not from {resumed_again}"
    );

    // The end: Succeeded at maxSteps, and no failure counted, by the Job or the operator.
    let pj = eventually_or(
        240,
        "disrupted Succeeded",
        context("disrupted to the end"),
        || pretrain_job(admin).filter(|p| p["status"]["phase"] == "Succeeded"),
    );
    let st = &pj["status"];
    assert_eq!(st["step"].as_u64(), Some(MAX_STEPS), "{st}");
    assert_eq!(st["restarts"], 0, "no restart counted: {st}");
    let job = job(admin).expect("the Job");
    assert_eq!(
        (counted_failures(&job), job["status"]["succeeded"].as_i64()),
        (0, Some(1)),
        "the Job counted no failure: {}\n{}",
        job["status"],
        context("counted")()
    );
    let events = ml_events(
        admin,
        &format!("involvedObject.name={NAME},reason=Preempted"),
    );
    // Kubernetes' event recorder folds repeats of one reason on one object into a series
    // that keeps the first note: the note names whichever disrupted pod the operator saw
    // first (the preempted one is gone once the Job has counted it).
    assert!(
        (events.contains(&first) && events.contains(PREEMPTION_BY_SCHEDULER))
            || (events.contains(&second) && events.contains(TERMINATION_BY_KUBELET)),
        "a Preempted event names a disrupted pod and why: {events}"
    );
    deadline_checks(admin);
}

/// A PretrainJob past its `activeDeadlineSeconds`: Kubernetes' Job controller stops its
/// pod and fails the Job, and the PretrainJob fails saying why and what to do.
fn deadline_checks(admin: &Path) {
    let manifest = "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: overdue, namespace: ml}\nspec:\n  \
        datasetRef: {name: words}\n  model: {preset: tiny, nLayer: 1}\n  \
        training: {batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 100000, warmupSteps: 2, precision: f32}\n  \
        resources: {gpus: 0}\n  activeDeadlineSeconds: 3\n";
    ok(
        &kubectl(admin, &["apply", "-f", "-"], Some(manifest)),
        "PretrainJob overdue",
    );
    let get = || kubectl_json(admin, &["get", "pj,job", "-n", "ml", "-o", "json"]);
    let pj = eventually_or(
        120,
        "overdue Failed",
        || format!("{:#}", get().unwrap_or_default()),
        || {
            kubectl_json(admin, &["get", "pj", "-n", "ml", "overdue", "-o", "json"])
                .filter(|p| p["status"]["phase"] == "Failed")
        },
    );
    let failed = pj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Failed"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["reason"], "DeadlineExceeded", "{pj:#}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("activeDeadlineSeconds")),
        "{pj:#}"
    );
    ok(
        &kubectl(
            admin,
            &["delete", "pj", "-n", "ml", "overdue", "--wait=false"],
            None,
        ),
        "delete PretrainJob overdue",
    );
}
