//! The three kinds' parts of the pipeline: what each references, how it resolves, and
//! its phase names.

use kube::{Api, ResourceExt};
use taper_crds::{
    Dataset, FinetuneJob, PretrainJob,
    conditions::{Condition, ConditionReason},
    job::ReclaimPolicy,
};

use super::{Ctx, TaperKind};
use crate::{
    build::Plan,
    config::Config,
    lifecycle::State,
    plan::{self, Inputs, Readiness},
};

fn job_phase(state: State) -> &'static str {
    match state {
        State::Pending => "Pending",
        State::Running => "Running",
        State::Suspended => "Suspended",
        State::Succeeded => "Succeeded",
        State::Failed => "Failed",
    }
}

fn phase_name<T: serde::Serialize>(phase: &T) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The Dataset `namespace/name`: from the Dataset controller's cache when it is Ready
/// there (a published Dataset stays so: most reads, none a request), else from the API
/// server (the cache may lag behind the watch event that woke this reconcile).
async fn dataset(ctx: &Ctx, namespace: &str, name: &str) -> Result<Option<Dataset>, kube::Error> {
    if let Some(ds) = ctx.cached_dataset(namespace, name)
        && ds.current().0 == Dataset::phase(State::Succeeded)
    {
        return Ok(Some(ds));
    }
    Api::<Dataset>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
}

impl TaperKind for Dataset {
    const COMMAND: &'static str = "prepare";
    const SUSPENDABLE: bool = false;
    const HAS_INPUTS: bool = false;
    const RUNNING: ConditionReason = ConditionReason::Preparing;
    const DONE: ConditionReason = ConditionReason::Published;

    async fn dereference(&self, _ctx: &Ctx) -> Result<Inputs, kube::Error> {
        Ok(Inputs::default())
    }

    fn plan(&self, _inputs: &Inputs, cfg: &Config) -> Readiness {
        plan::plan_dataset(self, cfg)
    }

    fn phase(state: State) -> &'static str {
        match state {
            State::Pending | State::Suspended => "Pending",
            State::Running => "Preparing",
            State::Succeeded => "Ready",
            State::Failed => "Failed",
        }
    }

    fn current(&self) -> (String, Vec<Condition>) {
        let s = self.status.clone().unwrap_or_default();
        (phase_name(&s.phase), s.conditions)
    }
}

impl TaperKind for PretrainJob {
    const COMMAND: &'static str = "pretrain";
    const SUSPENDABLE: bool = true;
    const HAS_INPUTS: bool = true;
    const RUNNING: ConditionReason = ConditionReason::Training;
    const DONE: ConditionReason = ConditionReason::MaxStepsReached;

    async fn dereference(&self, ctx: &Ctx) -> Result<Inputs, kube::Error> {
        let ns = self.namespace().unwrap_or_default();
        Ok(Inputs {
            dataset: dataset(ctx, &ns, &self.spec.dataset_ref.name).await?,
            base: None,
        })
    }

    fn plan(&self, inputs: &Inputs, cfg: &Config) -> Readiness {
        plan::plan_pretrain(self, inputs, cfg)
    }

    fn phase(state: State) -> &'static str {
        job_phase(state)
    }

    fn current(&self) -> (String, Vec<Condition>) {
        let s = self.status.clone().unwrap_or_default();
        (phase_name(&s.phase), s.conditions)
    }

    fn suspended(&self) -> bool {
        self.spec.run.suspend
    }

    fn latest_checkpoint(&self) -> Option<(i64, String)> {
        latest(self.status.as_ref())
    }

    fn reclaim_policy(&self) -> ReclaimPolicy {
        self.spec.run.reclaim_policy
    }

    fn cleanup_plan(&self, cfg: &Config) -> Option<Plan> {
        let secret = plan::secret_of(self.spec.checkpoints.access.as_ref(), cfg);
        Some(cleanup_plan(
            "pretrain",
            self.spec.run.image.clone(),
            secret,
        ))
    }

    fn stopped_early(&self) -> bool {
        let max = self.spec.resolved_training().max_steps;
        self.status
            .as_ref()
            .and_then(|s| s.step)
            .is_some_and(|step| step < max)
    }
}

impl TaperKind for FinetuneJob {
    const COMMAND: &'static str = "finetune";
    const SUSPENDABLE: bool = true;
    const HAS_INPUTS: bool = true;
    const RUNNING: ConditionReason = ConditionReason::Training;
    const DONE: ConditionReason = ConditionReason::MaxStepsReached;

    async fn dereference(&self, ctx: &Ctx) -> Result<Inputs, kube::Error> {
        let ns = self.namespace().unwrap_or_default();
        let base = match &self.spec.base_model.pretrain_job_ref {
            Some(r) => {
                Api::<PretrainJob>::namespaced(ctx.client.clone(), &ns)
                    .get_opt(&r.name)
                    .await?
            }
            None => None,
        };
        Ok(Inputs {
            dataset: dataset(ctx, &ns, &self.spec.dataset_ref.name).await?,
            base,
        })
    }

    fn plan(&self, inputs: &Inputs, cfg: &Config) -> Readiness {
        plan::plan_finetune(self, inputs, cfg)
    }

    fn phase(state: State) -> &'static str {
        job_phase(state)
    }

    fn current(&self) -> (String, Vec<Condition>) {
        let s = self.status.clone().unwrap_or_default().job;
        (phase_name(&s.phase), s.conditions)
    }

    fn suspended(&self) -> bool {
        self.spec.run.suspend
    }

    fn latest_checkpoint(&self) -> Option<(i64, String)> {
        latest(self.status.as_ref().map(|s| &s.job))
    }

    fn reclaim_policy(&self) -> ReclaimPolicy {
        self.spec.run.reclaim_policy
    }

    fn cleanup_plan(&self, cfg: &Config) -> Option<Plan> {
        let access = self
            .spec
            .output
            .location
            .as_ref()
            .and_then(|l| l.access.as_ref())
            .or(self.spec.checkpoints.access.as_ref());
        let secret = plan::secret_of(access, cfg);
        Some(cleanup_plan(
            "finetune",
            self.spec.run.image.clone(),
            secret,
        ))
    }
}

/// The part of a trainer pod's plan the cleanup Job reuses.
fn cleanup_plan(
    command: &'static str,
    image: Option<String>,
    store_secret: Option<String>,
) -> Plan {
    Plan {
        objects: Vec::new(),
        command,
        resources: Default::default(),
        default_gpus: 0,
        image,
        run: Default::default(),
        store_secret,
    }
}

/// The step and URI of a job's newest checkpoint, as the trainer reported it.
fn latest(status: Option<&taper_crds::JobStatus>) -> Option<(i64, String)> {
    let status = status?;
    let uri = status.latest_checkpoint.clone()?;
    let step = status
        .checkpoints
        .iter()
        .find(|c| c.uri == uri)
        .map_or(-1, |c| c.step);
    Some((step, uri))
}
