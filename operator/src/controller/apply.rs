//! Applying a plan's objects with server-side apply, and skipping a plan already applied
//! to the same Job ([`Applied`]).

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        batch::v1::Job,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use taper_crds::pod;

use super::{Ctx, Error, RESYNC};
use crate::build::{self, Owner, Plan};

/// The digest of the objects last applied for each Job (keyed by the Job's uid and
/// generation, so a Job changed by anyone else is applied again) and when. A reconcile
/// whose plan has the same digest skips the five applies, which are most of an operator's
/// requests once a job runs (every Job status change wakes it); after [`RESYNC`] it
/// applies anyway, restoring a child someone deleted.
#[derive(Debug, Default)]
pub struct Applied(
    std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
);

impl Applied {
    fn key(job: &Job) -> String {
        format!(
            "{}/{}",
            job.metadata.uid.as_deref().unwrap_or_default(),
            job.metadata.generation.unwrap_or_default()
        )
    }

    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (String, std::time::Instant)>>
    {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `digest` was applied to this very Job less than [`RESYNC`] ago.
    pub fn fresh(&self, job: &Job, digest: &str) -> bool {
        self.map()
            .get(&Self::key(job))
            .is_some_and(|(d, at)| d == digest && at.elapsed() < RESYNC)
    }

    /// Remember that `digest` was applied and gave `job`; entries older than [`RESYNC`]
    /// are dropped on the way, so finished Jobs do not accumulate.
    pub fn record(&self, job: &Job, digest: String) {
        let mut map = self.map();
        map.retain(|_, (_, at)| at.elapsed() < RESYNC);
        map.insert(Self::key(job), (digest, std::time::Instant::now()));
    }
}

/// SHA-256 of the objects' JSON.
fn digest(objects: &[serde_json::Value]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for o in objects {
        h.update(o.to_string().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Server-side apply of `obj` with the operator's field manager.
pub(super) async fn apply<T>(client: &Client, namespace: &str, obj: &T) -> Result<T, Error>
where
    T: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<T> = Api::namespaced(client.clone(), namespace);
    let name = obj.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(pod::OPERATOR_FIELD_MANAGER).force();
    let mut body = serde_json::to_value(obj)?;
    if let Some(map) = body.as_object_mut() {
        map.insert("apiVersion".into(), T::api_version(&()).into());
        map.insert("kind".into(), T::kind(&()).into());
    }
    Ok(api.patch(&name, &params, &Patch::Apply(&body)).await?)
}

/// What a reconcile knows of its Job before applying.
#[derive(Debug)]
pub(super) enum Known {
    /// Read from the operator's Job cache, which may lag behind the API server.
    Cached(Job),
    /// Read from the API server (`None`: there is no such Job).
    Read(Option<Job>),
}

/// The plan's objects and their digest.
struct Built {
    service_account: ServiceAccount,
    role: Role,
    role_binding: RoleBinding,
    config_map: ConfigMap,
    job: Job,
    digest: String,
}

/// Build the plan's objects for the Job `current` (`None`: to be created).
fn build_all(ctx: &Ctx, owner: &Owner, plan: &Plan, current: Option<&Job>) -> Result<Built, Error> {
    let current_suspend = current.map(|j| j.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false));
    let service_account = build::rbac::service_account(owner, plan.command);
    let role = build::rbac::role(owner, plan.command);
    let role_binding = build::rbac::role_binding(owner, plan.command);
    let config_map = build::config_map::config_map(owner, plan)?;
    let job = build::job::job(owner, plan, &ctx.cfg, current_suspend);
    let digest = digest(&[
        serde_json::to_value(&service_account)?,
        serde_json::to_value(&role)?,
        serde_json::to_value(&role_binding)?,
        serde_json::to_value(&config_map)?,
        serde_json::to_value(&job)?,
    ]);
    Ok(Built {
        service_account,
        role,
        role_binding,
        config_map,
        job,
        digest,
    })
}

/// Apply the plan's ServiceAccount, Role, RoleBinding, ConfigMap and Job, unless the same
/// objects were applied to this Job within [`RESYNC`]; returns the Job and whether it was
/// created.
///
/// A cached Job is trusted only to skip: when its plan was applied already, nothing is
/// read or written. Anything to apply is built from the Job as the API server has it,
/// because the build keeps a queued Job's `suspend` as Kueue set it, and a stale copy
/// would undo an admission.
pub(super) async fn apply_plan(
    ctx: &Ctx,
    owner: &Owner,
    plan: &Plan,
    known: Known,
) -> Result<(Job, bool), Error> {
    let ns = &owner.namespace;
    let current = match known {
        Known::Cached(job) => {
            let built = build_all(ctx, owner, plan, Some(&job))?;
            if ctx.applied.fresh(&job, &built.digest) {
                return Ok((job, false));
            }
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
            jobs.get_opt(&owner.child_name(plan.command)).await?
        }
        Known::Read(job) => job,
    };
    let built = build_all(ctx, owner, plan, current.as_ref())?;
    if let Some(current) = current.as_ref()
        && ctx.applied.fresh(current, &built.digest)
    {
        return Ok((current.clone(), false));
    }
    // The pod's ServiceAccount, Role and job file at once, all before the Job: its pod is
    // refused without the ServiceAccount, and cannot start without the ConfigMap. The
    // RoleBinding after its Role: without `bind`, the API server checks a new binding
    // against the rules of the Role it names, and refuses it (NotFound) while that Role
    // does not exist yet; applied side by side, a fast refusal also cancelled the Role's
    // request, so the race repeated on every retry. The Job beside the RoleBinding: only
    // the running trainer uses the binding, long after its pod is created (and a failed
    // binding fails this reconcile, so the next one applies both again).
    futures::try_join!(
        apply::<ServiceAccount>(&ctx.client, ns, &built.service_account),
        apply::<Role>(&ctx.client, ns, &built.role),
        apply::<ConfigMap>(&ctx.client, ns, &built.config_map),
    )?;
    let (_, applied) = futures::try_join!(
        apply::<RoleBinding>(&ctx.client, ns, &built.role_binding),
        apply::<Job>(&ctx.client, ns, &built.job),
    )?;
    ctx.applied.record(&applied, built.digest);
    Ok((applied, current.is_none()))
}
