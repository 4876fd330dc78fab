//! `reclaimPolicy`: the finalizer that holds a deleted job until its cleanup Job has
//! emptied its store prefixes, and that Job's lifecycle.

use std::time::Duration;

use k8s_openapi::api::{batch::v1::Job, core::v1::ConfigMap};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use taper_crds::job::ReclaimPolicy;

use super::{Ctx, Error, TaperKind, apply, event, owner};
use crate::build;

/// The finalizer that holds a job with `reclaimPolicy: Delete` until its cleanup Job has
/// emptied its store prefixes.
pub const FINALIZER: &str = "taper.dev/storage";

fn has_finalizer<K: TaperKind>(obj: &K) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// Set the resource's finalizers to `finalizers`, if its `resourceVersion` is still the
/// one read (a concurrent change makes this fail with a conflict, and the next reconcile
/// sees the change).
async fn set_finalizers<K: TaperKind>(
    ctx: &Ctx,
    obj: &K,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": obj.resource_version(),
    }});
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Add or drop [`FINALIZER`] to match the resource's `reclaimPolicy`; whether it changed.
pub(super) async fn sync_finalizer<K: TaperKind>(ctx: &Ctx, obj: &K) -> Result<bool, Error> {
    let want = obj.reclaim_policy() == ReclaimPolicy::Delete;
    if want == has_finalizer(obj) {
        return Ok(false);
    }
    let mut list: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if want {
        list.push(FINALIZER.to_string());
    }
    set_finalizers(ctx, obj, list).await?;
    Ok(true)
}

/// A resource being deleted: with `reclaimPolicy: Delete`, run the cleanup Job and drop
/// the finalizer once it has completed; otherwise drop it at once.
pub(super) async fn finalize<K: TaperKind>(ctx: &Ctx, obj: &K) -> Result<Action, Error> {
    if !has_finalizer(obj) {
        return Ok(Action::await_change());
    }
    let owner = owner(obj);
    let drop_finalizer = |note: Option<String>| async move {
        let rest = obj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        set_finalizers(ctx, obj, rest).await?;
        if let Some(note) = note {
            event(ctx, obj, EventType::Normal, "StorageDeleted", note);
        }
        Ok::<_, Error>(Action::await_change())
    };
    let plan = match (obj.reclaim_policy(), obj.cleanup_plan(&ctx.cfg)) {
        (ReclaimPolicy::Delete, Some(plan)) => plan,
        _ => return drop_finalizer(None).await,
    };
    // Nothing was ever written without the job file: the trainer never ran.
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    if config_maps
        .get_opt(&owner.child_name(plan.command))
        .await?
        .is_none()
    {
        return drop_finalizer(None).await;
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let name = owner.child_name(build::job::CLEANUP);
    let Some(job) = jobs.get_opt(&name).await? else {
        apply::<Job>(
            &ctx.client,
            &owner.namespace,
            &build::job::cleanup_job(&owner, &plan, &ctx.cfg),
        )
        .await?;
        let note = format!("deleting the job's stored data with Job {name}");
        event(ctx, obj, EventType::Normal, "DeletingStorage", note);
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let status = job.status.unwrap_or_default();
    let has = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    if has("Complete") {
        return drop_finalizer(Some(format!(
            "Job {name} deleted everything under the job's store prefixes"
        )))
        .await;
    }
    if has("Failed") {
        let note = format!(
            "Job {name} could not delete the job's stored data (see its pod's log); \
             fix the cause and delete the Job to retry, or set reclaimPolicy: Retain"
        );
        event(ctx, obj, EventType::Warning, "StorageDeletionFailed", note);
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    Ok(Action::requeue(Duration::from_secs(5)))
}
