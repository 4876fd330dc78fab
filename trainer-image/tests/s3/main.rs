//! Tests against a real MinIO (built by `e2e/scripts/build-tools.sh minio`). A test binary
//! of their own: MinIO's credentials reach the AWS SDK through the process environment,
//! which must not change while other tests' threads read it.

#[path = "../integration/common.rs"]
mod common;
mod prepare_sources;
mod store;
