//! The lifecycle state machine, pure: what the operator observes of a resource's Job
//! (its conditions, counters and suspension) and of the Job's failed pod becomes the
//! resource's state, the reason a person can act on, and the restart count. The exit
//! codes follow the contract of [`taper_crds::exit`] as the Job's pod failure policy
//! applied them.

use k8s_openapi::{
    api::batch::v1::JobStatus as BatchStatus, apimachinery::pkg::apis::meta::v1::Time,
};
use taper_crds::{
    conditions::{Condition, ConditionReason, ConditionStatus, ConditionType},
    exit,
};

/// Where a resource is, independent of its kind's phase names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting: for inputs, admission, or a pod.
    Pending,
    /// A trainer pod runs.
    Running,
    /// Suspended by the resource's `spec.suspend`.
    Suspended,
    /// Done and published.
    Succeeded,
    /// Failed permanently.
    Failed,
}

/// What the operator saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// The Job's status, `None` before the Job exists.
    pub job: Option<BatchStatus>,
    /// The Job's `spec.suspend`.
    pub job_suspended: bool,
    /// The resource's `spec.suspend`.
    pub resource_suspended: bool,
    /// The resource's Kueue queue, if any.
    pub queue: Option<String>,
    /// Exit code and termination message of the pod that failed the Job, when known.
    pub failed_pod: Option<(i32, String)>,
    /// For a job that succeeded: whether it stopped before `maxSteps` (an early stop).
    pub stopped_early: bool,
}

/// What the operator concludes.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The state.
    pub state: State,
    /// Why, as a closed reason.
    pub reason: ConditionReason,
    /// Details a person can act on.
    pub message: String,
    /// Pod failures counted against `maxRestarts`.
    pub restarts: i32,
    /// When the Job's first pod started.
    pub start_time: Option<Time>,
    /// When the Job finished.
    pub completion_time: Option<Time>,
}

fn condition(status: &BatchStatus, type_: &str) -> Option<(String, String, Option<Time>)> {
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
                c.last_transition_time.clone(),
            )
        })
}

/// The reason of a pod that failed the Job with exit `code`.
pub fn failure_reason(code: i32) -> ConditionReason {
    match u8::try_from(code) {
        Ok(exit::INVALID_SPEC) => ConditionReason::InvalidSpec,
        Ok(exit::INVALID_DATA) => ConditionReason::InvalidData,
        Ok(exit::LOSS_DIVERGED) => ConditionReason::LossDiverged,
        _ => ConditionReason::TrainerError,
    }
}

/// Decide the state of a resource whose Job is observed as `o`; `running` is the reason
/// of a running pod (`Preparing` or `Training`), `done` the reason of success.
pub fn decide(o: &Observation, running: ConditionReason, done: ConditionReason) -> Decision {
    let pending = |reason, message: String| Decision {
        state: State::Pending,
        reason,
        message,
        restarts: 0,
        start_time: None,
        completion_time: None,
    };
    let Some(job) = &o.job else {
        return pending(ConditionReason::PodPending, "creating the Job".into());
    };
    let restarts = job.failed.unwrap_or(0);
    let mut d = Decision {
        restarts,
        start_time: job.start_time.clone(),
        ..pending(ConditionReason::PodPending, String::new())
    };
    if let Some((_, _, at)) = condition(job, "Complete") {
        d.state = State::Succeeded;
        d.reason = if o.stopped_early {
            ConditionReason::StoppedEarly
        } else {
            done
        };
        d.message = "the trainer finished and published its output".into();
        d.completion_time = job.completion_time.clone().or(at);
        return d;
    }
    if let Some((reason, message, at)) = condition(job, "Failed") {
        d.state = State::Failed;
        d.completion_time = at;
        let last_words = o
            .failed_pod
            .as_ref()
            .map(|(code, words)| format!("exit code {code}: {}", words.trim()))
            .unwrap_or_else(|| message.clone());
        (d.reason, d.message) = match reason.as_str() {
            "PodFailurePolicy" => (
                o.failed_pod
                    .as_ref()
                    .map_or(ConditionReason::TrainerError, |(code, _)| {
                        failure_reason(*code)
                    }),
                last_words,
            ),
            "BackoffLimitExceeded" => (
                ConditionReason::RestartLimitExceeded,
                format!("{restarts} pod failures, more than maxRestarts; last: {last_words}"),
            ),
            "DeadlineExceeded" => (
                ConditionReason::DeadlineExceeded,
                format!(
                    "{message} (activeDeadlineSeconds); to go on, delete and re-apply it with \
                     a larger deadline or none: with reclaimPolicy Retain its new pod resumes \
                     from the latest checkpoint"
                ),
            ),
            _ => (
                ConditionReason::TrainerError,
                format!("{reason}: {last_words}"),
            ),
        };
        return d;
    }
    if o.job_suspended {
        if o.resource_suspended {
            d.state = State::Suspended;
            d.reason = ConditionReason::SuspendedBySpec;
            d.message = "spec.suspend is true; the latest checkpoint is kept".into();
        } else if let Some(q) = &o.queue {
            d.reason = ConditionReason::AwaitingAdmission;
            d.message = format!("the Job waits in Kueue queue {q} to be admitted");
        } else {
            d.message = "the Job is suspended".into();
        }
        return d;
    }
    if job.active.unwrap_or(0) > 0 {
        d.state = State::Running;
        d.reason = running;
        d.message = "a trainer pod is running".into();
        return d;
    }
    if restarts > 0 || job.terminating.unwrap_or(0) > 0 {
        d.reason = ConditionReason::PodRestarting;
        d.message =
            "the pod was lost and is being replaced; training resumes from the latest checkpoint"
                .into();
    } else {
        d.message = "waiting for the trainer pod to start".into();
    }
    d
}

/// The conditions that say `d` (`Ready`, `Progressing`, and `Failed` or `Suspended` when
/// they hold), each with the decision's reason and message.
pub fn conditions(d: &Decision, suspendable: bool) -> Vec<Condition> {
    let c = |type_, holds: bool| {
        let status = if holds {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        Condition::new(type_, status, d.reason, d.message.clone())
    };
    let mut out = vec![
        c(ConditionType::Ready, d.state == State::Succeeded),
        c(ConditionType::Progressing, d.state == State::Running),
    ];
    if d.state == State::Failed {
        out.push(c(ConditionType::Failed, true));
    }
    if suspendable {
        out.push(c(ConditionType::Suspended, d.state == State::Suspended));
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::JobCondition;

    use super::*;

    fn job(active: i32, failed: i32, cond: Option<(&str, &str)>) -> BatchStatus {
        BatchStatus {
            active: Some(active),
            failed: Some(failed),
            conditions: cond.map(|(t, r)| {
                vec![JobCondition {
                    type_: t.into(),
                    status: "True".into(),
                    reason: Some(r.into()),
                    message: Some(format!("{t} because {r}")),
                    ..JobCondition::default()
                }]
            }),
            ..BatchStatus::default()
        }
    }

    fn decide_on(o: Observation) -> Decision {
        decide(
            &o,
            ConditionReason::Training,
            ConditionReason::MaxStepsReached,
        )
    }

    #[test]
    fn no_job_yet_is_pending_and_an_active_pod_is_running() {
        assert_eq!(decide_on(Observation::default()).state, State::Pending);
        let d = decide_on(Observation {
            job: Some(job(1, 0, None)),
            ..Observation::default()
        });
        assert_eq!(
            (d.state, d.reason),
            (State::Running, ConditionReason::Training)
        );
    }

    #[test]
    fn permanent_exit_codes_fail_with_their_reason() {
        for (code, reason) in [
            (2, ConditionReason::InvalidSpec),
            (3, ConditionReason::InvalidData),
            (4, ConditionReason::LossDiverged),
        ] {
            let d = decide_on(Observation {
                job: Some(job(0, 1, Some(("Failed", "PodFailurePolicy")))),
                failed_pod: Some((code, "taper: invalid data: no document left".into())),
                ..Observation::default()
            });
            assert_eq!((d.state, d.reason), (State::Failed, reason), "exit {code}");
            assert!(
                d.message.contains(&format!("exit code {code}")),
                "{}",
                d.message
            );
        }
    }

    #[test]
    fn too_many_counted_failures_exceed_the_restart_limit() {
        let d = decide_on(Observation {
            job: Some(job(0, 4, Some(("Failed", "BackoffLimitExceeded")))),
            failed_pod: Some((1, "panicked".into())),
            ..Observation::default()
        });
        assert_eq!(d.state, State::Failed);
        assert_eq!(d.reason, ConditionReason::RestartLimitExceeded);
        assert_eq!(d.restarts, 4);
    }

    #[test]
    fn a_job_past_its_deadline_fails_saying_so() {
        let d = decide_on(Observation {
            job: Some(job(0, 0, Some(("Failed", "DeadlineExceeded")))),
            ..Observation::default()
        });
        assert_eq!(
            (d.state, d.reason),
            (State::Failed, ConditionReason::DeadlineExceeded)
        );
        assert!(d.message.contains("activeDeadlineSeconds"), "{}", d.message);
    }

    #[test]
    fn a_replaced_pod_is_restarting_and_success_says_how_it_ended() {
        let d = decide_on(Observation {
            job: Some(job(0, 1, None)),
            ..Observation::default()
        });
        assert_eq!(
            (d.state, d.reason),
            (State::Pending, ConditionReason::PodRestarting)
        );
        let d = decide_on(Observation {
            job: Some(job(0, 0, Some(("Complete", "CompletionsReached")))),
            stopped_early: true,
            ..Observation::default()
        });
        assert_eq!(
            (d.state, d.reason),
            (State::Succeeded, ConditionReason::StoppedEarly)
        );
    }

    #[test]
    fn a_suspended_job_is_suspended_or_awaits_admission() {
        let suspended = |resource_suspended, queue: Option<&str>| {
            decide_on(Observation {
                job: Some(job(0, 0, None)),
                job_suspended: true,
                resource_suspended,
                queue: queue.map(str::to_string),
                ..Observation::default()
            })
        };
        let d = suspended(true, Some("gpus"));
        assert_eq!(
            (d.state, d.reason),
            (State::Suspended, ConditionReason::SuspendedBySpec)
        );
        let d = suspended(false, Some("gpus"));
        assert_eq!(
            (d.state, d.reason),
            (State::Pending, ConditionReason::AwaitingAdmission)
        );
        assert!(d.message.contains("gpus"));
    }

    #[test]
    fn conditions_mirror_the_decision() {
        let d = decide_on(Observation {
            job: Some(job(0, 0, Some(("Failed", "PodFailurePolicy")))),
            failed_pod: Some((3, "bad data".into())),
            ..Observation::default()
        });
        let cs = conditions(&d, true);
        let get = |t| cs.iter().find(|c| c.type_ == t).expect("condition");
        assert_eq!(get(ConditionType::Failed).status, ConditionStatus::True);
        assert_eq!(get(ConditionType::Ready).status, ConditionStatus::False);
        assert_eq!(
            get(ConditionType::Ready).reason,
            ConditionReason::InvalidData
        );
        assert_eq!(get(ConditionType::Suspended).status, ConditionStatus::False);
    }
}
