//! The mocked API server of the reconcile scenarios (`tower-test`): it holds the objects
//! the operator reads and applies, answers as the API server would, and records every
//! request.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::{Value, json};
use taper_operator::{
    config::Config,
    controller::{Ctx, TaperKind, reconcile},
    metrics::Metrics,
};

/// One request the operator made: method, path with query, and JSON body.
pub type Request_ = (Method, String, Value);

/// What the mocked API server holds.
#[derive(Debug, Default)]
pub struct World {
    /// Returned for a GET of any Dataset (None: not found).
    pub dataset: Option<Value>,
    /// The Job: as the operator last applied it, with the status the Job controller gave it.
    pub job: Option<Value>,
    /// The Job's pods.
    pub pods: Vec<Value>,
    /// The resource under reconcile, echoed (with the new status) by status patches.
    pub resource: Value,
}

/// A mocked API server and an operator context that talks to it.
pub struct Mock {
    pub world: Arc<Mutex<World>>,
    pub seen: Arc<Mutex<Vec<Request_>>>,
    pub ctx: Arc<Ctx>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// The API server's answer to one request, from (and into) `world`.
fn answer(world: &Mutex<World>, method: &Method, path: &str, body: &Value) -> Response<Body> {
    let mut w = world.lock().expect("lock");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["apis", "batch", "v1", "namespaces", "ml", "jobs", _]) => w
            .job
            .as_ref()
            .map_or_else(not_found, |j| respond(StatusCode::OK, j)),
        // Server-side apply of the Job: the spec as applied, the status as it was.
        (&Method::PATCH, ["apis", "batch", "v1", "namespaces", "ml", "jobs", _]) => {
            let mut applied = body.clone();
            applied["status"] = w
                .job
                .as_ref()
                .map_or_else(|| json!({}), |j| j["status"].clone());
            w.job = Some(applied.clone());
            respond(StatusCode::OK, &applied)
        }
        (&Method::GET, ["api", "v1", "namespaces", "ml", "pods"]) => respond(
            StatusCode::OK,
            &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": w.pods}),
        ),
        (
            &Method::GET,
            [
                "apis",
                "taper.dev",
                "v1alpha1",
                "namespaces",
                "ml",
                "datasets",
                _,
            ],
        ) => w
            .dataset
            .as_ref()
            .map_or_else(not_found, |d| respond(StatusCode::OK, d)),
        (&Method::PATCH, [.., "status"]) => {
            w.resource["status"] = body["status"].clone();
            respond(StatusCode::OK, &w.resource)
        }
        (&Method::PATCH, _) | (&Method::POST, _) => respond(StatusCode::OK, body),
        (m, _) => panic!("unexpected request {m} {path}"),
    }
}

impl Mock {
    pub fn new(world: World) -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let world = Arc::new(Mutex::new(world));
        let seen: Arc<Mutex<Vec<Request_>>> = Arc::default();
        let (w, record) = (world.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let path = parts.uri.to_string();
                record.lock().expect("lock").push((
                    parts.method.clone(),
                    path.clone(),
                    body.clone(),
                ));
                let bare = path.split('?').next().unwrap_or_default();
                send.send_response(answer(&w, &parts.method, bare, &body));
            }
        });
        let client = Client::new(service, "default");
        let mut cfg = Config::defaults();
        cfg.default_output_uri = "s3://bucket/taper".into();
        let ctx = Arc::new(Ctx {
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
            applied: Default::default(),
            written: Default::default(),
            datasets: Default::default(),
            jobs: Default::default(),
        });
        Self {
            world,
            seen,
            ctx,
            task,
        }
    }

    /// Reconcile the resource the server holds; returns the requests it made.
    pub async fn reconcile<K: TaperKind>(&self) -> Vec<Request_> {
        self.seen.lock().expect("lock").clear();
        let obj: K = serde_json::from_value(self.world.lock().expect("lock").resource.clone())
            .expect("the resource");
        reconcile(Arc::new(obj), self.ctx.clone())
            .await
            .expect("reconcile");
        // Events are published by tasks of their own: wait until no request has come for
        // a while.
        let mut count = self.seen.lock().expect("lock").len();
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let now = self.seen.lock().expect("lock").len();
            if now == count {
                break;
            }
            count = now;
        }
        self.seen.lock().expect("lock").clone()
    }

    /// The resource's status as the server has it.
    pub fn status(&self) -> Value {
        self.world.lock().expect("lock").resource["status"].clone()
    }

    /// Set the status of the Job, as the Job controller does.
    #[allow(
        dead_code,
        reason = "each test crate compiles this module; not all use this"
    )]
    pub fn set_job_status(&self, status: Value) {
        if let Some(j) = self.world.lock().expect("lock").job.as_mut() {
            j["status"] = status;
        }
    }

    /// The Job as the operator applied it.
    pub fn job(&self) -> Value {
        self.world
            .lock()
            .expect("lock")
            .job
            .clone()
            .expect("a Job was applied")
    }
}

// Fixtures and readers shared by the scenarios.

/// A Dataset `ml/web` with one source.
pub fn dataset() -> Value {
    json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "Dataset",
        "metadata": {"name": "web", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"sources": [{"name": "a", "uri": "s3://c/a.jsonl", "format": "jsonl"}]},
    })
}

/// [`dataset`], published.
pub fn ready_dataset() -> Value {
    let mut ds = dataset();
    ds["status"] =
        json!({"phase": "Ready", "manifest": "s3://bucket/taper/ml/datasets/web/manifest.json"});
    ds
}

/// A PretrainJob `ml/gpt` of the Dataset `web`.
pub fn pretrain_job(suspend: bool) -> Value {
    json!({
        "apiVersion": "taper.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "gpt", "namespace": "ml", "uid": "u-2", "generation": 1},
        "spec": {"datasetRef": {"name": "web"}, "model": {"preset": "tiny"},
                 "suspend": suspend, "maxRestarts": 3},
    })
}

/// The condition of `type_` in `status`.
pub fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// The applies of a reconcile: the kinds server-side applied, status left out.
pub fn applies(seen: &[Request_]) -> Vec<String> {
    seen.iter()
        .filter(|(m, p, _)| *m == Method::PATCH && !p.contains("/status"))
        .map(|(_, _, b)| b["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}
