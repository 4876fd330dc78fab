//! The Helm chart without a cluster: `helm lint`, and `helm template` rendered with several
//! values and parsed into Kubernetes types. Checks the operator's configuration contract
//! (its environment), the restricted security context, the probes, least-privilege RBAC
//! (compared with a table written here, independently of the chart) and that
//! `values.schema.json` turns a typo or a wrong type into an error naming the field.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Output,
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Container, EnvVar, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::api::resource::Quantity,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "taper-system";
const RELEASE: &str = "taper";

use taper_e2e::minio::tool;

/// `helm ARGS…` with Helm's cache, configuration and data folders out of the user's home.
fn helm(args: &[&str]) -> Output {
    assert!(
        tool("helm").exists(),
        "helm is built by e2e/scripts/build-tools.sh"
    );
    taper_e2e::helm::command()
        .args(args)
        .output()
        .expect("helm runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The objects of `helm template` with `extra` arguments (`--set …`), by kind.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn new(extra: &[&str]) -> Self {
        tool("helm");
        let objects =
            taper_e2e::helm::template(RELEASE, NAMESPACE, extra).unwrap_or_else(|e| panic!("{e}"));
        Self { objects }
    }

    fn all<T: serde::de::DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(|o| {
                serde_json::from_value(o.clone())
                    .unwrap_or_else(|e| panic!("a rendered {kind} is not a valid {kind}: {e}"))
            })
            .collect()
    }

    fn one<T: serde::de::DeserializeOwned>(&self, kind: &str) -> T {
        let mut all = self.all::<T>(kind);
        assert_eq!(all.len(), 1, "expected exactly one {kind}");
        all.remove(0)
    }

    fn count(&self, kind: &str) -> usize {
        self.objects.iter().filter(|o| o["kind"] == kind).count()
    }

    fn deployment(&self) -> Deployment {
        self.one("Deployment")
    }
}

fn operator_container(d: &Deployment) -> Container {
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let mut containers = pod.containers;
    assert_eq!(containers.len(), 1, "one container");
    let c = containers.remove(0);
    assert_eq!(c.name, "operator");
    c
}

fn env(d: &Deployment) -> BTreeMap<String, EnvVar> {
    operator_container(d)
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect()
}

/// The literal value of `name` in the operator's environment.
fn env_value(d: &Deployment, name: &str) -> String {
    let env = env(d);
    let var = env
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not in the operator's environment"));
    assert!(var.value_from.is_none(), "{name} is a literal value");
    var.value.clone().unwrap_or_default()
}

type Triple = (String, String, String);

/// The operator's rules, written independently of the chart: (apiGroup, resource, verbs).
const EXPECTED_RULES: &[(&str, &str, &[&str])] = &[
    ("taper.dev", "datasets", &["get", "list", "watch", "patch"]),
    (
        "taper.dev",
        "pretrainjobs",
        &["get", "list", "watch", "patch"],
    ),
    (
        "taper.dev",
        "finetunejobs",
        &["get", "list", "watch", "patch"],
    ),
    ("taper.dev", "datasets/status", &["get", "patch"]),
    ("taper.dev", "pretrainjobs/status", &["get", "patch"]),
    ("taper.dev", "finetunejobs/status", &["get", "patch"]),
    ("taper.dev", "datasets/finalizers", &["update"]),
    ("taper.dev", "pretrainjobs/finalizers", &["update"]),
    ("taper.dev", "finetunejobs/finalizers", &["update"]),
    (
        "batch",
        "jobs",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "",
        "serviceaccounts",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("", "pods", &["get", "list", "watch"]),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    (
        "rbac.authorization.k8s.io",
        "roles",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "rbac.authorization.k8s.io",
        "rolebindings",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
];

fn expected_triples() -> BTreeSet<Triple> {
    EXPECTED_RULES
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |v| (group.to_string(), resource.to_string(), v.to_string()))
        })
        .collect()
}

/// Every (apiGroup, resource, verb) the rules grant. Rules limited by name or on
/// non-resource URLs are not expected in the operator's role at all.
fn triples(rules: &[PolicyRule]) -> BTreeSet<Triple> {
    let mut out = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.as_ref().is_none_or(Vec::is_empty),
            "unexpected resourceNames in {rule:?}"
        );
        assert!(
            rule.non_resource_urls.as_ref().is_none_or(Vec::is_empty),
            "unexpected nonResourceURLs in {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn assert_operator_rules(rules: &[PolicyRule], what: &str) {
    let got = triples(rules);
    let want = expected_triples();
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: rules differ from the operator's least-privilege table\n  granted but not expected: {extra:?}\n  expected but not granted: {missing:?}"
    );
    for (group, resource, verb) in &got {
        assert!(
            !resource.starts_with("secrets") && resource != "*" && verb != "*" && group != "*",
            "{what} grants {verb} on {group}/{resource}"
        );
        assert!(
            !["escalate", "bind", "impersonate"].contains(&verb.as_str()),
            "{what} grants {verb}"
        );
    }
}

#[test]
fn helm_lint_passes_plain_and_strict() {
    let chart = taper_e2e::helm::chart();
    let chart = chart.to_str().expect("UTF-8 path");
    for args in [vec!["lint", chart], vec!["lint", "--strict", chart]] {
        let out = helm(&args);
        assert!(out.status.success(), "helm {args:?} failed: {}", text(&out));
    }
}

#[test]
fn default_values_render_the_operator_deployment() {
    let r = Rendered::new(&[]);
    let d = r.deployment();
    let app_version = "0.1.0";

    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("taper-operator"),
        "the chart's ServiceAccount"
    );

    // The operator's configuration contract: every variable, with its default.
    let want_literals = [
        ("TAPER_WATCH_NAMESPACES", String::new()),
        (
            "TAPER_TRAINER_IMAGE",
            format!("ghcr.io/taper-dev/taper-trainer:{app_version}"),
        ),
        ("TAPER_GPU_RESOURCE_NAME", "nvidia.com/gpu".into()),
        ("TAPER_DEFAULT_OUTPUT_URI", String::new()),
        ("TAPER_S3_ENDPOINT", String::new()),
        ("TAPER_S3_REGION", String::new()),
        ("TAPER_S3_CREDENTIALS_SECRET", String::new()),
        ("TAPER_LEADER_ELECTION", "false".into()),
        ("TAPER_LEASE_NAME", "taper-operator".into()),
        ("TAPER_METRICS_ADDR", "0.0.0.0:8080".into()),
        ("TAPER_HEALTH_ADDR", "0.0.0.0:8081".into()),
        ("TAPER_RECONCILE_CONCURRENCY", "16".into()),
        ("TAPER_TRAINER_GRACE_SECONDS", "300".into()),
        ("TAPER_TRAINER_SCRAPE_ANNOTATIONS", "false".into()),
        ("RUST_LOG", "info".into()),
    ];
    for (name, value) in &want_literals {
        assert_eq!(&env_value(&d, name), value, "{name}");
    }
    let env = env(&d);
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        let path = env
            .get(name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(path, Some(field), "{name} from the downward API");
    }
    assert_eq!(
        env.len(),
        want_literals.len() + 2,
        "no variable beyond the contract: {:?}",
        env.keys()
    );

    let c = operator_container(&d);
    assert_eq!(
        c.image.as_deref(),
        Some(format!("ghcr.io/taper-dev/taper-operator:{app_version}").as_str())
    );
    assert!(c.args.is_none() && c.command.is_none(), "configured by env");

    // Ports and probes.
    let ports: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("metrics".into(), 8080), ("health".into(), 8081)])
    );
    for (probe, path) in [
        (c.liveness_probe.as_ref(), "/healthz"),
        (c.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).expect("port"),
            Value::from("health")
        );
    }

    // Resources: small defaults, both requests and limits.
    let res = c.resources.as_ref().expect("resources");
    let q = |m: &Option<BTreeMap<String, Quantity>>, k: &str| {
        m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone())
    };
    assert_eq!(q(&res.requests, "cpu").as_deref(), Some("50m"));
    assert_eq!(q(&res.requests, "memory").as_deref(), Some("64Mi"));
    assert_eq!(q(&res.limits, "cpu").as_deref(), Some("500m"));
    assert_eq!(q(&res.limits, "memory").as_deref(), Some("256Mi"));

    // The restricted Pod Security Standard, on the container (and the pod).
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65532));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert!(sc.privileged.is_none_or(|p| !p));
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );

    // The ServiceAccount and the metrics Service in front of the operator's pods.
    let sa: ServiceAccount = r.one("ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some("taper-operator"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
    let svc: Service = r.one("Service");
    let svc_spec = svc.spec.as_ref().expect("service spec");
    assert_eq!(svc_spec.type_.as_deref(), Some("ClusterIP"));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone());
    let pod_labels = pod_labels.expect("pod labels");
    let selector = svc_spec.selector.clone().expect("service selector");
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service selects the operator's pods: {selector:?} vs {pod_labels:?}"
    );
    assert_eq!(
        Some(&selector),
        spec.selector.match_labels.as_ref(),
        "same selector as the Deployment"
    );
    let svc_ports = svc_spec.ports.clone().unwrap_or_default();
    assert_eq!(svc_ports.len(), 1);
    assert_eq!(svc_ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(svc_ports[0].port, 8080);

    for label in [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
        "helm.sh/chart",
    ] {
        for o in &r.objects {
            assert!(
                o["metadata"]["labels"][label].is_string(),
                "{} {} lacks the label {label}",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn default_values_grant_exactly_the_operators_rules_cluster_wide() {
    let r = Rendered::new(&[]);
    let cr: ClusterRole = r.one("ClusterRole");
    assert_operator_rules(cr.rules.as_deref().unwrap_or_default(), "the ClusterRole");
    assert!(cr.aggregation_rule.is_none());

    let crb: ClusterRoleBinding = r.one("ClusterRoleBinding");
    assert_eq!(crb.role_ref.kind, "ClusterRole");
    assert_eq!(crb.role_ref.name, cr.metadata.name.clone().expect("name"));
    let subjects = crb.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "taper-operator");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));

    // Only the leader-election Role besides it, on Leases only, in the release namespace.
    let roles: Vec<Role> = r.all("Role");
    assert_eq!(roles.len(), 1, "only the leader-election Role");
    let lease_role = &roles[0];
    assert_eq!(lease_role.metadata.namespace.as_deref(), Some(NAMESPACE));
    let lease_rules = lease_role.rules.clone().unwrap_or_default();
    let mut lease_verbs = BTreeSet::new();
    for rule in &lease_rules {
        assert_eq!(rule.api_groups, Some(vec!["coordination.k8s.io".into()]));
        assert_eq!(rule.resources, Some(vec!["leases".into()]));
        if let Some(names) = &rule.resource_names {
            assert_eq!(
                names,
                &["taper-operator".to_string()],
                "the configured Lease"
            );
        }
        lease_verbs.extend(rule.verbs.iter().cloned());
    }
    assert_eq!(
        lease_verbs,
        BTreeSet::from(["create", "get", "patch", "update"].map(String::from)),
    );
    let rbs: Vec<RoleBinding> = r.all("RoleBinding");
    assert_eq!(rbs.len(), 1);
    assert_eq!(
        rbs[0].role_ref.name,
        lease_role.metadata.name.clone().expect("name")
    );
    assert_eq!(rbs[0].metadata.namespace.as_deref(), Some(NAMESPACE));

    // Nothing anywhere on Secrets.
    for o in &r.objects {
        for rule in o["rules"].as_array().into_iter().flatten() {
            assert!(
                !rule["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|res| res.as_str().is_some_and(|s| s.starts_with("secrets"))),
                "{} {} grants access to Secrets: {rule}",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn leader_election_follows_replicas_unless_set() {
    for (args, want) in [
        (&["--set", "replicas=2"][..], "true"),
        (&["--set", "leaderElection.enabled=true"][..], "true"),
        (
            &[
                "--set",
                "replicas=3",
                "--set",
                "leaderElection.enabled=false",
            ][..],
            "false",
        ),
        (&["--set", "replicas=1"][..], "false"),
    ] {
        let d = Rendered::new(args).deployment();
        assert_eq!(env_value(&d, "TAPER_LEADER_ELECTION"), want, "{args:?}");
    }
    let d = Rendered::new(&["--set", "replicas=2"]).deployment();
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(2));
}

#[test]
fn listed_namespaces_get_a_role_each_and_no_cluster_role() {
    let r = Rendered::new(&["--set-json", r#"watchNamespaces=["a","b"]"#]);
    assert_eq!(r.count("ClusterRole"), 0, "no ClusterRole");
    assert_eq!(r.count("ClusterRoleBinding"), 0, "no ClusterRoleBinding");
    assert_eq!(env_value(&r.deployment(), "TAPER_WATCH_NAMESPACES"), "a,b");

    let roles: Vec<Role> = r.all("Role");
    let bindings: Vec<RoleBinding> = r.all("RoleBinding");
    for ns in ["a", "b"] {
        let in_ns: Vec<&Role> = roles
            .iter()
            .filter(|ro| ro.metadata.namespace.as_deref() == Some(ns))
            .collect();
        assert_eq!(in_ns.len(), 1, "one Role in {ns}");
        let role = in_ns[0];
        assert_operator_rules(
            role.rules.as_deref().unwrap_or_default(),
            &format!("the Role in {ns}"),
        );
        let rb: Vec<&RoleBinding> = bindings
            .iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(ns))
            .collect();
        assert_eq!(rb.len(), 1, "one RoleBinding in {ns}");
        assert_eq!(rb[0].role_ref.kind, "Role");
        assert_eq!(
            rb[0].role_ref.name,
            role.metadata.name.clone().expect("name")
        );
        let subjects = rb[0].subjects.clone().unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].name, "taper-operator");
        assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    }
    // Besides those, only the leader-election Role and its binding in the release namespace.
    assert_eq!(roles.len(), 3);
    assert_eq!(bindings.len(), 3);
    assert!(
        roles
            .iter()
            .any(|ro| ro.metadata.namespace.as_deref() == Some(NAMESPACE))
    );
}

#[test]
fn values_reach_the_operators_environment() {
    let d = Rendered::new(&[
        "--set",
        "trainerImage.repository=registry.example/taper-trainer,trainerImage.tag=v9",
        "--set",
        "image.tag=v8",
        "--set",
        "gpuResourceName=amd.com/gpu",
        "--set",
        "storage.defaultOutputUri=s3://my-bucket/taper,storage.endpoint=http://minio:9000",
        "--set",
        "storage.region=eu-west-1,storage.credentialsSecret=taper-s3",
        "--set",
        "leaderElection.leaseName=other-lease,metrics.port=9090,health.port=9091",
        "--set",
        "reconcileConcurrency=3,trainer.terminationGracePeriodSeconds=600,logLevel=debug",
    ])
    .deployment();
    for (name, value) in [
        ("TAPER_TRAINER_IMAGE", "registry.example/taper-trainer:v9"),
        ("TAPER_GPU_RESOURCE_NAME", "amd.com/gpu"),
        ("TAPER_DEFAULT_OUTPUT_URI", "s3://my-bucket/taper"),
        ("TAPER_S3_ENDPOINT", "http://minio:9000"),
        ("TAPER_S3_REGION", "eu-west-1"),
        ("TAPER_S3_CREDENTIALS_SECRET", "taper-s3"),
        ("TAPER_LEASE_NAME", "other-lease"),
        ("TAPER_METRICS_ADDR", "0.0.0.0:9090"),
        ("TAPER_HEALTH_ADDR", "0.0.0.0:9091"),
        ("TAPER_RECONCILE_CONCURRENCY", "3"),
        ("TAPER_TRAINER_GRACE_SECONDS", "600"),
        ("RUST_LOG", "debug"),
    ] {
        assert_eq!(env_value(&d, name), value, "{name}");
    }
    assert_eq!(
        operator_container(&d).image.as_deref(),
        Some("ghcr.io/taper-dev/taper-operator:v8")
    );
}

#[test]
fn schema_rejects_typos_and_wrong_types_naming_the_field() {
    let chart = taper_e2e::helm::chart();
    let chart = chart.to_str().expect("UTF-8 path");
    for (set, field) in [
        (["--set", "replica=2"], "replica"),
        (["--set", "metrics.port=notanumber"], "/metrics/port"),
        (["--set", "gpuResourceName=5"], "/gpuResourceName"),
        (["--set", "storage.bucket=x"], "bucket"),
        (
            ["--set", "leaderElection.enabled=maybe"],
            "/leaderElection/enabled",
        ),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    ] {
        for cmd in ["template", "lint"] {
            let mut args = vec![cmd];
            if cmd == "template" {
                args.push(RELEASE);
            }
            args.push(chart);
            args.extend(set);
            let out = helm(&args);
            let msg = text(&out);
            assert!(
                !out.status.success(),
                "helm {args:?} accepted a bad value:\n{msg}"
            );
            assert!(
                msg.contains(field) && msg.contains("schema"),
                "helm {args:?} failed without naming {field}:\n{msg}"
            );
        }
    }
}

/// Every monitoring part on, as a platform team with kube-prometheus-stack would set it.
const MONITORING_ON: &[&str] = &[
    "--set",
    "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true,monitoring.dashboards.enabled=true",
    "--set",
    "monitoring.annotations.enabled=true,monitoring.scrapeConfig.enabled=true",
    "--set-string",
    "monitoring.serviceMonitor.labels.release=kps,monitoring.podMonitor.labels.release=kps",
];

const MONITORING_KINDS: [&str; 3] = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];

#[test]
fn lint_and_template_pass_on_every_value_set() {
    let chart = taper_e2e::helm::chart();
    let chart = chart.to_str().expect("UTF-8 path");
    let sets: Vec<(&str, Vec<&str>)> = vec![
        ("defaults", vec![]),
        ("monitoring on", MONITORING_ON.to_vec()),
        (
            "monitoring on, namespace-scoped",
            [
                MONITORING_ON,
                &["--set-json", r#"watchNamespaces=["a","b"]"#],
            ]
            .concat(),
        ),
        (
            "monitoring on, cluster-scoped, 2 replicas",
            [MONITORING_ON, &["--set", "replicas=2"]].concat(),
        ),
        ("2 replicas", vec!["--set", "replicas=2"]),
    ];
    for (what, set) in &sets {
        for cmd in ["lint", "template"] {
            let mut args = vec![cmd];
            if cmd == "template" {
                args.push(RELEASE);
            } else {
                args.push("--strict");
            }
            args.push(chart);
            args.extend(set.iter().copied());
            let out = helm(&args);
            assert!(
                out.status.success(),
                "{what}: helm {args:?}: {}",
                text(&out)
            );
        }
    }
}

#[test]
fn monitoring_is_off_by_default_and_each_part_follows_its_flag() {
    let off = Rendered::new(&[]);
    for kind in MONITORING_KINDS {
        assert_eq!(off.count(kind), 0, "no {kind} by default");
    }
    assert_eq!(off.count("ConfigMap"), 0, "no dashboards by default");
    let d = off.deployment();
    let annotations = d
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert!(annotations.is_empty(), "{annotations:?}");
    for (flag, kind) in [
        ("monitoring.serviceMonitor.enabled=true", "ServiceMonitor"),
        ("monitoring.podMonitor.enabled=true", "PodMonitor"),
        ("monitoring.prometheusRule.enabled=true", "PrometheusRule"),
    ] {
        let r = Rendered::new(&["--set", flag]);
        for other in MONITORING_KINDS {
            assert_eq!(
                r.count(other),
                usize::from(other == kind),
                "{flag}: {other}"
            );
        }
    }
}

#[test]
fn monitors_select_the_operator_service_and_the_trainer_pods() {
    let r = Rendered::new(MONITORING_ON);
    let sm = r
        .objects
        .iter()
        .find(|o| o["kind"] == "ServiceMonitor")
        .expect("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        sm["metadata"]["labels"]["release"], "kps",
        "configurable labels"
    );
    let svc: Service = r.one("Service");
    let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
    let selector: BTreeMap<String, String> =
        serde_json::from_value(sm["spec"]["selector"]["matchLabels"].clone()).expect("selector");
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| svc_labels.get(k) == Some(v)),
        "the ServiceMonitor selects the metrics Service: {selector:?} vs {svc_labels:?}"
    );
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!([NAMESPACE])
    );
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["honorLabels"], true);

    let pm = r
        .objects
        .iter()
        .find(|o| o["kind"] == "PodMonitor")
        .expect("PodMonitor");
    assert_eq!(pm["metadata"]["labels"]["release"], "kps");
    // The labels the operator puts on every trainer pod (operator/src/build/mod.rs) and
    // its metrics port's name (crds/src/pod.rs), written here independently.
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/managed-by": "taper-operator"})
    );
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], taper_crds::pod::METRICS_PORT_NAME);
    assert_eq!(endpoint["path"], taper_crds::pod::METRICS_PATH);
    assert_eq!(endpoint["honorLabels"], true);

    // Namespace-scoped: trainer pods in the watched namespaces only.
    let scoped = Rendered::new(&[
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set-json",
        r#"watchNamespaces=["a","b"]"#,
    ]);
    let pm = scoped
        .objects
        .iter()
        .find(|o| o["kind"] == "PodMonitor")
        .expect("PodMonitor");
    assert_eq!(
        pm["spec"]["namespaceSelector"],
        json!({"matchNames": ["a", "b"]})
    );

    // The annotations alternative on the operator's pods.
    let annotations = r
        .deployment()
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("8080")
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    // … and on the trainer pods, which the operator annotates when told to.
    assert_eq!(
        env_value(&r.deployment(), "TAPER_TRAINER_SCRAPE_ANNOTATIONS"),
        "true"
    );
}

#[test]
fn dashboards_are_configmaps_with_the_sidecar_label_and_a_datasource_variable() {
    let r = Rendered::new(&[
        "--set",
        "monitoring.dashboards.enabled=true,monitoring.dashboards.label=my_dashboards",
        "--set-string",
        "monitoring.dashboards.labelValue=yes,monitoring.dashboards.annotations.grafana_folder=Taper",
    ]);
    let maps: Vec<&Value> = r
        .objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .collect();
    let mut titles = BTreeSet::new();
    for cm in &maps {
        assert_eq!(
            cm["metadata"]["labels"]["my_dashboards"], "yes",
            "{}",
            cm["metadata"]
        );
        assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Taper");
        let data = cm["data"].as_object().expect("data");
        assert_eq!(data.len(), 1, "one dashboard per ConfigMap");
        let (key, json) = data.iter().next().expect("one key");
        assert!(key.ends_with(".json"), "{key}");
        let dash: Value = serde_json::from_str(json.as_str().expect("text")).expect("JSON");
        let vars = dash["templating"]["list"].as_array().expect("variables");
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{key}: a datasource variable"
        );
        for p in dash["panels"].as_array().expect("panels") {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{key}: {}",
                p["title"]
            );
            assert!(!p["targets"].as_array().expect("targets").is_empty());
        }
        titles.insert(dash["title"].as_str().expect("title").to_string());
    }
    assert_eq!(
        titles,
        BTreeSet::from([
            "Taper / Training".to_string(),
            "Taper / Operator".to_string()
        ])
    );
    let default_label = Rendered::new(&["--set", "monitoring.dashboards.enabled=true"]);
    for o in default_label
        .objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
    {
        assert_eq!(o["metadata"]["labels"]["grafana_dashboard"], "1");
    }
}

#[test]
fn schema_rejects_wrong_monitoring_values_naming_the_field() {
    let chart = taper_e2e::helm::chart();
    let chart = chart.to_str().expect("UTF-8 path");
    for (set, field) in [
        (
            ["--set", "monitoring.serviceMonitor.enabled=yes"],
            "/monitoring/serviceMonitor/enabled",
        ),
        (
            ["--set", "monitoring.prometheusRule.stalledMinutes=soon"],
            "/monitoring/prometheusRule/stalledMinutes",
        ),
        (
            ["--set", "monitoring.prometheusRule.throughputDropRatio=2"],
            "/monitoring/prometheusRule/throughputDropRatio",
        ),
        (
            ["--set", "monitoring.podMonitor.interval=often"],
            "/monitoring/podMonitor/interval",
        ),
        (["--set", "monitoring.dashboard.enabled=true"], "dashboard"),
    ] {
        let mut args = vec!["template", RELEASE, chart];
        args.extend(set);
        let out = helm(&args);
        let msg = text(&out);
        assert!(
            !out.status.success(),
            "helm {args:?} accepted a bad value:\n{msg}"
        );
        assert!(
            msg.contains(field) && msg.contains("schema"),
            "helm {args:?} failed without naming {field}:\n{msg}"
        );
    }
}
