//! Taper's end-to-end harness: the real components the suite runs against, each built from
//! the package registries by `e2e/scripts/build-tools.sh` and started here.
//!
//! - [`cluster::ControlPlane`]: etcd, kube-apiserver and kube-controller-manager with fresh
//!   certificates and token authentication;
//! - [`runner::PodRunner`]: a kubelet stand-in that runs trainer-image pods with the locally
//!   built `taper`;
//! - [`minio::Minio`]: an S3 server; [`prometheus::Prometheus`]: a metrics server.
//!
//! Every process dies with the test process that started it and is stopped on drop.

use std::path::PathBuf;

pub mod cluster;
pub mod helm;
pub mod http;
pub mod minio;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod runner;

/// The folder of shared test corpora, `../shared/data` beside the checkout, or the folder
/// named by `TAPER_SHARED_DATA`. `None` when it is absent (a user's fresh clone): tests
/// that need it then skip with a message saying so. CI always has it.
pub fn shared_data_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("TAPER_SHARED_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    };
    dir.is_dir().then_some(dir)
}

/// [`shared_data_dir`], or `None` after recording the running test as skipped
/// ([`skip`]). Tests that need the corpora begin with
/// `let Some(data) = taper_e2e::shared_data_or_skip() else { return };`.
pub fn shared_data_or_skip() -> Option<PathBuf> {
    let dir = shared_data_dir();
    if dir.is_none() {
        skip("../shared/data is absent (a fresh clone; set TAPER_SHARED_DATA to run it)");
    }
    dir
}

/// Record that the running test skips its checks, and why. A test that returns early
/// would otherwise count as passed: this prints `SKIPPED: <test>: <reason>` and, when
/// `TAPER_SKIP_LOG` names a file (as `scripts/test.sh` does), appends `<test>\t<reason>`
/// to it, so the suite's summary counts and names every skip (and fails under `CI=true`).
/// The test's name is its thread's, which the test harness sets.
pub fn skip(reason: &str) {
    let current = std::thread::current();
    let test = current.name().unwrap_or("<unnamed test>");
    eprintln!("SKIPPED: {test}: {reason}");
    if let Some(log) = std::env::var_os("TAPER_SKIP_LOG") {
        use std::io::Write;
        // One write of the whole line: tests run in parallel threads, and an append of
        // this size is not interleaved with another's.
        let line = format!("{test}\t{reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            // The skip must not go unseen: a test that cannot record it fails.
            panic!(
                "cannot record the skip of {test} in {}: {e}",
                PathBuf::from(log).display()
            );
        }
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The locally built `taper` binary that stands for the trainer image: `$TAPER_BIN`, or
/// `taper` in the Cargo target folder's debug profile (`cargo test --workspace` builds it).
pub fn taper_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TAPER_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join("taper")
}

/// The locally built `taper-operator` binary: `$TAPER_OPERATOR_BIN`, or `taper-operator`
/// in the Cargo target folder's debug profile (`cargo test --workspace` builds it).
pub fn operator_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TAPER_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug").join("taper-operator")
}
