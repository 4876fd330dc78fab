//! The reconcile pipeline against a mocked API server (`tower-test`), as kube-rs's
//! reference controller tests it: each test answers the requests the operator makes,
//! records them, and checks what it applied.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::{Value, json};
use taper_crds::Dataset;
use taper_operator::{
    config::Config,
    controller::{Ctx, reconcile},
    metrics::Metrics,
};

/// One request the operator made: method, path with query, and JSON body.
type Seen = Arc<Mutex<Vec<(Method, String, Value)>>>;

fn dataset() -> Dataset {
    serde_json::from_value(json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "web", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"sources": [{"name": "a", "uri": "s3://c/a.jsonl", "format": "jsonl"}]},
    }))
    .expect("dataset")
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

/// A mocked API server: `job` is the Job the server holds (None: not created yet) and
/// `pods` the Job's pods. Applies echo their body back (with the Job's status).
fn serve(job: Option<Value>, pods: Value) -> (Client, Seen, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.to_string();
            record
                .lock()
                .expect("lock")
                .push((parts.method.clone(), path.clone(), body.clone()));
            let bare = path.split('?').next().unwrap_or_default().to_string();
            let response = match (parts.method, bare.as_str()) {
                (Method::GET, "/apis/batch/v1/namespaces/ml/jobs/web-prepare") => match &job {
                    Some(j) => respond(StatusCode::OK, j),
                    None => respond(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "not found"}),
                    ),
                },
                (Method::PATCH, "/apis/batch/v1/namespaces/ml/jobs/web-prepare") => {
                    let mut applied = body.clone();
                    if let Some(j) = &job {
                        applied["status"] = j["status"].clone();
                    }
                    respond(StatusCode::OK, &applied)
                }
                (Method::GET, "/api/v1/namespaces/ml/pods") => respond(StatusCode::OK, &pods),
                (Method::PATCH, "/apis/taper.dev/v1alpha1/namespaces/ml/datasets/web/status") => {
                    let mut ds = serde_json::to_value(dataset()).expect("json");
                    ds["status"] = body["status"].clone();
                    respond(StatusCode::OK, &ds)
                }
                (Method::PATCH, _) | (Method::POST, _) => respond(StatusCode::OK, &body),
                (m, p) => panic!("unexpected request {m} {p}"),
            };
            send.send_response(response);
        }
    });
    (Client::new(service, "default"), seen, task)
}

fn ctx(client: Client) -> Arc<Ctx> {
    let mut cfg = Config::defaults();
    cfg.default_output_uri = "s3://bucket/taper".into();
    Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "taper-operator".into(),
                instance: None,
            },
        ),
        client,
        cfg,
        metrics: Metrics::new().expect("metrics"),
        announced: Default::default(),
    })
}

fn status_patch(seen: &Seen) -> Value {
    seen.lock()
        .expect("lock")
        .iter()
        .rev()
        .find(|(m, p, _)| *m == Method::PATCH && p.contains("/datasets/web/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("a status patch")
}

#[tokio::test]
async fn a_new_dataset_gets_its_objects_applied_and_a_pending_status() {
    let (client, seen, task) = serve(
        None,
        json!({"kind": "PodList", "apiVersion": "v1", "items": []}),
    );
    reconcile(Arc::new(dataset()), ctx(client))
        .await
        .expect("reconcile");
    task.abort();
    let seen = seen.lock().expect("lock").clone();
    let applied: Vec<&str> = seen
        .iter()
        .filter(|(m, p, _)| *m == Method::PATCH && !p.contains("/status"))
        .map(|(_, _, b)| b["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        applied,
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"],
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
    let job = &seen
        .iter()
        .find(|(m, _, b)| *m == Method::PATCH && b["kind"] == "Job")
        .expect("Job")
        .2;
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "prepare"
    );
    assert!(
        seen.iter().any(|(m, p, b)| *m == Method::POST
            && p.contains("/events")
            && b["reason"] == "Created"),
        "a Created event"
    );
    let status = {
        let s: Seen = Arc::new(Mutex::new(seen.clone()));
        status_patch(&s)
    };
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
    let pods = json!({"kind": "PodList", "apiVersion": "v1", "items": [{
        "metadata": {"name": "web-prepare-x", "namespace": "ml"},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "image": "t", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3, "message": "invalid data: no document left after filtering"}}}]}}]});
    let (client, seen, task) = serve(Some(job), pods);
    reconcile(Arc::new(dataset()), ctx(client))
        .await
        .expect("reconcile");
    task.abort();
    let status = status_patch(&seen);
    assert_eq!(status["phase"], "Failed", "{status}");
    let failed = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Failed"))
        .expect("Failed condition");
    assert_eq!(failed["reason"], "InvalidData");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no document left"),
        "{failed}"
    );
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .any(|(m, p, b)| *m == Method::POST
                && p.contains("/events")
                && b["reason"] == "Failed"
                && b["type"] == "Warning"),
        "a Failed warning event"
    );
}
