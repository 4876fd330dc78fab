//! Disruptions on request, done as the scheduler (preemption) and the kubelet (eviction)
//! do them, so that the suite can check what the Job controller and the operator make of
//! a pod failed with the `DisruptionTarget` condition.
//!
//! A running pod annotated [`DISRUPT_ANNOTATION`] is disrupted once, by the annotation's
//! value, the reason Kubernetes writes in the pod's `DisruptionTarget` condition:
//! - [`PREEMPTION_BY_SCHEDULER`]: as the scheduler's preemption, the runner (as
//!   `system:kube-scheduler`) adds `DisruptionTarget=True` to the pod's status and deletes
//!   the pod with its grace period; the node then stops it (SIGTERM, the grace period,
//!   SIGKILL), reports it `Failed` with the condition kept, and removes it for good.
//! - [`TERMINATION_BY_KUBELET`]: as the kubelet's eviction on node pressure, the node adds
//!   the condition, stops the pod's containers with the grace period, and reports the pod
//!   `Failed` with reason `Evicted`; the pod is not deleted.
//!
//! [`DISRUPT_GRACE_ANNOTATION`] overrides the pod's `terminationGracePeriodSeconds`; `0`
//! kills at once (a hard eviction: the trainer gets no time to save a checkpoint and ends
//! with 137).

use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use serde_json::json;

use super::now;

/// The annotation that asks the runner to disrupt a pod; its value is the reason.
pub const DISRUPT_ANNOTATION: &str = "e2e.taper.dev/disrupt";
/// The annotation that overrides the grace period of a disruption, in seconds.
pub const DISRUPT_GRACE_ANNOTATION: &str = "e2e.taper.dev/disrupt-grace-seconds";
/// The `DisruptionTarget` reason of a pod preempted by the scheduler.
pub const PREEMPTION_BY_SCHEDULER: &str = "PreemptionByScheduler";
/// The `DisruptionTarget` reason of a pod terminated by the kubelet (eviction).
pub const TERMINATION_BY_KUBELET: &str = "TerminationByKubelet";
/// The pod condition type of a disrupted pod.
pub const DISRUPTION_TARGET: &str = "DisruptionTarget";
/// The pod's `status.reason` after an eviction by the kubelet.
pub const EVICTED: &str = "Evicted";

/// What the scheduler writes in the condition of a pod it preempts.
const PREEMPTION_MESSAGE: &str =
    "default-scheduler: preempting to accommodate a higher priority pod";

/// A disruption asked for by a pod's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Disruption {
    /// Preempted by the scheduler: marked, then deleted with this grace period.
    Preemption { grace: i64 },
    /// Evicted by the node.
    Eviction(Eviction),
}

/// An eviction by the node: the grace period its containers get, and the message of the
/// pod's status and condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Eviction {
    pub(super) grace: i64,
    pub(super) message: String,
}

/// The disruption `pod`'s annotations ask for, if any and if the pod has not finished;
/// an error says why an annotation cannot be followed.
pub(super) fn requested(pod: &Pod) -> Option<Result<Disruption, String>> {
    let annotations = pod.metadata.annotations.as_ref()?;
    let reason = annotations.get(DISRUPT_ANNOTATION)?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let grace = match annotations.get(DISRUPT_GRACE_ANNOTATION) {
        Some(g) => match g.parse::<i64>() {
            Ok(g) if g >= 0 => g,
            _ => {
                return Some(Err(format!(
                    "{DISRUPT_GRACE_ANNOTATION}: {g:?} is not a number of seconds"
                )));
            }
        },
        None => pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30),
    };
    Some(match reason.as_str() {
        PREEMPTION_BY_SCHEDULER => Ok(Disruption::Preemption { grace }),
        TERMINATION_BY_KUBELET => Ok(Disruption::Eviction(Eviction {
            grace,
            message: format!(
                "The node was low on resource: memory. (an eviction asked for by the \
                 {DISRUPT_ANNOTATION} annotation of the e2e pod runner)"
            ),
        })),
        other => Err(format!(
            "{DISRUPT_ANNOTATION}: {other:?} is neither {PREEMPTION_BY_SCHEDULER} nor {TERMINATION_BY_KUBELET}"
        )),
    })
}

/// The `DisruptionTarget=True` condition with `reason` and `message`.
pub(super) fn condition(reason: &str, message: &str) -> PodCondition {
    PodCondition {
        type_: DISRUPTION_TARGET.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: Some(now()),
        ..PodCondition::default()
    }
}

/// A status that only adds (or updates) `condition`: as a strategic merge patch, it keeps
/// the pod's other conditions.
pub(super) fn with_condition(condition: PodCondition) -> PodStatus {
    PodStatus {
        conditions: Some(vec![condition]),
        ..PodStatus::default()
    }
}

/// Preempt `pod` as the scheduler does: mark it `DisruptionTarget` (reason
/// `PreemptionByScheduler`), then delete it with `grace`.
pub(super) async fn preempt(scheduler: &Client, pod: &Pod, grace: i64) -> Result<(), kube::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(scheduler.clone(), ns);
    let status = with_condition(condition(PREEMPTION_BY_SCHEDULER, PREEMPTION_MESSAGE));
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Strategic(json!({ "status": status })),
    )
    .await?;
    let mut dp = DeleteParams::default().grace_period(u32::try_from(grace).unwrap_or(0));
    dp.preconditions = Some(Preconditions {
        uid: pod.metadata.uid.clone(),
        resource_version: None,
    });
    pods.delete(name, &dp).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::PodSpec;
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(annotations: &[(&str, &str)], phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                termination_grace_period_seconds: Some(60),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn the_annotation_names_the_disruption_and_the_grace_period() {
        assert_eq!(requested(&pod(&[], "Running")), None);
        assert_eq!(
            requested(&pod(
                &[(DISRUPT_ANNOTATION, PREEMPTION_BY_SCHEDULER)],
                "Running"
            )),
            Some(Ok(Disruption::Preemption { grace: 60 })),
            "the pod's own grace period by default"
        );
        let evicted = requested(&pod(
            &[
                (DISRUPT_ANNOTATION, TERMINATION_BY_KUBELET),
                (DISRUPT_GRACE_ANNOTATION, "0"),
            ],
            "Running",
        ));
        assert!(
            matches!(&evicted, Some(Ok(Disruption::Eviction(e))) if e.grace == 0 && e.message.contains("low on resource")),
            "{evicted:?}"
        );
        assert!(matches!(
            requested(&pod(&[(DISRUPT_ANNOTATION, "true")], "Running")),
            Some(Err(_))
        ));
        assert!(matches!(
            requested(&pod(
                &[
                    (DISRUPT_ANNOTATION, PREEMPTION_BY_SCHEDULER),
                    (DISRUPT_GRACE_ANNOTATION, "-1")
                ],
                "Running"
            )),
            Some(Err(_))
        ));
        assert_eq!(
            requested(&pod(
                &[(DISRUPT_ANNOTATION, PREEMPTION_BY_SCHEDULER)],
                "Failed"
            )),
            None,
            "a finished pod is not disrupted"
        );
    }

    /// The condition as the scheduler and the kubelet write it, alone in the patch so
    /// that a strategic merge keeps the pod's other conditions.
    #[test]
    fn the_condition_is_the_kubernetes_shape() {
        let v = serde_json::to_value(with_condition(condition(
            PREEMPTION_BY_SCHEDULER,
            PREEMPTION_MESSAGE,
        )))
        .expect("json");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["conditions"], "{v}");
        let c = &v["conditions"][0];
        assert_eq!(
            (&c["type"], &c["status"], &c["reason"]),
            (
                &json!("DisruptionTarget"),
                &json!("True"),
                &json!("PreemptionByScheduler")
            )
        );
        assert!(c["lastTransitionTime"].is_string(), "{c}");
    }
}
