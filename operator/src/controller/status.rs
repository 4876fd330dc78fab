//! The status fields the operator owns: applying them, and remembering what it last
//! wrote ([`Written`]), so that a reconcile woken before the watch has brought back that
//! write (a Job's creation is seen before the status applied after it) reads the status
//! as the API server has it: it neither writes the same status again nor announces a
//! transition twice.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::Serialize;
use taper_crds::{conditions::Condition, pod};

use super::{Ctx, Error, RESYNC, TaperKind};

/// The status fields the operator owns, as it applies them. The trainer owns the live
/// figures (with its own field manager); neither overwrites the other's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    /// The kind's phase name.
    pub phase: String,
    /// The conditions.
    pub conditions: Vec<Condition>,
    /// The generation acted on.
    pub observed_generation: Option<i64>,
    /// Counted pod failures (jobs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<i32>,
    /// The current trainer pod (jobs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the first pod started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the resource finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// The status this operator last applied to each resource (by uid), with the
/// `resourceVersion` of the copy it was computed from. While the cache still holds that
/// copy, the write is newer than the cache; once the cache moves on, it holds the write.
#[derive(Debug, Default)]
pub struct Written(Mutex<HashMap<String, (String, OperatorStatus, Instant)>>);

impl Written {
    fn map(&self) -> MutexGuard<'_, HashMap<String, (String, OperatorStatus, Instant)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The status last written to `obj` when `obj` is the copy that write was computed
    /// from (the cache has not brought the write back yet).
    pub fn newer<K: Resource>(&self, obj: &K) -> Option<OperatorStatus> {
        let (uid, version) = (
            obj.meta().uid.as_deref()?,
            obj.meta().resource_version.as_deref()?,
        );
        let mut map = self.map();
        match map.get(uid) {
            Some((from, status, _)) if from == version => Some(status.clone()),
            Some(_) => {
                map.remove(uid);
                None
            }
            None => None,
        }
    }

    fn record<K: Resource>(&self, obj: &K, status: &OperatorStatus) {
        let (Some(uid), Some(version)) =
            (obj.meta().uid.clone(), obj.meta().resource_version.clone())
        else {
            return;
        };
        let mut map = self.map();
        // The cache has long caught up with older writes.
        map.retain(|_, (_, _, at)| at.elapsed() < RESYNC);
        map.insert(uid, (version, status.clone(), Instant::now()));
    }

    /// Forget a deleted resource.
    pub fn forget(&self, uid: &str) {
        self.map().remove(uid);
    }

    /// How many resources it remembers.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether every field of `status` already has that value on `obj` (then applying it
/// would change nothing, and would only wake this controller again).
pub fn unchanged<K: TaperKind>(obj: &K, status: &OperatorStatus) -> bool {
    let (Ok(current), Ok(new)) = (serde_json::to_value(obj), serde_json::to_value(status)) else {
        return false;
    };
    new.as_object().is_some_and(|fields| {
        fields
            .iter()
            .all(|(k, v)| current["status"].get(k).unwrap_or(&serde_json::Value::Null) == v)
    })
}

/// Apply `status` to the resource's status subresource, unless nothing would change:
/// compared with `newer` (what [`Written::newer`] gave for `obj`) when there is one, else
/// with `obj`'s.
pub(super) async fn apply_status<K: TaperKind>(
    ctx: &Ctx,
    obj: &K,
    status: &OperatorStatus,
    newer: Option<&OperatorStatus>,
) -> Result<(), Error> {
    if newer.map_or_else(|| unchanged(obj, status), |w| w == status) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": obj.name_any()},
        "status": status,
    });
    let params = PatchParams::apply(pod::OPERATOR_FIELD_MANAGER).force();
    api.patch_status(&obj.name_any(), &params, &Patch::Apply(&body))
        .await?;
    ctx.written.record(obj, status);
    Ok(())
}
