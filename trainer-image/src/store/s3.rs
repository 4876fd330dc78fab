//! `s3://` store over aws-sdk-s3: custom endpoints with path-style addressing (MinIO, Ceph,
//! R2), credentials from the default chain (environment, profile, web identity, instance
//! metadata), explicit retry and timeout settings, and multipart uploads with parallel
//! parts for large files.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_s3::{
    Client,
    error::DisplayErrorContext,
    primitives::ByteStream,
    types::{CompletedMultipartUpload, CompletedPart},
};
use taper_crds::store::StoreAccess;
use tokio::{sync::Semaphore, task::JoinSet};

use super::{BoxFuture, ObjectInfo, ObjectStore, StoreError, join};

/// Connection settings of an S3 store.
#[derive(Clone, Debug, PartialEq)]
pub struct S3Settings {
    /// Endpoint URL; `None` for AWS S3. Path-style addressing is used whenever it is set.
    pub endpoint: Option<String>,
    /// Region.
    pub region: String,
    /// Attempts per request (first try included), with exponential backoff.
    pub max_attempts: u32,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// Timeout of one attempt of one request (a part, for multipart uploads).
    pub attempt_timeout: Duration,
    /// Files larger than this are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part (S3's minimum is 5 MiB).
    pub part_size: u64,
    /// Parts uploaded at once.
    pub parallel_parts: usize,
}

impl S3Settings {
    /// Settings from a resource's `access` block, falling back to the standard AWS
    /// environment (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_REGION`).
    pub fn from_access(access: Option<&StoreAccess>) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: access
                .and_then(|a| a.endpoint.clone())
                .or_else(|| env("AWS_ENDPOINT_URL_S3"))
                .or_else(|| env("AWS_ENDPOINT_URL")),
            region: access
                .and_then(|a| a.region.clone())
                .or_else(|| env("AWS_REGION"))
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            ..Self::default()
        }
    }
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            max_attempts: 8,
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(300),
            multipart_threshold: 64 << 20,
            part_size: 32 << 20,
            parallel_parts: 4,
        }
    }
}

/// A bucket (and key prefix) in an S3-compatible store.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    settings: S3Settings,
}

fn s3_err<E: std::error::Error>(op: &'static str, key: &str, e: E) -> StoreError {
    StoreError::S3 {
        op,
        key: key.to_string(),
        message: DisplayErrorContext(e).to_string(),
    }
}

impl S3Store {
    /// A client for `bucket` under `prefix` (no request is made yet).
    pub async fn connect(bucket: &str, prefix: &str, settings: S3Settings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.endpoint.is_some())
            .build();
        Self {
            client: Client::from_conf(conf),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            settings,
        }
    }

    /// The underlying client (for tests and bucket set-up).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn full(&self, key: &str) -> String {
        join(&self.prefix, key)
    }

    /// Start reading `full`; a missing key is [`StoreError::NotFound`].
    async fn get_object(
        &self,
        full: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        self.client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    StoreError::NotFound(format!("s3://{}/{full}", self.bucket))
                } else {
                    s3_err("get-object", full, e)
                }
            })
    }

    async fn put_multipart(&self, key: &str, path: &Path, size: u64) -> Result<(), StoreError> {
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| s3_err("create-multipart-upload", &full, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::S3 {
                op: "create-multipart-upload",
                key: full.clone(),
                message: "no upload id".into(),
            })?
            .to_string();
        let result = self.upload_parts(&full, &upload_id, path, size).await;
        match result {
            Ok(parts) => {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| s3_err("complete-multipart-upload", &full, e))?;
                Ok(())
            }
            Err(e) => {
                // Leave no orphaned parts behind; the upload never becomes visible.
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        full: &str,
        upload_id: &str,
        path: &Path,
        size: u64,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let part_size = self.settings.part_size.max(5 << 20);
        let n_parts = size.div_ceil(part_size);
        let permits = Arc::new(Semaphore::new(self.settings.parallel_parts.max(1)));
        let mut tasks = JoinSet::new();
        for i in 0..n_parts {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| s3_err("upload-part", full, e))?;
            let (client, bucket, key, id, file): (Client, String, String, String, PathBuf) = (
                self.client.clone(),
                self.bucket.clone(),
                full.to_string(),
                upload_id.to_string(),
                path.to_path_buf(),
            );
            let offset = i * part_size;
            let len = part_size.min(size - offset);
            tasks.spawn(async move {
                let _permit = permit;
                let body = ByteStream::read_from()
                    .path(&file)
                    .offset(offset)
                    .length(aws_sdk_s3::primitives::Length::Exact(len))
                    .build()
                    .await
                    .map_err(|e| s3_err("upload-part", &key, e))?;
                let part_number = (i + 1) as i32;
                let out = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(&id)
                    .part_number(part_number)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| s3_err("upload-part", &key, e))?;
                Ok::<_, StoreError>(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                )
            });
        }
        let mut parts = Vec::with_capacity(n_parts as usize);
        while let Some(joined) = tasks.join_next().await {
            parts.push(joined.map_err(|e| s3_err("upload-part", full, e))??);
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }
}

impl ObjectStore for S3Store {
    fn uri(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let full = self.full(key);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| s3_err("put-object", &full, e))?;
            Ok(())
        })
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let size = std::fs::metadata(path)
                .map_err(|source| StoreError::Io {
                    path: path.display().to_string(),
                    source,
                })?
                .len();
            if size > self.settings.multipart_threshold {
                return self.put_multipart(key, path, size).await;
            }
            let full = self.full(key);
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| s3_err("put-object", &full, e))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .body(body)
                .send()
                .await
                .map_err(|e| s3_err("put-object", &full, e))?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        Box::pin(async move {
            let full = self.full(key);
            let out = self.get_object(&full).await?;
            let bytes = out
                .body
                .collect()
                .await
                .map_err(|e| s3_err("get-object", &full, e))?;
            Ok(bytes.into_bytes().to_vec())
        })
    }

    fn get_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            use std::io::Write;
            let full = self.full(key);
            let mut out = self.get_object(&full).await?;
            let io = |source| StoreError::Io {
                path: path.display().to_string(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let tmp = path.with_extension(format!("taper-tmp-{}", std::process::id()));
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            while let Some(chunk) = out
                .body
                .try_next()
                .await
                .map_err(|e| s3_err("get-object", &full, e))?
            {
                file.write_all(&chunk).map_err(io)?;
            }
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let full = self.full(prefix);
            let strip = if self.prefix.is_empty() {
                0
            } else {
                self.prefix.len() + 1
            };
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| s3_err("list-objects-v2", &full, e))?;
                for o in page.contents() {
                    if let Some(k) = o.key() {
                        out.push(ObjectInfo {
                            key: k.get(strip..).unwrap_or(k).to_string(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                        });
                    }
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let full = self.full(key);
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| s3_err("delete-object", &full, e))?;
            Ok(())
        })
    }
}
