//! Pure builders: from a resource and its resolved [`Plan`] to the objects the operator
//! applies — the job-file ConfigMap, the per-job ServiceAccount, Role and RoleBinding
//! that let the trainer report its own status, and the `batch/v1` Job. No I/O.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use sha2::{Digest, Sha256};
use taper_crds::{TaperObject, job::RunPolicy, resources::Resources};

pub mod config_map;
pub mod job;
pub mod rbac;

/// Kueue's queue label: copied from a resource to its Job, which is then created
/// suspended for Kueue to admit.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Label with the owning resource's kind.
pub const KIND_LABEL: &str = "taper.dev/kind";
/// Label with the owning resource's name.
pub const JOB_LABEL: &str = "taper.dev/job";

/// What a resource resolves to: everything the builders need besides the resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The job file: the resource itself first, with every reference made concrete and
    /// defaults filled in, then the objects it references.
    pub objects: Vec<TaperObject>,
    /// The trainer subcommand: `prepare`, `pretrain` or `finetune`.
    pub command: &'static str,
    /// Pod resources of the resource.
    pub resources: Resources,
    /// GPUs when the resource does not say.
    pub default_gpus: i32,
    /// The resource's trainer image, if it names one.
    pub image: Option<String>,
    /// Suspension, restarts and TTL.
    pub run: RunPolicy,
    /// The Secret with S3 credentials to load as environment, if any.
    pub store_secret: Option<String>,
}

/// The identity of the owning resource, as the builders need it.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    /// `Dataset`, `PretrainJob` or `FinetuneJob`.
    pub kind: String,
    /// Its plural (`pretrainjobs`), for RBAC rules.
    pub plural: String,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The controller owner reference to it.
    pub reference: OwnerReference,
    /// Its labels (the queue label is copied from them).
    pub labels: BTreeMap<String, String>,
}

impl Owner {
    /// The name of every object built for it: `<name>-<command>`, cut to 63 characters
    /// with a hash of the whole when longer (a Job's name becomes a label value).
    pub fn child_name(&self, command: &str) -> String {
        child_name(&self.name, command)
    }

    /// The Kueue queue the resource asks for.
    pub fn queue(&self) -> Option<&str> {
        self.labels.get(QUEUE_LABEL).map(String::as_str)
    }

    /// Labels of every object built for it.
    pub fn labels(&self, command: &str) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "taper".to_string()),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
            (
                "app.kubernetes.io/component".to_string(),
                command.to_string(),
            ),
            (
                "app.kubernetes.io/managed-by".to_string(),
                "taper-operator".to_string(),
            ),
            (KIND_LABEL.to_string(), self.kind.clone()),
            (JOB_LABEL.to_string(), self.name.clone()),
        ]);
        if let Some(q) = self.queue() {
            l.insert(QUEUE_LABEL.to_string(), q.to_string());
        }
        l
    }

    /// Metadata of a built object called `name`.
    pub fn meta(&self, name: &str, command: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(command)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// `<base>-<suffix>`, at most 63 characters: a longer one keeps a prefix of `base` and
/// ends with 8 hex digits of the hash of the full name, so distinct names stay distinct.
pub fn child_name(base: &str, suffix: &str) -> String {
    let full = format!("{base}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = hex::encode(Sha256::digest(full.as_bytes()));
    let keep = 63 - suffix.len() - 10;
    let prefix: String = base.chars().take(keep).collect();
    format!(
        "{}-{}-{suffix}",
        prefix.trim_end_matches(['-', '.']),
        &hash[..8]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_names_fit_a_label_and_stay_distinct() {
        assert_eq!(child_name("gpt2", "pretrain"), "gpt2-pretrain");
        let a = child_name(&"a".repeat(100), "pretrain");
        let b = child_name(&format!("{}b", "a".repeat(99)), "pretrain");
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("-pretrain"));
        assert_eq!(a, child_name(&"a".repeat(100), "pretrain"), "deterministic");
    }
}
