//! The chart's monitoring against the suite's real Prometheus, during the operator's run
//! (`operator::operator_checks`): Prometheus runs with the scrape configuration the chart
//! renders (`monitoring.scrapeConfig`): the operator's trainer pods, listed from the API
//! server as Kubernetes service discovery (role pod) would list them, are kept and
//! labelled by the chart's relabelling (labels, port name `metrics`, phase, honor_labels),
//! and scraped for real; after the run, every panel query of the
//! rendered dashboards and every selector of every rendered alert expression returns data
//! over the run, and every alert expression evaluates.
//!
//! What cannot return data here, and why:
//! - the DCGM panels (GPU utilisation and memory): no dcgm-exporter without GPUs; they are
//!   checked to be valid queries that return nothing;
//! - Debian's Prometheus is built without Kubernetes service discovery: the test plays it
//!   (see [`start`]) and Prometheus reads the targets from files (file_sd);
//! - the operator is a process on the host, not a pod: it is listed with the labels the
//!   rendered Deployment gives its pods.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use taper_e2e::prometheus::Prometheus;

use crate::support::{kubectl, kubectl_json};

/// Prometheus, started before the operator's checks.
pub(crate) struct Monitoring {
    prometheus: Prometheus,
    started: f64,
    rendered: Vec<Value>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    work: PathBuf,
    admin: PathBuf,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The suite's monitoring values: every part on, a 1 s scrape interval. The operator's
/// scenarios `helm install` the chart with them (and their own storage values), so what
/// Prometheus runs with here is what the release holds; [`Monitoring::check`] compares.
pub(crate) const VALUES: &str = "monitoring.scrapeConfig.enabled=true,monitoring.scrapeConfig.interval=1s,\
     monitoring.prometheusRule.enabled=true,monitoring.dashboards.enabled=true,\
     monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,\
     monitoring.annotations.enabled=true";

/// The chart rendered with [`VALUES`].
fn render() -> Vec<Value> {
    taper_e2e::helm::template("taper", "taper-system", &["--set", VALUES])
        .unwrap_or_else(|e| panic!("{e}"))
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The operators' metrics addresses, from their logs (`metrics_addr=…`) in `work`.
fn operator_targets(work: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pod) = name.strip_suffix(".log") else {
            continue;
        };
        if !pod.starts_with("operator-") {
            continue;
        }
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(addr) = log
            .split("metrics_addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        {
            out.push((pod.to_string(), addr.to_string()));
        }
    }
    out
}

/// What Prometheus' Kubernetes discovery (role pod) makes of `pod`: one target per
/// container port, with the `__meta_kubernetes_*` labels the chart's relabelling reads.
fn pod_targets(pod: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
    if ip.is_empty() {
        return out;
    }
    let mut base = BTreeMap::from([
        (
            "__meta_kubernetes_namespace".to_string(),
            pod["metadata"]["namespace"].clone(),
        ),
        (
            "__meta_kubernetes_pod_name".to_string(),
            pod["metadata"]["name"].clone(),
        ),
        (
            "__meta_kubernetes_pod_phase".to_string(),
            pod["status"]["phase"].clone(),
        ),
    ]);
    for (k, v) in pod["metadata"]["labels"].as_object().into_iter().flatten() {
        base.insert(
            format!("__meta_kubernetes_pod_label_{}", sanitize(k)),
            v.clone(),
        );
        base.insert(
            format!("__meta_kubernetes_pod_labelpresent_{}", sanitize(k)),
            json!("true"),
        );
    }
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        for port in c["ports"].as_array().into_iter().flatten() {
            let mut labels = base.clone();
            labels.insert(
                "__meta_kubernetes_pod_container_name".into(),
                c["name"].clone(),
            );
            labels.insert(
                "__meta_kubernetes_pod_container_port_name".into(),
                port["name"].clone(),
            );
            labels.insert(
                "__meta_kubernetes_pod_container_port_number".into(),
                json!(port["containerPort"].to_string()),
            );
            out.push(
                json!({"targets": [format!("{ip}:{}", port["containerPort"])], "labels": labels}),
            );
        }
    }
    out
}

/// Start Prometheus with the chart's scrape configuration. Debian's Prometheus is built
/// without Kubernetes service discovery, so a thread plays it: it lists the pods through
/// the API server (`admin` kubeconfig) every second and writes, per scrape job, the targets
/// that discovery would give (in the job's `namespaces`) to a file the job reads instead
/// (file_sd); the operators, host processes logging to `work`, are added as the pods of the
/// rendered Deployment would be. The chart's relabelling then keeps and labels them.
pub(crate) fn start(admin: &Path, work: &Path) -> Monitoring {
    let rendered = render();
    let scrape = rendered
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["scrape-configs.yaml"].is_string())
        .expect("the scrape configuration ConfigMap");
    let mut jobs: Vec<Value> =
        serde_yaml::from_str(scrape["data"]["scrape-configs.yaml"].as_str().unwrap_or(""))
            .expect("scrape configs parse");
    assert_eq!(jobs.len(), 2, "operator and trainer jobs: {jobs:?}");
    let pod_labels = rendered
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .map(|d| d["spec"]["template"]["metadata"]["labels"].clone())
        .expect("the Deployment's pod labels");
    // (file, namespaces or None for all) per job.
    let mut files: Vec<(PathBuf, Option<Vec<String>>)> = Vec::new();
    for job in &mut jobs {
        let sd = job["kubernetes_sd_configs"].clone();
        let sd = sd.as_array().expect("Kubernetes service discovery");
        assert_eq!(sd.len(), 1, "{job}");
        assert_eq!(sd[0]["role"], "pod", "{job}");
        let namespaces: Option<Vec<String>> =
            serde_json::from_value(sd[0]["namespaces"]["names"].clone()).ok();
        let file = work.join(format!(
            "sd-{}.json",
            job["job_name"].as_str().unwrap_or("job")
        ));
        std::fs::write(&file, "[]").expect("targets file");
        let obj = job.as_object_mut().expect("job");
        obj.remove("kubernetes_sd_configs");
        obj.insert(
            "file_sd_configs".into(),
            json!([{"files": [&file], "refresh_interval": "1s"}]),
        );
        files.push((file, namespaces));
    }
    let prometheus = Prometheus::start_with(Value::Array(jobs))
        .expect("prometheus starts with the chart's config");
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, dir, admin_kc) = (stop.clone(), work.to_path_buf(), admin.to_path_buf());
    let watcher = std::thread::spawn(move || {
        let mut last: BTreeMap<PathBuf, String> = BTreeMap::new();
        while !flag.load(Ordering::Relaxed) {
            let out = kubectl(&admin_kc, &["get", "pods", "-A", "-o", "json"], None);
            let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let mut pods: Vec<Value> = listed["items"].as_array().cloned().unwrap_or_default();
            for (name, addr) in operator_targets(&dir) {
                let (ip, port) = addr.rsplit_once(':').unwrap_or((&addr, "0"));
                pods.push(json!({
                    "metadata": {"namespace": "taper-system", "name": name, "labels": pod_labels},
                    "status": {"podIP": ip, "phase": "Running"},
                    "spec": {"containers": [{"name": "operator", "ports": [
                        {"name": "metrics", "containerPort": port.parse::<u16>().unwrap_or(0)}]}]},
                }));
            }
            for (file, namespaces) in &files {
                let groups: Vec<Value> = pods
                    .iter()
                    .filter(|p| {
                        namespaces.as_ref().is_none_or(|ns| {
                            ns.iter()
                                .any(|n| p["metadata"]["namespace"].as_str() == Some(n))
                        })
                    })
                    .flat_map(pod_targets)
                    .collect();
                let text = Value::Array(groups).to_string();
                if last.get(file) != Some(&text) {
                    let tmp = file.with_extension("tmp");
                    if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, file).is_ok() {
                        last.insert(file.clone(), text);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    Monitoring {
        prometheus,
        started: now(),
        rendered,
        stop,
        watcher: Some(watcher),
        work: work.to_path_buf(),
        admin: admin.to_path_buf(),
    }
}

/// The series of a range query's answer.
fn series(answer: &Value) -> Vec<Value> {
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Grafana's variables, as a person would pick them after the run.
fn substitute(expr: &str, job: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$namespace", "ml")
        .replace("$operator_job", "taper-operator-metrics")
        .replace("$job", job)
}

/// The selectors of an alert expression: each `taper_…` or `up` metric with its matchers.
fn selectors(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(taper_[a-z_]+|up)(\{[^}]*\})?").expect("regex");
    let mut out: Vec<String> = re.find_iter(expr).map(|m| m.as_str().to_string()).collect();
    out.sort();
    out.dedup();
    out
}

impl Monitoring {
    fn range(&self, promql: &str, end: f64) -> Result<Vec<Value>, String> {
        self.prometheus
            .query_range(promql, self.started, end, 1.0)
            .map(|a| series(&a))
    }

    /// After the operator's checks: every panel and every alert against the data.
    pub(crate) fn check(mut self) {
        let end = now();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let up = self
            .range(r#"up{job="taper-operator-metrics"} == 1"#, end)
            .expect("up");
        assert!(
            !up.is_empty(),
            "Prometheus scraped the operator through the chart's config"
        );
        let trainers = self
            .range(r#"up{job="taper-trainer"} == 1"#, end)
            .expect("up");
        let pods: Vec<&str> = trainers
            .iter()
            .filter_map(|s| s["metric"]["pod"].as_str())
            .collect();
        println!("  trainer pods scraped through Kubernetes discovery: {pods:?}");
        assert!(
            pods.iter().any(|p| p.starts_with("gpt-pretrain-")),
            "the gpt trainer pod was discovered and scraped: {trainers:?}"
        );

        // Every panel query of every rendered dashboard.
        let mut empty = Vec::new();
        let mut checked = 0;
        for cm in self.rendered.iter().filter(|o| o["kind"] == "ConfigMap") {
            let Some((_, text)) = cm["data"].as_object().and_then(|d| d.iter().next()) else {
                continue;
            };
            let Ok(dash) = serde_json::from_str::<Value>(text.as_str().unwrap_or("")) else {
                continue;
            };
            let mut queries: Vec<(String, String)> = Vec::new();
            for v in dash["templating"]["list"].as_array().into_iter().flatten() {
                if let Some(def) = v["definition"].as_str()
                    && let Some(sel) = def
                        .strip_prefix("label_values(")
                        .and_then(|r| r.rsplit_once(','))
                        .map(|(s, _)| s.to_string())
                {
                    queries.push((format!("variable {}", v["name"]), sel));
                }
            }
            for p in dash["panels"].as_array().into_iter().flatten() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    queries.push((
                        format!("{} / {}", dash["title"], p["title"]),
                        t["expr"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            for (what, expr) in queries {
                checked += 1;
                // The job whose run shows it: gpt (20 steps, evaluations, checkpoints), or
                // long (many steps and checkpoints, no evaluation).
                let mut found = None;
                for job in ["gpt", "long", "queued"] {
                    let q = substitute(&expr, job);
                    let got = self
                        .range(&q, end)
                        .unwrap_or_else(|e| panic!("{what}: {q}: {e}"));
                    if !got.is_empty() {
                        found = Some(job);
                        break;
                    }
                }
                if expr.contains("DCGM_") {
                    assert!(found.is_none(), "{what}: DCGM data without dcgm-exporter?");
                    empty.push(what);
                } else {
                    assert!(found.is_some(), "{what} returned no data: {expr}");
                }
            }
        }
        println!(
            "  {checked} dashboard queries ran; without data (no dcgm-exporter here): {empty:?}"
        );
        assert_eq!(empty.len(), 2, "only the two DCGM panels are empty");

        // Every alert: the expression evaluates, and each selector in it has data.
        let rule = self
            .rendered
            .iter()
            .find(|o| o["kind"] == "PrometheusRule")
            .expect("PrometheusRule");
        let mut firing = Vec::new();
        for group in rule["spec"]["groups"].as_array().into_iter().flatten() {
            for r in group["rules"].as_array().into_iter().flatten() {
                let name = r["alert"].as_str().unwrap_or_default();
                let expr = r["expr"].as_str().unwrap_or_default();
                let got = self
                    .range(expr, end)
                    .unwrap_or_else(|e| panic!("{name}: {expr}: {e}"));
                if !got.is_empty() {
                    firing.push((name.to_string(), got));
                }
                for sel in selectors(expr) {
                    let data = self
                        .range(&format!("group({sel})"), end)
                        .unwrap_or_else(|e| panic!("{name}: {sel}: {e}"));
                    assert!(!data.is_empty(), "{name}: {sel} has no data in Prometheus");
                }
            }
        }
        let names: Vec<&str> = firing.iter().map(|(n, _)| n.as_str()).collect();
        println!("  alert expressions true at some point of the run: {names:?}");
        // The Dataset `broken` failed for real: TaperJobFailed's expression finds it.
        let failed = firing
            .iter()
            .find(|(n, _)| n == "TaperJobFailed")
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        assert!(
            failed
                .iter()
                .any(|s| s["metric"]["kind"] == "Dataset" && s["metric"]["name"] == "broken"),
            "TaperJobFailed finds the failed Dataset ml/broken: {failed:?}"
        );
        // Not TaperOperatorDown: the suite kills the leader on purpose (failover) and stops
        // the operators before this check, so its expression is true for moments of the
        // run by design (its `for: 5m` is what keeps it from firing; promtool's unit tests
        // cover it firing and not).
        for quiet in ["TaperLossNotFinite", "TaperCheckpointFailing"] {
            assert!(!names.contains(&quiet), "{quiet} on a healthy run");
        }
        self.preview(end);
        self.installed_is_rendered();
        drop(self.prometheus);
    }

    /// The release `helm install` created holds the rules and dashboards proven above,
    /// and monitors the API server accepted against prometheus-operator's own CRDs.
    fn installed_is_rendered(&self) {
        let get = |kind: &str| -> Vec<Value> {
            let list = kubectl_json(
                &self.admin,
                &["get", kind, "-n", "taper-system", "-o", "json"],
            )
            .unwrap_or_else(|| panic!("kubectl get {kind} -n taper-system"));
            list["items"].as_array().cloned().unwrap_or_default()
        };
        let rendered = |kind: &str| -> Vec<&Value> {
            self.rendered.iter().filter(|o| o["kind"] == kind).collect()
        };
        for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
            let installed = get(&kind.to_lowercase());
            let want = rendered(kind);
            assert_eq!(installed.len(), want.len(), "{kind}: {installed:?}");
            for w in want {
                let name = &w["metadata"]["name"];
                let got = installed
                    .iter()
                    .find(|o| &o["metadata"]["name"] == name)
                    .unwrap_or_else(|| panic!("{kind} {name} installed"));
                assert_eq!(
                    got["spec"], w["spec"],
                    "{kind} {name}: installed = rendered"
                );
            }
        }
        let config_maps = get("configmaps");
        let mut compared = 0;
        for w in rendered("ConfigMap") {
            let name = &w["metadata"]["name"];
            let got = config_maps
                .iter()
                .find(|o| &o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("ConfigMap {name} installed"));
            assert_eq!(
                got["data"], w["data"],
                "ConfigMap {name}: installed = rendered"
            );
            compared += 1;
        }
        // Two dashboards and the scrape configuration.
        assert_eq!(compared, 3, "{:?}", rendered("ConfigMap"));
        println!(
            "  helm install holds the ServiceMonitor, PodMonitor, PrometheusRule, dashboards and \
             scrape configuration proven here"
        );
    }

    /// `taper dashboards render` draws every panel from this Prometheus: each panel that
    /// needs only Taper shows data for the gpt job, the DCGM ones say why they cannot.
    /// With `$TAPER_DASHBOARD_PREVIEW` set, the PNGs are copied there (the README's picture
    /// comes from this run).
    fn preview(&self, end: f64) {
        // The Training dashboard over the gpt job's life (a few seconds of a run of some
        // minutes), the Operator dashboard over the whole run.
        let steps = self
            .range(r#"taper_train_step{namespace="ml", name="gpt"}"#, end)
            .expect("gpt's steps");
        let times: Vec<f64> = steps
            .iter()
            .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v[0].as_f64())
            .collect();
        let first = times.iter().copied().fold(f64::INFINITY, f64::min);
        let last = times.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(first.is_finite(), "gpt's steps were scraped");
        let mut rendered = self.render("training", first - 3.0, last + 3.0);
        rendered.extend(self.render("operator", self.started, end));
        for d in &rendered {
            let png = PathBuf::from(d["png"].as_str().unwrap_or_default());
            assert!(is_png(&png), "{}", png.display());
            for p in d["panels"].as_array().into_iter().flatten() {
                let file = PathBuf::from(p["png"].as_str().unwrap_or_default());
                assert!(is_png(&file), "{}", file.display());
                let series = p["series"].as_u64().unwrap_or(0);
                if p["needs"] == "dcgm" {
                    assert_eq!(series, 0, "{p}");
                } else {
                    assert!(
                        series > 0,
                        "{} / {} drew no data",
                        d["dashboard"],
                        p["title"]
                    );
                }
            }
        }
        if let Some(dir) = std::env::var_os("TAPER_DASHBOARD_PREVIEW") {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).expect("preview folder");
            for d in &rendered {
                let png = PathBuf::from(d["png"].as_str().unwrap_or_default());
                let name = png.file_name().expect("file name");
                std::fs::copy(&png, dir.join(name)).expect("copy preview");
            }
        }
    }

    /// `taper dashboards render` of one dashboard over `start..end`: its JSON summary.
    fn render(&self, dashboard: &str, start: f64, end: f64) -> Vec<Value> {
        let output = std::process::Command::new(taper_e2e::taper_bin())
            .args(["dashboards", "render", "--dashboard", dashboard])
            .args(["--prometheus", &self.prometheus.url()])
            .args(["--var", "namespace=ml", "--var", "job=gpt"])
            .args(["--var", "operator_job=taper-operator-metrics"])
            .args([
                "--start",
                &format!("{start:.0}"),
                "--end",
                &format!("{end:.0}"),
            ])
            .args(["--scrape-interval", "1s"])
            .arg("--out")
            .arg(self.work.join("preview"))
            .output()
            .expect("taper dashboards render runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "render failed: {stderr}");
        println!("  dashboards render:\n{stderr}");
        let rendered: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON summary per dashboard"))
            .collect();
        assert_eq!(rendered.len(), 1, "{dashboard}");
        rendered
    }
}

/// A PNG file: its signature and more than a header's worth of bytes.
fn is_png(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
        .unwrap_or(false)
}
