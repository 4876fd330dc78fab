//! Object stores: one trait, two backends — a local folder (`file://`) and S3 (`s3://`,
//! any S3-compatible server). Keys are `/`-separated paths relative to the store's root.
//!
//! Both backends make each object appear whole or not at all: the local store writes a
//! temporary file and renames it; S3 publishes an object only when its upload completes.
//! Layers above (checkpoints, dataset shards) add their own commit marker: a manifest
//! written last.

mod local;
mod s3;

use std::{future::Future, path::Path, pin::Pin, sync::Arc};

pub use local::LocalStore;
pub use s3::{S3Settings, S3Store};
use taper_crds::store::StoreAccess;

/// A boxed future, so that the trait can be used as `dyn ObjectStore`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URI is not one this store layer understands.
    #[error("unsupported store URI {0:?}: use s3://bucket/prefix or file:///path")]
    BadUri(String),
    /// The object does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// Local file-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The S3 service or the network failed (after the configured retries).
    #[error("s3 {op} {key}: {message}")]
    S3 {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The error, with its cause chain.
        message: String,
    },
    /// An HTTP(S) download failed (after its retries).
    #[error("GET {url}: {message}")]
    Http {
        /// The URL.
        url: String,
        /// The error, with its cause chain.
        message: String,
    },
}

impl StoreError {
    /// The kind of failure for the exit code: a bad URI is the spec's, a missing object
    /// the data's, anything else (network, throttling, a full disk) may pass.
    pub fn category(&self) -> taper_crds::exit::Category {
        use taper_crds::exit::Category;
        match self {
            Self::BadUri(_) => Category::InvalidSpec,
            Self::NotFound(_) => Category::InvalidData,
            _ => Category::Retryable,
        }
    }

    /// Whether retrying later may succeed (network, throttling, server errors), as
    /// opposed to a permanent problem (bad URI, missing object).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::S3 { .. } | Self::Io { .. } | Self::Http { .. })
    }
}

/// One listed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store's root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A place to keep artefacts.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Where this store lives, as a URI.
    fn uri(&self) -> String;
    /// Write `data` to `key`, replacing any object there.
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Upload the local file at `path` to `key` (in parallel parts when it is large).
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Read the whole object at `key`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, StoreError>>;
    /// Download the object at `key` to the local file `path` (written atomically).
    fn get_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>>;
    /// Delete `key`; deleting a missing object is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Open the store rooted at `uri` (`file://PATH`, where PATH is absolute or relative to the
/// working directory, or `s3://bucket[/prefix]`).
pub async fn open(
    uri: &str,
    access: Option<&StoreAccess>,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    if let Some(path) = uri.strip_prefix("file://") {
        if path.is_empty() {
            return Err(StoreError::BadUri(uri.to_string()));
        }
        return Ok(Arc::new(LocalStore::new(path)));
    }
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::BadUri(uri.to_string()));
        }
        let settings = S3Settings::from_access(access);
        return Ok(Arc::new(S3Store::connect(bucket, prefix, settings).await));
    }
    Err(StoreError::BadUri(uri.to_string()))
}

/// Size and sha256 (lower-case hex) of a local file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Join a key prefix and a name with exactly one `/`.
pub fn join(prefix: &str, name: &str) -> String {
    let p = prefix.trim_end_matches('/');
    let n = name.trim_start_matches('/');
    if p.is_empty() {
        n.to_string()
    } else {
        format!("{p}/{n}")
    }
}
