//! Phases and conditions shared by the three kinds.
//!
//! Conditions follow the Kubernetes API conventions (`type`, `status`, `reason`,
//! `message`, `lastTransitionTime`, `observedGeneration`), but `type` and `reason`
//! are closed enums: every reason is one the operator can set and a person can act on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Lifecycle phase of a Dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DatasetPhase {
    /// Accepted; the prepare pod has not started yet.
    #[default]
    Pending,
    /// The prepare pod is reading, cleaning, deduplicating and tokenizing.
    Preparing,
    /// Shards and manifest are published; jobs that reference this Dataset may start.
    Ready,
    /// Preparation failed permanently; see the `Ready` condition for the reason.
    Failed,
}

impl DatasetPhase {
    /// Whether the phase is terminal (no further work will happen without a spec change).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Ready | Self::Failed)
    }
}

/// Lifecycle phase of a PretrainJob or FinetuneJob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobPhase {
    /// Accepted; waiting for its inputs (Dataset, base model) or for a pod to be scheduled.
    #[default]
    Pending,
    /// A trainer pod is running.
    Running,
    /// `spec.suspend` is true; no pod runs, the latest checkpoint is kept.
    Suspended,
    /// Training finished (`maxSteps` reached or stopped early); the final checkpoint is published.
    Succeeded,
    /// Training failed permanently or ran out of restarts; see the `Failed` condition.
    Failed,
}

impl JobPhase {
    /// Whether the phase is terminal.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Status of a condition, as in the Kubernetes API conventions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell yet.
    #[default]
    Unknown,
}

/// The kinds of condition Taper sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionType {
    /// The resource's output is usable (Dataset: shards published; job: final model published).
    Ready,
    /// Work is under way (a pod is running and reporting progress).
    Progressing,
    /// Every input the resource references exists and is Ready.
    InputsReady,
    /// The job is suspended by `spec.suspend`.
    Suspended,
    /// The resource failed permanently; the reason says why.
    Failed,
}

/// Machine-readable reason of a condition. Each one names a cause a person can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionReason {
    /// The resource was just accepted.
    Created,
    /// The referenced Dataset does not exist in this namespace.
    DatasetNotFound,
    /// The referenced Dataset exists but is not Ready yet.
    DatasetNotReady,
    /// The referenced Dataset has the wrong `format` for this kind of job.
    DatasetFormatMismatch,
    /// The referenced PretrainJob does not exist in this namespace.
    BaseModelNotFound,
    /// The referenced PretrainJob has no checkpoint of the requested kind yet.
    BaseModelNotReady,
    /// The Secret named for object-store credentials does not exist.
    CredentialsNotFound,
    /// All inputs are present and Ready.
    InputsReady,
    /// The pod was created and is waiting to be scheduled or to pull its image.
    PodPending,
    /// The Job waits in its Kueue queue (`kueue.x-k8s.io/queue-name`) to be admitted.
    AwaitingAdmission,
    /// The trainer is running.
    Training,
    /// The prepare pod is running.
    Preparing,
    /// The pod was lost (preemption, node failure, OOM kill) and is being replaced; training resumes from the latest checkpoint.
    PodRestarting,
    /// The job is suspended by `spec.suspend`.
    SuspendedBySpec,
    /// Training reached `maxSteps`.
    MaxStepsReached,
    /// Validation loss stopped improving and `spec.overfitting.action` is `StopEarly`.
    StoppedEarly,
    /// The Dataset's shards and manifest were published.
    Published,
    /// The spec is invalid in a way the API server could not catch (for example an unknown preset in a referenced object).
    InvalidSpec,
    /// The input data could not be used (unreadable source, nothing left after filtering, corrupt shards).
    InvalidData,
    /// Loss became NaN or infinite and did not recover.
    LossDiverged,
    /// The pod failed more than `spec.maxRestarts` times.
    RestartLimitExceeded,
    /// The job was active longer than `spec.activeDeadlineSeconds`.
    DeadlineExceeded,
    /// The trainer exited with a permanent error; the message carries its last words.
    TrainerError,
}

/// One observation of the resource's state, in the shape of the Kubernetes API conventions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Which aspect of the resource this condition describes.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// Whether the condition holds.
    pub status: ConditionStatus,
    /// Why the condition has this status, as a closed set of reasons.
    pub reason: ConditionReason,
    /// A human-readable explanation with the details needed to act on it.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition with the given type, status and reason, and no transition time yet.
    pub fn new(
        type_: ConditionType,
        status: ConditionStatus,
        reason: ConditionReason,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
            last_transition_time: None,
            observed_generation: None,
        }
    }
}

/// Set `new` in `conditions`, replacing the condition of the same type. The transition
/// time is kept when the status did not change, as the API conventions require.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: Time) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            new.last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone().or(Some(now))
            } else {
                Some(now)
            };
            *existing = new;
        }
        None => {
            new.last_transition_time = Some(now);
            conditions.push(new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conds = Vec::new();
        let c = || {
            Condition::new(
                ConditionType::InputsReady,
                ConditionStatus::False,
                ConditionReason::DatasetNotReady,
                "waiting",
            )
        };
        set_condition(&mut conds, c(), at(10));
        set_condition(&mut conds, c(), at(20));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, Some(at(10)));

        let ready = Condition::new(
            ConditionType::InputsReady,
            ConditionStatus::True,
            ConditionReason::InputsReady,
            "",
        );
        set_condition(&mut conds, ready, at(30));
        assert_eq!(conds[0].last_transition_time, Some(at(30)));
        assert_eq!(conds[0].reason, ConditionReason::InputsReady);
    }

    #[test]
    fn terminal_phases() {
        assert!(DatasetPhase::Ready.is_terminal());
        assert!(!DatasetPhase::Preparing.is_terminal());
        assert!(JobPhase::Failed.is_terminal());
        assert!(!JobPhase::Suspended.is_terminal());
    }
}
