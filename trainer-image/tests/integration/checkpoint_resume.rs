//! Checkpoints are atomic, verified and retained as documented, and a resumed run is the
//! same run: killed part way and restarted, it ends with the weights an uninterrupted run
//! reaches.

use crate::common::{TempDir, byte_dataset_dir, quick_training, runtime, tiny_model, tiny_run};
use candle_core::Device;
use taper_crds::{
    report::ProgressEvent,
    training::{Overfitting, ResolvedTraining},
};
use taper_trainer::{
    metrics::Metrics,
    store::{BoxFuture, LocalStore, ObjectInfo, ObjectStore, StoreError},
    train::{
        checkpoint::{Checkpointer, LATEST, MANIFEST, dir_name},
        data::open_dataset,
        pretrain::{self, EventSink, Outcome, PretrainRun},
    },
};

/// Options of [`run_job`] that some tests change.
#[derive(Clone, Copy, Default)]
struct JobOptions<'a> {
    stop_after: Option<u64>,
    dropout: f64,
    events: Option<EventSink<'a>>,
    /// Evaluate every this many steps instead of every 4.
    eval_interval: Option<i64>,
}

fn run_job(
    rt: &tokio::runtime::Runtime,
    data: &std::path::Path,
    store: &dyn ObjectStore,
    staging: &std::path::Path,
    max_steps: i64,
    interval: u64,
    options: JobOptions<'_>,
) -> Outcome {
    let (manifest, train, test) = open_dataset(data).expect("dataset");
    pretrain::run(
        rt,
        PretrainRun {
            model: taper_crds::model::GptConfig {
                dropout: options.dropout,
                ..tiny_model()
            },
            training: ResolvedTraining {
                eval_interval: options.eval_interval.unwrap_or(4),
                ..quick_training(max_steps)
            },
            checkpoint_interval: interval,
            stop_after: options.stop_after,
            events: options.events,
            ..tiny_run(
                &manifest,
                &train,
                &test,
                store,
                staging.to_path_buf(),
                max_steps,
            )
        },
    )
    .expect("pretraining runs")
}

fn weights(
    store: &dyn ObjectStore,
    rt: &tokio::runtime::Runtime,
    staging: &std::path::Path,
) -> (u64, Vec<(String, Vec<f32>)>) {
    let loaded = rt
        .block_on(Checkpointer::new(store, staging).resume(&Device::Cpu))
        .expect("resume")
        .expect("a checkpoint exists");
    let w = loaded
        .model
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("values"),
            )
        })
        .collect();
    (loaded.state.step, w)
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let rt = runtime();
    let tmp = TempDir::new("resume");
    let data = byte_dataset_dir(&tmp);
    let mut finals = Vec::new();
    // Without dropout, and with it: the masks come from a stream saved in the checkpoint.
    for dropout in [0.0, 0.2] {
        let at = |name: &str| tmp.path().join(format!("{name}-{dropout}"));
        let options = JobOptions {
            dropout,
            ..Default::default()
        };
        let straight = LocalStore::new(at("straight"));
        let outcome = run_job(&rt, &data, &straight, &at("s1"), 12, 4, options);
        assert_eq!(outcome, Outcome::MaxStepsReached { step: 12 });

        let resumed = LocalStore::new(at("resumed"));
        let stopped = JobOptions {
            stop_after: Some(5),
            ..options
        };
        let first = run_job(&rt, &data, &resumed, &at("s2"), 12, 4, stopped);
        assert_eq!(
            first,
            Outcome::Interrupted { step: 5 },
            "stops with a checkpoint at step 5"
        );
        let (step, _) = weights(&resumed, &rt, &at("r0"));
        assert_eq!(step, 5, "the interrupted run left its checkpoint at step 5");
        let second = run_job(&rt, &data, &resumed, &at("s3"), 12, 4, options);
        assert_eq!(second, Outcome::MaxStepsReached { step: 12 });

        let (step_a, wa) = weights(&straight, &rt, &at("r1"));
        let (step_b, wb) = weights(&resumed, &rt, &at("r2"));
        assert_eq!((step_a, step_b), (12, 12));
        assert!(
            wa == wb,
            "dropout {dropout}: the resumed run saw the same batches and masks and ends with \
             identical weights"
        );
        finals.push(wa);
    }
    assert!(
        finals[0] != finals[1],
        "dropout 0.2 trains differently from dropout 0: it is applied"
    );
}

#[test]
fn resume_skips_corrupt_missing_and_incomplete_checkpoints_and_retention_keeps_the_best() {
    let rt = runtime();
    let tmp = TempDir::new("fallback");
    let data = byte_dataset_dir(&tmp);
    let store = LocalStore::new(tmp.path().join("ckpt"));
    let evals = std::sync::Mutex::new(Vec::new());
    let record = |e: &ProgressEvent| {
        if let ProgressEvent::Eval(r) = e {
            evals.lock().expect("lock").push((r.step, r.val_loss));
        }
    };
    let options = JobOptions {
        events: Some(EventSink(&record)),
        eval_interval: Some(2),
        ..Default::default()
    };
    run_job(&rt, &data, &store, &tmp.path().join("s"), 12, 2, options);
    let ck = Checkpointer::new(&store, tmp.path().join("r"));
    // The best, from the evaluations the run printed (with a checkpoint every 2 steps, so
    // the newest two both carry a validation loss and a wrong pick among them shows).
    let evals = evals.into_inner().expect("lock");
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [2, 4, 6, 8, 10, 12],
        "{evals:?}"
    );
    let lowest = evals
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|e| e.0)
        .expect("evaluations");

    // Retention: the newest two (steps 10 and 12) plus the best by validation loss.
    let listed = rt.block_on(ck.list()).expect("list");
    let steps: Vec<u64> = listed.iter().map(|l| l.manifest.step).collect();
    let best = rt
        .block_on(ck.best())
        .expect("best")
        .expect("a best checkpoint");
    assert_eq!(
        best.manifest.step, lowest,
        "the best checkpoint is the evaluation with the lowest validation loss: {evals:?}"
    );
    let mut expected = vec![lowest, 10, 12];
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(steps, expected, "the newest two plus the best");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.path(LATEST)).expect("latest.json"))
            .expect("json");
    assert_eq!(latest["step"], 12);
    let folders = std::fs::read_dir(store.path(""))
        .expect("store root")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count();
    assert_eq!(
        folders,
        steps.len(),
        "deleted checkpoints leave no empty folders"
    );

    // Corrupt the newest: one flipped byte in its weights.
    let newest = store.path(&format!("{}/model.safetensors", dir_name(12)));
    let mut bytes = std::fs::read(&newest).expect("weights");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&newest, bytes).expect("corrupt");
    let loaded = rt
        .block_on(ck.resume(&Device::Cpu))
        .expect("resume")
        .expect("fallback");
    assert_eq!(
        loaded.state.step, 10,
        "falls back past the corrupt checkpoint"
    );

    // Remove a file of the next one: falls back again (to the best, if it is older).
    std::fs::remove_file(store.path(&format!("{}/optimizer.safetensors", dir_name(10))))
        .expect("remove");
    let loaded = rt.block_on(ck.resume(&Device::Cpu)).expect("resume");
    match loaded {
        Some(l) => assert!(
            l.state.step < 10,
            "skips the checkpoint with a missing file"
        ),
        None => assert!(best.manifest.step >= 10, "no intact checkpoint is left"),
    }

    // A checkpoint without its manifest (a crash mid-write) is not a checkpoint.
    std::fs::create_dir_all(store.path(&dir_name(14))).expect("dir");
    std::fs::write(
        store.path(&format!("{}/model.safetensors", dir_name(14))),
        b"partial",
    )
    .expect("partial");
    assert!(
        rt.block_on(ck.list())
            .expect("list")
            .iter()
            .all(|l| l.manifest.step != 14)
    );
    assert!(!store.path(&format!("{}/{MANIFEST}", dir_name(14))).exists());
}

#[test]
fn a_diverging_loss_is_detected_and_not_trained_through() {
    let rt = runtime();
    let tmp = TempDir::new("diverge");
    let data = byte_dataset_dir(&tmp);
    let (manifest, train, test) = open_dataset(&data).expect("dataset");
    let store = LocalStore::new(tmp.path().join("ckpt"));
    let mut training = quick_training(50);
    // An absurd learning rate without clipping blows the weights up within a few steps.
    training.learning_rate = 1e30;
    training.min_learning_rate = 1e30;
    training.warmup_steps = 0;
    training.grad_clip = 0.0;
    let err = pretrain::run(
        &rt,
        PretrainRun {
            training,
            overfitting: Overfitting::default(),
            checkpoint_interval: 1000,
            ..tiny_run(&manifest, &train, &test, &store, tmp.path().join("s"), 50)
        },
    )
    .expect_err("the loss diverges");
    assert!(
        matches!(err, pretrain::PretrainError::Diverged(3, _)),
        "{err}"
    );
    assert_eq!(
        taper_trainer::job::JobError::Pretrain(err).exit_code(),
        taper_crds::exit::LOSS_DIVERGED
    );
    assert!(
        rt.block_on(store.list("")).expect("list").is_empty(),
        "no checkpoint of a diverged model is written"
    );
}

/// A local store whose file uploads take `delay` each, noting the training step (read from
/// the run's metrics) when each upload starts and when it ends.
#[derive(Debug)]
struct SlowStore {
    inner: LocalStore,
    delay: std::time::Duration,
    step: prometheus::IntGauge,
    seen: std::sync::Mutex<Vec<(i64, i64)>>,
}

impl ObjectStore for SlowStore {
    fn uri(&self) -> String {
        self.inner.uri()
    }
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.put(key, data)
    }
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let before = self.step.get();
            tokio::time::sleep(self.delay).await;
            let result = self.inner.put_file(key, path).await;
            let after = self.step.get();
            self.seen.lock().expect("lock").push((before, after));
            result
        })
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, StoreError>> {
        self.inner.get(key)
    }
    fn get_file<'a>(
        &'a self,
        key: &'a str,
        path: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.get_file(key, path)
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        self.inner.list(prefix)
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.delete(key)
    }
}

#[test]
fn training_goes_on_while_a_checkpoint_uploads_and_the_run_waits_for_the_last() {
    let rt = runtime();
    let tmp = TempDir::new("background");
    let data = byte_dataset_dir(&tmp);
    let (manifest, train, test) = open_dataset(&data).expect("dataset");
    let metrics = Metrics::new("PretrainJob", "test", "background").expect("metrics");
    let store = SlowStore {
        inner: LocalStore::new(tmp.path().join("ckpt")),
        delay: std::time::Duration::from_millis(150),
        step: metrics.step.clone(),
        seen: Default::default(),
    };
    let outcome = pretrain::run(
        &rt,
        PretrainRun {
            checkpoint_interval: 8,
            metrics: Some(&metrics),
            ..tiny_run(&manifest, &train, &test, &store, tmp.path().join("s"), 24)
        },
    )
    .expect("run");
    assert_eq!(outcome, Outcome::MaxStepsReached { step: 24 });
    let seen = store.seen.lock().expect("lock").clone();
    assert!(
        seen.iter().any(|(before, after)| after > before),
        "the step never advanced while a file uploaded: {seen:?}"
    );
    // The run returned only once the last checkpoint was complete.
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.inner.path(LATEST)).expect("latest.json"))
            .expect("json");
    assert_eq!(latest["step"], 24);
    let (step, _) = weights(&store, &rt, &tmp.path().join("r"));
    assert_eq!(step, 24);
}

#[test]
fn a_checkpoint_is_identified_by_the_sha256_of_its_stored_manifest() {
    let rt = runtime();
    let tmp = TempDir::new("manifest-sha");
    let data = byte_dataset_dir(&tmp);
    let first = LocalStore::new(tmp.path().join("first"));
    run_job(
        &rt,
        &data,
        &first,
        &tmp.path().join("s"),
        4,
        4,
        JobOptions::default(),
    );
    let loaded = rt
        .block_on(Checkpointer::new(&first, tmp.path().join("r")).resume(&Device::Cpu))
        .expect("resume")
        .expect("a checkpoint");
    // Saved again, into a second store, by the code under test.
    let second = LocalStore::new(tmp.path().join("second"));
    let saved = rt
        .block_on(Checkpointer::new(&second, tmp.path().join("w")).save(
            &loaded.state,
            &loaded.model,
            &loaded.optimizer,
        ))
        .expect("save");
    let stored = second.path(&format!("{}/{MANIFEST}", dir_name(4)));
    let (_, sha) = taper_trainer::store::sha256_file(&stored).expect("hash the stored manifest");
    assert_eq!(
        saved.sha256, sha,
        "the reported sha256 is the stored manifest's"
    );
    assert_eq!(saved.manifest.files.len(), 3);
    assert!(
        saved
            .manifest
            .files
            .iter()
            .all(|f| f.sha256 != saved.sha256),
        "not a file's checksum"
    );
    assert!(saved.uri.ends_with(&dir_name(4)), "{}", saved.uri);
}
