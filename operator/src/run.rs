//! Running the controllers: one per kind (and per watched namespace), each watching its
//! resources and the objects its resources reference, and woken by its Jobs through one
//! Job watch the three share, which also fills the Job cache; a gauge of
//! resources per phase; and leader election on a Lease, so that only one replica
//! reconciles.

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, future::join_all};
use k8s_openapi::api::batch::v1::Job;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        Controller, PredicateConfig, WatchStreamExt,
        controller::Config as ControllerConfig,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store, reflector},
        watcher::{self, watcher},
    },
};
use taper_crds::{Dataset, FinetuneJob, PretrainJob};

use crate::{
    config::Config,
    controller::{Ctx, TaperKind, error_policy, reconcile},
    metrics::Metrics,
};

fn apis<K>(client: &Client, namespaces: &Option<Vec<String>>) -> Vec<Api<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespaces {
        None => vec![Api::all(client.clone())],
        Some(list) => list
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect(),
    }
}

/// The status fields the operator applies itself ([`crate::controller::OperatorStatus`]).
const OWN_STATUS: [&str; 7] = [
    "phase",
    "conditions",
    "observedGeneration",
    "restarts",
    "podName",
    "startTime",
    "completionTime",
];

/// A hash of what in a resource can call for a reconcile: all of it but its
/// `resourceVersion`, its managed fields and the status fields the operator applies.
/// Events whose hash is unchanged wake no reconcile, so the operator's own status apply
/// (one event per resource and reconcile) does not queue another reconcile; a change of
/// spec, labels, finalizers or deletion, or of the trainer's live figures, does.
pub fn trigger_hash<K: serde::Serialize>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut v = serde_json::to_value(obj).ok()?;
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    if let Some(status) = v.get_mut("status").and_then(|s| s.as_object_mut()) {
        for field in OWN_STATUS {
            status.remove(field);
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut hasher);
    Some(hasher.finish())
}

/// A controller for `K` from `api` whose own watch passes only [`trigger_hash`] changes.
fn controller<K: TaperKind>(api: Api<K>) -> Controller<K> {
    let (reader, writer) = reflector::store();
    let trigger = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .predicate_filter(trigger_hash::<K>, PredicateConfig::default());
    Controller::for_stream(trigger, reader)
}

/// One watch of the operator's Jobs, shared by the three controllers (where `owns` would
/// open one each): it fills the cache the reconciles read ([`Ctx::cached_job`]) and wakes
/// each Job's owner through its kind's controller.
struct JobFeed {
    store: Store<Job>,
    dataset: Wakes,
    pretrain: Wakes,
    finetune: Wakes,
    /// Drives the watch; it runs until aborted.
    run: futures::future::BoxFuture<'static, ()>,
}

type Wakes = futures::channel::mpsc::UnboundedReceiver<Result<Job, watcher::Error>>;

fn job_feed(api: Api<Job>) -> JobFeed {
    use futures::channel::mpsc::unbounded;
    let (store, writer) = reflector::store();
    let (dataset_tx, dataset) = unbounded();
    let (pretrain_tx, pretrain) = unbounded();
    let (finetune_tx, finetune) = unbounded();
    let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=taper-operator");
    let run = watcher(api, config)
        // Kept: the metadata, `spec.suspend` and the status, all a reconcile reads of a
        // cached Job. Without the managed fields and the pod template, a cached Job is a
        // small fraction of its size (1,000 whole Jobs took 33 MiB).
        .modify(|job| {
            job.managed_fields_mut().clear();
            if let Some(spec) = job.spec.as_mut() {
                spec.template = Default::default();
                spec.pod_failure_policy = None;
            }
        })
        .default_backoff()
        .reflect(writer)
        .touched_objects()
        .for_each(move |job| {
            match job {
                Ok(job) => {
                    let owner = job
                        .owner_references()
                        .iter()
                        .find(|o| o.controller == Some(true))
                        .map(|o| o.kind.clone())
                        .unwrap_or_default();
                    let tx = if owner == Dataset::kind(&()) {
                        Some(&dataset_tx)
                    } else if owner == PretrainJob::kind(&()) {
                        Some(&pretrain_tx)
                    } else if owner == FinetuneJob::kind(&()) {
                        Some(&finetune_tx)
                    } else {
                        None
                    };
                    // A closed channel: that controller has shut down.
                    if let Some(tx) = tx {
                        let _ = tx.unbounded_send(Ok(job));
                    }
                }
                Err(error) => tracing::warn!(%error, "the Job watch failed; retrying"),
            }
            futures::future::ready(())
        })
        .boxed();
    JobFeed {
        store,
        dataset,
        pretrain,
        finetune,
        run,
    }
}

/// Count the resources of `store` per phase into the `taper_jobs` gauge.
fn count<K: TaperKind>(metrics: &Metrics, kind: &str, stores: &[Store<K>]) {
    let mut counts: std::collections::BTreeMap<String, i64> = Default::default();
    let mut phases = std::collections::BTreeSet::new();
    for store in stores {
        for obj in store.state() {
            let phase = obj.current().0;
            phases.insert((
                obj.namespace().unwrap_or_default(),
                obj.name_any(),
                phase.clone(),
            ));
            *counts.entry(phase).or_default() += 1;
        }
    }
    metrics.set_job_phases(kind, phases);
    for phase in [
        "Pending",
        "Preparing",
        "Running",
        "Suspended",
        "Ready",
        "Succeeded",
        "Failed",
    ] {
        metrics
            .jobs
            .with_label_values(&[kind, phase])
            .set(counts.get(phase).copied().unwrap_or(0));
    }
}

/// Run every controller until shutdown (SIGTERM or Ctrl-C).
pub async fn controllers(client: Client, cfg: Config, metrics: Metrics) {
    let reporter = Reporter {
        controller: "taper-operator".into(),
        instance: (!cfg.identity.is_empty()).then(|| cfg.identity.clone()),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        cfg: cfg.clone(),
        announced: Default::default(),
        applied: Default::default(),
        written: Default::default(),
        datasets: Default::default(),
        jobs: Default::default(),
    });
    let namespaces = cfg.namespaces();
    let controller_config = ControllerConfig::default()
        .concurrency(cfg.reconcile_concurrency)
        .debounce(crate::controller::DEBOUNCE);
    let mut tasks = Vec::new();
    let mut dataset_stores = Vec::new();
    let mut pretrain_stores = Vec::new();
    let mut finetune_stores = Vec::new();
    let mut job_stores = Vec::new();
    let mut feeds = Vec::new();

    for (api, jobs, datasets, pretrains) in apis::<Dataset>(&client, &namespaces)
        .into_iter()
        .zip(apis::<Job>(&client, &namespaces))
        .zip(apis::<Dataset>(&client, &namespaces))
        .zip(apis::<PretrainJob>(&client, &namespaces))
        .map(|(((a, j), d), p)| (a, j, d, p))
    {
        let feed = job_feed(jobs);
        job_stores.push(feed.store);
        feeds.push(tokio::spawn(feed.run));
        let c = controller(api)
            .owns_stream(feed.dataset)
            .with_config(controller_config.clone());
        dataset_stores.push(c.store());
        tasks.push(
            c.shutdown_on_signal()
                .run(reconcile::<Dataset>, error_policy::<Dataset>, ctx.clone())
                .for_each(|_| async {})
                .boxed(),
        );

        // PretrainJobs: also woken when their Dataset changes.
        let c = controller(pretrains.clone())
            .owns_stream(feed.pretrain)
            .with_config(controller_config.clone());
        let store = c.store();
        pretrain_stores.push(store.clone());
        let c = c.watches(
            datasets.clone(),
            watcher::Config::default(),
            move |ds: Dataset| {
                refs(&store, &ds, |pj: &PretrainJob| {
                    pj.spec.dataset_ref.name == ds.name_any()
                })
            },
        );
        tasks.push(
            c.shutdown_on_signal()
                .run(
                    reconcile::<PretrainJob>,
                    error_policy::<PretrainJob>,
                    ctx.clone(),
                )
                .for_each(|_| async {})
                .boxed(),
        );

        // FinetuneJobs: woken by their Dataset and their base PretrainJob.
        let ns_api: Api<FinetuneJob> = match &namespaces {
            None => Api::all(client.clone()),
            Some(_) => Api::namespaced(client.clone(), &datasets_namespace(&datasets)),
        };
        let c = controller(ns_api)
            .owns_stream(feed.finetune)
            .with_config(controller_config.clone());
        let store = c.store();
        finetune_stores.push(store.clone());
        let by_dataset = store.clone();
        let c = c
            .watches(datasets, watcher::Config::default(), move |ds: Dataset| {
                refs(&by_dataset, &ds, |fj: &FinetuneJob| {
                    fj.spec.dataset_ref.name == ds.name_any()
                })
            })
            .watches(
                pretrains,
                watcher::Config::default(),
                move |pj: PretrainJob| {
                    refs(&store, &pj, |fj: &FinetuneJob| {
                        fj.spec
                            .base_model
                            .pretrain_job_ref
                            .as_ref()
                            .is_some_and(|r| r.name == pj.name_any())
                    })
                },
            );
        tasks.push(
            c.shutdown_on_signal()
                .run(
                    reconcile::<FinetuneJob>,
                    error_policy::<FinetuneJob>,
                    ctx.clone(),
                )
                .for_each(|_| async {})
                .boxed(),
        );
    }

    // Before any reconcile runs (they start with `join_all` below).
    let _ = ctx.datasets.set(dataset_stores.clone());
    let _ = ctx.jobs.set(job_stores);
    let gauge = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(15)).await;
            count(&metrics, "Dataset", &dataset_stores);
            count(&metrics, "PretrainJob", &pretrain_stores);
            count(&metrics, "FinetuneJob", &finetune_stores);
        }
    });
    join_all(tasks).await;
    gauge.abort();
    for feed in feeds {
        feed.abort();
    }
}

/// The namespace a namespaced Api was made for (all controllers of one loop share it).
fn datasets_namespace(api: &Api<Dataset>) -> String {
    api.resource_url()
        .split("/namespaces/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string()
}

/// The resources in `store`, in `changed`'s namespace, for which `refers` holds.
fn refs<K, O>(store: &Store<K>, changed: &O, refers: impl Fn(&K) -> bool) -> Vec<ObjectRef<K>>
where
    K: TaperKind,
    O: Resource,
{
    let ns = changed.meta().namespace.clone();
    store
        .state()
        .into_iter()
        .filter(|k| k.meta().namespace == ns && refers(k))
        .map(|k| ObjectRef::from_obj(&*k))
        .collect()
}

/// Wait until this replica leads (on the configured Lease), returning a receiver that
/// turns false if leadership is lost.
pub async fn lead(
    client: Client,
    cfg: &Config,
) -> Result<tokio::sync::watch::Receiver<bool>, kube_lease_manager::LeaseManagerError> {
    let identity = if cfg.identity.is_empty() {
        format!("taper-operator-{}", std::process::id())
    } else {
        cfg.identity.clone()
    };
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, &cfg.lease_name)
        .with_namespace(&cfg.lease_namespace)
        .with_identity(identity)
        .with_duration(cfg.lease_seconds)
        .with_grace(5)
        .with_field_manager(taper_crds::pod::OPERATOR_FIELD_MANAGER)
        .build()
        .await?;
    let (mut rx, _task) = manager.watch().await;
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            break;
        }
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::trigger_hash;

    fn job() -> Value {
        json!({
            "apiVersion": "taper.dev/v1alpha1",
            "kind": "PretrainJob",
            "metadata": {
                "name": "gpt", "namespace": "ml", "uid": "u1", "generation": 1,
                "resourceVersion": "10", "labels": {"team": "a"},
                "managedFields": [{"manager": "taper-operator"}]
            },
            "spec": {"maxSteps": 100},
            "status": {
                "phase": "Pending", "conditions": [], "observedGeneration": 1,
                "progress": {"step": 10}
            }
        })
    }

    fn changed(edit: impl FnOnce(&mut Value)) -> bool {
        let mut other = job();
        edit(&mut other);
        trigger_hash(&job()) != trigger_hash(&other)
    }

    #[test]
    fn only_the_operators_own_status_and_bookkeeping_wake_no_reconcile() {
        // What the operator's own status apply changes.
        assert!(!changed(|j| {
            j["metadata"]["resourceVersion"] = json!("11");
            j["metadata"]["managedFields"] = json!([{"manager": "x"}]);
            j["status"]["phase"] = json!("Running");
            j["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
            j["status"]["observedGeneration"] = json!(2);
            j["status"]["restarts"] = json!(1);
            j["status"]["podName"] = json!("gpt-pretrain-x");
            j["status"]["startTime"] = json!("2026-11-30T00:00:00Z");
            j["status"]["completionTime"] = json!("2026-11-30T01:00:00Z");
        }));
        // What a person, Kueue, deletion or the trainer changes.
        assert!(changed(|j| j["spec"]["maxSteps"] = json!(200)));
        assert!(changed(|j| j["metadata"]["generation"] = json!(2)));
        assert!(changed(
            |j| j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = json!("q")
        ));
        assert!(changed(
            |j| j["metadata"]["finalizers"] = json!(["taper.dev/storage"])
        ));
        assert!(changed(
            |j| j["metadata"]["deletionTimestamp"] = json!("2026-11-30T00:00:00Z")
        ));
        assert!(changed(|j| j["status"]["progress"]["step"] = json!(20)));
        assert!(changed(|j| j["metadata"]["uid"] = json!("u2")));
    }
}
