//! `taper cleanup`: the storage half of a job's `reclaimPolicy: Delete`. The operator runs
//! it in a short Job when a PretrainJob or FinetuneJob with that policy is deleted, with
//! the job's own file and credentials, so the operator never holds storage credentials.
//! It deletes every object under the job's prefixes (its checkpoints, and a FinetuneJob's
//! output), and refuses a prefix that is a whole bucket or a filesystem root.

use taper_crds::{TaperObject, store::StoreAccess};

use crate::{job::JobError, store};

/// A store prefix to empty.
#[derive(Clone, Debug, PartialEq)]
pub struct Prefix {
    /// `s3://bucket/prefix` or `file://path`.
    pub uri: String,
    /// How to reach it.
    pub access: Option<StoreAccess>,
}

/// What was deleted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deleted {
    /// Prefix URIs emptied.
    pub prefixes: Vec<String>,
    /// Objects deleted.
    pub objects: u64,
    /// Bytes they held.
    pub bytes: u64,
}

/// The prefixes of the job `name` in a resolved job file (the operator fills in every
/// default, so the URIs are concrete).
pub fn prefixes(objects: &[TaperObject], name: Option<&str>) -> Result<Vec<Prefix>, JobError> {
    let matches =
        |meta: &kube::api::ObjectMeta| name.is_none_or(|n| meta.name.as_deref() == Some(n));
    let mut out = Vec::new();
    for object in objects {
        match object {
            TaperObject::PretrainJob(j) if matches(&j.metadata) => {
                let c = &j.spec.checkpoints;
                out.extend(c.uri.clone().map(|uri| Prefix {
                    uri,
                    access: c.access.clone(),
                }));
                break;
            }
            TaperObject::FinetuneJob(j) if matches(&j.metadata) => {
                let c = &j.spec.checkpoints;
                out.extend(c.uri.clone().map(|uri| Prefix {
                    uri,
                    access: c.access.clone(),
                }));
                out.extend(j.spec.output.location.clone().map(|l| Prefix {
                    uri: l.uri,
                    access: l.access,
                }));
                break;
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(JobError::Spec(format!(
            "no PretrainJob or FinetuneJob{} with a store prefix in the job file",
            name.map(|n| format!(" named {n}")).unwrap_or_default()
        )));
    }
    Ok(out)
}

/// Refuse a prefix whose deletion would take more than one job's data.
fn guard(uri: &str) -> Result<(), JobError> {
    let path = uri
        .strip_prefix("s3://")
        .map(|rest| rest.split_once('/').map_or("", |(_, p)| p))
        .or_else(|| uri.strip_prefix("file://"))
        .ok_or_else(|| {
            JobError::Spec(format!(
                "{uri}: only s3:// and file:// prefixes are deleted"
            ))
        })?;
    if path.trim_matches('/').is_empty() {
        return Err(JobError::Spec(format!(
            "{uri}: refusing to delete a whole bucket or filesystem root"
        )));
    }
    Ok(())
}

/// Delete every object under each prefix; deleting what is already gone is not an error,
/// so a cleanup Job that is retried finishes the work.
pub async fn delete(prefixes: &[Prefix]) -> Result<Deleted, JobError> {
    let mut done = Deleted::default();
    for p in prefixes {
        guard(&p.uri)?;
        let store = store::open(&p.uri, p.access.as_ref()).await?;
        for object in store.list("").await? {
            store.delete(&object.key).await?;
            done.objects += 1;
            done.bytes += object.size;
        }
        done.prefixes.push(p.uri.clone());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_buckets_and_roots_are_refused() {
        for bad in [
            "s3://bucket",
            "s3://bucket/",
            "file:///",
            "file://",
            "https://x/y",
        ] {
            assert!(guard(bad).is_err(), "{bad}");
        }
        for ok in [
            "s3://bucket/ml/pretrainjobs/gpt/checkpoints",
            "file:///tmp/x",
        ] {
            assert!(guard(ok).is_ok(), "{ok}");
        }
    }
}
