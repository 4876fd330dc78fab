//! The pod runner: plays the kubelet (and, for binding, the scheduler) for the suite.
//!
//! It registers a Node with allocatable CPU, memory and a fake `nvidia.com/gpu`, binds
//! unscheduled pods to it (as `system:kube-scheduler`, through the `pods/binding`
//! subresource), and runs the pods bound to it (as `system:node:<name>`, so the Node
//! authorizer and NodeRestriction apply to everything it reads and writes).
//!
//! Only the trainer image is run: its containers execute the locally built `taper` binary
//! with the container's command, args and environment (`$(VAR)` expanded, `secretKeyRef`,
//! `configMapKeyRef`, `fieldRef` and `envFrom` resolved). ConfigMap, Secret, downward-API,
//! projected (including service-account tokens from the TokenRequest API) and `emptyDir`
//! volumes are materialised in a per-pod folder, and each mount path is rewritten to that
//! folder in the command, args, environment and working directory, since there is no
//! container filesystem. Pods with any other image stay `Pending` with the reason
//! `ErrImageNeverPull`. On deletion a pod's processes get SIGTERM, the grace period, then
//! SIGKILL, and the runner deletes the pod for good, as the kubelet does. Each container's
//! output goes to `<work>/logs/<namespace>_<pod>_<container>.log`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{
        Binding, ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, KeyToPath, Node,
        ObjectReference, Pod, Secret, ServiceAccount, Volume,
    },
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

/// Errors of the runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// How the runner is set up.
#[derive(Clone, Debug)]
pub struct RunnerOptions {
    /// Name of the Node to register.
    pub node_name: String,
    /// Image repositories (without tag or digest) that are the trainer image.
    pub trainer_images: Vec<String>,
    /// The locally built `taper` binary that stands for the trainer image.
    pub taper_bin: PathBuf,
    /// Folder for pods' volumes and logs.
    pub work_dir: PathBuf,
    /// Fake GPUs the node advertises as `nvidia.com/gpu`.
    pub gpus: u32,
    /// The API server's host and port, given to pods as `KUBERNETES_SERVICE_HOST/PORT`.
    pub api_host_port: Option<(String, u16)>,
}

impl RunnerOptions {
    /// Defaults for `node_name`, with the trainer image known as `taper-trainer` under any
    /// registry.
    pub fn new(node_name: &str, taper_bin: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            node_name: node_name.to_string(),
            trainer_images: vec![
                "taper-trainer".into(),
                "ghcr.io/taper-dev/taper-trainer".into(),
            ],
            taper_bin,
            work_dir,
            gpus: 8,
            api_host_port: None,
        }
    }

    /// Whether `image` is the trainer image: its repository, without tag or digest, is one
    /// of `trainer_images` or ends with `/<one of them>`.
    pub fn is_trainer_image(&self, image: &str) -> bool {
        let repo = image.split('@').next().unwrap_or(image);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        self.trainer_images
            .iter()
            .any(|t| repo == t || repo.ends_with(&format!("/{t}")))
    }
}

/// A running pod runner; [`PodRunner::shutdown`] (or drop) stops it and every process it
/// started.
#[derive(Debug)]
pub struct PodRunner {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    logs: PathBuf,
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunnerError {
    let what = what.into();
    move |source| RunnerError::Io { what, source }
}

impl PodRunner {
    /// Register the node and start binding and running pods.
    pub async fn start(
        node: Client,
        scheduler: Client,
        opts: RunnerOptions,
    ) -> Result<Self, RunnerError> {
        if !opts.taper_bin.exists() {
            return Err(RunnerError::Config(format!(
                "{} is missing: build it with `cargo build -p taper-trainer`",
                opts.taper_bin.display()
            )));
        }
        let logs = opts.work_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io(logs.display().to_string()))?;
        register_node(&node, &opts).await?;
        let (stop, stopped) = watch::channel(false);
        let opts = Arc::new(opts);
        let task = tokio::spawn(run(node, scheduler, opts, stopped));
        Ok(Self {
            stop,
            task: Some(task),
            logs,
        })
    }

    /// The log file of a container.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.logs.join(format!("{namespace}_{pod}_{container}.log"))
    }

    /// Stop the runner: every running container gets SIGTERM, then SIGKILL after 5 s.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn register_node(client: &Client, opts: &RunnerOptions) -> Result<(), RunnerError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply("taper-pod-runner").force();
    nodes
        .patch(
            &opts.node_name,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": opts.node_name, "labels": {
                    "kubernetes.io/hostname": opts.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.present": "true",
                }},
            })),
        )
        .await?;
    heartbeat(&nodes, opts).await
}

async fn heartbeat(nodes: &Api<Node>, opts: &RunnerOptions) -> Result<(), RunnerError> {
    let t = now();
    let resources = json!({"cpu": "16", "memory": "128Gi", "pods": "110",
                           "ephemeral-storage": "100Gi", "nvidia.com/gpu": opts.gpus.to_string()});
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [
            condition("Ready", "True", "KubeletReady", "taper pod runner is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                      {"type": "Hostname", "address": opts.node_name}],
        "nodeInfo": {"machineID": "taper-e2e", "systemUUID": "taper-e2e", "bootID": "taper-e2e",
                     "kernelVersion": "", "osImage": "taper e2e pod runner",
                     "containerRuntimeVersion": "taper-pod-runner://0.1", "kubeletVersion": "v1.34.4",
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
    }});
    nodes
        .patch_status(
            &opts.node_name,
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    Ok(())
}

struct Tracked {
    terminate: watch::Sender<Option<i64>>,
    task: JoinHandle<()>,
}

async fn run(
    node: Client,
    scheduler: Client,
    opts: Arc<RunnerOptions>,
    mut stopped: watch::Receiver<bool>,
) {
    let nodes: Api<Node> = Api::all(node.clone());
    let all_sched: Api<Pod> = Api::all(scheduler.clone());
    let all_node: Api<Pod> = Api::all(node.clone());
    let mine = ListParams::default().fields(&format!("spec.nodeName={}", opts.node_name));
    let unbound = ListParams::default().fields("spec.nodeName=");
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut last_beat = tokio::time::Instant::now();
    loop {
        if *stopped.borrow() {
            break;
        }
        if last_beat.elapsed() > Duration::from_secs(10) {
            if let Err(e) = heartbeat(&nodes, &opts).await {
                tracing::warn!("node heartbeat: {e}");
            }
            last_beat = tokio::time::Instant::now();
        }
        // Bind what the (absent) scheduler would.
        if let Ok(list) = all_sched.list(&unbound).await {
            for pod in list.items {
                if let Err(e) = bind(&scheduler, &pod, &opts.node_name).await {
                    tracing::warn!(
                        "binding {}: {e}",
                        pod.metadata.name.as_deref().unwrap_or("")
                    );
                }
            }
        }
        match all_node.list(&mine).await {
            Ok(list) => {
                let mut seen = Vec::new();
                for pod in list.items {
                    let Some(uid) = pod.metadata.uid.clone() else {
                        continue;
                    };
                    seen.push(uid.clone());
                    let deleting = pod.metadata.deletion_timestamp.is_some();
                    let grace = pod
                        .metadata
                        .deletion_grace_period_seconds
                        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
                        .unwrap_or(30);
                    if let Some(t) = tracked.get(&uid) {
                        if deleting && t.terminate.borrow().is_none() {
                            let _ = t.terminate.send(Some(grace));
                        }
                        continue;
                    }
                    let (terminate, rx) = watch::channel(deleting.then_some(grace));
                    let task = tokio::spawn(run_pod(node.clone(), opts.clone(), pod, rx));
                    tracked.insert(uid, Tracked { terminate, task });
                }
                // Gone from the API (force-deleted): stop at once.
                for (uid, t) in &tracked {
                    if !seen.contains(uid) && t.terminate.borrow().is_none() {
                        let _ = t.terminate.send(Some(0));
                    }
                }
                tracked.retain(|uid, t| seen.contains(uid) || !t.task.is_finished());
            }
            Err(e) => tracing::warn!("listing pods of {}: {e}", opts.node_name),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stopped.changed() => {}
        }
    }
    for t in tracked.values() {
        let _ = t.terminate.send(Some(5));
    }
    for (_, t) in tracked {
        let _ = t.task.await;
    }
}

async fn bind(client: &Client, pod: &Pod, node_name: &str) -> Result<(), RunnerError> {
    let (Some(ns), Some(name)) = (
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    ) else {
        return Ok(());
    };
    let spec = pod.spec.as_ref();
    let scheduler = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .unwrap_or("default-scheduler");
    if scheduler != "default-scheduler" || pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let binding = Binding {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            api_version: Some("v1".into()),
            name: Some(node_name.to_string()),
            ..Default::default()
        },
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create_subresource::<Binding, Value>("binding", name, &PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// One container's view of the filesystem: mount paths mapped to host folders.
#[derive(Clone, Debug, Default)]
struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    /// Replace every mount path (as a whole path component) in `s` with its host folder.
    fn rewrite(&self, s: &str) -> String {
        let mut out = s.to_string();
        let mut sorted = self.0.clone();
        sorted.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        for (mount, host) in &sorted {
            let mount = mount.trim_end_matches('/');
            if mount.is_empty() {
                continue;
            }
            let mut result = String::new();
            let mut rest = out.as_str();
            while let Some(i) = rest.find(mount) {
                let after = &rest[i + mount.len()..];
                let before = &rest[..i];
                let before_ok = before.is_empty()
                    || before.ends_with("://")
                    || !is_path_char(before.chars().last().unwrap_or(' '));
                let after_ok = after.is_empty()
                    || after.starts_with('/')
                    || !is_path_char(after.chars().next().unwrap_or(' '));
                result.push_str(&rest[..i]);
                if before_ok && after_ok {
                    result.push_str(&host.display().to_string());
                } else {
                    result.push_str(mount);
                }
                rest = after;
            }
            result.push_str(rest);
            out = result;
        }
        out
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// Expand `$(NAME)` references as the kubelet does; `$$(` escapes; unknown names stay.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(j) if env.contains_key(&tail[..j]) => {
                    out.push_str(&env[&tail[..j]]);
                    rest = &tail[j + 1..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|l| l.get(key).cloned())
    };
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    Some(match path {
        "metadata.name" => m.name.clone()?,
        "metadata.namespace" => m.namespace.clone()?,
        "metadata.uid" => m.uid.clone()?,
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone()?,
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone()?,
        "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => "127.0.0.1".into(),
        _ => {
            if let Some(k) = quoted("metadata.labels['") {
                return label(&m.labels, &k);
            }
            if let Some(k) = quoted("metadata.annotations['") {
                return label(&m.annotations, &k);
            }
            return None;
        }
    })
}

/// Why a container cannot start yet (kubelet's `CreateContainerConfigError`).
#[derive(Debug)]
struct ConfigError(String);

#[derive(Clone)]
struct PodCtx {
    client: Client,
    pod: Pod,
    ns: String,
    name: String,
    dir: PathBuf,
    opts: Arc<RunnerOptions>,
}

impl PodCtx {
    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("configmap {name:?}: {e}")))
    }

    async fn secret(&self, name: &str) -> Result<Option<Secret>, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("secret {name:?}: {e}")))
    }

    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.config_map(name).await? {
            Some(cm) => {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                Ok(data)
            }
            None if optional => Ok(BTreeMap::new()),
            None => Err(ConfigError(format!("configmap {name:?} not found"))),
        }
    }

    async fn secret_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.secret(name).await? {
            Some(s) => {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                Ok(data)
            }
            None if optional => Ok(BTreeMap::new()),
            None => Err(ConfigError(format!("secret {name:?} not found"))),
        }
    }

    async fn token(
        &self,
        audience: Option<String>,
        expiry: Option<i64>,
    ) -> Result<Vec<u8>, ConfigError> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: Some(expiry.unwrap_or(3607)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let out: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .map_err(|e| ConfigError(format!("token for service account {sa:?}: {e}")))?;
        Ok(out.status.map(|s| s.token.into_bytes()).unwrap_or_default())
    }

    /// Write every volume of the pod into `<dir>/volumes/<name>`.
    async fn materialise(
        &self,
        volumes: &[Volume],
    ) -> Result<BTreeMap<String, PathBuf>, ConfigError> {
        let mut out = BTreeMap::new();
        for v in volumes {
            let dir = self.dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ConfigError(format!("{}: {e}", dir.display())))?;
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            if v.empty_dir.is_some() {
            } else if let Some(cm) = &v.config_map {
                let data = self
                    .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?;
                files.extend(select(data, cm.items.as_ref()));
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data = self.secret_data(&name, s.optional.unwrap_or(false)).await?;
                files.extend(select(data, s.items.as_ref()));
            } else if let Some(d) = &v.downward_api {
                files.extend(downward_files(&self.pod, d.items.as_ref()));
            } else if let Some(p) = &v.projected {
                for src in p.sources.iter().flatten() {
                    if let Some(cm) = &src.config_map {
                        let data = self
                            .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                            .await?;
                        files.extend(select(data, cm.items.as_ref()));
                    }
                    if let Some(s) = &src.secret {
                        let data = self
                            .secret_data(&s.name, s.optional.unwrap_or(false))
                            .await?;
                        files.extend(select(data, s.items.as_ref()));
                    }
                    if let Some(d) = &src.downward_api {
                        files.extend(downward_files(&self.pod, d.items.as_ref()));
                    }
                    if let Some(t) = &src.service_account_token {
                        files.push((
                            t.path.clone(),
                            self.token(t.audience.clone(), t.expiration_seconds).await?,
                        ));
                    }
                }
            } else {
                return Err(ConfigError(format!(
                    "volume {:?}: only configMap, secret, downwardAPI, projected and emptyDir volumes are supported by the e2e pod runner",
                    v.name
                )));
            }
            for (path, bytes) in files {
                if path.split('/').any(|c| c == "..") {
                    return Err(ConfigError(format!(
                        "volume {:?}: path {path:?} escapes the volume",
                        v.name
                    )));
                }
                let file = dir.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| ConfigError(format!("{}: {e}", parent.display())))?;
                }
                std::fs::write(&file, bytes)
                    .map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
            }
            out.insert(v.name.clone(), dir);
        }
        Ok(out)
    }

    /// The container's environment, in order, with references resolved.
    async fn environment(&self, c: &Container) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut env = BTreeMap::new();
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(cm) = &from.config_map_ref {
                self.config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?
            } else if let Some(s) = &from.secret_ref {
                self.secret_data(&s.name, s.optional.unwrap_or(false))
                    .await?
            } else {
                BTreeMap::new()
            };
            for (k, v) in data {
                env.insert(
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        for EnvVar {
            name,
            value,
            value_from,
        } in c.env.iter().flatten()
        {
            let v = if let Some(from) = value_from {
                if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match self.secret_data(&r.name, optional).await?.remove(&r.key) {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError(format!(
                                "couldn't find key {} in Secret {}/{}",
                                r.key, self.ns, r.name
                            )));
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match self
                        .config_map_data(&r.name, optional)
                        .await?
                        .remove(&r.key)
                    {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                r.key, self.ns, r.name
                            )));
                        }
                    }
                } else if let Some(f) = &from.field_ref {
                    field_value(&self.pod, &f.field_path).unwrap_or_default()
                } else if let Some(r) = &from.resource_field_ref {
                    let res = c.resources.as_ref();
                    let (kind, resource) = r.resource.split_once('.').unwrap_or(("", ""));
                    let map = match kind {
                        "limits" => res.and_then(|r| r.limits.as_ref()),
                        _ => res.and_then(|r| r.requests.as_ref()),
                    };
                    map.and_then(|m| m.get(resource))
                        .map(|q| q.0.clone())
                        .unwrap_or_else(|| "0".into())
                } else {
                    String::new()
                }
            } else {
                expand(value.as_deref().unwrap_or_default(), &env)
            };
            env.insert(name.clone(), v);
        }
        Ok(env)
    }
}

/// The files of a ConfigMap or Secret volume: every key, or only the listed `items`.
fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        None => data.into_iter().collect(),
        Some(items) => items
            .iter()
            .filter_map(|k| data.get(&k.key).map(|v| (k.path.clone(), v.clone())))
            .collect(),
    }
}

/// The files of a downward-API volume or projection.
fn downward_files(pod: &Pod, items: Option<&Vec<DownwardAPIVolumeFile>>) -> Vec<(String, Vec<u8>)> {
    items
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let f = item.field_ref.as_ref()?;
            Some((
                item.path.clone(),
                field_value(pod, &f.field_path)
                    .unwrap_or_default()
                    .into_bytes(),
            ))
        })
        .collect()
}

#[derive(Clone, Debug)]
enum State {
    Waiting(String, String),
    Running(String),
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started: String,
        finished: String,
    },
}

fn container_status(c: &Container, state: &State, restarts: i32) -> Value {
    let s = match state {
        State::Waiting(reason, message) => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running(started) => json!({"running": {"startedAt": started}}),
        State::Terminated {
            code,
            reason,
            message,
            started,
            finished,
        } => json!({"terminated": {
            "exitCode": code, "reason": reason, "message": message, "startedAt": started, "finishedAt": finished}}),
    };
    json!({"name": c.name, "image": c.image.clone().unwrap_or_default(),
           "imageID": "", "containerID": format!("taper://{}", c.name),
           "ready": matches!(state, State::Running(_)), "started": matches!(state, State::Running(_)),
           "restartCount": restarts, "state": s})
}

async fn patch_status(ctx: &PodCtx, status: Value) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    if let Err(e) = pods
        .patch_status(
            &ctx.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
    {
        tracing::warn!("status of pod {}/{}: {e}", ctx.ns, ctx.name);
    }
}

fn conditions(ready: bool, initialized: bool) -> Value {
    let t = now();
    let c = |type_: &str, ok: bool| json!({"type": type_, "status": if ok {"True"} else {"False"}, "lastTransitionTime": t});
    json!([
        c("PodScheduled", true),
        c("Initialized", initialized),
        c("ContainersReady", ready),
        c("Ready", ready)
    ])
}

async fn run_pod(
    client: Client,
    opts: Arc<RunnerOptions>,
    pod: Pod,
    mut terminate: watch::Receiver<Option<i64>>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = opts.work_dir.join("pods").join(&uid);
    let ctx = PodCtx {
        client: client.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        dir: dir.clone(),
        opts: opts.clone(),
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let finished_already = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if !finished_already && terminate.borrow().is_none() {
        execute(&ctx, &spec, &mut terminate).await;
    }
    // Wait for deletion, then remove the pod for good (the kubelet's final delete).
    while terminate.borrow().is_none() {
        if terminate.changed().await.is_err() {
            return;
        }
    }
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let mut dp = DeleteParams::default().grace_period(0);
    dp.preconditions = Some(kube::api::Preconditions {
        uid: Some(uid),
        resource_version: None,
    });
    let _ = pods.delete(&name, &dp).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn execute(
    ctx: &PodCtx,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    terminate: &mut watch::Receiver<Option<i64>>,
) {
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    let unknown: Vec<String> = containers
        .iter()
        .filter_map(|c| c.image.clone())
        .filter(|i| !ctx.opts.is_trainer_image(i))
        .collect();
    if let Some(image) = unknown.first() {
        let msg = format!(
            "the e2e pod runner runs only the trainer image ({}); it never pulls or runs {image}",
            ctx.opts.trainer_images.join(", ")
        );
        let statuses: Vec<Value> = spec
            .containers
            .iter()
            .map(|c| {
                let known = c
                    .image
                    .as_deref()
                    .is_some_and(|i| ctx.opts.is_trainer_image(i));
                let (r, m) = if known {
                    ("PodInitializing", String::new())
                } else {
                    ("ErrImageNeverPull", msg.clone())
                };
                container_status(c, &State::Waiting(r.into(), m), 0)
            })
            .collect();
        patch_status(
            ctx,
            json!({"phase": "Pending", "hostIP": "127.0.0.1", "startTime": now(),
            "conditions": conditions(false, true), "containerStatuses": statuses}),
        )
        .await;
        return;
    }
    let start_time = now();
    // Volumes and environments; a missing Secret or ConfigMap is retried, as the kubelet does.
    let (volumes, envs) = loop {
        let result = async {
            let volumes = ctx
                .materialise(spec.volumes.as_deref().unwrap_or_default())
                .await?;
            let mut envs = Vec::new();
            for c in &containers {
                envs.push(ctx.environment(c).await?);
            }
            Ok::<_, ConfigError>((volumes, envs))
        }
        .await;
        match result {
            Ok(v) => break v,
            Err(ConfigError(msg)) => {
                let statuses: Vec<Value> = spec
                    .containers
                    .iter()
                    .map(|c| {
                        container_status(
                            c,
                            &State::Waiting("CreateContainerConfigError".into(), msg.clone()),
                            0,
                        )
                    })
                    .collect();
                patch_status(
                    ctx,
                    json!({"phase": "Pending", "hostIP": "127.0.0.1", "startTime": start_time,
                    "conditions": conditions(false, false), "containerStatuses": statuses}),
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = terminate.changed() => return,
                }
            }
        }
    };
    let n_init = spec.init_containers.as_ref().map_or(0, Vec::len);
    let restart = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let mut states: Vec<State> = spec
        .containers
        .iter()
        .map(|_| State::Waiting("PodInitializing".into(), String::new()))
        .collect();
    let mut restarts = vec![0i32; spec.containers.len()];
    let base = json!({"hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "startTime": start_time});
    let status = |states: &[State], restarts: &[i32], phase: &str, ready: bool, init: bool| {
        let mut s = base.clone();
        s["phase"] = json!(phase);
        s["conditions"] = conditions(ready, init);
        s["containerStatuses"] = Value::Array(
            spec.containers
                .iter()
                .zip(states)
                .zip(restarts)
                .map(|((c, st), r)| container_status(c, st, *r))
                .collect(),
        );
        s
    };
    // Init containers, one after the other.
    for (i, c) in containers[..n_init].iter().enumerate() {
        patch_status(ctx, status(&states, &restarts, "Pending", false, false)).await;
        match run_container(ctx, c, &envs[i], &volumes, terminate).await {
            State::Terminated { code: 0, .. } => {}
            State::Terminated {
                code,
                reason,
                message,
                ..
            } => {
                let mut s = status(&states, &restarts, "Failed", false, false);
                s["reason"] = json!(reason);
                s["message"] = json!(format!(
                    "init container {} exited with {code}: {message}",
                    c.name
                ));
                patch_status(ctx, s).await;
                return;
            }
            _ => return,
        }
    }
    // App containers, all at once; restarted per the pod's restart policy.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        states[i] = State::Running(now());
        let (c, env, volumes) = (c.clone(), envs[n_init + i].clone(), volumes.clone());
        let mut term = terminate.clone();
        let ctx2 = ctx.clone();
        tasks.spawn(async move { (i, run_container(&ctx2, &c, &env, &volumes, &mut term).await) });
    }
    patch_status(ctx, status(&states, &restarts, "Running", true, true)).await;
    while let Some(Ok((i, state))) = tasks.join_next().await {
        let code = match &state {
            State::Terminated { code, .. } => *code,
            _ => 0,
        };
        states[i] = state;
        let again = terminate.borrow().is_none()
            && (restart == "Always" || (restart == "OnFailure" && code != 0));
        if again {
            restarts[i] += 1;
            let backoff = Duration::from_secs((1u64 << restarts[i].min(4) as u32).min(10));
            patch_status(ctx, status(&states, &restarts, "Running", false, true)).await;
            let c = spec.containers[i].clone();
            let (env, volumes) = (envs[n_init + i].clone(), volumes.clone());
            let mut term = terminate.clone();
            let ctx2 = ctx.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = term.changed() => {}
                }
                (i, run_container(&ctx2, &c, &env, &volumes, &mut term).await)
            });
            states[i] = State::Running(now());
            patch_status(ctx, status(&states, &restarts, "Running", true, true)).await;
            continue;
        }
        let all_done = states.iter().all(|s| matches!(s, State::Terminated { .. }));
        if all_done {
            let ok = states
                .iter()
                .all(|s| matches!(s, State::Terminated { code: 0, .. }));
            patch_status(
                ctx,
                status(
                    &states,
                    &restarts,
                    if ok { "Succeeded" } else { "Failed" },
                    false,
                    true,
                ),
            )
            .await;
        } else {
            patch_status(ctx, status(&states, &restarts, "Running", false, true)).await;
        }
    }
}

async fn run_container(
    ctx: &PodCtx,
    c: &Container,
    env: &BTreeMap<String, String>,
    volumes: &BTreeMap<String, PathBuf>,
    terminate: &mut watch::Receiver<Option<i64>>,
) -> State {
    let started = now();
    let fail = |message: String| State::Terminated {
        code: 128,
        reason: "StartError".into(),
        message,
        started: started.clone(),
        finished: now(),
    };
    let cdir = ctx.dir.join("containers").join(&c.name);
    let root = cdir.join("root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        return fail(format!("{}: {e}", root.display()));
    }
    let term_log = cdir.join("termination-log");
    let _ = std::fs::write(&term_log, b"");
    let term_path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let mut mounts = Mounts::default();
    mounts.0.push((term_path, term_log.clone()));
    for m in c.volume_mounts.iter().flatten() {
        let Some(host) = volumes.get(&m.name) else {
            return fail(format!("volume mount {:?}: no such volume", m.name));
        };
        let host = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        mounts.0.push((m.mount_path.clone(), host));
    }
    // The image's entrypoint is `taper` and its default argument `--help`.
    let (program, args): (String, Vec<String>) = match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => (
            cmd[0].clone(),
            cmd[1..]
                .iter()
                .chain(args.iter().flatten())
                .cloned()
                .collect(),
        ),
        (_, Some(args)) => ("taper".into(), args.clone()),
        (_, None) => ("taper".into(), vec!["--help".into()]),
    };
    if program != "taper" && !program.ends_with("/taper") {
        return fail(format!(
            "exec: {program:?}: the e2e pod runner runs only the trainer's `taper` entrypoint"
        ));
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| mounts.rewrite(&expand(a, env)))
        .collect();
    let log_path = ctx
        .opts
        .work_dir
        .join("logs")
        .join(format!("{}_{}_{}.log", ctx.ns, ctx.name, c.name));
    let log = match std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
    {
        Ok(f) => f,
        Err(e) => return fail(format!("{}: {e}", log_path.display())),
    };
    let Ok(log_err) = log.try_clone() else {
        return fail("log file".into());
    };
    let workdir = c
        .working_dir
        .as_deref()
        .map(|w| PathBuf::from(mounts.rewrite(w)))
        .unwrap_or(root.clone());
    let _ = std::fs::create_dir_all(&workdir);
    let mut cmd = tokio::process::Command::new(&ctx.opts.taper_bin);
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &root)
        .env("HOSTNAME", &ctx.name)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true);
    if let Some((host, port)) = &ctx.opts.api_host_port {
        cmd.env("KUBERNETES_SERVICE_HOST", host)
            .env("KUBERNETES_SERVICE_PORT", port.to_string());
    }
    for (k, v) in env {
        cmd.env(k, mounts.rewrite(v));
    }
    crate::process::die_with_parent(cmd.as_std_mut());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return fail(format!("exec {}: {e}", ctx.opts.taper_bin.display())),
    };
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let status = loop {
        let requested = *terminate.borrow();
        if let Some(grace) = requested {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(grace.max(0) as u64), child.wait()).await
            {
                Ok(s) => break s,
                Err(_) => {
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                    break child.wait().await;
                }
            }
        }
        tokio::select! {
            s = child.wait() => break s,
            r = terminate.changed() => if r.is_err() { let _ = child.start_kill(); break child.wait().await; },
        }
    };
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(9)
        }),
        Err(_) => 128,
    };
    let mut message = std::fs::read_to_string(&term_log).unwrap_or_default();
    if message.is_empty()
        && code != 0
        && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        message = crate::process::tail(&log_path, 80);
    }
    if message.len() > 4096 {
        message = message[message.len() - 4096..].to_string();
    }
    State::Terminated {
        code,
        reason: if code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        },
        message,
        started,
        finished: now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_trainer_image() {
        let o = RunnerOptions::new("n", PathBuf::from("/bin/true"), PathBuf::from("/tmp"));
        assert!(o.is_trainer_image("taper-trainer"));
        assert!(o.is_trainer_image("taper-trainer:0.1.0"));
        assert!(o.is_trainer_image("registry.example:5000/team/taper-trainer:0.1.0"));
        assert!(o.is_trainer_image("ghcr.io/taper-dev/taper-trainer@sha256:abc"));
        assert!(!o.is_trainer_image("busybox"));
        assert!(!o.is_trainer_image("evil/taper-trainer-not"));
        assert!(!o.is_trainer_image("registry.example:5000/busybox"));
    }

    #[test]
    fn expands_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$A", &env), "$A");
    }

    #[test]
    fn rewrites_mount_paths_as_whole_components() {
        let m = Mounts(vec![
            ("/etc/taper".into(), PathBuf::from("/tmp/v/job")),
            ("/data".into(), PathBuf::from("/tmp/v/data")),
        ]);
        assert_eq!(
            m.rewrite("--job=/etc/taper/job.yaml"),
            "--job=/tmp/v/job/job.yaml"
        );
        assert_eq!(m.rewrite("file:///data/x"), "file:///tmp/v/data/x");
        assert_eq!(m.rewrite("/database"), "/database");
        assert_eq!(m.rewrite("/data"), "/tmp/v/data");
    }
}
