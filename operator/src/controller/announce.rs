//! Events for what is news since the last reconcile: a checkpoint the trainer reported
//! (`CheckpointSaved`) and a pod disrupted (`Preempted`), each announced once per replica.

use kube::runtime::events::EventType;

use super::{Ctx, Pods, TaperKind, event};
use crate::lifecycle::State;

/// What this replica has announced per resource (by uid): the newest checkpoint and the
/// disrupted pods. Entries live while their resource runs; after a restart or a failover
/// the new leader announces the current checkpoint once more, never a stream of repeats.
#[derive(Debug, Default)]
pub struct Announced(std::sync::Mutex<std::collections::HashMap<String, Seen>>);

#[derive(Debug, Default)]
struct Seen {
    checkpoint: Option<String>,
    disrupted: std::collections::BTreeSet<String>,
}

impl Announced {
    fn with<T>(&self, uid: &str, f: impl FnOnce(&mut Seen) -> T) -> T {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(map.entry(uid.to_string()).or_default())
    }

    /// Whether `uri` is news for resource `uid` (and remember it).
    pub fn checkpoint(&self, uid: &str, uri: &str) -> bool {
        self.with(uid, |s| {
            let new = s.checkpoint.as_deref() != Some(uri);
            s.checkpoint = Some(uri.to_string());
            new
        })
    }

    /// Whether the disruption of pod `pod_uid` is news for resource `uid`.
    pub fn disruption(&self, uid: &str, pod_uid: &str) -> bool {
        self.with(uid, |s| s.disrupted.insert(pod_uid.to_string()))
    }

    /// Forget resource `uid` (finished or deleted).
    pub fn forget(&self, uid: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid);
    }

    /// Resources remembered.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Announce what is news since the last reconcile: a pod disrupted (`Preempted`) and a
/// checkpoint saved (`CheckpointSaved`). Nothing for a resource that was already
/// finished; a resource that finishes now is announced, then forgotten.
pub(super) async fn announce<K: TaperKind>(
    ctx: &Ctx,
    obj: &K,
    was: &str,
    state: State,
    pods: &Pods,
) {
    let done = |p: &str| p == K::phase(State::Succeeded) || p == K::phase(State::Failed);
    let uid = obj.meta().uid.clone().unwrap_or_default();
    if done(was) {
        ctx.announced.forget(&uid);
        return;
    }
    for (pod_uid, name, reason, message) in &pods.disrupted {
        if ctx.announced.disruption(&uid, pod_uid) {
            let note = format!(
                "pod {name} was disrupted ({reason}: {message}); the Job replaces it without \
                 counting a restart, and the new pod resumes from the latest checkpoint"
            );
            event(ctx, obj, EventType::Warning, "Preempted", note);
        }
    }
    if let Some((step, uri)) = obj.latest_checkpoint()
        && ctx.announced.checkpoint(&uid, &uri)
    {
        let note = format!("checkpoint at step {step} saved to {uri}");
        event(ctx, obj, EventType::Normal, "CheckpointSaved", note);
    }
    if matches!(state, State::Succeeded | State::Failed) {
        ctx.announced.forget(&uid);
    }
}

#[cfg(test)]
mod tests {
    use super::Announced;

    #[test]
    fn each_checkpoint_and_disruption_is_announced_once_per_resource() {
        let a = Announced::default();
        assert!(a.checkpoint("job-1", "s3://b/step-000000010"));
        assert!(!a.checkpoint("job-1", "s3://b/step-000000010"), "a repeat");
        assert!(
            a.checkpoint("job-2", "s3://b/step-000000010"),
            "another job"
        );
        assert!(
            a.checkpoint("job-1", "s3://b/step-000000020"),
            "a newer one"
        );
        assert!(a.disruption("job-1", "pod-a"));
        assert!(!a.disruption("job-1", "pod-a"));
        assert!(a.disruption("job-1", "pod-b"));
        assert_eq!(a.len(), 2);
        a.forget("job-1");
        assert_eq!(a.len(), 1, "a finished or deleted job is forgotten");
        assert!(a.checkpoint("job-1", "s3://b/step-000000020"));
    }
}
