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
