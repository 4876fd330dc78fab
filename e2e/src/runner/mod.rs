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
//!
//! For the suite's disruption checks, a running pod annotated [`DISRUPT_ANNOTATION`] is
//! preempted ([`PREEMPTION_BY_SCHEDULER`]) or evicted ([`TERMINATION_BY_KUBELET`]) as
//! Kubernetes does it, ending `Failed` with the `DisruptionTarget` condition.
//!
//! Modules by concern: `node` (the Node, heartbeats, binding, one task per pod), `pod`
//! (a pod's state machine), `config` (environment and volumes), `paths` (mount-path
//! rewriting), `container` (the `taper` process), `status` (typed pod and container
//! statuses), `disrupt` (preemption and eviction on request).

use std::{path::PathBuf, sync::Arc};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff};
use kube::Client;
use tokio::{sync::watch, task::JoinHandle};

mod config;
mod container;
mod disrupt;
mod node;
mod paths;
mod pod;
mod status;

pub use disrupt::{
    DISRUPT_ANNOTATION, DISRUPT_GRACE_ANNOTATION, DISRUPTION_TARGET, EVICTED,
    PREEMPTION_BY_SCHEDULER, TERMINATION_BY_KUBELET,
};

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

/// Now, to the second, for the times in statuses.
fn now() -> Time {
    let t = jiff::Timestamp::now();
    Time(t.round(jiff::Unit::Second).unwrap_or(t))
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
        node::register_node(&node, &opts).await?;
        let (stop, stopped) = watch::channel(false);
        let opts = Arc::new(opts);
        let task = tokio::spawn(node::run(node, scheduler, opts, stopped));
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
}
