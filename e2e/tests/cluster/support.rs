//! What every check of the suite uses: kubectl, retrying until a condition holds, and the
//! named steps the suite prints.

use std::{
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

pub(crate) fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl is installed");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("write kubectl stdin");
    }
    child.wait_with_output().expect("kubectl runs")
}

/// The JSON that `kubectl ARGS` prints (with `-o json` among them), or `None` when it
/// fails or prints something else.
pub(crate) fn kubectl_json(kubeconfig: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = kubectl(kubeconfig, args, None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

pub(crate) fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Retry `f` until it returns `Some` or `secs` pass.
pub(crate) fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// [`eventually`], printing `context()` when it times out.
pub(crate) fn eventually_or<T>(
    secs: u64,
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub(crate) fn step(name: &str) {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = *last {
        println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
    *last = Some(Instant::now());
    println!("step: {name}");
}

/// Wait until the controller manager has made the `default` service account of `ns`
/// (pods are refused before it exists).
pub(crate) fn wait_for_default_service_account(kubeconfig: &Path, ns: &str) {
    eventually(
        60,
        &format!("the default service account exists in {ns}"),
        || {
            kubectl(
                kubeconfig,
                &["get", "serviceaccount", "-n", ns, "default"],
                None,
            )
            .status
            .success()
            .then_some(())
        },
    );
}

/// An S3 client for the suite's MinIO at `endpoint` (path-style, its root credentials).
pub(crate) fn minio_client(endpoint: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .endpoint_url(endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                taper_e2e::minio::ACCESS_KEY,
                taper_e2e::minio::SECRET_KEY,
                None,
                None,
                "e2e",
            ))
            .force_path_style(true)
            .behavior_version_latest()
            .build(),
    )
}

/// The Events of namespace `ml` matching the field `selector` (e.g.
/// `involvedObject.name=gpt`), as `kubectl get events -o json` prints them.
pub(crate) fn ml_events(kubeconfig: &Path, selector: &str) -> String {
    ok(
        &kubectl(
            kubeconfig,
            &[
                "get",
                "events",
                "-n",
                "ml",
                "--field-selector",
                selector,
                "-o",
                "json",
            ],
            None,
        ),
        "events",
    )
}

/// Assert that `events` (from [`ml_events`]) holds an Event of each of `reasons`.
pub(crate) fn assert_event_reasons(events: &str, reasons: &[&str]) {
    for reason in reasons {
        assert!(
            events.contains(&format!("\"reason\": \"{reason}\"")),
            "event {reason}: {events}"
        );
    }
}
