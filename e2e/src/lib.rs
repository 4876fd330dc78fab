//! Helpers shared by Taper's test suites.
//!
//! The control-plane launcher, pod runner, S3 server and Prometheus arrive with the e2e
//! issue; for now this crate locates the shared test corpora.

use std::path::PathBuf;

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

pub mod minio;
