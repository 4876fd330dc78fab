//! Where a source's bytes come from.
//!
//! - `file://PATH`: one file, every file under a folder (sorted), or a glob (`*.jsonl`).
//! - `s3://bucket/prefix`: every object whose key starts with the prefix; or
//!   `s3://bucket/path/*.jsonl.zst`: the objects matching a glob (`*` and `?` stop at `/`).
//! - `https://…` (and `http://`, for local mirrors and tests; the CRD admits only https):
//!   one file, retried with backoff and resumed with a `Range` request where the server
//!   allows it.
//!
//! Remote objects are downloaded one at a time to a spool folder, read, and deleted: the
//! pipeline never holds a source's raw bytes in memory, and never more than one object on
//! disk.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use taper_crds::dataset::Source;

use super::PrepareError;
use crate::store::{self, ObjectStore, StoreError};

/// Attempts of an HTTP download in a row that make no progress before it fails.
const HTTP_ATTEMPTS: u32 = 6;

/// One object of a source.
#[derive(Debug)]
pub(crate) enum Object {
    /// A local file, read in place.
    Local(PathBuf),
    /// A file behind an HTTP(S) URL.
    Http(String),
    /// An object of an S3 bucket.
    S3 {
        /// The bucket, opened at its root.
        store: Arc<dyn ObjectStore>,
        /// The object's key.
        key: String,
    },
}

impl Object {
    /// How a message names this object.
    pub(crate) fn label(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Http(u) => u.clone(),
            Self::S3 { store, key } => store::join(&store.uri(), key),
        }
    }
}

/// A local copy of an object: a downloaded copy is deleted when this is dropped.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// Where to read it.
    pub path: PathBuf,
    spooled: bool,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if self.spooled {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The objects of `source`, in a stable order. A source that names nothing is an error
/// that names it.
pub(crate) fn list(
    rt: &tokio::runtime::Runtime,
    source: &Source,
) -> Result<Vec<Object>, PrepareError> {
    let name = &source.name;
    let uri = source.uri.as_str();
    if let Some(path) = uri.strip_prefix("file://") {
        return list_local(name, path);
    }
    if uri.starts_with("https://") || uri.starts_with("http://") {
        return Ok(vec![Object::Http(uri.to_string())]);
    }
    if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(PrepareError::Spec(format!(
                "source {name}: {uri:?} names no bucket"
            )));
        }
        let bucket_store = rt.block_on(store::open(
            &format!("s3://{bucket}"),
            source.access.as_ref(),
        ))?;
        let (prefix, pattern) = if has_glob(path) {
            let literal = &path[..path.find(['*', '?', '[']).unwrap_or(path.len())];
            let pattern = glob::Pattern::new(path).map_err(|e| {
                PrepareError::Spec(format!("source {name}: bad glob {path:?}: {e}"))
            })?;
            (literal.to_string(), Some(pattern))
        } else {
            (path.to_string(), None)
        };
        let options = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        let objects: Vec<Object> = rt
            .block_on(bucket_store.list(&prefix))?
            .into_iter()
            .filter(|o| !o.key.ends_with('/'))
            .filter(|o| {
                pattern
                    .as_ref()
                    .is_none_or(|p| p.matches_with(&o.key, options))
            })
            .map(|o| Object::S3 {
                store: bucket_store.clone(),
                key: o.key,
            })
            .collect();
        if objects.is_empty() {
            return Err(PrepareError::Data(format!(
                "source {name}: no object matches {uri}"
            )));
        }
        return Ok(objects);
    }
    Err(PrepareError::Spec(format!(
        "source {name}: {uri:?} is not an s3://, https:// or file:// URI"
    )))
}

fn list_local(name: &str, path: &str) -> Result<Vec<Object>, PrepareError> {
    let unreadable =
        |e: String| PrepareError::Data(format!("source {name}: cannot read {path}: {e}"));
    let mut files = Vec::new();
    if has_glob(path) {
        let entries = glob::glob(path)
            .map_err(|e| PrepareError::Spec(format!("source {name}: bad glob {path:?}: {e}")))?;
        for entry in entries {
            let p = entry.map_err(|e| unreadable(e.to_string()))?;
            if p.is_file() {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(PrepareError::Data(format!(
                "source {name}: no file matches {path}"
            )));
        }
    } else if Path::new(path).is_dir() {
        walk(Path::new(path), &mut files).map_err(|e| unreadable(e.to_string()))?;
        if files.is_empty() {
            return Err(PrepareError::Data(format!(
                "source {name}: the folder {path} holds no file"
            )));
        }
    } else {
        // A missing file is reported when it is opened, with the reader's message.
        files.push(PathBuf::from(path));
    }
    files.sort();
    Ok(files.into_iter().map(Object::Local).collect())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&p, out)?;
        } else if !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
    Ok(())
}

/// A folder of one run's downloads, under `$TAPER_SPOOL_DIR` (default: the system's
/// temporary folder); removed, with anything left in it, when dropped.
#[derive(Debug)]
pub(crate) struct Spool(PathBuf);

impl Spool {
    /// The folder.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// A new, unique spool folder (created on first use).
    pub(crate) fn new() -> Self {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::env::var_os(taper_crds::pod::env::SPOOL_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        Self(base.join(format!("taper-prepare-{}-{run}", std::process::id())))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A local copy of `object` (the file itself when it is local), downloaded into `spool`.
pub(crate) fn fetch(
    rt: &tokio::runtime::Runtime,
    spool: &Spool,
    source: &str,
    object: &Object,
    index: usize,
) -> Result<Fetched, PrepareError> {
    let spool = &spool.0;
    let dest = spool.join(format!("{source}-{index:06}"));
    let mkdir = |e: std::io::Error| {
        PrepareError::Store(StoreError::Io {
            path: spool.display().to_string(),
            source: e,
        })
    };
    match object {
        Object::Local(p) => Ok(Fetched {
            path: p.clone(),
            spooled: false,
        }),
        Object::S3 { store, key } => {
            std::fs::create_dir_all(spool).map_err(mkdir)?;
            rt.block_on(store.get_file(key, &dest))?;
            Ok(Fetched {
                path: dest,
                spooled: true,
            })
        }
        Object::Http(url) => {
            std::fs::create_dir_all(spool).map_err(mkdir)?;
            let fetched = Fetched {
                path: dest,
                spooled: true,
            };
            rt.block_on(download(url, &fetched.path, source))?;
            Ok(fetched)
        }
    }
}

fn http_err(url: &str, message: impl std::fmt::Display) -> PrepareError {
    PrepareError::Store(StoreError::Http {
        url: url.to_string(),
        message: message.to_string(),
    })
}

/// Download `url` to `dest`: transient failures (connection errors, 408, 429, 5xx, a body
/// cut short) are retried with exponential backoff, resuming from the bytes already on
/// disk with a `Range` request; a server that answers 200 to it is read again from the
/// start. Other statuses are permanent errors that name the URL.
pub(crate) async fn download(url: &str, dest: &Path, source: &str) -> Result<u64, PrepareError> {
    use reqwest::{StatusCode, header};
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("taper/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| http_err(url, e))?;
    let io = |e: std::io::Error| {
        PrepareError::Store(StoreError::Io {
            path: dest.display().to_string(),
            source: e,
        })
    };
    let mut file = std::fs::File::create(dest).map_err(io)?;
    let mut have = 0u64;
    let mut failures = 0u32;
    let mut last_error = String::new();
    loop {
        if failures > 0 {
            if failures >= HTTP_ATTEMPTS {
                return Err(http_err(
                    url,
                    format!("{last_error} (gave up after {HTTP_ATTEMPTS} attempts)"),
                ));
            }
            let backoff = Duration::from_millis(250 << failures.min(6));
            tracing::warn!(
                source,
                url,
                from_byte = have,
                "GET failed: {last_error}; retrying in {backoff:?}"
            );
            tokio::time::sleep(backoff).await;
        }
        let mut request = client.get(url);
        if have > 0 {
            request = request.header(header::RANGE, format!("bytes={have}-"));
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                last_error = error_chain(&e);
                continue;
            }
        };
        let status = response.status();
        let expected_total = match status {
            StatusCode::OK => {
                if have > 0 {
                    // The server ignored the range: start over.
                    file = std::fs::File::create(dest).map_err(io)?;
                    have = 0;
                }
                response.content_length()
            }
            StatusCode::PARTIAL_CONTENT => {
                let start = response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(have) {
                    file = std::fs::File::create(dest).map_err(io)?;
                    have = 0;
                    failures += 1;
                    last_error = "the server answered a different range".into();
                    continue;
                }
                response.content_length().map(|n| n + have)
            }
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
                // Everything was already here when the last connection dropped.
                return Ok(have);
            }
            s if s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS
                || s.is_server_error() =>
            {
                failures += 1;
                last_error = format!("HTTP {s}");
                continue;
            }
            s => {
                return Err(PrepareError::Data(format!(
                    "source {source}: GET {url}: HTTP {s}"
                )));
            }
        };
        let mut progressed = false;
        let outcome = loop {
            match response.chunk().await {
                Ok(Some(bytes)) => {
                    file.write_all(&bytes).map_err(io)?;
                    have += bytes.len() as u64;
                    progressed = true;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(error_chain(&e)),
            }
        };
        match (outcome, expected_total) {
            (Ok(()), Some(total)) if have < total => {
                last_error = format!("the body ended at byte {have} of {total}");
            }
            (Ok(()), _) => {
                file.sync_all().map_err(io)?;
                return Ok(have);
            }
            (Err(e), _) => last_error = e,
        }
        failures = if progressed { 1 } else { failures + 1 };
    }
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A local copy of the single object at `uri` (a `tokenizer.json`, say), downloaded into
/// `spool`; `what` names it in messages.
pub(crate) fn fetch_one(
    rt: &tokio::runtime::Runtime,
    spool: &Spool,
    what: &str,
    uri: &str,
    access: Option<&taper_crds::store::StoreAccess>,
) -> Result<Fetched, PrepareError> {
    let object = if let Some(path) = uri.strip_prefix("file://") {
        Object::Local(PathBuf::from(path))
    } else if uri.starts_with("https://") || uri.starts_with("http://") {
        Object::Http(uri.to_string())
    } else if let Some((bucket, key)) = uri.strip_prefix("s3://").and_then(|r| r.split_once('/')) {
        Object::S3 {
            store: rt.block_on(store::open(&format!("s3://{bucket}"), access))?,
            key: key.to_string(),
        }
    } else {
        return Err(PrepareError::Spec(format!(
            "{what}: {uri:?} is not an s3://bucket/key, https:// or file:// URI"
        )));
    };
    let fetched = fetch(rt, spool, what, &object, 0)?;
    if !fetched.path.is_file() {
        return Err(PrepareError::Data(format!("{what}: cannot read {uri}")));
    }
    Ok(fetched)
}
