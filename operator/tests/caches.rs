//! The operator's caches against the mocked API server: what a reconcile may take from
//! them without a request, and where it must read the API server instead.

use http::Method;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::{reflector, watcher};
use serde_json::json;
use taper_crds::{Dataset, PretrainJob};
mod mock;

use mock::{Mock, Request_, World, applies, condition, dataset, pretrain_job, ready_dataset};

/// The requests among `seen` with `method` whose path contains `part`.
fn count(seen: &[Request_], method: Method, part: &str) -> usize {
    seen.iter()
        .filter(|(m, p, _)| *m == method && p.contains(part))
        .count()
}

/// The GETs of Jobs among `seen`.
fn job_reads(seen: &[Request_]) -> usize {
    count(seen, Method::GET, "/jobs/")
}

#[tokio::test]
async fn a_cached_job_whose_plan_was_applied_is_not_read_and_a_stale_one_does_not_undo_kueue() {
    let mut queued = pretrain_job(false);
    queued["metadata"]["labels"] = json!({"kueue.x-k8s.io/queue-name": "gpus"});
    let mock = Mock::new(World {
        dataset: Some(ready_dataset()),
        resource: queued,
        ..World::default()
    });
    let (store, mut writer) = reflector::store::<Job>();
    let _ = mock.ctx.jobs.set(vec![store]);
    // Not in the cache: read (not found), then created, suspended for Kueue.
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(job_reads(&seen), 1, "{seen:#?}");
    assert!(applies(&seen).contains(&"Job".to_string()), "{seen:#?}");
    assert_eq!(mock.job()["spec"]["suspend"], true);
    // The watch brings the Job into the cache: a reconcile makes no request for it.
    let cache = |writer: &mut reflector::store::Writer<Job>, job| {
        let job: Job = serde_json::from_value(job).expect("job");
        writer.apply_watcher_event(&watcher::Event::Apply(job));
    };
    cache(&mut writer, mock.job());
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(
        (job_reads(&seen), applies(&seen).len()),
        (0, 0),
        "{seen:#?}"
    );
    // Kueue admits it, and the person changes the spec before the watch has brought the
    // admission: the new plan is built from the Job read from the API server, so the
    // apply keeps Kueue's `suspend: false` (the stale copy would have re-suspended it).
    if let Some(job) = mock.world.lock().expect("lock").job.as_mut() {
        job["spec"]["suspend"] = json!(false);
    }
    mock.world.lock().expect("lock").resource["spec"]["training"] = json!({"maxSteps": 123});
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(job_reads(&seen), 1, "{seen:#?}");
    assert!(applies(&seen).contains(&"Job".to_string()), "{seen:#?}");
    assert_eq!(mock.job()["spec"]["suspend"], false, "{:#}", mock.job());
}

#[tokio::test]
async fn a_ready_dataset_in_the_cache_is_not_read_again_and_one_that_is_not_is() {
    let reads = |seen: &[Request_]| count(seen, Method::GET, "/datasets/");
    // Not in any cache: read from the API server.
    let mock = Mock::new(World {
        dataset: Some(ready_dataset()),
        resource: pretrain_job(false),
        ..World::default()
    });
    let (store, mut writer) = reflector::store::<Dataset>();
    let _ = mock.ctx.datasets.set(vec![store]);
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(reads(&seen), 1, "{seen:#?}");
    // Cached but not Ready (the cache may lag behind the event): read again.
    let pending: Dataset = serde_json::from_value(dataset()).expect("dataset");
    writer.apply_watcher_event(&watcher::Event::Apply(pending));
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(reads(&seen), 1, "{seen:#?}");
    // Cached and Ready: no request, and the plan still resolves the Dataset's manifest.
    let ready: Dataset = serde_json::from_value(ready_dataset()).expect("dataset");
    writer.apply_watcher_event(&watcher::Event::Apply(ready));
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(reads(&seen), 0, "{seen:#?}");
    assert_eq!(mock.status()["phase"], "Pending", "{}", mock.status());
    assert_eq!(
        condition(&mock.status(), "InputsReady").expect("InputsReady")["status"],
        "True"
    );
}

#[tokio::test]
async fn a_copy_older_than_the_operators_own_status_write_does_not_get_it_written_again() {
    let status_patches = |seen: &[Request_]| count(seen, Method::PATCH, "/status");
    let mut job = pretrain_job(false);
    job["metadata"]["resourceVersion"] = json!("41");
    let mock = Mock::new(World {
        dataset: Some(ready_dataset()),
        resource: job.clone(),
        ..World::default()
    });
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(status_patches(&seen), 1, "{seen:#?}");
    let written = mock.status();
    // Woken again (by its Job's creation) before the watch brought back that status: the
    // copy it gets is the one the write was computed from.
    mock.world.lock().expect("lock").resource = job;
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(status_patches(&seen), 0, "{seen:#?}");
    // Once the cache has moved on (a newer copy), that copy's status is what counts.
    let mut moved_on = pretrain_job(false);
    moved_on["metadata"]["resourceVersion"] = json!("42");
    moved_on["status"] = written;
    mock.world.lock().expect("lock").resource = moved_on;
    let seen = mock.reconcile::<PretrainJob>().await;
    assert_eq!(status_patches(&seen), 0, "{seen:#?}");
    assert!(
        mock.ctx.written.is_empty(),
        "forgotten once the cache has caught up"
    );
}
