//! The pod contract: how a trainer pod is wired, in one place. The operator builds pods
//! with these names, the trainer reads them, and the e2e suite checks both against each
//! other.
//!
//! | what | value |
//! | --- | --- |
//! | the resolved job file | `/etc/taper/job.yaml` (a ConfigMap mounted at [`JOB_MOUNT_PATH`]) |
//! | scratch space | an `emptyDir` at [`WORK_MOUNT_PATH`] |
//! | metrics | container port [`METRICS_PORT`] named [`METRICS_PORT_NAME`], path [`METRICS_PATH`] |
//! | labels of every metric | `kind`, `namespace`, `name` (see [`metric::LABELS`]) |
//! | live status | the trainer applies its own resource's `status` figures (server-side apply, field manager [`TRAINER_FIELD_MANAGER`]) with the token, CA and namespace projected at [`API_MOUNT_PATH`] for the job's own ServiceAccount |
//! | the container | named [`CONTAINER_NAME`]; exit codes as in [`crate::exit`] |

/// Environment variables the trainer reads (each also a command-line flag).
pub mod env {
    /// `cpu`, `cuda` or `cuda:N` (`--device`).
    pub const DEVICE: &str = "TAPER_DEVICE";
    /// Local scratch folder for downloads and checkpoint staging (`--work-dir`).
    pub const WORK_DIR: &str = "TAPER_WORK_DIR";
    /// Address of the Prometheus endpoint, e.g. `0.0.0.0:9090` (`--metrics-addr`).
    pub const METRICS_ADDR: &str = "TAPER_METRICS_ADDR";
    /// Peak TFLOP/s of the device, for MFU (`--peak-tflops`).
    pub const PEAK_TFLOPS: &str = "TAPER_PEAK_TFLOPS";
    /// Namespace of the resource, a label of every metric (`--namespace`); the operator
    /// sets it from the pod's `metadata.namespace`.
    pub const NAMESPACE: &str = "TAPER_NAMESPACE";
    /// Local folder where `taper prepare` spools remote sources and its spill files.
    pub const SPOOL_DIR: &str = "TAPER_SPOOL_DIR";
    /// Tokens per suffix-array chunk of exact-substring dedup.
    pub const SUBSTRING_CHUNK_TOKENS: &str = "TAPER_SUBSTRING_CHUNK_TOKENS";
    /// A folder with `token`, `ca.crt` and `namespace` for the API server (the projected
    /// volume at [`super::API_MOUNT_PATH`]); set, the trainer reports live status to its
    /// resource. The API server's address comes from `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`.
    pub const API_CREDENTIALS: &str = "TAPER_API_CREDENTIALS";
}

/// Name of the trainer container of every Taper pod.
pub const CONTAINER_NAME: &str = "trainer";
/// Where the job ServiceAccount's token, the cluster CA and the namespace are projected.
pub const API_MOUNT_PATH: &str = "/var/run/secrets/taper/api";
/// Field manager of the status figures the trainer applies.
pub const TRAINER_FIELD_MANAGER: &str = "taper-trainer";
/// Field manager of everything the operator applies.
pub const OPERATOR_FIELD_MANAGER: &str = "taper-operator";

/// Where the resolved job's ConfigMap is mounted.
pub const JOB_MOUNT_PATH: &str = "/etc/taper";
/// The key of the resolved job in that ConfigMap, and its file name.
pub const JOB_FILE: &str = "job.yaml";
/// Where the pod's scratch `emptyDir` is mounted.
pub const WORK_MOUNT_PATH: &str = "/work";
/// The metrics container port.
pub const METRICS_PORT: u16 = 9090;
/// The name of the metrics container port (what a PodMonitor selects).
pub const METRICS_PORT_NAME: &str = "metrics";
/// The HTTP path of the metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The full path of the resolved job file inside a trainer container.
pub fn job_path() -> String {
    format!("{JOB_MOUNT_PATH}/{JOB_FILE}")
}

/// Names of the trainer's Prometheus metrics.
pub mod metric {
    /// The labels of every trainer metric; nothing unbounded.
    pub const LABELS: [&str; 3] = ["kind", "namespace", "name"];
    /// Latest training loss (gauge).
    pub const TRAIN_LOSS: &str = "taper_train_loss";
    /// Latest validation loss (gauge).
    pub const VAL_LOSS: &str = "taper_val_loss";
    /// Current learning rate (gauge).
    pub const LEARNING_RATE: &str = "taper_learning_rate";
    /// Optimizer steps taken (gauge).
    pub const TRAIN_STEP: &str = "taper_train_step";
    /// Training tokens consumed (counter).
    pub const TRAIN_TOKENS: &str = "taper_train_tokens_total";
    /// Wall time of one optimizer step (histogram).
    pub const STEP_DURATION: &str = "taper_step_duration_seconds";
    /// Model FLOPs utilisation (gauge, 0–1).
    pub const MFU: &str = "taper_mfu_ratio";
    /// Time to write one checkpoint (histogram).
    pub const CHECKPOINT_SAVE_DURATION: &str = "taper_checkpoint_save_duration_seconds";
    /// The run's `maxSteps` (gauge), for progress and ETA.
    pub const MAX_STEPS: &str = "taper_train_max_steps";
    /// Steps whose loss was NaN or infinite, each skipped (counter).
    pub const NONFINITE_LOSSES: &str = "taper_nonfinite_losses_total";
    /// Evaluations in a row whose validation loss rose above the one before (gauge).
    pub const VAL_LOSS_RISES: &str = "taper_rising_val_losses";
    /// Checkpoint saves that failed (counter).
    pub const CHECKPOINT_FAILURES: &str = "taper_checkpoint_failures_total";
    /// Bytes of the latest saved checkpoint's files (gauge).
    pub const CHECKPOINT_SIZE: &str = "taper_checkpoint_size_bytes";
    /// Every trainer metric.
    pub const ALL: [&str; 13] = [
        TRAIN_LOSS,
        VAL_LOSS,
        LEARNING_RATE,
        TRAIN_STEP,
        TRAIN_TOKENS,
        STEP_DURATION,
        MFU,
        CHECKPOINT_SAVE_DURATION,
        MAX_STEPS,
        NONFINITE_LOSSES,
        VAL_LOSS_RISES,
        CHECKPOINT_FAILURES,
        CHECKPOINT_SIZE,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_path_is_inside_its_mount_and_names_are_prometheus_names() {
        assert_eq!(job_path(), "/etc/taper/job.yaml");
        let valid = |n: &str| {
            n.starts_with("taper_") && n.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        };
        for name in metric::ALL {
            assert!(valid(name), "{name}");
        }
        let mut names = metric::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), metric::ALL.len(), "metric names are distinct");
    }
}
