//! Where an artefact lives: an object-store location shared by every kind.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// CEL rule shared by every URI field: the schemes Taper's store layer understands.
pub const URI_SCHEME_RULE: &str =
    "self.startsWith('s3://') || self.startsWith('https://') || self.startsWith('file://')";

/// Message of [`URI_SCHEME_RULE`]; the API server prefixes it with the field's path.
pub const URI_SCHEME_MESSAGE: &str = "uri must start with s3://, https:// or file://";

/// The longest URI accepted. It bounds the cost of CEL rules over lists of sources.
pub const MAX_URI_LENGTH: u32 = 2048;

/// A location in object storage: an S3 bucket and prefix, an HTTPS URL (read-only), or a
/// local folder (`file://`, for the local quickstart only).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectLocation {
    /// URI of the location: `s3://bucket/prefix`, `https://host/path` or `file:///abs/path`.
    #[x_kube(validation = Rule::new(URI_SCHEME_RULE).message(URI_SCHEME_MESSAGE))]
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Object-store access: credentials Secret, endpoint and region. Unset: the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<StoreAccess>,
}

/// How to reach an S3-compatible store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreAccess {
    /// Name of a Secret in the resource's namespace holding `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and optionally `AWS_SESSION_TOKEN`). Unset: the operator's
    /// configured Secret, or the pod's ambient credentials (IRSA, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// S3 endpoint URL for S3-compatible stores (MinIO, Ceph, R2). Unset: AWS S3. Path-style
    /// addressing is used whenever an endpoint is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("access.endpoint must be an http:// or https:// URL"))]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: Option<String>,
    /// S3 region. Unset: `us-east-1`, or `AWS_REGION` in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
}

/// Whether `uri` uses a scheme Taper's store layer understands. Mirrors [`URI_SCHEME_RULE`].
pub fn has_supported_scheme(uri: &str) -> bool {
    ["s3://", "https://", "file://"]
        .iter()
        .any(|scheme| uri.starts_with(scheme))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert!(has_supported_scheme("s3://bucket/x"));
        assert!(has_supported_scheme("file:///tmp/x"));
        assert!(!has_supported_scheme("http://insecure"));
        assert!(!has_supported_scheme("gs://other-cloud"));
    }
}
