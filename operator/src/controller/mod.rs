//! The reconcile pipeline, written once for the three kinds: *dereference* (read the
//! referenced objects) → *validate and resolve* ([`crate::plan`], pure) → *build*
//! ([`crate::build`], pure) → *apply* (server-side apply, one field manager) → *status*
//! ([`crate::lifecycle`], pure, then applied to the status subresource). Each kind
//! supplies only what differs ([`TaperKind`], in [`kinds`]).

use std::{fmt::Debug, future::Future, sync::Arc, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use taper_crds::{
    Dataset,
    conditions::{Condition, ConditionReason, ConditionStatus, ConditionType, set_condition},
    job::ReclaimPolicy,
    pod,
};

use crate::{
    build::{Owner, Plan},
    config::Config,
    lifecycle::{self, Decision, Observation, State},
    metrics::Metrics,
    plan::{Inputs, Readiness},
};

mod announce;
mod apply;
mod finalizer;
pub mod kinds;
mod status;

pub use announce::Announced;
use announce::announce;
pub use apply::Applied;
use apply::{Known, apply, apply_plan};
pub use finalizer::FINALIZER;
use finalizer::{finalize, sync_finalizer};
use status::apply_status;
pub use status::{OperatorStatus, Written, unchanged};

/// How often a resource is looked at again without any change (a safety net: Job and
/// referenced-object changes trigger reconciles through watches).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Triggers for one resource within this time make one reconcile (a Job's creation and
/// its pod's, when they come together). Every new resource waits this long for its first
/// reconcile, so it is short: at 100 ms it was half the median time from a PretrainJob's
/// creation to its Job's in `scripts/bench/operator_scale.py`. The extra reconciles a
/// short debounce lets through cost no request: the Job comes from the cache, an applied
/// plan and an unchanged status are not sent again ([`Written`]), and the operator's
/// own status applies wake nothing (`run::trigger_hash`).
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// How soon a resource waiting for an input is looked at again.
pub const WAIT: Duration = Duration::from_secs(30);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The job file could not be written.
    #[error("job file: {0}")]
    JobFile(#[from] serde_yaml::Error),
    /// A status could not be serialised.
    #[error("status: {0}")]
    Status(#[from] serde_json::Error),
}

impl Error {
    /// A bounded category, for the error metric's label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Self::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Self::Kube(kube::Error::Api(s)) if s.code == 422 => "invalid",
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "transport",
            Self::JobFile(_) | Self::Status(_) => "serialization",
        }
    }
}

/// What every reconcile shares.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// The configuration.
    pub cfg: Config,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// What Events have announced, so a repeated reconcile does not announce it again.
    pub announced: Announced,
    /// What was last applied per Job, so an unchanged plan is not applied again.
    pub applied: Applied,
    /// The status last written per resource, newer than the cache until it catches up.
    pub written: Written,
    /// The Dataset controllers' caches (set once they exist; unset in tests).
    pub datasets: std::sync::OnceLock<Vec<Store<Dataset>>>,
    /// The caches of the operator's Jobs, one per watch (set once they exist).
    pub jobs: std::sync::OnceLock<Vec<Store<Job>>>,
}

/// `namespace/name` in the first of `stores` that has it.
fn cached<K>(stores: &std::sync::OnceLock<Vec<Store<K>>>, namespace: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let key = ObjectRef::new(name).within(namespace);
    stores
        .get()?
        .iter()
        .find_map(|store| store.get(&key))
        .map(|obj| (*obj).clone())
}

impl Ctx {
    /// The Dataset `namespace/name` as the Dataset controllers' caches have it.
    pub fn cached_dataset(&self, namespace: &str, name: &str) -> Option<Dataset> {
        cached(&self.datasets, namespace, name)
    }

    /// The Job `namespace/name` as the Job cache has it (`None` also when unknown there).
    pub fn cached_job(&self, namespace: &str, name: &str) -> Option<Job> {
        cached(&self.jobs, namespace, name)
    }
}

impl Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What differs between the three kinds.
pub trait TaperKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The trainer subcommand (and the suffix of every child's name).
    const COMMAND: &'static str;
    /// Whether `spec.suspend` exists (PretrainJob, FinetuneJob).
    const SUSPENDABLE: bool;
    /// Whether the kind references other objects (an `InputsReady` condition).
    const HAS_INPUTS: bool;
    /// The reason of a running pod.
    const RUNNING: ConditionReason;
    /// The reason of success.
    const DONE: ConditionReason;

    /// Read the referenced objects.
    fn dereference(&self, ctx: &Ctx) -> impl Future<Output = Result<Inputs, kube::Error>> + Send;
    /// Validate and resolve (pure).
    fn plan(&self, inputs: &Inputs, cfg: &Config) -> Readiness;
    /// The phase name of `state`.
    fn phase(state: State) -> &'static str;
    /// The current phase name and conditions.
    fn current(&self) -> (String, Vec<Condition>);
    /// Whether `spec.suspend` is true.
    fn suspended(&self) -> bool {
        false
    }
    /// Whether a finished run stopped before `maxSteps` (from the trainer's figures).
    fn stopped_early(&self) -> bool {
        false
    }
    /// The step and URI of the newest checkpoint the trainer reported (jobs only).
    fn latest_checkpoint(&self) -> Option<(i64, String)> {
        None
    }
    /// What deleting the resource does to its stored data (jobs only).
    fn reclaim_policy(&self) -> ReclaimPolicy {
        ReclaimPolicy::Retain
    }
    /// The plan of the trainer pod the cleanup Job reuses: image and S3 Secret (jobs only).
    fn cleanup_plan(&self, _cfg: &Config) -> Option<Plan> {
        None
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The resource's identity for the builders.
pub fn owner<K: TaperKind>(obj: &K) -> Owner {
    Owner {
        kind: K::kind(&()).into_owned(),
        plural: K::plural(&()).into_owned(),
        name: obj.name_any(),
        namespace: obj.namespace().unwrap_or_default(),
        reference: obj.controller_owner_ref(&()).unwrap_or_default(),
        labels: obj.labels().clone(),
    }
}

/// What the operator reads from a Job's pods.
#[derive(Debug, Default)]
struct Pods {
    /// The exit code and last words of the most recent failed trainer pod.
    failed: Option<(i32, String)>,
    /// The live pod's name.
    live: Option<String>,
    /// Pods with the `DisruptionTarget` condition (preempted, evicted, node lost): uid,
    /// name and the condition's reason and message.
    disrupted: Vec<(String, String, String, String)>,
}

/// The Job's pods, as [`Pods`].
async fn pods_of(ctx: &Ctx, owner: &Owner, job: &str) -> Result<Pods, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?;
    let mut failed: Option<(Time, i32, String)> = None;
    let mut seen = Pods::default();
    for p in &list.items {
        let status = p.status.clone().unwrap_or_default();
        let phase = status.phase.clone().unwrap_or_default();
        if (phase == "Running" || phase == "Pending") && p.metadata.deletion_timestamp.is_none() {
            seen.live = p.metadata.name.clone();
        }
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
        {
            seen.disrupted.push((
                p.metadata.uid.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            ));
        }
        for cs in status.container_statuses.unwrap_or_default() {
            if cs.name != pod::CONTAINER_NAME {
                continue;
            }
            if let Some(t) = cs.state.and_then(|s| s.terminated)
                && t.exit_code != 0
            {
                let at = t.finished_at.clone().unwrap_or_else(now);
                if failed.as_ref().is_none_or(|(f, _, _)| at.0 > f.0) {
                    failed = Some((at, t.exit_code, t.message.unwrap_or_default()));
                }
            }
        }
    }
    seen.failed = failed.map(|(_, c, m)| (c, m));
    Ok(seen)
}

/// Conditions after setting each of `new` on `current` (transition times kept when a
/// status did not change).
fn merge(current: &[Condition], new: Vec<Condition>, generation: Option<i64>) -> Vec<Condition> {
    let mut out = current.to_vec();
    let at = now();
    for mut c in new {
        c.observed_generation = generation;
        set_condition(&mut out, c, at.clone());
    }
    out
}

/// Publish an Event on `obj` in the background: the reconcile (and its concurrency slot)
/// does not wait for the request. Failures to publish are logged, never fatal.
fn event<K: TaperKind>(ctx: &Ctx, obj: &K, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    let (recorder, reference) = (ctx.recorder.clone(), obj.object_ref(&()));
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "cannot publish an event");
        }
    });
}

/// The Event reason of a move from `from` to `to`.
fn transition(from: &str, to: State, reason: ConditionReason) -> Option<&'static str> {
    let name = match (to, reason) {
        // Un-suspended: usually seen as Pending (a new pod starting), sometimes Running.
        (State::Running | State::Pending, _) if from == "Suspended" => "Resumed",
        (State::Running, _) => "Started",
        (State::Pending, ConditionReason::PodRestarting) => "Retrying",
        (State::Suspended, _) => "Suspended",
        (State::Succeeded, _) => "Succeeded",
        (State::Failed, _) => "Failed",
        (State::Pending, _) => return None,
    };
    Some(name)
}

/// One reconcile of `obj`.
pub async fn reconcile<K: TaperKind>(obj: Arc<K>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let kind = K::kind(&());
    let kind = kind.as_ref();
    ctx.metrics.reconciliations.with_label_values(&[kind]).inc();
    let timer = ctx
        .metrics
        .duration
        .with_label_values(&[kind])
        .start_timer();
    let result = reconcile_inner(&*obj, &ctx).await;
    timer.observe_duration();
    if let Err(e) = &result {
        ctx.metrics
            .errors
            .with_label_values(&[kind, e.category()])
            .inc();
    }
    result
}

async fn reconcile_inner<K: TaperKind>(obj: &K, ctx: &Ctx) -> Result<Action, Error> {
    if obj.meta().deletion_timestamp.is_some() {
        let uid = obj.meta().uid.as_deref().unwrap_or_default();
        ctx.announced.forget(uid);
        ctx.written.forget(uid);
        return finalize(ctx, obj).await;
    }
    if sync_finalizer(ctx, obj).await? {
        // The patch wakes this controller again with the new object.
        return Ok(Action::await_change());
    }
    let generation = obj.meta().generation;
    // This operator's last status write, when the cache's copy predates it.
    let newer = ctx.written.newer(obj);
    let (phase, current) = match &newer {
        Some(s) => (s.phase.clone(), s.conditions.clone()),
        None => obj.current(),
    };
    // The references and the Job, read at once.
    let owner = owner(obj);
    let job_name = owner.child_name(K::COMMAND);
    // The Job from the cache, else read (with the references, at once).
    let cached = ctx.cached_job(&owner.namespace, &job_name);
    let read = async {
        if cached.is_some() {
            return Ok(None);
        }
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &owner.namespace);
        jobs.get_opt(&job_name).await.map(Known::Read).map(Some)
    };
    let (inputs, read) = futures::try_join!(obj.dereference(ctx), read)?;
    let known = match (cached, read) {
        (_, Some(read)) => read,
        (Some(job), None) => Known::Cached(job),
        (None, None) => Known::Read(None),
    };
    let inputs_condition = |status, reason, message: &str| {
        Condition::new(ConditionType::InputsReady, status, reason, message)
    };
    let (plan, mut new_conditions) = match obj.plan(&inputs, &ctx.cfg) {
        Readiness::Ready(plan) => {
            let plan = *plan;
            let c = K::HAS_INPUTS.then(|| {
                inputs_condition(
                    ConditionStatus::True,
                    ConditionReason::InputsReady,
                    "every input is Ready",
                )
            });
            (plan, c.into_iter().collect::<Vec<_>>())
        }
        Readiness::Waiting(reason, message) => {
            let mut conds = vec![Condition::new(
                ConditionType::Ready,
                ConditionStatus::False,
                reason,
                message.clone(),
            )];
            if K::HAS_INPUTS {
                conds.push(inputs_condition(ConditionStatus::False, reason, &message));
            }
            let status = OperatorStatus {
                phase: K::phase(State::Pending).into(),
                conditions: merge(&current, conds, generation),
                observed_generation: generation,
                ..OperatorStatus::default()
            };
            apply_status(ctx, obj, &status, newer.as_ref()).await?;
            if phase != K::phase(State::Pending) || current.is_empty() {
                event(ctx, obj, EventType::Normal, "Waiting", message);
            }
            return Ok(Action::requeue(WAIT));
        }
        Readiness::Invalid(reason, message) => {
            let conds = vec![
                Condition::new(
                    ConditionType::Ready,
                    ConditionStatus::False,
                    reason,
                    message.clone(),
                ),
                Condition::new(
                    ConditionType::Failed,
                    ConditionStatus::True,
                    reason,
                    message.clone(),
                ),
            ];
            let status = OperatorStatus {
                phase: K::phase(State::Failed).into(),
                conditions: merge(&current, conds, generation),
                observed_generation: generation,
                completion_time: Some(now()),
                ..OperatorStatus::default()
            };
            apply_status(ctx, obj, &status, newer.as_ref()).await?;
            if phase != K::phase(State::Failed) {
                event(ctx, obj, EventType::Warning, "Failed", message);
            }
            return Ok(Action::await_change());
        }
    };
    // Every plan of a kind runs that kind's command (crate::plan), so the Job read above is
    // the plan's.
    debug_assert_eq!(plan.command, K::COMMAND);
    let (job, created) = apply_plan(ctx, &owner, &plan, known).await?;
    if created {
        event(
            ctx,
            obj,
            EventType::Normal,
            "Created",
            format!("created Job {}", owner.child_name(plan.command)),
        );
    }
    let job_status = job.status.clone();
    let failed_job = job_status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
    // Pods matter for a live pod's name and for failed ones (exit codes, disruptions);
    // a Job without either (just created, suspended, queued) has none worth a request.
    let has_pods = job_status.as_ref().is_some_and(|s| {
        s.active.unwrap_or(0) + s.failed.unwrap_or(0) + s.terminating.unwrap_or(0) > 0
    });
    let pods = if has_pods {
        pods_of(ctx, &owner, &job_name).await?
    } else {
        Pods::default()
    };
    let observation = Observation {
        job: job_status,
        job_suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        resource_suspended: obj.suspended(),
        queue: owner.queue().map(str::to_string),
        failed_pod: if failed_job {
            pods.failed.clone()
        } else {
            None
        },
        stopped_early: obj.stopped_early(),
    };
    let d: Decision = lifecycle::decide(&observation, K::RUNNING, K::DONE);
    new_conditions.extend(lifecycle::conditions(&d, K::SUSPENDABLE));
    let status = OperatorStatus {
        phase: K::phase(d.state).into(),
        conditions: merge(&current, new_conditions, generation),
        observed_generation: generation,
        restarts: K::SUSPENDABLE.then_some(d.restarts),
        pod_name: if K::SUSPENDABLE {
            pods.live.clone()
        } else {
            None
        },
        start_time: d.start_time.clone(),
        completion_time: d.completion_time.clone(),
    };
    apply_status(ctx, obj, &status, newer.as_ref()).await?;
    if phase != K::phase(d.state)
        && let Some(reason) = transition(&phase, d.state, d.reason)
    {
        let type_ = if d.state == State::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        event(ctx, obj, type_, reason, d.message.clone());
    }
    announce(ctx, obj, &phase, d.state, &pods).await;
    Ok(match d.state {
        State::Succeeded | State::Failed => Action::await_change(),
        _ => Action::requeue(RESYNC),
    })
}

/// Back off after an error.
pub fn error_policy<K: TaperKind>(_obj: Arc<K>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(kind = %K::kind(&()), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::{State, transition};
    use taper_crds::conditions::ConditionReason as R;

    #[test]
    fn each_transition_names_its_event() {
        let t = |from, to, reason| transition(from, to, reason);
        assert_eq!(
            t("Suspended", State::Pending, R::PodPending),
            Some("Resumed")
        );
        assert_eq!(t("Suspended", State::Running, R::Training), Some("Resumed"));
        assert_eq!(t("Pending", State::Running, R::Training), Some("Started"));
        assert_eq!(
            t("Running", State::Pending, R::PodRestarting),
            Some("Retrying")
        );
        assert_eq!(t("Running", State::Pending, R::PodPending), None);
        assert_eq!(
            t("Running", State::Suspended, R::SuspendedBySpec),
            Some("Suspended")
        );
        assert_eq!(
            t("Running", State::Succeeded, R::MaxStepsReached),
            Some("Succeeded")
        );
        assert_eq!(t("Running", State::Failed, R::InvalidData), Some("Failed"));
    }
}
