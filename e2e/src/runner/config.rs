//! Pod configuration, resolved as the kubelet does before it starts a container: the
//! environment (`$(VAR)` expansion, `secretKeyRef`, `configMapKeyRef`, `fieldRef`,
//! `resourceFieldRef`, `envFrom`) and the volumes (ConfigMap, Secret, downward API,
//! projected with service-account tokens from the TokenRequest API, `emptyDir`), written
//! into the pod's folder.

use std::{collections::BTreeMap, path::PathBuf};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{
        ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, KeyToPath, Pod, Secret,
        ServiceAccount, Volume,
    },
};
use kube::{Api, api::PostParams};

use super::pod::PodCtx;

/// Expand `$(NAME)` references as the kubelet does; `$$(` escapes; unknown names stay.
pub(super) fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(j) if env.contains_key(&tail[..j]) => {
                    out.push_str(&env[&tail[..j]]);
                    rest = &tail[j + 1..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|l| l.get(key).cloned())
    };
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    Some(match path {
        "metadata.name" => m.name.clone()?,
        "metadata.namespace" => m.namespace.clone()?,
        "metadata.uid" => m.uid.clone()?,
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone()?,
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone()?,
        "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => "127.0.0.1".into(),
        _ => {
            if let Some(k) = quoted("metadata.labels['") {
                return label(&m.labels, &k);
            }
            if let Some(k) = quoted("metadata.annotations['") {
                return label(&m.annotations, &k);
            }
            return None;
        }
    })
}

/// Why a container cannot start yet (kubelet's `CreateContainerConfigError`).
#[derive(Debug)]
pub(super) struct ConfigError(pub(super) String);

impl PodCtx {
    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, ConfigError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("configmap {name:?}: {e}")))
    }

    async fn secret(&self, name: &str) -> Result<Option<Secret>, ConfigError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        api.get_opt(name)
            .await
            .map_err(|e| ConfigError(format!("secret {name:?}: {e}")))
    }

    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.config_map(name).await? {
            Some(cm) => {
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                Ok(data)
            }
            None if optional => Ok(BTreeMap::new()),
            None => Err(ConfigError(format!("configmap {name:?} not found"))),
        }
    }

    async fn secret_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>, ConfigError> {
        match self.secret(name).await? {
            Some(s) => {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                Ok(data)
            }
            None if optional => Ok(BTreeMap::new()),
            None => Err(ConfigError(format!("secret {name:?} not found"))),
        }
    }

    async fn token(
        &self,
        audience: Option<String>,
        expiry: Option<i64>,
    ) -> Result<Vec<u8>, ConfigError> {
        let sa = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: Some(expiry.unwrap_or(3607)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let out: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .map_err(|e| ConfigError(format!("token for service account {sa:?}: {e}")))?;
        Ok(out.status.map(|s| s.token.into_bytes()).unwrap_or_default())
    }

    /// Write every volume of the pod into `<dir>/volumes/<name>`.
    pub(super) async fn materialise(
        &self,
        volumes: &[Volume],
    ) -> Result<BTreeMap<String, PathBuf>, ConfigError> {
        let mut out = BTreeMap::new();
        for v in volumes {
            let dir = self.dir.join("volumes").join(&v.name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ConfigError(format!("{}: {e}", dir.display())))?;
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            if v.empty_dir.is_some() {
            } else if let Some(cm) = &v.config_map {
                let data = self
                    .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?;
                files.extend(select(data, cm.items.as_ref()));
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let data = self.secret_data(&name, s.optional.unwrap_or(false)).await?;
                files.extend(select(data, s.items.as_ref()));
            } else if let Some(d) = &v.downward_api {
                files.extend(downward_files(&self.pod, d.items.as_ref()));
            } else if let Some(p) = &v.projected {
                for src in p.sources.iter().flatten() {
                    if let Some(cm) = &src.config_map {
                        let data = self
                            .config_map_data(&cm.name, cm.optional.unwrap_or(false))
                            .await?;
                        files.extend(select(data, cm.items.as_ref()));
                    }
                    if let Some(s) = &src.secret {
                        let data = self
                            .secret_data(&s.name, s.optional.unwrap_or(false))
                            .await?;
                        files.extend(select(data, s.items.as_ref()));
                    }
                    if let Some(d) = &src.downward_api {
                        files.extend(downward_files(&self.pod, d.items.as_ref()));
                    }
                    if let Some(t) = &src.service_account_token {
                        files.push((
                            t.path.clone(),
                            self.token(t.audience.clone(), t.expiration_seconds).await?,
                        ));
                    }
                }
            } else {
                return Err(ConfigError(format!(
                    "volume {:?}: only configMap, secret, downwardAPI, projected and emptyDir volumes are supported by the e2e pod runner",
                    v.name
                )));
            }
            for (path, bytes) in files {
                if path.split('/').any(|c| c == "..") {
                    return Err(ConfigError(format!(
                        "volume {:?}: path {path:?} escapes the volume",
                        v.name
                    )));
                }
                let file = dir.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| ConfigError(format!("{}: {e}", parent.display())))?;
                }
                std::fs::write(&file, bytes)
                    .map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
            }
            out.insert(v.name.clone(), dir);
        }
        Ok(out)
    }

    /// The container's environment, in order, with references resolved.
    pub(super) async fn environment(
        &self,
        c: &Container,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut env = BTreeMap::new();
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(cm) = &from.config_map_ref {
                self.config_map_data(&cm.name, cm.optional.unwrap_or(false))
                    .await?
            } else if let Some(s) = &from.secret_ref {
                self.secret_data(&s.name, s.optional.unwrap_or(false))
                    .await?
            } else {
                BTreeMap::new()
            };
            for (k, v) in data {
                env.insert(
                    format!("{prefix}{k}"),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        for EnvVar {
            name,
            value,
            value_from,
        } in c.env.iter().flatten()
        {
            let v = if let Some(from) = value_from {
                if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match self.secret_data(&r.name, optional).await?.remove(&r.key) {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError(format!(
                                "couldn't find key {} in Secret {}/{}",
                                r.key, self.ns, r.name
                            )));
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match self
                        .config_map_data(&r.name, optional)
                        .await?
                        .remove(&r.key)
                    {
                        Some(v) => String::from_utf8_lossy(&v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(ConfigError(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                r.key, self.ns, r.name
                            )));
                        }
                    }
                } else if let Some(f) = &from.field_ref {
                    field_value(&self.pod, &f.field_path).unwrap_or_default()
                } else if let Some(r) = &from.resource_field_ref {
                    let res = c.resources.as_ref();
                    let (kind, resource) = r.resource.split_once('.').unwrap_or(("", ""));
                    let map = match kind {
                        "limits" => res.and_then(|r| r.limits.as_ref()),
                        _ => res.and_then(|r| r.requests.as_ref()),
                    };
                    map.and_then(|m| m.get(resource))
                        .map(|q| q.0.clone())
                        .unwrap_or_else(|| "0".into())
                } else {
                    String::new()
                }
            } else {
                expand(value.as_deref().unwrap_or_default(), &env)
            };
            env.insert(name.clone(), v);
        }
        Ok(env)
    }
}

/// The files of a ConfigMap or Secret volume: every key, or only the listed `items`.
fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        None => data.into_iter().collect(),
        Some(items) => items
            .iter()
            .filter_map(|k| data.get(&k.key).map(|v| (k.path.clone(), v.clone())))
            .collect(),
    }
}

/// The files of a downward-API volume or projection.
fn downward_files(pod: &Pod, items: Option<&Vec<DownwardAPIVolumeFile>>) -> Vec<(String, Vec<u8>)> {
    items
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let f = item.field_ref.as_ref()?;
            Some((
                item.path.clone(),
                field_value(pod, &f.field_path)
                    .unwrap_or_default()
                    .into_bytes(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$A", &env), "$A");
    }
}
