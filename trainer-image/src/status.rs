//! Live status: the trainer applies the figures of its own resource's `status` — step,
//! losses, throughput, checkpoints; counts of a prepared Dataset — with server-side apply
//! and its own field manager, so that `kubectl get pj` shows them while the operator owns
//! the phase and conditions. The pod's ServiceAccount may `get` and `patch` that one
//! resource's status and nothing else; its token, the cluster CA and the namespace are
//! projected into the folder named by `TAPER_API_CREDENTIALS` (see `taper_crds::pod`).
//! Without that variable (a laptop), nothing is reported. A failed report is logged and
//! never stops training.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use taper_crds::{
    DatasetStatus, JobStatus, pod,
    report::{PrepareReport, ProgressEvent},
};

/// Reports at most this often, except for events that change the checkpoint list or
/// end the run, which are reported at once.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// How long the end of a run waits for its last status report.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(20);

/// The status fields the trainer owns on a PretrainJob or FinetuneJob (`adapterUri` and
/// `modelUri` only on a FinetuneJob, from its `exported` event).
const JOB_FIELDS: [&str; 15] = [
    "step",
    "tokens",
    "maxSteps",
    "eta",
    "trainLoss",
    "valLoss",
    "bestValLoss",
    "tokensPerSecond",
    "mfu",
    "learningRate",
    "latestCheckpoint",
    "bestCheckpoint",
    "checkpoints",
    "adapterUri",
    "modelUri",
];

/// The status fields the trainer owns on a Dataset.
const DATASET_FIELDS: [&str; 8] = [
    "documentsRead",
    "documentsWritten",
    "dropped",
    "duplicates",
    "trainTokens",
    "testTokens",
    "manifest",
    "digest",
];

/// Why the API server cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The credentials folder or the service address is unusable.
    #[error("API credentials: {0}")]
    Config(String),
    /// The request failed.
    #[error("status patch: {0}")]
    Kube(#[from] kube::Error),
}

/// The resource whose status the trainer reports.
#[derive(Clone)]
pub struct Target {
    client: Client,
    namespace: String,
    /// The resource's kind, group, version and plural, from its type.
    resource: kube::api::ApiResource,
    name: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.resource.kind, self.namespace, self.name)
    }
}

/// A client authenticated by the projected credentials in `dir`.
async fn client_from(dir: &Path) -> Result<(Client, String), StatusError> {
    // kube's rustls client needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .map_err(|_| StatusError::Config("KUBERNETES_SERVICE_HOST is unset".into()))?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let namespace = std::fs::read_to_string(dir.join("namespace"))
        .map_err(|e| StatusError::Config(format!("{}/namespace: {e}", dir.display())))?
        .trim()
        .to_string();
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "pod",
        "clusters": [{"name": "pod", "cluster": {
            "server": format!("https://{host}:{port}"),
            "certificate-authority": dir.join("ca.crt").display().to_string(),
        }}],
        "users": [{"name": "pod", "user": {"tokenFile": dir.join("token").display().to_string()}}],
        "contexts": [{"name": "pod", "context": {"cluster": "pod", "user": "pod", "namespace": namespace}}],
    });
    let kubeconfig = Kubeconfig::from_yaml(&kubeconfig.to_string())
        .map_err(|e| StatusError::Config(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| StatusError::Config(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| StatusError::Config(e.to_string()))?;
    Ok((client, namespace))
}

impl Target {
    /// The resource of type `K` called `name` in the pod's namespace, when
    /// `TAPER_API_CREDENTIALS` names the projected credentials; `None` otherwise (or,
    /// logged, when they are unusable).
    pub fn from_env<K: kube::Resource<DynamicType = ()>>(
        rt: &tokio::runtime::Runtime,
        name: &str,
    ) -> Option<Self> {
        let Some(dir) = std::env::var_os(pod::env::API_CREDENTIALS) else {
            tracing::debug!("{} is unset: no live status", pod::env::API_CREDENTIALS);
            return None;
        };
        match rt.block_on(client_from(Path::new(&dir))) {
            Ok((client, namespace)) => Some(Self {
                client,
                namespace,
                resource: kube::api::ApiResource::erase::<K>(&()),
                name: name.to_string(),
            }),
            Err(e) => {
                tracing::warn!("live status is off: {e}");
                None
            }
        }
    }

    /// Apply `status` (only the trainer's fields of it) to the resource.
    pub async fn apply(
        &self,
        status: serde_json::Value,
        fields: &[&str],
    ) -> Result<(), StatusError> {
        let mut owned = serde_json::Map::new();
        if let serde_json::Value::Object(map) = status {
            for (k, v) in map {
                if fields.contains(&k.as_str()) {
                    owned.insert(k, v);
                }
            }
        }
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &self.resource);
        let body = serde_json::json!({
            "apiVersion": self.resource.api_version,
            "kind": self.resource.kind,
            "metadata": {"name": self.name},
            "status": owned,
        });
        let params = PatchParams::apply(pod::TRAINER_FIELD_MANAGER).force();
        api.patch_status(&self.name, &params, &Patch::Apply(&body))
            .await?;
        Ok(())
    }

    /// Report a finished prepare run.
    pub fn report_dataset(&self, rt: &tokio::runtime::Runtime, report: &PrepareReport) {
        let mut status = DatasetStatus::default();
        status.record_published(
            report,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
        );
        let value = serde_json::to_value(&status).unwrap_or_default();
        match rt.block_on(self.apply(value, &DATASET_FIELDS)) {
            Ok(()) => tracing::info!(target = ?self, "reported the prepare counts"),
            Err(e) => tracing::warn!(target = ?self, "cannot report the prepare counts: {e}"),
        }
    }
}

/// Folds progress events into a job status and applies its figures: at once for
/// `started`, `eval`, `checkpoint` and `done`, otherwise at most every [`INTERVAL`].
#[derive(Debug)]
pub struct JobReporter {
    sender: tokio::sync::mpsc::UnboundedSender<ProgressEvent>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl JobReporter {
    /// Start reporting to `target` on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, target: Target) -> Self {
        let (sender, mut events) = tokio::sync::mpsc::unbounded_channel::<ProgressEvent>();
        let task = rt.spawn(async move {
            let mut status = JobStatus::default();
            // A FinetuneJob's published model, beside the job status.
            let mut exported = serde_json::Map::new();
            let mut last: Option<Instant> = None;
            let mut dirty = false;
            loop {
                let event = tokio::time::timeout(INTERVAL, events.recv()).await;
                let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                let urgent = match &event {
                    Ok(Some(e)) => {
                        status.observe(e, &now);
                        if let ProgressEvent::Exported(x) = e {
                            for (key, uri) in
                                [("adapterUri", &x.adapter_uri), ("modelUri", &x.model_uri)]
                            {
                                if let Some(uri) = uri {
                                    exported.insert(key.into(), uri.clone().into());
                                }
                            }
                        }
                        dirty = true;
                        !matches!(e, ProgressEvent::Step(_) | ProgressEvent::NonFiniteLoss(_))
                    }
                    Ok(None) => true,
                    Err(_) => false,
                };
                let due = last.is_none_or(|t| t.elapsed() >= INTERVAL);
                if dirty && (urgent || due) {
                    let mut value = serde_json::to_value(&status).unwrap_or_default();
                    if let Some(map) = value.as_object_mut() {
                        map.extend(exported.clone());
                    }
                    match target.apply(value, &JOB_FIELDS).await {
                        Ok(()) => dirty = false,
                        Err(e) => tracing::warn!(target = ?target, "cannot report progress: {e}"),
                    }
                    last = Some(Instant::now());
                }
                if matches!(event, Ok(None)) {
                    break;
                }
            }
        });
        Self {
            sender,
            task: Some(task),
        }
    }

    /// A sink for the run's events.
    pub fn sink(&self) -> impl Fn(&ProgressEvent) + Send + Sync + use<> {
        let sender = self.sender.clone();
        move |e: &ProgressEvent| {
            let _ = sender.send(e.clone());
        }
    }

    /// Report what is left and stop; an API server that does not answer delays the
    /// trainer's exit by at most [`FINISH_TIMEOUT`] (the checkpoint is already saved).
    pub fn finish(mut self, rt: &tokio::runtime::Runtime) {
        let (dummy, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.sender, dummy));
        if let Some(task) = self.task.take()
            && rt
                .block_on(async { tokio::time::timeout(FINISH_TIMEOUT, task).await })
                .is_err()
        {
            tracing::warn!("the last status report did not finish in {FINISH_TIMEOUT:?}");
        }
    }
}
