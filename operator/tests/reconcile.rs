//! The reconcile pipeline against a mocked API server (`tower-test`), as kube-rs's
//! reference controller tests it: the mock holds the objects the operator reads and
//! applies, records every request, and the tests check what the operator applied and the
//! status it wrote.
//!
//! Where a scenario needs a pod to fail, the test plays Kubernetes' Job controller on the
//! Job the operator applied ([`job_controller`]): the failed pod is judged by that Job's
//! own `podFailurePolicy` as the Job controller's `matchPodFailurePolicy` does, so the
//! whole contract is under test: the exit codes of `taper_crds::exit`, the policy the
//! builder makes of them, and the lifecycle that reads the Job's outcome back.

use http::Method;
use serde_json::{Value, json};
use taper_crds::{
    Dataset, PretrainJob,
    exit::{self, Action},
};
mod mock;

use mock::{Mock, Request_, World, applies, condition, dataset, pretrain_job, ready_dataset};

/// A trainer pod of the Job `gpt-pretrain` in `phase`, terminated with `exit` (code and
/// termination message) if given, with `conditions` besides the kubelet's.
fn pod(name: &str, phase: &str, exit: Option<(i32, &str)>, conditions: &[Value]) -> Value {
    let state = match exit {
        Some((code, message)) => json!({"terminated": {"exitCode": code, "reason": "Error",
            "message": message, "finishedAt": "2025-01-02T03:04:05Z"}}),
        None => json!({"running": {"startedAt": "2025-01-02T03:00:00Z"}}),
    };
    let mut all =
        vec![json!({"type": "Ready", "status": if phase == "Running" { "True" } else { "False" }})];
    all.extend(conditions.iter().cloned());
    json!({
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"),
                     "labels": {"batch.kubernetes.io/job-name": "gpt-pretrain"}},
        "status": {"phase": phase, "conditions": all, "containerStatuses": [{
            "name": "trainer", "image": "t", "imageID": "", "ready": exit.is_none(),
            "restartCount": 0, "state": state}]},
    })
}

fn disruption_target(reason: &str) -> Value {
    json!({"type": "DisruptionTarget", "status": "True", "reason": reason,
           "message": "default-scheduler: preempting to accommodate a higher priority pod"})
}

/// Kubernetes' Job controller's judgement of a failed pod under the Job's
/// `podFailurePolicy` (`matchPodFailurePolicy`): the first rule that matches wins;
/// `onExitCodes` looks at the containers (of `containerName`, when set) that terminated
/// with a non-zero code, `onPodConditions` at the pod's conditions; no rule: `Count`.
fn judge(job: &Value, pod: &Value) -> String {
    let rules = job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let conditions = pod["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for rule in &rules {
        let on = &rule["onExitCodes"];
        let by_code = on.is_object()
            && statuses.iter().any(|cs| {
                let code = cs["state"]["terminated"]["exitCode"].as_i64().unwrap_or(0);
                let named = on["containerName"].as_str().is_none_or(|n| cs["name"] == n);
                let listed = on["values"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|v| v.as_i64() == Some(code)));
                let matches = if on["operator"] == "In" {
                    listed
                } else {
                    !listed
                };
                named && code != 0 && matches
            });
        let by_condition = rule["onPodConditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                conditions
                    .iter()
                    .any(|c| c["type"] == p["type"] && c["status"] == p["status"])
            });
        if by_code || by_condition {
            return rule["action"].as_str().unwrap_or_default().to_string();
        }
    }
    "Count".into()
}

/// Play the Job controller on trainer pod `failed`: judge it by the applied Job's
/// policy, and record the outcome as Kubernetes does: `FailJob` fails the Job with reason
/// `PodFailurePolicy`; `Ignore` replaces the pod without counting it; `Count` counts it
/// in `status.failed` and replaces it, until more than `backoffLimit` fail the Job with
/// `BackoffLimitExceeded`. Returns the action.
fn job_controller(mock: &Mock, failed: Value) -> String {
    let job = mock.job();
    let action = judge(&job, &failed);
    let counted = job["status"]["failed"].as_i64().unwrap_or(0)
        + i64::from(action == "Count" || action == "FailJob");
    let backoff_limit = job["spec"]["backoffLimit"].as_i64().unwrap_or(6);
    let code = failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"].clone();
    let name = failed["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let failed_condition = |reason: &str, message: String| {
        let at = "2025-01-02T03:04:06Z";
        json!({"failed": counted, "active": 0, "startTime": "2025-01-02T03:00:00Z",
               "conditions": [
                   {"type": "FailureTarget", "status": "True", "reason": reason, "message": message,
                    "lastTransitionTime": at},
                   {"type": "Failed", "status": "True", "reason": reason, "message": message,
                    "lastTransitionTime": at}]})
    };
    let status = if action == "FailJob" {
        failed_condition(
            "PodFailurePolicy",
            format!(
                "Container trainer for pod ml/{name} failed with exit code {code} matching FailJob rule at index 0"
            ),
        )
    } else if counted > backoff_limit {
        failed_condition(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        )
    } else {
        json!({"failed": counted, "active": 1, "ready": 1, "startTime": "2025-01-02T03:00:00Z"})
    };
    let mut w = mock.world.lock().expect("lock");
    if let Some(j) = w.job.as_mut() {
        j["status"] = status.clone();
    }
    w.pods
        .retain(|p| p["metadata"]["name"] != failed["metadata"]["name"]);
    w.pods.push(failed);
    if status["active"] == 1 {
        w.pods.push(pod("gpt-pretrain-next", "Running", None, &[]));
    }
    action
}

/// The status of the last status patch among `seen`.
fn status_patch(seen: &[Request_]) -> Value {
    seen.iter()
        .rev()
        .find(|(m, p, _)| *m == Method::PATCH && p.contains("/status"))
        .map(|(_, _, b)| b["status"].clone())
        .unwrap_or_else(|| panic!("a status patch among {seen:#?}"))
}

/// The reasons and types of the Events among `seen`.
fn events(seen: &[Request_]) -> Vec<(String, String)> {
    seen.iter()
        .filter(|(m, p, _)| *m == Method::POST && p.contains("/events"))
        .map(|(_, _, b)| {
            (
                b["reason"].as_str().unwrap_or_default().to_string(),
                b["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The status says the job trains: Running, the condition that says so, and no failure.
fn assert_training(status: &Value, restarts: i64, what: &str) {
    assert_eq!(status["phase"], "Running", "{what}: {status}");
    assert_eq!(status["restarts"], restarts, "{what}: {status}");
    assert_eq!(status["podName"], "gpt-pretrain-next", "{what}: {status}");
    let progressing = condition(status, "Progressing").expect("Progressing");
    assert_eq!(
        (&progressing["status"], &progressing["reason"]),
        (&json!("True"), &json!("Training")),
        "{what}: {status}"
    );
    assert!(
        condition(status, "Failed").is_none_or(|c| c["status"] != "True"),
        "{what}: not failed: {status}"
    );
}

/// The status of a Job whose pod runs.
fn active() -> Value {
    json!({"active": 1, "ready": 1, "startTime": "2025-01-02T03:00:00Z"})
}

/// A PretrainJob whose Job the operator created; the first pod runs.
async fn running_pretrain_job(suspend: bool) -> Mock {
    let mock = Mock::new(World {
        dataset: Some(ready_dataset()),
        resource: pretrain_job(suspend),
        ..World::default()
    });
    let seen = mock.reconcile::<PretrainJob>().await;
    assert!(
        events(&seen).contains(&("Created".into(), "Normal".into())),
        "{seen:#?}"
    );
    mock.world.lock().expect("lock").pods = vec![pod("gpt-pretrain-first", "Running", None, &[])];
    mock.set_job_status(active());
    mock
}

#[tokio::test]
async fn a_new_dataset_gets_its_objects_applied_and_a_pending_status() {
    let mock = Mock::new(World {
        resource: dataset(),
        ..World::default()
    });
    let seen = mock.reconcile::<Dataset>().await;
    let applied: Vec<&str> = seen
        .iter()
        .filter(|(m, p, _)| *m == Method::PATCH && !p.contains("/status"))
        .map(|(_, _, b)| b["kind"].as_str().unwrap_or_default())
        .collect();
    // The RoleBinding after its Role (the API server checks a binding against the rules
    // of the Role it names), the Job last.
    assert_eq!(
        applied,
        ["ServiceAccount", "Role", "ConfigMap", "RoleBinding", "Job"],
        "{seen:#?}"
    );
    for (m, p, _) in &seen {
        if *m == Method::PATCH {
            assert!(
                p.contains("fieldManager=taper-operator") && p.contains("force=true"),
                "server-side apply with one field manager: {p}"
            );
        }
    }
    assert_eq!(
        mock.job()["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "prepare"
    );
    assert!(
        events(&seen).contains(&("Created".into(), "Normal".into())),
        "a Created event"
    );
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Pending", "{status}");
    assert!(
        status.get("documentsRead").is_none(),
        "the trainer's fields are not the operator's: {status}"
    );
}

#[tokio::test]
async fn a_job_failed_by_its_pod_failure_policy_fails_the_dataset_with_the_exit_codes_reason() {
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "web-prepare", "namespace": "ml"},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
             "message": "Container trainer for pod ml/web-prepare-x failed with exit code 3 matching FailJob rule at index 0"}]},
    });
    let mock = Mock::new(World {
        resource: dataset(),
        job: Some(job),
        pods: vec![pod(
            "web-prepare-x",
            "Failed",
            Some((3, "invalid data: no document left after filtering")),
            &[],
        )],
        ..World::default()
    });
    let seen = mock.reconcile::<Dataset>().await;
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Failed", "{status}");
    let failed = condition(&status, "Failed").expect("Failed condition");
    assert_eq!(failed["reason"], "InvalidData");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no document left"),
        "{failed}"
    );
    assert!(
        events(&seen).contains(&("Failed".into(), "Warning".into())),
        "a Failed warning event"
    );
}

/// Exit 75 (interrupted after a checkpoint, or a transient store failure) and 143 (killed
/// by SIGTERM) are retried without counting: the resource keeps training with no restart
/// counted; a crash (1) or a SIGKILL (137) is counted, and training goes on too.
#[tokio::test]
async fn retryable_exits_are_not_counted_and_the_job_keeps_training() {
    for code in [75, 143, 1, 137] {
        let mock = running_pretrain_job(false).await;
        let counted = match exit::classify(code) {
            Action::RetryNotCounted => 0,
            Action::RetryCounted => 1,
            other => panic!("exit {code} is {other:?}, not a retry"),
        };
        job_controller(
            &mock,
            pod(
                "gpt-pretrain-first",
                "Failed",
                Some((code, "interrupted")),
                &[],
            ),
        );
        let seen = mock.reconcile::<PretrainJob>().await;
        assert_training(&status_patch(&seen), counted, &format!("exit {code}"));
        assert!(
            !events(&seen).iter().any(|(r, _)| r == "Failed"),
            "exit {code}: no Failed event: {seen:#?}"
        );
    }
}

/// A pod preempted by the scheduler (or evicted, or lost with its node) carries the
/// `DisruptionTarget` condition; killed before it could save (137, which would count),
/// it is still replaced without a restart counted: while it terminates the resource is
/// retrying, then it trains again on the new pod.
#[tokio::test]
async fn a_preempted_pod_is_replaced_without_counting_a_restart() {
    for reason in ["PreemptionByScheduler", "TerminationByKubelet"] {
        let mock = running_pretrain_job(false).await;
        let seen = mock.reconcile::<PretrainJob>().await;
        assert_eq!(status_patch(&seen)["phase"], "Running", "{reason}");
        // Marked and deleted: the Job counts it as terminating, not active.
        {
            let mut w = mock.world.lock().expect("lock");
            let mut victim = pod(
                "gpt-pretrain-first",
                "Running",
                None,
                &[disruption_target(reason)],
            );
            victim["metadata"]["deletionTimestamp"] = json!("2025-01-02T03:04:00Z");
            w.pods = vec![victim];
        }
        mock.set_job_status(
            json!({"active": 0, "terminating": 1, "startTime": "2025-01-02T03:00:00Z"}),
        );
        let seen = mock.reconcile::<PretrainJob>().await;
        let status = status_patch(&seen);
        assert_eq!(
            (&status["phase"], &status["restarts"]),
            (&json!("Pending"), &json!(0)),
            "{reason}: {status}"
        );
        let ready = condition(&status, "Ready").expect("Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("PodRestarting")),
            "{reason}: {status}"
        );
        assert!(
            condition(&status, "Failed").is_none_or(|c| c["status"] != "True"),
            "{reason}: {status}"
        );
        assert!(
            events(&seen).contains(&("Retrying".into(), "Normal".into()))
                && events(&seen).contains(&("Preempted".into(), "Warning".into())),
            "{reason}: Retrying and Preempted events: {seen:#?}"
        );
        // Failed with the condition: the Job's policy ignores it and starts another pod.
        let action = job_controller(
            &mock,
            pod(
                "gpt-pretrain-first",
                "Failed",
                Some((exit::KILLED_BY_SIGKILL, "")),
                &[disruption_target(reason)],
            ),
        );
        assert_eq!(action, "Ignore", "{reason}: the Job's policy ignores it");
        let seen = mock.reconcile::<PretrainJob>().await;
        assert_training(&status_patch(&seen), 0, reason);
        assert!(
            !events(&seen)
                .iter()
                .any(|(r, _)| r == "Preempted" || r == "Failed"),
            "{reason}: the disruption is announced once, and nothing failed: {seen:#?}"
        );
    }
}

/// `spec.suspend: true` applies the Job suspended (the Job controller stops its pod, which
/// saves a checkpoint) and the resource says Suspended; `false` unsuspends it and the
/// resource runs again.
#[tokio::test]
async fn suspend_suspends_the_job_and_resume_unsuspends_it() {
    let mock = running_pretrain_job(false).await;
    assert_eq!(mock.job()["spec"]["suspend"], false);
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(status_patch(&seen)["phase"], "Running");

    mock.world.lock().expect("lock").resource["spec"]["suspend"] = json!(true);
    let seen = mock.reconcile::<PretrainJob>().await;
    let job = mock.job();
    assert_eq!(job["spec"]["suspend"], true, "the Job is applied suspended");
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Suspended", "{status}");
    let suspended = condition(&status, "Suspended").expect("Suspended");
    assert_eq!(
        (&suspended["status"], &suspended["reason"]),
        (&json!("True"), &json!("SuspendedBySpec")),
        "{status}"
    );
    assert!(
        events(&seen).contains(&("Suspended".into(), "Normal".into())),
        "{seen:#?}"
    );
    // The Job controller stops the pod and says so; nothing changes.
    mock.set_job_status(json!({"active": 0, "startTime": "2025-01-02T03:00:00Z", "conditions": [
        {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended"}]}));
    mock.world.lock().expect("lock").pods.clear();
    mock.reconcile::<PretrainJob>().await;
    assert_eq!(mock.job()["spec"]["suspend"], true, "it stays suspended");
    assert_eq!(mock.status()["phase"], "Suspended");

    mock.world.lock().expect("lock").resource["spec"]["suspend"] = json!(false);
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(
        mock.job()["spec"]["suspend"],
        false,
        "the Job is unsuspended"
    );
    let status = status_patch(&seen);
    assert_eq!(
        condition(&status, "Suspended").expect("Suspended")["status"],
        "False",
        "{status}"
    );
    assert_ne!(status["phase"], "Suspended", "{status}");
    // The Job controller starts a pod again (it resumes from the latest checkpoint).
    mock.set_job_status(active());
    mock.world.lock().expect("lock").pods = vec![pod("gpt-pretrain-next", "Running", None, &[])];
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_training(&status_patch(&seen), 0, "resumed");
}

/// Exit 2, 3 and 4 (invalid spec, invalid data, diverged loss) fail the Job at once by its
/// pod failure policy, and the resource fails with the code's reason and the trainer's
/// last words.
#[tokio::test]
async fn permanent_exit_codes_fail_the_job_with_their_reason() {
    for (code, reason) in [
        (exit::INVALID_SPEC, "InvalidSpec"),
        (exit::INVALID_DATA, "InvalidData"),
        (exit::LOSS_DIVERGED, "LossDiverged"),
    ] {
        let code = i32::from(code);
        assert_eq!(exit::classify(code), Action::FailPermanently, "exit {code}");
        let mock = running_pretrain_job(false).await;
        let words = format!("taper: {reason} (exit {code}): retrying cannot help");
        let action = job_controller(
            &mock,
            pod("gpt-pretrain-first", "Failed", Some((code, &words)), &[]),
        );
        assert_eq!(action, "FailJob", "exit {code}");
        let seen = mock.reconcile::<PretrainJob>().await;
        let status = status_patch(&seen);
        assert_eq!(status["phase"], "Failed", "exit {code}: {status}");
        let failed = condition(&status, "Failed").expect("Failed");
        assert_eq!(
            (&failed["status"], &failed["reason"]),
            (&json!("True"), &json!(reason)),
            "exit {code}: {status}"
        );
        assert!(
            failed["message"]
                .as_str()
                .is_some_and(|m| m.contains(&words) && m.contains(&format!("exit code {code}"))),
            "exit {code}: the trainer's last words: {failed}"
        );
        let ready = condition(&status, "Ready").expect("Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!(reason))
        );
        assert!(status["completionTime"].is_string(), "{status}");
        assert!(
            events(&seen).contains(&("Failed".into(), "Warning".into())),
            "exit {code}: {seen:#?}"
        );
    }
}

#[tokio::test]
async fn a_reconcile_with_nothing_new_applies_nothing_and_a_changed_spec_applies_again() {
    let mock = running_pretrain_job(false).await;
    // The Job's status changed (its pod runs): a reconcile reads, writes the status, and
    // sends none of the five applies, which would change nothing.
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(applies(&seen), Vec::<String>::new(), "{seen:#?}");
    assert_eq!(status_patch(&seen)["phase"], "Running");
    let again = mock.reconcile::<PretrainJob>().await;
    assert_eq!(applies(&again), Vec::<String>::new(), "{again:#?}");
    // The person suspends it: a new plan, applied in full.
    mock.world.lock().expect("lock").resource["spec"]["suspend"] = json!(true);
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(
        applies(&seen),
        ["ServiceAccount", "Role", "ConfigMap", "RoleBinding", "Job"],
        "{seen:#?}"
    );
    assert_eq!(mock.job()["spec"]["suspend"], true);
    // Someone else edits the Job (a new generation): applied again, back to the plan.
    if let Some(job) = mock.world.lock().expect("lock").job.as_mut() {
        job["metadata"]["generation"] = json!(7);
        job["spec"]["suspend"] = json!(false);
    }
    let seen = mock.reconcile::<PretrainJob>().await;
    assert!(applies(&seen).contains(&"Job".to_string()), "{seen:#?}");
    assert_eq!(mock.job()["spec"]["suspend"], true);
}
