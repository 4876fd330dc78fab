//! The `taper` binary as a user runs it.

use std::process::Command;

use crate::common;

fn taper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_taper"))
}

#[test]
fn version_names_the_program() {
    let out = taper().arg("--version").output().expect("taper runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("taper "));
}

/// The README's quickstart as a newcomer runs it, in an empty folder with nothing beside
/// it (no `../shared`): write the world, prepare it, pretrain, stop (as Ctrl-C would) with
/// a checkpoint, run again and resume at the same step.
#[test]
fn quickstart_needs_nothing_outside_the_repository_and_resumes() {
    let tmp = common::TempDir::new("quickstart");
    let first = taper()
        .current_dir(tmp.path())
        .args(["quickstart", "--stop-after", "2"])
        .output()
        .expect("taper runs");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(
        first.status.code(),
        Some(75),
        "stops with a checkpoint\n{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains("world-bios: 4000 documents")
            && stdout.contains("world-qa: 2400 documents"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"reason\":\"Interrupted\",\"step\":2"),
        "{stdout}"
    );
    let manifest = tmp
        .path()
        .join(".taper/quickstart/datasets/world-qa/manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).expect("json");
    assert_eq!(
        manifest["tokenizer"],
        "file://.taper/quickstart/world/tokenizer.json"
    );
    assert_eq!(manifest["vocabSize"], 1024);
    assert!(
        manifest["train"][0]["mask"].is_object(),
        "instruction shards carry loss masks"
    );

    let second = taper()
        .current_dir(tmp.path())
        .args(["quickstart", "--stop-after", "3"])
        .output()
        .expect("taper runs");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("already prepared"), "{stdout}");
    assert!(
        stdout.contains("\"event\":\"started\",\"step\":2"),
        "resumes at step 2:\n{stdout}"
    );
    assert!(stdout.contains("\"resumedFrom\":\"file://"), "{stdout}");
    assert_eq!(second.status.code(), Some(75));
}

#[test]
fn validate_refuses_a_bad_manifest_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("taper-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: bad}\n\
         spec:\n  datasetRef: {name: d}\n  model: {preset: gpt2-small, nHead: 7}\n",
    )
    .expect("write manifest");
    let out = taper()
        .args(["validate", "--job"])
        .arg(&file)
        .output()
        .expect("taper runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "permanent error exit code; stderr: {stderr}"
    );
    assert!(stderr.contains("nHead must divide nEmbd"), "{stderr}");
    assert!(stderr.contains("PretrainJob bad"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The CRD's schema bounds, not only its CEL rules: the API server refuses a negative batch
/// size by `minimum: 1`, and so does `taper validate`, with the API server's words.
#[test]
fn validate_refuses_a_value_out_of_the_schema_bounds_naming_the_field() {
    let tmp = common::TempDir::new("validate-bounds");
    let file = tmp.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: bad}\n\
         spec:\n  datasetRef: {name: d}\n  model: {preset: tiny}\n  training: {batchSize: -4}\n",
    )
    .expect("write manifest");
    let out = taper()
        .args(["validate", "--job"])
        .arg(&file)
        .output()
        .expect("taper runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "permanent error exit code; stderr: {stderr}"
    );
    assert!(
        stderr.contains(
            "PretrainJob bad) is invalid: spec.training.batchSize: Invalid value: -4: \
             spec.training.batchSize in body should be greater than or equal to 1"
        ),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"));
}

/// SIGTERM finishes the step, saves a checkpoint and exits 75; the next run resumes at that
/// step. Meanwhile `/metrics` serves the training metrics with bounded labels.
#[test]
fn sigterm_checkpoints_and_exits_retryable_then_the_run_resumes() {
    use std::io::{BufRead, BufReader, Read, Write};

    let tmp = common::TempDir::new("sigterm");
    let data = common::byte_dataset_dir(&tmp);
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: sig}\nspec:\n  datasetRef: {name: d}\n  \
         model: {preset: tiny, nLayer: 1, vocabSize: 256}\n  training: {batchSize: 2, gradientAccumulationSteps: 1, \
         maxSteps: 100000, warmupSteps: 10, precision: f32}\n  evaluation: {interval: 2, iterations: 1}\n",
    )
    .expect("job");
    let ckpt = format!("file://{}", tmp.path().join("ckpt").display());
    let args = |extra: &[&str]| {
        let mut c = taper();
        c.args(["pretrain", "--job"])
            .arg(&job)
            .arg("--data")
            .arg(format!("file://{}", data.display()));
        c.args(["--checkpoints", &ckpt, "--work-dir"])
            .arg(tmp.path().join("work"))
            .args(extra);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let mut child = args(&["--metrics-addr", "127.0.0.1:0"])
        .spawn()
        .expect("taper starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut err_lines = BufReader::new(stderr).lines();
    let metrics_line = err_lines.next().expect("a line").expect("utf-8");
    let addr = metrics_line
        .rsplit("http://")
        .next()
        .expect("address")
        .trim_end_matches("/metrics")
        .to_string();
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Wait for a few steps, then read the metrics and send SIGTERM.
    for line in out.by_ref() {
        let line = line.expect("utf-8");
        if line.contains("\"event\":\"step\"") && line.contains("\"step\":3,") {
            break;
        }
    }
    let mut conn = std::net::TcpStream::connect(&addr).expect("metrics endpoint");
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("response");
    let samples = parse_exposition(&body);
    // Every sample of every trainer metric, with the job's labels and nothing unbounded;
    // the checkpoint size appears with the first checkpoint, which may not be saved yet.
    for name in taper_crds::pod::metric::ALL
        .iter()
        .filter(|n| **n != taper_crds::pod::metric::CHECKPOINT_SIZE)
    {
        assert!(
            samples.iter().any(|s| s.0.starts_with(name)),
            "{name} missing:\n{body}"
        );
    }
    for (name, labels, _) in samples.iter().filter(|s| s.0.starts_with("taper_")) {
        let mut keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        keys.retain(|k| *k != "le"); // histogram buckets
        keys.sort_unstable();
        assert_eq!(keys, ["kind", "name", "namespace"], "{name}: {labels:?}");
        let value = |k: &str| labels.iter().find(|l| l.0 == k).map(|l| l.1.as_str());
        assert_eq!(
            (value("kind"), value("namespace"), value("name")),
            (Some("PretrainJob"), Some("local"), Some("sig")),
            "{name}"
        );
    }
    let get = |name: &str| -> f64 {
        samples
            .iter()
            .find(|s| s.0 == name)
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("{name}:\n{body}"))
    };
    // Read after the step-3 event: the step is at least 3 and whole (later steps may have
    // run since); the losses are finite and near ln(256) for an untrained byte model.
    let step = get(taper_crds::pod::metric::TRAIN_STEP);
    assert!(step >= 3.0 && step.fract() == 0.0, "step {step}");
    for name in [
        taper_crds::pod::metric::TRAIN_LOSS,
        taper_crds::pod::metric::VAL_LOSS,
    ] {
        let loss = get(name);
        assert!(
            loss.is_finite() && (4.0..6.5).contains(&loss),
            "{name} {loss}"
        );
    }
    assert!(
        get(taper_crds::pod::metric::TRAIN_TOKENS) >= 3.0 * 2.0 * 64.0,
        "3 steps of 2 sequences of 64 tokens"
    );
    assert!(get(taper_crds::pod::metric::LEARNING_RATE) > 0.0);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let rest: Vec<String> = out.map(|l| l.expect("utf-8")).collect();
    let code = child.wait().expect("exit").code();
    assert_eq!(
        code,
        Some(75),
        "retryable exit code; stdout tail: {:?}",
        rest.last()
    );
    let done: serde_json::Value =
        serde_json::from_str(rest.last().expect("a final line")).expect("json");
    assert_eq!(done["reason"], "Interrupted");
    let stopped_at = done["step"].as_u64().expect("step");
    assert!(
        rest.iter().any(|l| l.contains("\"event\":\"checkpoint\"")),
        "a checkpoint was written on SIGTERM"
    );

    // The next run resumes from exactly that step.
    let resumed = args(&["--stop-after", &(stopped_at + 1).to_string()])
        .output()
        .expect("taper runs");
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&resumed.stdout)
            .lines()
            .next()
            .expect("a line"),
    )
    .expect("json");
    assert_eq!(first["event"], "started");
    assert_eq!(first["step"].as_u64(), Some(stopped_at));
    assert!(
        first["resumedFrom"]
            .as_str()
            .is_some_and(|uri| uri.ends_with(&format!("step-{stopped_at:09}"))),
        "{first}"
    );
    assert_eq!(resumed.status.code(), Some(75));

    // And the checkpoint samples text.
    let sample = taper()
        .args([
            "generate",
            "--checkpoint",
            &ckpt,
            "--prompt",
            "line ",
            "--max-tokens",
            "20",
        ])
        .output()
        .expect("taper runs");
    assert!(
        sample.status.success(),
        "{}",
        String::from_utf8_lossy(&sample.stderr)
    );
    let text = String::from_utf8_lossy(&sample.stdout);
    assert!(
        text.starts_with("line ") && text.trim_end().len() > "line ".len(),
        "{text:?}"
    );
}

#[test]
fn a_missing_dataset_is_a_permanent_data_error() {
    let tmp = common::TempDir::new("nodata");
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: x}\nspec:\n  datasetRef: {name: d}\n  \
         model: {preset: tiny}\n  training: {maxSteps: 10, warmupSteps: 1}\n  checkpoints: {uri: \"file:///tmp/x\"}\n",
    )
    .expect("job");
    let out = taper()
        .args(["pretrain", "--job"])
        .arg(&job)
        .args(["--data", "file:///nonexistent/taper-data"])
        .output()
        .expect("taper runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/taper-data/manifest.json"),
        "{stderr}"
    );
}

/// One sample of a Prometheus text exposition: name, labels and value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus text exposition.
fn parse_exposition(body: &str) -> Vec<Sample> {
    let body = body.split_once("\r\n\r\n").map_or(body, |(_, b)| b);
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value))
        })
        .collect()
}

/// `taper cleanup` (the operator's cleanup Job for `reclaimPolicy: Delete`) empties the
/// job's checkpoint prefix, and refuses a prefix that is a whole bucket.
#[test]
fn cleanup_deletes_everything_under_the_jobs_prefix_and_refuses_a_bucket() {
    let tmp = common::TempDir::new("cleanup");
    let ckpt = tmp.path().join("store/ml/pretrainjobs/gpt/checkpoints");
    let other = tmp.path().join("store/ml/pretrainjobs/other/checkpoints");
    for dir in [&ckpt, &other] {
        std::fs::create_dir_all(dir.join("step-000000002")).expect("dir");
        std::fs::write(dir.join("step-000000002/model.safetensors"), b"w").expect("file");
        std::fs::write(dir.join("latest.json"), b"{}").expect("file");
    }
    let job = |uri: &str| {
        format!(
            "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: gpt}}\nspec:\n  \
             datasetRef: {{name: d}}\n  model: {{preset: tiny}}\n  checkpoints: {{uri: \"{uri}\"}}\n  \
             reclaimPolicy: Delete\n"
        )
    };
    let file = tmp.path().join("job.yaml");
    std::fs::write(&file, job(&format!("file://{}", ckpt.display()))).expect("job");
    let out = taper()
        .args(["cleanup", "--job"])
        .arg(&file)
        .args(["--name", "gpt"])
        .output()
        .expect("taper runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = walk(&ckpt);
    assert!(
        left.is_empty(),
        "everything under the prefix is gone: {left:?}"
    );
    assert_eq!(walk(&other).len(), 2, "another job's data is untouched");

    std::fs::write(&file, job("s3://whole-bucket")).expect("job");
    let out = taper()
        .args(["cleanup", "--job"])
        .arg(&file)
        .output()
        .expect("taper runs");
    assert_eq!(out.status.code(), Some(2), "an invalid spec");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to delete a whole bucket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
