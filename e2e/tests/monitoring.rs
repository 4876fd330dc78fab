//! The chart's alerts with the real `promtool` (Debian's, built by
//! `e2e/scripts/build-tools.sh prometheus`): the PrometheusRule as `helm template` renders
//! it is checked with `promtool check rules`, and every alert has a `promtool test rules`
//! case where it fires (with its labels and its annotations naming the namespace and the
//! job, word for word) and one where it does not. Each alert also has a runbook section in
//! the chart's README.

use std::{collections::BTreeSet, process::Command};

use serde_json::{Value, json};
use taper_e2e::workspace_root;

const NAMESPACE: &str = "taper-system";
const RUNBOOK: &str = "https://github.com/taper-dev/taper/blob/main/charts/taper/README.md";

use taper_e2e::minio::tool;

/// The objects `helm template` renders with `--set` `sets`.
fn render(sets: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    taper_e2e::helm::template("taper", NAMESPACE, &args).unwrap_or_else(|e| panic!("{e}"))
}

/// The rendered PrometheusRule's `spec` (a Prometheus rules file: `groups`).
fn rules(sets: &[&str]) -> Value {
    let mut all = vec!["monitoring.prometheusRule.enabled=true"];
    all.extend_from_slice(sets);
    let objs = render(&all);
    let mut found = objs.into_iter().filter(|o| o["kind"] == "PrometheusRule");
    let rule = found.next().expect("a PrometheusRule");
    assert!(found.next().is_none(), "one PrometheusRule");
    rule["spec"].clone()
}

struct Run {
    ok: bool,
    output: String,
}

/// Write `rules` and the unit tests into a folder and run `promtool ARGS`.
fn promtool(rules: &Value, tests: &Value, args: &[&str]) -> Run {
    let dir = std::env::temp_dir().join(format!(
        "taper-promtool-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml::to_string(rules).expect("YAML"),
    )
    .expect("rules");
    std::fs::write(
        dir.join("tests.yaml"),
        serde_yaml::to_string(tests).expect("YAML"),
    )
    .expect("tests");
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool runs");
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        ok: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Labels of a trainer series of PretrainJob ml/gpt, as scraped (honor_labels).
fn trainer(metric: &str) -> String {
    format!(
        r#"{metric}{{kind="PretrainJob",namespace="ml",name="gpt",job="taper-trainer",instance="10.0.0.7:9090",pod="gpt-pretrain-abcde"}}"#
    )
}

/// Labels of the operator's phase series for `kind` ml/gpt in `phase`.
fn phase(kind: &str, phase: &str) -> String {
    format!(
        r#"taper_job_phase{{kind="{kind}",namespace="ml",name="gpt",phase="{phase}",job="taper-operator-metrics",instance="10.0.0.2:8080"}}"#
    )
}

fn series(s: &str, values: &str) -> Value {
    json!({"series": s, "values": values})
}

/// The labels and annotations an alert about PretrainJob ml/gpt fires with.
fn gpt_alert(alert: &str, severity: &str, summary: &str, description: &str) -> Value {
    json!({
        "exp_labels": {"severity": severity, "kind": "PretrainJob", "namespace": "ml", "name": "gpt"},
        "exp_annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": format!("{RUNBOOK}#{}", alert.to_lowercase()),
        },
    })
}

/// One unit test: input series, then at `at` the alert fires with `expected` (empty: does
/// not fire).
struct Case {
    alert: &'static str,
    what: &'static str,
    input: Vec<Value>,
    at: &'static str,
    expected: Vec<Value>,
}

/// Every alert, firing and not firing.
fn cases() -> Vec<Case> {
    let not_finite = |input, expected| Case {
        alert: "TaperLossNotFinite",
        what: "",
        input,
        at: "3m",
        expected,
    };
    let nf = gpt_alert(
        "TaperLossNotFinite",
        "critical",
        "Training loss of PretrainJob ml/gpt is NaN or infinite",
        "PretrainJob gpt in namespace ml produced a NaN or infinite loss (those steps are skipped; three in a row stop the run with exit code 4).",
    );
    let diverging = gpt_alert(
        "TaperLossDiverging",
        "warning",
        "Validation loss of ml/gpt is rising",
        "The validation loss of PretrainJob gpt in namespace ml rose at each of the last 3 evaluations.",
    );
    let stalled = gpt_alert(
        "TaperTrainingStalled",
        "warning",
        "ml/gpt is Running but not training",
        "PretrainJob gpt in namespace ml is Running but its step has not changed (or no trainer pod was scraped) for 15 minutes.",
    );
    let failed = gpt_alert(
        "TaperJobFailed",
        "critical",
        "PretrainJob ml/gpt failed",
        "PretrainJob gpt in namespace ml is Failed; its Failed condition says why (kubectl describe).",
    );
    let ckpt_failing = gpt_alert(
        "TaperCheckpointFailing",
        "critical",
        "Checkpoints of ml/gpt fail to save",
        "A checkpoint save of PretrainJob gpt in namespace ml failed in the last 30 minutes (the run stops and its pod is retried).",
    );
    let ckpt_slow = gpt_alert(
        "TaperCheckpointSlow",
        "warning",
        "Checkpoints of ml/gpt are slow",
        "Checkpoint saves of PretrainJob gpt in namespace ml took 11m 40s on average over the last hour, more than 600 s.",
    );
    let collapsed = gpt_alert(
        "TaperThroughputCollapsed",
        "warning",
        "Throughput of ml/gpt collapsed",
        "Tokens/s of PretrainJob gpt in namespace ml over the last 10 minutes (16.67) is below 0.5 of its own rate over the hour before.",
    );
    let down = json!({
        "exp_labels": {"severity": "critical", "namespace": NAMESPACE},
        "exp_annotations": {
            "summary": "The Taper operator is down",
            "description": "No replica of the Taper operator (scrape job taper-operator-metrics in namespace taper-system) has been up for 5 minutes: Taper resources are not reconciled.",
            "runbook_url": format!("{RUNBOOK}#taperoperatordown"),
        },
    });
    let errors_series = r#"taper_operator_reconcile_errors_total{kind="Dataset",category="forbidden",namespace="taper-system",job="taper-operator-metrics",instance="10.0.0.2:8080"}"#;
    let errors = json!({
        "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "kind": "Dataset", "category": "forbidden"},
        "exp_annotations": {
            "summary": "The Taper operator fails to reconcile Datasets (forbidden)",
            "description": "The Taper operator in namespace taper-system had 10 reconcile errors of category forbidden on Datasets in 10 minutes (more than 5); its log names the resources.",
            "runbook_url": format!("{RUNBOOK}#taperreconcileerrorsrising"),
        },
    });
    vec![
        not_finite(
            vec![series(&trainer("taper_nonfinite_losses_total"), "0 0 1 1")],
            vec![nf.clone()],
        ),
        not_finite(
            vec![series(&trainer("taper_train_loss"), "3.1 3.0 2.9 NaN")],
            vec![nf.clone()],
        ),
        not_finite(
            vec![series(&trainer("taper_train_loss"), "3.1 3.0 2.9 +Inf")],
            vec![nf],
        ),
        not_finite(
            vec![
                series(&trainer("taper_nonfinite_losses_total"), "0 0 0 0"),
                series(&trainer("taper_train_loss"), "3.1 3.0 2.9 2.8"),
            ],
            vec![],
        ),
        Case {
            alert: "TaperLossDiverging",
            what: "three rises in a row",
            input: vec![series(&trainer("taper_rising_val_losses"), "0 1 2 3")],
            at: "3m",
            expected: vec![diverging],
        },
        Case {
            alert: "TaperLossDiverging",
            what: "two rises, then a fall",
            input: vec![series(&trainer("taper_rising_val_losses"), "0 1 2 0")],
            at: "3m",
            expected: vec![],
        },
        Case {
            alert: "TaperTrainingStalled",
            what: "Running, step frozen since minute 5",
            input: vec![
                series(&phase("PretrainJob", "Running"), "1x30"),
                series(&trainer("taper_train_step"), "0+1x5 5x25"),
            ],
            at: "28m",
            expected: vec![stalled.clone()],
        },
        Case {
            alert: "TaperTrainingStalled",
            what: "Running and no trainer pod scraped at all",
            input: vec![series(&phase("PretrainJob", "Running"), "1x30")],
            at: "28m",
            expected: vec![stalled],
        },
        Case {
            alert: "TaperTrainingStalled",
            what: "Running and stepping; a Dataset is not a training job",
            input: vec![
                series(&phase("PretrainJob", "Running"), "1x30"),
                series(&trainer("taper_train_step"), "0+1x30"),
                series(&phase("Dataset", "Running"), "1x30"),
            ],
            at: "28m",
            expected: vec![],
        },
        Case {
            alert: "TaperJobFailed",
            what: "Failed",
            input: vec![series(&phase("PretrainJob", "Failed"), "1 1")],
            at: "1m",
            expected: vec![failed],
        },
        Case {
            alert: "TaperJobFailed",
            what: "Running",
            input: vec![series(&phase("PretrainJob", "Running"), "1 1")],
            at: "1m",
            expected: vec![],
        },
        Case {
            alert: "TaperCheckpointFailing",
            what: "a failed save, then the pod is gone",
            input: vec![series(
                &trainer("taper_checkpoint_failures_total"),
                "0 0 1 stale",
            )],
            at: "10m",
            expected: vec![ckpt_failing],
        },
        Case {
            alert: "TaperCheckpointFailing",
            what: "no failure",
            input: vec![series(&trainer("taper_checkpoint_failures_total"), "0x20")],
            at: "10m",
            expected: vec![],
        },
        Case {
            alert: "TaperCheckpointSlow",
            what: "700 s per save",
            input: vec![
                series(
                    &trainer("taper_checkpoint_save_duration_seconds_sum"),
                    "0+700x60",
                ),
                series(
                    &trainer("taper_checkpoint_save_duration_seconds_count"),
                    "0+1x60",
                ),
            ],
            at: "60m",
            expected: vec![ckpt_slow],
        },
        Case {
            alert: "TaperCheckpointSlow",
            what: "60 s per save",
            input: vec![
                series(
                    &trainer("taper_checkpoint_save_duration_seconds_sum"),
                    "0+60x60",
                ),
                series(
                    &trainer("taper_checkpoint_save_duration_seconds_count"),
                    "0+1x60",
                ),
            ],
            at: "60m",
            expected: vec![],
        },
        Case {
            alert: "TaperThroughputCollapsed",
            what: "100 tokens/s for 70 minutes, then 16.7",
            input: vec![series(
                &trainer("taper_train_tokens_total"),
                "0+6000x70 421000+1000x30",
            )],
            at: "100m",
            expected: vec![collapsed],
        },
        Case {
            alert: "TaperThroughputCollapsed",
            what: "steady 100 tokens/s",
            input: vec![series(&trainer("taper_train_tokens_total"), "0+6000x100")],
            at: "100m",
            expected: vec![],
        },
        Case {
            alert: "TaperOperatorDown",
            what: "its target is down",
            input: vec![series(
                r#"up{job="taper-operator-metrics",instance="10.0.0.2:8080"}"#,
                "0x10",
            )],
            at: "10m",
            expected: vec![down.clone()],
        },
        Case {
            alert: "TaperOperatorDown",
            what: "no target at all",
            input: vec![series(r#"up{job="other",instance="x"}"#, "1x10")],
            at: "10m",
            expected: vec![down],
        },
        Case {
            alert: "TaperOperatorDown",
            what: "one replica down, one up",
            input: vec![
                series(
                    r#"up{job="taper-operator-metrics",instance="10.0.0.2:8080"}"#,
                    "0x10",
                ),
                series(
                    r#"up{job="taper-operator-metrics",instance="10.0.0.3:8080"}"#,
                    "1x10",
                ),
            ],
            at: "10m",
            expected: vec![],
        },
        Case {
            alert: "TaperReconcileErrorsRising",
            what: "one error a minute",
            input: vec![series(errors_series, "0+1x30")],
            at: "25m",
            expected: vec![errors],
        },
        Case {
            alert: "TaperReconcileErrorsRising",
            what: "one error in five minutes",
            input: vec![series(errors_series, "0+0.2x30")],
            at: "25m",
            expected: vec![],
        },
    ]
}

fn unit_tests(cases: &[Case]) -> Value {
    let tests: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "name": format!("{} {}: {}", c.alert, if c.expected.is_empty() { "silent" } else { "fires" }, c.what),
                "interval": "1m",
                "input_series": c.input,
                "alert_rule_test": [{"eval_time": c.at, "alertname": c.alert, "exp_alerts": c.expected}],
            })
        })
        .collect();
    json!({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
}

fn alerts(rules: &Value) -> Vec<Value> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn promtool_checks_the_rendered_rules() {
    let rules = rules(&[]);
    let run = promtool(&rules, &json!({}), &["check", "rules", "rules.yaml"]);
    assert!(run.ok, "promtool check rules:\n{}", run.output);
    assert!(
        run.output.contains("SUCCESS: 9 rules found"),
        "{}",
        run.output
    );
}

#[test]
fn promtool_unit_tests_cover_every_alert_firing_and_not() {
    let rules = rules(&[]);
    let cases = cases();
    let names: BTreeSet<String> = alerts(&rules)
        .iter()
        .map(|a| a["alert"].as_str().expect("alert name").to_string())
        .collect();
    let want: BTreeSet<String> = [
        "TaperLossNotFinite",
        "TaperLossDiverging",
        "TaperTrainingStalled",
        "TaperJobFailed",
        "TaperCheckpointFailing",
        "TaperCheckpointSlow",
        "TaperThroughputCollapsed",
        "TaperOperatorDown",
        "TaperReconcileErrorsRising",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want, "the alerts the issue asks for");
    for name in &names {
        for firing in [true, false] {
            assert!(
                cases
                    .iter()
                    .any(|c| c.alert == name && c.expected.is_empty() != firing),
                "{name} has no unit test where it {}",
                if firing { "fires" } else { "stays silent" }
            );
        }
    }
    let run = promtool(
        &rules,
        &unit_tests(&cases),
        &["test", "rules", "tests.yaml"],
    );
    assert!(run.ok, "promtool test rules:\n{}", run.output);
    assert!(run.output.contains("SUCCESS"), "{}", run.output);

    // The same tests fail against rules rendered with other thresholds: they do check
    // the expressions, not only that something fires.
    for set in [
        "monitoring.prometheusRule.divergingEvaluations=4",
        "monitoring.prometheusRule.stalledMinutes=30",
        "monitoring.prometheusRule.checkpointSlowSeconds=800",
        "monitoring.prometheusRule.reconcileErrors=20",
    ] {
        let other = self::rules(&[set]);
        let run = promtool(
            &other,
            &unit_tests(&cases),
            &["test", "rules", "tests.yaml"],
        );
        assert!(
            !run.ok,
            "the unit tests pass with {set}: they do not pin the threshold"
        );
    }
}

#[test]
fn every_alert_has_a_severity_a_description_naming_the_job_and_a_runbook() {
    let rules = rules(&["monitoring.prometheusRule.alertLabels.team=ml"]);
    let readme = std::fs::read_to_string(workspace_root().join("charts/taper/README.md"))
        .expect("charts/taper/README.md");
    for a in alerts(&rules) {
        let name = a["alert"].as_str().expect("name");
        let severity = a["labels"]["severity"].as_str().unwrap_or_default();
        assert!(["critical", "warning"].contains(&severity), "{name}: {a}");
        assert_eq!(a["labels"]["team"], "ml", "{name}: alertLabels");
        let description = a["annotations"]["description"].as_str().unwrap_or_default();
        assert!(
            a["annotations"]["summary"].is_string(),
            "{name} has a summary"
        );
        assert!(description.contains("namespace"), "{name}: {description}");
        if !name.starts_with("TaperOperator") && !name.starts_with("TaperReconcile") {
            assert!(
                description.contains("{{ $labels.namespace }}")
                    && description.contains("{{ $labels.name }}"),
                "{name} names the namespace and the job: {description}"
            );
        }
        let anchor = format!("#{}", name.to_lowercase());
        assert_eq!(
            a["annotations"]["runbook_url"],
            format!("{RUNBOOK}{anchor}"),
            "{name}"
        );
        assert!(
            readme.contains(&format!("### {name}\n")),
            "charts/taper/README.md has no runbook section `### {name}`"
        );
    }
}
