//! The Grafana dashboards of the Helm chart, defined once here: `taper dashboards json`
//! writes them to `charts/taper/files/dashboards/` (a test fails when those files drift
//! from this definition), and `taper dashboards render` draws each panel from a
//! Prometheus as a PNG, so that a person can see what Grafana will show.
//!
//! Queries use Grafana's variables: `$namespace` and `$job` (a resource's name: the
//! `name` label of the trainer's series), `${datasource}` for the data source, and
//! `$__rate_interval` for rate windows.

use serde_json::{Value, json};
use taper_crds::pod::metric;

pub mod draw;
pub mod prom;
pub mod render;

/// How a panel shows its queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelKind {
    /// A graph over time.
    TimeSeries,
    /// The latest value, large.
    Stat,
}

/// One query of a panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// PromQL, with the dashboard's variables.
    pub expr: String,
    /// Grafana's legend format, e.g. `{{name}}`.
    pub legend: &'static str,
}

/// Why a panel may show no data on a cluster that runs Taper correctly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Data whenever a job trains (or the operator runs).
    Taper,
    /// NVIDIA's DCGM exporter scraped by the same Prometheus (GPU nodes only).
    Dcgm,
}

/// One panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Title.
    pub title: &'static str,
    /// What it shows, for Grafana's panel description.
    pub description: &'static str,
    /// Graph or single value.
    pub kind: PanelKind,
    /// Grafana unit id (`short`, `s`, `percentunit`, `bytes`, …).
    pub unit: &'static str,
    /// Its queries.
    pub queries: Vec<Query>,
    /// Width in Grafana's 24-column grid.
    pub width: u32,
    /// What must exist for it to show data.
    pub needs: Needs,
}

/// A template variable from a `label_values` query.
#[derive(Clone, Debug, PartialEq)]
pub struct Variable {
    /// Its name (`$name` in queries).
    pub name: &'static str,
    /// Label shown in Grafana.
    pub label: &'static str,
    /// The metric selector whose label values it lists.
    pub selector: String,
    /// The label.
    pub label_name: &'static str,
}

/// One dashboard.
#[derive(Clone, Debug, PartialEq)]
pub struct Dashboard {
    /// File stem in the chart (`training` → `training.json`).
    pub file: &'static str,
    /// Grafana uid.
    pub uid: &'static str,
    /// Title.
    pub title: &'static str,
    /// Template variables besides the data source.
    pub variables: Vec<Variable>,
    /// Panels, laid out left to right, top to bottom.
    pub panels: Vec<Panel>,
}

fn q(expr: impl Into<String>, legend: &'static str) -> Query {
    Query {
        expr: expr.into(),
        legend,
    }
}

fn panel(
    title: &'static str,
    description: &'static str,
    kind: PanelKind,
    unit: &'static str,
    queries: Vec<Query>,
) -> Panel {
    Panel {
        title,
        description,
        kind,
        unit,
        queries,
        width: if kind == PanelKind::Stat { 6 } else { 12 },
        needs: Needs::Taper,
    }
}

/// The job's selector in trainer queries.
const JOB: &str = r#"namespace="$namespace", name="$job""#;

/// The per-job Training dashboard.
pub fn training() -> Dashboard {
    use PanelKind::{Stat, TimeSeries};
    let m = |name: &str| format!("{name}{{{JOB}}}");
    let by = "sum by (kind, namespace, name)";
    let step_seconds = format!(
        "{by} (rate({}_sum{{{JOB}}}[$__rate_interval])) / {by} (rate({}_count{{{JOB}}}[$__rate_interval]))",
        metric::STEP_DURATION,
        metric::STEP_DURATION
    );
    let dcgm_pod = r#"namespace="$namespace", pod=~"$job-(pretrain|finetune)-.*""#;
    let dcgm = |title, description, unit, expr: String| {
        let mut p = panel(
            title,
            description,
            TimeSeries,
            unit,
            vec![q(expr, "{{pod}} GPU {{gpu}}")],
        );
        p.needs = Needs::Dcgm;
        p
    };
    let gpu_util = dcgm(
        "GPU utilisation",
        "DCGM exporter: DCGM_FI_DEV_GPU_UTIL of the job's pods (GPU nodes with dcgm-exporter only).",
        "percent",
        format!("DCGM_FI_DEV_GPU_UTIL{{{dcgm_pod}}}"),
    );
    let gpu_mem = dcgm(
        "GPU memory used",
        "DCGM exporter: DCGM_FI_DEV_FB_USED (MiB) of the job's pods.",
        "decmbytes",
        format!("DCGM_FI_DEV_FB_USED{{{dcgm_pod}}}"),
    );
    Dashboard {
        file: "training",
        uid: "taper-training",
        title: "Taper / Training",
        variables: vec![
            Variable {
                name: "namespace",
                label: "Namespace",
                selector: metric::TRAIN_STEP.to_string(),
                label_name: "namespace",
            },
            Variable {
                name: "job",
                label: "Job",
                selector: format!(r#"{}{{namespace="$namespace"}}"#, metric::TRAIN_STEP),
                label_name: "name",
            },
        ],
        panels: vec![
            panel(
                "Step",
                "Optimizer steps taken (taper_train_step).",
                Stat,
                "short",
                vec![q(format!("max({})", m(metric::TRAIN_STEP)), "step")],
            ),
            panel(
                "Progress",
                "Steps taken over maxSteps.",
                Stat,
                "percentunit",
                vec![q(
                    format!(
                        "max({}) / max({})",
                        m(metric::TRAIN_STEP),
                        m(metric::MAX_STEPS)
                    ),
                    "progress",
                )],
            ),
            panel(
                "ETA",
                "Steps left times the mean step time over the rate interval.",
                Stat,
                "s",
                vec![q(
                    format!(
                        "(max({}) - max({})) * max({step_seconds})",
                        m(metric::MAX_STEPS),
                        m(metric::TRAIN_STEP)
                    ),
                    "eta",
                )],
            ),
            panel(
                "MFU",
                "Model FLOPs utilisation: nanoGPT's FLOPs estimate over --peak-tflops (absent without it).",
                Stat,
                "percentunit",
                vec![q(format!("max({})", m(metric::MFU)), "mfu")],
            ),
            panel(
                "Loss",
                "Training loss (every step) and validation loss (every evaluation), nats per token.",
                TimeSeries,
                "short",
                vec![
                    q(format!("max({})", m(metric::TRAIN_LOSS)), "train"),
                    q(format!("max({})", m(metric::VAL_LOSS)), "validation"),
                ],
            ),
            panel(
                "Learning rate",
                "The schedule's current learning rate.",
                TimeSeries,
                "short",
                vec![q(format!("max({})", m(metric::LEARNING_RATE)), "lr")],
            ),
            panel(
                "Tokens per second",
                "Training tokens consumed per second.",
                TimeSeries,
                "short",
                vec![q(
                    format!("{by} (rate({}[$__rate_interval]))", m(metric::TRAIN_TOKENS)),
                    "tokens/s",
                )],
            ),
            panel(
                "Step time",
                "Mean and 90th percentile of the wall time of an optimizer step.",
                TimeSeries,
                "s",
                vec![
                    q(step_seconds.clone(), "mean"),
                    q(
                        format!(
                            "histogram_quantile(0.9, sum by (le) (rate({}_bucket{{{JOB}}}[$__rate_interval])))",
                            metric::STEP_DURATION
                        ),
                        "p90",
                    ),
                ],
            ),
            panel(
                "MFU over time",
                "Model FLOPs utilisation.",
                TimeSeries,
                "percentunit",
                vec![q(format!("max({})", m(metric::MFU)), "mfu")],
            ),
            panel(
                "Checkpoint save duration",
                "Mean seconds per checkpoint save (upload and retention) over the last hour.",
                TimeSeries,
                "s",
                vec![q(
                    format!(
                        "{by} (increase({}_sum{{{JOB}}}[1h])) / {by} (increase({}_count{{{JOB}}}[1h]))",
                        metric::CHECKPOINT_SAVE_DURATION,
                        metric::CHECKPOINT_SAVE_DURATION
                    ),
                    "mean save",
                )],
            ),
            panel(
                "Checkpoint size",
                "Bytes of the files of the latest checkpoint.",
                TimeSeries,
                "bytes",
                vec![q(format!("max({})", m(metric::CHECKPOINT_SIZE)), "size")],
            ),
            panel(
                "Non-finite losses and failed checkpoints",
                "Steps skipped for a NaN or infinite loss, and checkpoint saves that failed (counters of the current pod).",
                TimeSeries,
                "short",
                vec![
                    q(
                        format!("max({})", m(metric::NONFINITE_LOSSES)),
                        "non-finite losses",
                    ),
                    q(
                        format!("max({})", m(metric::CHECKPOINT_FAILURES)),
                        "failed checkpoints",
                    ),
                ],
            ),
            gpu_util,
            gpu_mem,
        ],
    }
}

/// The Operator dashboard.
pub fn operator() -> Dashboard {
    use PanelKind::{Stat, TimeSeries};
    Dashboard {
        file: "operator",
        uid: "taper-operator",
        title: "Taper / Operator",
        variables: vec![Variable {
            name: "operator_job",
            label: "Operator scrape job",
            selector: "taper_jobs".to_string(),
            label_name: "job",
        }],
        panels: vec![
            panel(
                "Operator replicas up",
                "Scrape targets of the operator that answer (the leader and any standby).",
                Stat,
                "short",
                vec![q(r#"sum(up{job="$operator_job"})"#, "up")],
            ),
            panel(
                "Failed resources",
                "Taper resources in phase Failed.",
                Stat,
                "short",
                vec![q(r#"sum(taper_jobs{phase="Failed"})"#, "failed")],
            ),
            panel(
                "Reconciliations per second",
                "Reconciliations run, per kind.",
                TimeSeries,
                "ops",
                vec![q(
                    "sum by (kind) (rate(taper_operator_reconciliations_total[$__rate_interval]))",
                    "{{kind}}",
                )],
            ),
            panel(
                "Reconcile errors by category",
                "Reconciliations that failed, per kind and error category, per second.",
                TimeSeries,
                "ops",
                vec![q(
                    "sum by (kind, category) (rate(taper_operator_reconcile_errors_total[$__rate_interval]))",
                    "{{kind}} {{category}}",
                )],
            ),
            panel(
                "Reconcile duration",
                "90th percentile and mean of one reconciliation, per kind.",
                TimeSeries,
                "s",
                vec![
                    q(
                        "histogram_quantile(0.9, sum by (kind, le) (rate(taper_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                        "p90 {{kind}}",
                    ),
                    q(
                        "sum by (kind) (rate(taper_operator_reconcile_duration_seconds_sum[$__rate_interval])) / sum by (kind) (rate(taper_operator_reconcile_duration_seconds_count[$__rate_interval]))",
                        "mean {{kind}}",
                    ),
                ],
            ),
            panel(
                "Resources by phase",
                "Datasets, PretrainJobs and FinetuneJobs per phase.",
                TimeSeries,
                "short",
                vec![q(
                    "max by (kind, phase) (taper_jobs) > 0",
                    "{{kind}} {{phase}}",
                )],
            ),
        ],
    }
}

/// Every dashboard of the chart.
pub fn all() -> Vec<Dashboard> {
    vec![training(), operator()]
}

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

impl Dashboard {
    /// The dashboard as Grafana's JSON model (schema version 39).
    pub fn to_grafana(&self) -> Value {
        let mut templating = vec![json!({
            "name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
        })];
        for v in &self.variables {
            let query = format!("label_values({}, {})", v.selector, v.label_name);
            templating.push(json!({
                "name": v.name, "label": v.label, "type": "query",
                "datasource": datasource(),
                "definition": query,
                "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "refresh": 2, "sort": 1, "current": {}, "hide": 0,
                "includeAll": false, "multi": false,
            }));
        }
        let panels: Vec<Value> = self
            .panels
            .iter()
            .zip(render::layout(&self.panels))
            .enumerate()
            .map(|(i, (p, pos))| {
                let targets: Vec<Value> = p
                    .queries
                    .iter()
                    .enumerate()
                    .map(|(j, t)| {
                        json!({
                            "refId": char::from(b'A' + j as u8).to_string(),
                            "datasource": datasource(),
                            "expr": t.expr, "legendFormat": t.legend, "range": true,
                        })
                    })
                    .collect();
                json!({
                    "id": i + 1,
                    "type": match p.kind { PanelKind::TimeSeries => "timeseries", PanelKind::Stat => "stat" },
                    "title": p.title,
                    "description": p.description,
                    "datasource": datasource(),
                    "gridPos": pos,
                    "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                    "options": match p.kind {
                        PanelKind::TimeSeries => json!({"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}),
                        PanelKind::Stat => json!({"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": false}, "colorMode": "value", "graphMode": "area"}),
                    },
                    "targets": targets,
                })
            })
            .collect();
        json!({
            "uid": self.uid,
            "title": self.title,
            "tags": ["taper"],
            "timezone": "browser",
            "schemaVersion": 39,
            "version": 1,
            "editable": true,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": templating},
            "annotations": {"list": []},
            "panels": panels,
        })
    }

    /// The file's text: pretty JSON with a final newline.
    pub fn to_file(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(&self.to_grafana()).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart_file(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/taper/files/dashboards")
            .join(format!("{name}.json"))
    }

    #[test]
    fn the_charts_dashboards_are_generated_from_this_definition() {
        let dir = chart_file("x");
        let dir = dir.parent().expect("folder");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("charts/taper/files/dashboards")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut want: Vec<String> = all().iter().map(|d| format!("{}.json", d.file)).collect();
        want.sort();
        assert_eq!(files, want, "one file per dashboard, nothing else");
        for d in all() {
            let committed = std::fs::read_to_string(chart_file(d.file)).expect("dashboard file");
            assert!(
                committed == d.to_file(),
                "charts/taper/files/dashboards/{}.json drifted from trainer-image/src/dashboards/mod.rs: \
                 run `cargo run -p taper-trainer -- dashboards json --out charts/taper/files/dashboards`",
                d.file
            );
        }
    }

    #[test]
    fn panels_use_the_datasource_variable_and_trainer_panels_select_the_job() {
        for d in all() {
            let g = d.to_grafana();
            let mut ids = std::collections::BTreeSet::new();
            for p in g["panels"].as_array().expect("panels") {
                assert!(ids.insert(p["id"].as_u64()), "unique ids");
                assert_eq!(p["datasource"]["uid"], "${datasource}");
                let pos = &p["gridPos"];
                assert!(pos["x"].as_u64().unwrap_or(99) + pos["w"].as_u64().unwrap_or(99) <= 24);
                for t in p["targets"].as_array().expect("targets") {
                    assert_eq!(t["datasource"]["uid"], "${datasource}");
                    let expr = t["expr"].as_str().expect("expr");
                    if d.file == "training" {
                        assert!(
                            expr.contains(r#"namespace="$namespace""#),
                            "{}: {expr}",
                            p["title"]
                        );
                    }
                }
            }
        }
    }
}
