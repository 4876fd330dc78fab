//! The pure parts of the operator: resolution of each kind and the objects built for it.
//!
//! Golden files (`tests/golden/*.yaml`) hold the full objects built for fixtures, so that
//! a change to any built field shows in review; `TAPER_UPDATE_GOLDEN=1 cargo test -p
//! taper-operator --test builders` rewrites them. The contract-level properties are also
//! asserted directly, against `taper_crds::exit` and the pod security standard.

use std::path::PathBuf;

use k8s_openapi::api::batch::v1::Job;
use taper_crds::{
    Dataset, PretrainJob,
    conditions::{ConditionReason, DatasetPhase},
    dataset::DatasetStatus,
    exit::{self, Action},
    pod,
};
use taper_operator::{
    build::{self, Owner, Plan},
    config::Config,
    controller,
    plan::{self, Inputs, Readiness},
};

fn cfg() -> Config {
    let mut c = Config::defaults();
    c.default_output_uri = "s3://ml-bucket/taper".into();
    c.s3_endpoint = "http://minio.storage:9000".into();
    c.s3_region = "eu-west-1".into();
    c.s3_credentials_secret = "s3-creds".into();
    c
}

fn dataset(ready: bool) -> Dataset {
    let mut ds: Dataset = serde_yaml::from_str(
        "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata: {name: owt2, namespace: research, uid: 11111111-2222-3333-4444-555555555555, generation: 2}\n\
         spec:\n  sources: [{name: web, uri: \"s3://corpora/owt2/*.jsonl.zst\", format: jsonl.zst}]\n",
    )
    .expect("dataset");
    if ready {
        ds.status = Some(DatasetStatus {
            phase: DatasetPhase::Ready,
            ..DatasetStatus::default()
        });
    }
    ds
}

fn pretrain_job() -> PretrainJob {
    serde_yaml::from_str(
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\n\
         metadata: {name: gpt2, namespace: research, uid: 66666666-7777-8888-9999-000000000000, labels: {kueue.x-k8s.io/queue-name: gpus}}\n\
         spec:\n  datasetRef: {name: owt2}\n  model: {preset: gpt2-small}\n  maxRestarts: 5\n  ttlSecondsAfterFinished: 3600\n  activeDeadlineSeconds: 86400\n  \
         resources: {gpus: 8, cpu: \"32\", memory: 512Gi, nodeSelector: {pool: h100}, \
         tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}], priorityClassName: training}\n",
    )
    .expect("pretrain job")
}

fn ready(r: Readiness) -> Plan {
    match r {
        Readiness::Ready(p) => *p,
        other => panic!("expected a plan, got {other:?}"),
    }
}

/// Compare `objects` rendered as YAML with the golden file `name`.
/// The PretrainJob of these tests with its Dataset Ready, and its plan.
fn ready_pretrain() -> (PretrainJob, Plan) {
    let pj = pretrain_job();
    let inputs = Inputs {
        dataset: Some(dataset(true)),
        base: None,
    };
    let plan = ready(plan::plan_pretrain(&pj, &inputs, &cfg()));
    (pj, plan)
}

fn golden(name: &str, objects: &[serde_json::Value]) {
    let text: String = objects
        .iter()
        .map(|o| serde_yaml::to_string(o).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("TAPER_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("write golden");
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TAPER_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        text,
        expected,
        "{} drifted; review and rerun with TAPER_UPDATE_GOLDEN=1",
        path.display()
    );
}

fn built(owner: &Owner, plan: &Plan, current: Option<bool>) -> (Job, Vec<serde_json::Value>) {
    let cfg = cfg();
    let job = build::job::job(owner, plan, &cfg, current);
    let objects = vec![
        serde_json::to_value(build::config_map::config_map(owner, plan).expect("config map"))
            .expect("json"),
        serde_json::to_value(build::rbac::service_account(owner, plan.command)).expect("json"),
        serde_json::to_value(build::rbac::role(owner, plan.command)).expect("json"),
        serde_json::to_value(build::rbac::role_binding(owner, plan.command)).expect("json"),
        serde_json::to_value(&job).expect("json"),
    ];
    (job, objects)
}

#[test]
fn a_pretrain_job_builds_its_config_map_rbac_and_job() {
    let (pj, plan) = ready_pretrain();
    let owner = controller::owner(&pj);
    let (job, objects) = built(&owner, &plan, None);
    golden("pretrain.yaml", &objects);

    // The job file: the job with its checkpoint URI under the default output, and its
    // Dataset with the output it was prepared to.
    let file = build::config_map::job_file(&plan).expect("job file");
    assert!(
        file.contains("uri: s3://ml-bucket/taper/research/pretrainjobs/gpt2/checkpoints"),
        "{file}"
    );
    assert!(
        file.contains("uri: s3://ml-bucket/taper/research/datasets/owt2"),
        "{file}"
    );
    let parsed = taper_crds::parse_manifests(&file).expect("the trainer parses the job file");
    assert_eq!(parsed.len(), 2);

    let spec = job.spec.expect("spec");
    assert_eq!(spec.backoff_limit, Some(5), "maxRestarts");
    assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
    assert_eq!(spec.active_deadline_seconds, Some(86400));
    assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
    assert_eq!(
        spec.suspend,
        Some(true),
        "queued: created suspended for Kueue"
    );
    let pod_spec = spec.template.spec.expect("pod spec");
    let c = &pod_spec.containers[0];
    assert_eq!(c.name, pod::CONTAINER_NAME);
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .expect("limits");
    assert_eq!(limits["nvidia.com/gpu"].0, "8");
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        ["pretrain", "--job", "/etc/taper/job.yaml", "--name", "gpt2"]
    );
}

#[test]
fn the_pod_failure_policy_is_the_exit_code_contract() {
    // Every code a rule names gets, from the policy, what crds::exit::classify says the
    // operator does about it; every other code falls through to Count.
    let policy = build::job::pod_failure_policy();
    let action_of = |code: i32| {
        policy
            .rules
            .iter()
            .find(|r| {
                r.on_exit_codes
                    .as_ref()
                    .is_some_and(|e| e.values.contains(&code))
            })
            .map(|r| r.action.as_str())
            .unwrap_or("Count")
    };
    for code in [1, 2, 3, 4, 75, 137, 143, 139, 255] {
        let expected = match exit::classify(code) {
            Action::FailPermanently => "FailJob",
            Action::RetryNotCounted => "Ignore",
            Action::RetryCounted => "Count",
            Action::Succeed => unreachable!("0 is not a failure"),
        };
        assert_eq!(action_of(code), expected, "exit code {code}");
    }
    let disruption = policy
        .rules
        .iter()
        .find(|r| r.on_pod_conditions.is_some())
        .expect("a pod-condition rule");
    assert_eq!(disruption.action, "Ignore");
    assert_eq!(
        disruption.on_pod_conditions.as_ref().expect("conditions")[0].type_,
        "DisruptionTarget"
    );
}

#[test]
fn trainer_pods_meet_the_restricted_pod_security_standard() {
    let (pj, plan) = ready_pretrain();
    let (job, _) = built(&controller::owner(&pj), &plan, Some(false));
    let pod = job.spec.expect("spec").template.spec.expect("pod");
    let psc = pod.security_context.expect("pod security context");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.expect("seccomp").type_,
        "RuntimeDefault"
    );
    for c in &pod.containers {
        let sc = c
            .security_context
            .clone()
            .expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }
    // Only volume types the restricted profile allows.
    for v in pod.volumes.unwrap_or_default() {
        assert!(
            v.config_map.is_some() || v.empty_dir.is_some() || v.projected.is_some(),
            "{v:?}"
        );
    }
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn trainer_pods_carry_scrape_annotations_only_when_configured() {
    let (pj, plan) = ready_pretrain();
    let owner = controller::owner(&pj);
    let annotations = |c: &Config| {
        build::job::job(&owner, &plan, c, Some(false))
            .spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
    };
    assert_eq!(annotations(&cfg()), None, "off by default");
    let mut on = cfg();
    on.trainer_scrape_annotations = true;
    let got = annotations(&on).expect("annotations");
    // Prometheus' `kubernetes-pods` convention, written out here independently of the
    // builder: the trainer serves /metrics on port 9090.
    let want: std::collections::BTreeMap<String, String> = [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9090"),
        ("prometheus.io/path", "/metrics"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_queued_job_keeps_the_suspend_kueue_gave_it_and_a_suspended_one_stays_suspended() {
    let (pj, mut plan) = ready_pretrain();
    let owner = controller::owner(&pj);
    let suspend = |plan: &Plan, current| {
        build::job::job(&owner, plan, &cfg(), current)
            .spec
            .and_then(|s| s.suspend)
    };
    assert_eq!(suspend(&plan, None), Some(true), "created suspended");
    assert_eq!(suspend(&plan, Some(true)), Some(true), "still waiting");
    assert_eq!(
        suspend(&plan, Some(false)),
        Some(false),
        "admitted by Kueue: kept, never flipped back"
    );
    plan.run.suspend = true;
    assert_eq!(suspend(&plan, Some(false)), Some(true));
    let mut unqueued = owner.clone();
    unqueued.labels.clear();
    plan.run.suspend = false;
    assert_eq!(
        build::job::job(&unqueued, &plan, &cfg(), Some(true))
            .spec
            .and_then(|s| s.suspend),
        Some(false)
    );
}

#[test]
fn a_dataset_builds_a_prepare_job_without_gpus() {
    let ds = dataset(false);
    let plan = ready(plan::plan_dataset(&ds, &cfg()));
    assert_eq!(plan.command, "prepare");
    assert_eq!(plan.store_secret.as_deref(), Some("s3-creds"));
    let (job, objects) = built(&controller::owner(&ds), &plan, None);
    golden("dataset.yaml", &objects);
    let c = &job
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0];
    let resources = c.resources.clone().unwrap_or_default();
    assert!(
        resources
            .limits
            .is_none_or(|l| !l.contains_key("nvidia.com/gpu"))
    );
}

#[test]
fn references_wait_with_a_reason_or_fail_when_they_cannot_work() {
    let pj = pretrain_job();
    let cfg = cfg();
    let none = plan::plan_pretrain(&pj, &Inputs::default(), &cfg);
    assert!(
        matches!(none, Readiness::Waiting(ConditionReason::DatasetNotFound, ref m) if m.contains("owt2")),
        "{none:?}"
    );
    let not_ready = plan::plan_pretrain(
        &pj,
        &Inputs {
            dataset: Some(dataset(false)),
            base: None,
        },
        &cfg,
    );
    assert!(
        matches!(
            not_ready,
            Readiness::Waiting(ConditionReason::DatasetNotReady, _)
        ),
        "{not_ready:?}"
    );
    let mut instruction = dataset(true);
    instruction.spec.format = taper_crds::dataset::DatasetFormat::Instruction;
    let mismatch = plan::plan_pretrain(
        &pj,
        &Inputs {
            dataset: Some(instruction),
            base: None,
        },
        &cfg,
    );
    assert!(
        matches!(
            mismatch,
            Readiness::Invalid(ConditionReason::DatasetFormatMismatch, _)
        ),
        "{mismatch:?}"
    );
    let no_default = plan::plan_dataset(&dataset(false), &Config::defaults());
    assert!(
        matches!(no_default, Readiness::Invalid(ConditionReason::InvalidSpec, ref m) if m.contains("TAPER_DEFAULT_OUTPUT_URI")),
        "{no_default:?}"
    );
}

/// A FinetuneJob on a PretrainJob waits until the base has Succeeded, then runs on the
/// concrete checkpoint it chose: the job file names the checkpoint's folder URI (with the
/// base's store access) instead of the reference, as `taper finetune` reads it.
#[test]
fn a_finetune_job_runs_on_the_concrete_checkpoint_of_its_base() {
    let fj: taper_crds::FinetuneJob = serde_yaml::from_str(
        "apiVersion: taper.dev/v1alpha1\nkind: FinetuneJob\n\
         metadata: {name: chat, namespace: research, uid: 12121212-3434-5656-7878-909090909090}\n\
         spec:\n  baseModel: {pretrainJobRef: {name: gpt2, checkpoint: best}}\n  datasetRef: {name: owt2}\n",
    )
    .expect("finetune job");
    let mut instruction = dataset(true);
    instruction.spec.format = taper_crds::dataset::DatasetFormat::Instruction;
    let mut base = pretrain_job();
    let inputs = |base: &PretrainJob| Inputs {
        dataset: Some(instruction.clone()),
        base: Some(base.clone()),
    };
    let waiting = plan::plan_finetune(&fj, &inputs(&base), &cfg());
    assert!(
        matches!(
            waiting,
            Readiness::Waiting(ConditionReason::BaseModelNotReady, _)
        ),
        "{waiting:?}"
    );
    let best = "s3://ml-bucket/taper/research/pretrainjobs/gpt2/checkpoints/step-000004000";
    base.status = Some(taper_crds::JobStatus {
        phase: taper_crds::JobPhase::Succeeded,
        best_checkpoint: Some(best.into()),
        latest_checkpoint: Some(format!("{best}0")),
        ..Default::default()
    });
    let plan = ready(plan::plan_finetune(&fj, &inputs(&base), &cfg()));
    assert_eq!(plan.command, "finetune");
    let files: Vec<&str> = plan.objects.iter().map(|o| o.kind()).collect();
    assert_eq!(
        files,
        ["FinetuneJob", "Dataset"],
        "the base is resolved, not shipped"
    );
    let resolved = plan.objects[0].as_finetune_job().expect("finetune job");
    assert_eq!(resolved.spec.base_model.uri.as_deref(), Some(best));
    assert!(resolved.spec.base_model.pretrain_job_ref.is_none());
    // The base's checkpoints sit at the operator's default location: so does its access.
    assert_eq!(
        resolved
            .spec
            .base_model
            .access
            .as_ref()
            .and_then(|a| a.endpoint.as_deref()),
        Some("http://minio.storage:9000")
    );
    assert!(
        resolved.spec.output.location.is_some(),
        "the output defaults to the operator's bucket"
    );
}

/// A deleted job with `reclaimPolicy: Delete`: the cleanup Job is the trainer's pod (its
/// image, S3 Secret, ServiceAccount and job file) running `taper cleanup`, without GPUs.
#[test]
fn the_cleanup_job_runs_taper_cleanup_in_the_trainers_pod_without_gpus() {
    use taper_operator::controller::TaperKind;
    let mut pj = pretrain_job();
    pj.spec.run.reclaim_policy = taper_crds::job::ReclaimPolicy::Delete;
    let owner = controller::owner(&pj);
    let plan = pj.cleanup_plan(&cfg()).expect("a job has a cleanup plan");
    let job = build::job::cleanup_job(&owner, &plan, &cfg());
    golden("cleanup.yaml", &[serde_json::to_value(&job).expect("json")]);
    assert_eq!(job.metadata.name.as_deref(), Some("gpt2-cleanup"));
    let spec = job.spec.expect("spec");
    assert_eq!(spec.suspend, Some(false), "runs even for a queued job");
    let pod_spec = spec.template.spec.expect("pod spec");
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("gpt2-pretrain")
    );
    let c = &pod_spec.containers[0];
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        ["cleanup", "--job", "/etc/taper/job.yaml", "--name", "gpt2"]
    );
    assert!(c.resources.is_none(), "no GPU for deleting objects");
    assert!(
        c.env_from
            .as_ref()
            .is_some_and(|e| e[0].secret_ref.is_some()),
        "the job's S3 credentials"
    );
    let volumes = pod_spec.volumes.unwrap_or_default();
    assert!(
        volumes.iter().any(|v| v
            .config_map
            .as_ref()
            .is_some_and(|c| c.name == "gpt2-pretrain")),
        "the trainer's job file"
    );
}
