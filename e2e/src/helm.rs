//! The real `helm` (built by `e2e/scripts/build-tools.sh helm`) on the project's chart,
//! with Helm's cache, configuration and data folders out of the user's home.

use std::{path::PathBuf, process::Command};

use serde::Deserialize;
use serde_json::Value;

/// The chart's folder, `charts/taper`.
pub fn chart() -> PathBuf {
    crate::workspace_root().join("charts/taper")
}

/// `helm`, ready for arguments.
pub fn command() -> Command {
    let tmp = std::env::temp_dir();
    let mut cmd = Command::new(crate::minio::tools_dir().join("helm"));
    cmd.env("HELM_CACHE_HOME", tmp.join("taper-helm-cache"))
        .env("HELM_CONFIG_HOME", tmp.join("taper-helm-config"))
        .env("HELM_DATA_HOME", tmp.join("taper-helm-data"));
    cmd
}

/// The objects of `helm template RELEASE charts/taper --namespace NAMESPACE EXTRA…`
/// (`extra` such as `--set`, `key=value`), empty documents left out.
pub fn template(release: &str, namespace: &str, extra: &[&str]) -> Result<Vec<Value>, String> {
    let out = command()
        .args(["template", release])
        .arg(chart())
        .args(["--namespace", namespace])
        .args(extra)
        .output()
        .map_err(|e| format!("helm: {e} (run e2e/scripts/build-tools.sh helm)"))?;
    if !out.status.success() {
        return Err(format!(
            "helm template {extra:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let value = Value::deserialize(doc).map_err(|e| format!("rendered YAML: {e}"))?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}
