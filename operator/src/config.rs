//! The operator's configuration: flags, each with an environment variable (the chart sets
//! the variables).

use std::net::SocketAddr;

use clap::Parser;

/// Kubernetes operator for Taper's Dataset, PretrainJob and FinetuneJob resources.
#[derive(Clone, Debug, Parser)]
#[command(name = "taper-operator", version, about)]
pub struct Config {
    /// Namespaces to watch, comma-separated; empty: all namespaces.
    #[arg(
        long,
        env = "TAPER_WATCH_NAMESPACES",
        default_value = "",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,
    /// Trainer image of a resource without `spec.image`.
    #[arg(
        long,
        env = "TAPER_TRAINER_IMAGE",
        default_value = "ghcr.io/taper-dev/taper-trainer:0.1.0"
    )]
    pub trainer_image: String,
    /// Extended resource name of a GPU, unless a resource names its own.
    #[arg(
        long,
        env = "TAPER_GPU_RESOURCE_NAME",
        default_value = "nvidia.com/gpu"
    )]
    pub gpu_resource_name: String,
    /// Where outputs go when a resource does not say: `s3://bucket/prefix`; a Dataset's
    /// shards go to `<prefix>/<namespace>/datasets/<name>`, a job's checkpoints to
    /// `<prefix>/<namespace>/<kind>/<name>/checkpoints`.
    #[arg(long, env = "TAPER_DEFAULT_OUTPUT_URI", default_value = "")]
    pub default_output_uri: String,
    /// S3 endpoint of the default output (MinIO, Ceph, R2); empty: AWS.
    #[arg(long, env = "TAPER_S3_ENDPOINT", default_value = "")]
    pub s3_endpoint: String,
    /// S3 region of the default output; empty: the pod's `AWS_REGION` or `us-east-1`.
    #[arg(long, env = "TAPER_S3_REGION", default_value = "")]
    pub s3_region: String,
    /// Name of the Secret, in each job's namespace, with the S3 credentials of resources
    /// that name none. The operator never reads it: trainer pods load it as environment.
    #[arg(long, env = "TAPER_S3_CREDENTIALS_SECRET", default_value = "")]
    pub s3_credentials_secret: String,
    /// Take part in leader election on a Lease; only the leader reconciles.
    #[arg(long, env = "TAPER_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "TAPER_LEASE_NAME", default_value = "taper-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the election.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,
    /// Lease duration in seconds: a dead leader is replaced after at most this (plus the
    /// grace of 5 s).
    #[arg(long, env = "TAPER_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Where `/metrics` is served.
    #[arg(long, env = "TAPER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` are served.
    #[arg(long, env = "TAPER_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    /// Resources reconciled at once, per kind.
    #[arg(long, env = "TAPER_RECONCILE_CONCURRENCY", default_value_t = 16)]
    pub reconcile_concurrency: u16,
    /// `terminationGracePeriodSeconds` of trainer pods: long enough to save a checkpoint.
    #[arg(long, env = "TAPER_TRAINER_GRACE_SECONDS", default_value_t = 300)]
    pub trainer_grace_seconds: i64,
    /// Put `prometheus.io/scrape`, `/port` and `/path` annotations on trainer pods, for a
    /// Prometheus without prometheus-operator that scrapes annotated pods.
    #[arg(long, env = "TAPER_TRAINER_SCRAPE_ANNOTATIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub trainer_scrape_annotations: bool,
}

impl Config {
    /// The watched namespaces, or `None` for all.
    pub fn namespaces(&self) -> Option<Vec<String>> {
        let list: Vec<String> = self
            .watch_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        (!list.is_empty()).then_some(list)
    }

    /// A configuration with every default (tests).
    pub fn defaults() -> Self {
        Self::parse_from(["taper-operator"])
    }
}
