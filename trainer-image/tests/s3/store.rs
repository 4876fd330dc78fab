//! The S3 backend against a real MinIO (built by `e2e/scripts/build-tools.sh minio`):
//! put/get/list/delete, multipart uploads in parallel parts, checkpoints and resume,
//! `taper prepare` sources, and an outage reported as a retryable error.

use crate::common::{TempDir, byte_dataset_dir, tiny_run};
use candle_core::Device;
use taper_crds::{exit, report::ProgressEvent};
use taper_e2e::minio::Minio;
use taper_trainer::{
    job::JobError,
    store::{LocalStore, ObjectStore, S3Settings, S3Store, StoreError},
    train::{
        checkpoint::Checkpointer,
        data::open_dataset,
        pretrain::{self, EventSink, Outcome, PretrainRun},
    },
};

fn settings(minio: &Minio) -> S3Settings {
    S3Settings {
        endpoint: Some(minio.endpoint()),
        ..S3Settings::default()
    }
}

async fn bucket(minio: &Minio, name: &str, prefix: &str, s: S3Settings) -> S3Store {
    let store = S3Store::connect(name, prefix, s).await;
    let _ = minio;
    store
        .client()
        .create_bucket()
        .bucket(name)
        .send()
        .await
        .expect("create bucket");
    store
}

/// One test for everything MinIO serves, so that [`Minio::export_env`] sets the process
/// environment once, before any other thread reads it.
#[test]
fn s3_store_against_minio() {
    let minio =
        Minio::start().expect("MinIO starts (build it with e2e/scripts/build-tools.sh minio)");
    minio.export_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tmp = TempDir::new("s3");

    rt.block_on(async {
        // Basic object operations under a prefix, path-style on a custom endpoint.
        let store = bucket(&minio, "basics", "jobs/a", settings(&minio)).await;
        assert_eq!(store.uri(), "s3://basics/jobs/a");
        store.put("x/one.txt", b"1".to_vec()).await.expect("put");
        store.put("x/two.txt", b"22".to_vec()).await.expect("put");
        store.put("y.txt", b"333".to_vec()).await.expect("put");
        assert_eq!(store.get("x/two.txt").await.expect("get"), b"22");
        let listed = store.list("x/").await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|o| (o.key.as_str(), o.size))
                .collect::<Vec<_>>(),
            vec![("x/one.txt", 1), ("x/two.txt", 2)]
        );
        store.delete("x/one.txt").await.expect("delete");
        store
            .delete("x/never-existed")
            .await
            .expect("deleting a missing key is fine");
        assert!(matches!(
            store.get("x/one.txt").await,
            Err(StoreError::NotFound(_))
        ));

        // Multipart: a 12 MiB file in 5 MiB parts, uploaded in parallel, read back intact.
        let small_parts = S3Settings {
            multipart_threshold: 6 << 20,
            part_size: 5 << 20,
            parallel_parts: 3,
            ..settings(&minio)
        };
        let big_store = bucket(&minio, "multipart", "", small_parts).await;
        let big = tmp.path().join("big.bin");
        let data: Vec<u8> = (0..12u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&big, &data).expect("write");
        big_store
            .put_file("weights/big.bin", &big)
            .await
            .expect("multipart upload");
        let back = tmp.path().join("back.bin");
        big_store
            .get_file("weights/big.bin", &back)
            .await
            .expect("download");
        assert_eq!(
            taper_trainer::store::sha256_file(&back).expect("hash"),
            taper_trainer::store::sha256_file(&big).expect("hash")
        );
        let head = big_store
            .client()
            .head_object()
            .bucket("multipart")
            .key("weights/big.bin")
            .send()
            .await
            .expect("head");
        assert!(
            head.e_tag().unwrap_or_default().ends_with("-3\""),
            "uploaded as 3 parts: {:?}",
            head.e_tag()
        );
    });

    // Pretraining with checkpoints in S3, interrupted and resumed.
    let data = byte_dataset_dir(&tmp);
    let (manifest, train, test) = open_dataset(&data).expect("dataset");
    let store = rt.block_on(bucket(&minio, "checkpoints", "ns/pj/run", settings(&minio)));
    let started = std::sync::Mutex::new(Vec::new());
    let record = |e: &ProgressEvent| {
        if let ProgressEvent::Started(s) = e {
            started.lock().expect("lock").push(s.clone());
        }
    };
    let run = |store: &dyn ObjectStore, stop_after: Option<u64>, staging: &str| {
        pretrain::run(
            &rt,
            PretrainRun {
                overfitting: Default::default(),
                stop_after,
                events: Some(EventSink(&record)),
                ..tiny_run(&manifest, &train, &test, store, tmp.path().join(staging), 8)
            },
        )
    };
    assert_eq!(
        run(&store, Some(3), "a").expect("first run"),
        Outcome::Interrupted { step: 3 }
    );
    assert_eq!(
        run(&store, None, "b").expect("resumed run"),
        Outcome::MaxStepsReached { step: 8 }
    );
    // The second run continued from the first one's checkpoint at step 3, not from 0.
    let starts = started.lock().expect("lock").clone();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(
        (starts[0].step, starts[0].resumed_from.as_deref()),
        (0, None)
    );
    assert_eq!(starts[1].step, 3, "{starts:?}");
    assert_eq!(
        starts[1].resumed_from.as_deref(),
        Some("s3://checkpoints/ns/pj/run/step-000000003"),
        "{starts:?}"
    );
    let final_weights = |store: &dyn ObjectStore, staging: &str| {
        let loaded = rt
            .block_on(Checkpointer::new(store, tmp.path().join(staging)).resume(&Device::Cpu))
            .expect("resume")
            .expect("a checkpoint");
        let weights: Vec<(String, Vec<f32>)> = loaded
            .model
            .iter()
            .map(|(k, t)| {
                let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>());
                (k.clone(), v.expect("values"))
            })
            .collect();
        (loaded.state.step, weights)
    };
    // An uninterrupted run, on the local disk, reaches the same weights.
    let local = LocalStore::new(tmp.path().join("uninterrupted"));
    assert_eq!(
        run(&local, None, "d").expect("uninterrupted run"),
        Outcome::MaxStepsReached { step: 8 }
    );
    let (step_s3, w_s3) = final_weights(&store, "c");
    let (step_local, w_local) = final_weights(&local, "e");
    assert_eq!((step_s3, step_local), (8, 8));
    assert!(
        w_s3 == w_local,
        "the run resumed from S3 ends with the weights of an uninterrupted run"
    );

    // `taper prepare` reads its sources from S3 prefixes and globs.
    crate::prepare_sources::from_s3(&minio, &rt);

    // An outage: the store is gone, the error is transient and maps to "retryable".
    let dead = rt.block_on(S3Store::connect(
        "checkpoints",
        "x",
        S3Settings {
            max_attempts: 2,
            ..settings(&minio)
        },
    ));
    drop(minio);
    let err = rt
        .block_on(dead.put("k", b"v".to_vec()))
        .expect_err("the server is down");
    assert!(err.is_transient(), "{err}");
    assert_eq!(JobError::Store(err).exit_code(), exit::RETRYABLE);
}
