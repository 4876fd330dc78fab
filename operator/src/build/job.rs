//! The `batch/v1` Job that runs the trainer. Kubernetes' Job controller does the
//! retrying: the trainer's exit-code contract ([`taper_crds::exit`]) becomes the Job's
//! `podFailurePolicy` — permanent codes fail the Job at once, the retryable code, a
//! SIGTERM kill and a `DisruptionTarget` pod (preemption, eviction, node loss) are
//! ignored (a new pod, not counted), anything else counts against
//! `backoffLimit = maxRestarts`. `podReplacementPolicy: Failed` means never two trainers
//! at once.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{
            Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
            PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
        },
        core::v1::{
            Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
            DownwardAPIProjection, DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvFromSource,
            EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
            PodTemplateSpec, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
            SecretEnvSource, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
            VolumeProjection,
        },
    },
    apimachinery::pkg::api::resource::Quantity,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use taper_crds::{exit, pod};

use super::{Owner, Plan};
use crate::config::Config;

/// The user and group trainer containers run as (nonroot in distroless images).
pub const RUN_AS: i64 = 65532;
/// Lifetime of the projected API token; the trainer re-reads the file before each patch.
pub const TOKEN_SECONDS: i64 = 3600;

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The exit-code contract as a pod failure policy (first matching rule wins).
pub fn pod_failure_policy() -> PodFailurePolicy {
    let codes = |values: Vec<i32>| PodFailurePolicyOnExitCodesRequirement {
        container_name: Some(pod::CONTAINER_NAME.into()),
        operator: "In".into(),
        values,
    };
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(codes(vec![
                    i32::from(exit::INVALID_SPEC),
                    i32::from(exit::INVALID_DATA),
                    i32::from(exit::LOSS_DIVERGED),
                ])),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: Some(codes(vec![
                    i32::from(exit::RETRYABLE),
                    exit::KILLED_BY_SIGTERM,
                ])),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

/// The pod's resources: CPU and memory as asked, GPUs as a limit (and request) of the
/// GPU resource.
fn resources(plan: &Plan, cfg: &Config) -> ResourceRequirements {
    let r = &plan.resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &r.cpu {
        requests.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(memory) = &r.memory {
        requests.insert("memory".to_string(), memory.clone());
        limits.insert("memory".to_string(), memory.clone());
    }
    let gpus = r.gpus_or(plan.default_gpus);
    if gpus > 0 {
        let name = r
            .gpu_resource_name
            .clone()
            .unwrap_or_else(|| cfg.gpu_resource_name.clone());
        requests.insert(name.clone(), Quantity(gpus.to_string()));
        limits.insert(name, Quantity(gpus.to_string()));
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

/// The volumes: the job file, scratch space, `/tmp`, a memory-backed `/dev/shm`, and
/// the projected API credentials of the job's ServiceAccount.
fn volumes(config_map: &str) -> Vec<Volume> {
    let empty = |name: &str, medium: Option<&str>| Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: medium.map(str::to_string),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    };
    vec![
        Volume {
            name: "job".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        empty("work", None),
        empty("tmp", None),
        empty("shm", Some("Memory")),
        Volume {
            name: "api".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: "token".into(),
                            expiration_seconds: Some(TOKEN_SECONDS),
                            audience: None,
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: "kube-root-ca.crt".into(),
                            items: Some(vec![KeyToPath {
                                key: "ca.crt".into(),
                                path: "ca.crt".into(),
                                mode: None,
                            }]),
                            optional: None,
                        }),
                        ..VolumeProjection::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: "namespace".into(),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".into(),
                                    api_version: None,
                                }),
                                ..DownwardAPIVolumeFile::default()
                            }]),
                        }),
                        ..VolumeProjection::default()
                    },
                ]),
                default_mode: None,
            }),
            ..Volume::default()
        },
    ]
}

/// The trainer container.
fn container(owner: &Owner, plan: &Plan, cfg: &Config) -> Container {
    let gpus = plan.resources.gpus_or(plan.default_gpus);
    let mut env_vars = vec![
        env(pod::env::WORK_DIR, pod::WORK_MOUNT_PATH),
        env(
            pod::env::SPOOL_DIR,
            format!("{}/spool", pod::WORK_MOUNT_PATH),
        ),
        env(
            pod::env::METRICS_ADDR,
            format!("0.0.0.0:{}", pod::METRICS_PORT),
        ),
        env(pod::env::API_CREDENTIALS, pod::API_MOUNT_PATH),
        env(pod::env::DEVICE, if gpus > 0 { "cuda" } else { "cpu" }),
        env("HOME", "/tmp"),
        EnvVar {
            name: pod::env::NAMESPACE.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    if !cfg.s3_region.is_empty() {
        env_vars.push(env("AWS_REGION", cfg.s3_region.clone()));
    }
    Container {
        name: pod::CONTAINER_NAME.into(),
        image: Some(
            plan.image
                .clone()
                .unwrap_or_else(|| cfg.trainer_image.clone()),
        ),
        args: Some(vec![
            plan.command.to_string(),
            "--job".into(),
            pod::job_path(),
            "--name".into(),
            owner.name.clone(),
        ]),
        env: Some(env_vars),
        env_from: plan.store_secret.as_ref().map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        ports: Some(vec![ContainerPort {
            name: Some(pod::METRICS_PORT_NAME.into()),
            container_port: i32::from(pod::METRICS_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(plan, cfg)),
        volume_mounts: Some(vec![
            mount("job", pod::JOB_MOUNT_PATH, true),
            mount("work", pod::WORK_MOUNT_PATH, false),
            mount("tmp", "/tmp", false),
            mount("shm", "/dev/shm", false),
            mount("api", pod::API_MOUNT_PATH, true),
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// The annotations of Prometheus' usual `kubernetes-pods` scrape job: the trainer's
/// metrics port and path.
fn scrape_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        (
            "prometheus.io/port".to_string(),
            pod::METRICS_PORT.to_string(),
        ),
        (
            "prometheus.io/path".to_string(),
            pod::METRICS_PATH.to_string(),
        ),
    ])
}

/// The Job `<name>-<command>`; `current_suspend` is the existing Job's `spec.suspend`
/// (`None` before it exists). It is created suspended when the resource is suspended or
/// queued (Kueue admits it by unsuspending); a queued Job keeps the `suspend` it has, so
/// the operator never flips it against Kueue (leaving the field out of the apply would
/// not do: server-side apply would remove a field its manager stops sending).
pub fn job(owner: &Owner, plan: &Plan, cfg: &Config, current_suspend: Option<bool>) -> Job {
    let name = owner.child_name(plan.command);
    let labels = owner.labels(plan.command);
    let suspend = if plan.run.suspend {
        Some(true)
    } else if owner.queue().is_some() {
        Some(current_suspend.unwrap_or(true))
    } else {
        Some(false)
    };
    Job {
        metadata: owner.meta(&name, plan.command),
        spec: Some(JobSpec {
            backoff_limit: Some(plan.run.max_restarts),
            completions: Some(1),
            parallelism: Some(1),
            pod_failure_policy: Some(pod_failure_policy()),
            pod_replacement_policy: Some("Failed".into()),
            suspend,
            ttl_seconds_after_finished: plan.run.ttl_seconds_after_finished,
            active_deadline_seconds: plan.run.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: cfg.trainer_scrape_annotations.then(scrape_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(name.clone()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(cfg.trainer_grace_seconds),
                    node_selector: (!plan.resources.node_selector.is_empty())
                        .then(|| plan.resources.node_selector.clone()),
                    tolerations: (!plan.resources.tolerations.is_empty())
                        .then(|| plan.resources.tolerations.clone()),
                    priority_class_name: plan.resources.priority_class_name.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container(owner, plan, cfg)],
                    volumes: Some(volumes(&name)),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The component (and name suffix) of the cleanup Job.
pub const CLEANUP: &str = "cleanup";

/// The Job `<name>-cleanup` that runs `taper cleanup` for a deleted job with
/// `reclaimPolicy: Delete`: the trainer's pod as `plan` builds it (its image, S3 Secret,
/// ServiceAccount and job file, all still present while the finalizer holds the
/// deletion), without GPUs, metrics or a time limit, retried twice.
pub fn cleanup_job(owner: &Owner, plan: &Plan, cfg: &Config) -> Job {
    let mut j = job(owner, plan, cfg, None);
    j.metadata = owner.meta(&owner.child_name(CLEANUP), CLEANUP);
    if let Some(spec) = j.spec.as_mut() {
        spec.backoff_limit = Some(2);
        spec.suspend = Some(false);
        spec.ttl_seconds_after_finished = None;
        spec.active_deadline_seconds = None;
        if let Some(meta) = spec.template.metadata.as_mut() {
            meta.labels = Some(owner.labels(CLEANUP));
        }
        if let Some(pod) = spec.template.spec.as_mut() {
            pod.termination_grace_period_seconds = Some(30);
            for c in &mut pod.containers {
                c.args = Some(vec![
                    CLEANUP.into(),
                    "--job".into(),
                    pod::job_path(),
                    "--name".into(),
                    owner.name.clone(),
                ]);
                c.ports = None;
                c.resources = None;
                if let Some(env) = c.env.as_mut() {
                    env.retain(|e| e.name != pod::env::METRICS_ADDR);
                }
            }
        }
    }
    j
}
