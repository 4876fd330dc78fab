//! `taper prepare` reads `s3://` sources: a prefix or a glob names every object it reads.

use serde_json::json;
use taper_e2e::minio::Minio;
use taper_trainer::{
    prepare::{self, PrepareError},
    store::{ObjectStore, S3Settings, S3Store},
};

/// A runtime for the S3 listings and downloads of a selection.
fn select_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

use crate::common::{all_rules_off, dataset, shared};

fn web_from(uri: &str, endpoint: &str) -> taper_crds::Dataset {
    dataset(json!({
        "sources": [{"name": "web", "uri": uri, "format": "jsonl", "urlField": "metadata.url",
                     "access": {"endpoint": endpoint}}],
        "cleaning": all_rules_off(),
        "dedup": {"minhash": {"enabled": false}, "decontamination": {"enabled": false}},
        "split": {"testSize": 0.05},
    }))
}

/// The web sample split over three objects (plus two that the URIs must not pick up)
/// reads exactly as the local file does: 697 records, 27 empty, 9 exact duplicates.
pub fn from_s3(minio: &Minio, rt: &tokio::runtime::Runtime) {
    let Some(data) = shared() else { return };
    let text = std::fs::read_to_string(data.join("webtext-sample.jsonl")).expect("web sample");
    let lines: Vec<&str> = text.lines().collect();
    let store = rt.block_on(S3Store::connect(
        "corpus",
        "",
        S3Settings {
            endpoint: Some(minio.endpoint()),
            ..S3Settings::default()
        },
    ));
    rt.block_on(store.client().create_bucket().bucket("corpus").send())
        .expect("create bucket");
    for (i, part) in lines.chunks(lines.len().div_ceil(3)).enumerate() {
        let body = format!("{}\n", part.join("\n")).into_bytes();
        rt.block_on(store.put(&format!("web/part-{i}.jsonl"), body))
            .expect("put");
    }
    rt.block_on(store.put("web/README.txt", b"not records".to_vec()))
        .expect("put");
    rt.block_on(store.put("web/nested/part-9.jsonl", b"{\"text\": \"x\"}\n".to_vec()))
        .expect("put");

    let local = prepare::select_documents(
        &select_runtime(),
        &web_from(
            &format!("file://{}", data.join("webtext-sample.jsonl").display()),
            &minio.endpoint(),
        ),
    )
    .expect("local");
    for uri in ["s3://corpus/web/*.jsonl", "s3://corpus/web/part-"] {
        let p = prepare::select_documents(&select_runtime(), &web_from(uri, &minio.endpoint()))
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(p.stats.documents_read, 697, "{uri}");
        assert_eq!(p.stats.dropped, local.stats.dropped, "{uri}");
        assert_eq!(p.train, local.train, "{uri}");
        assert!(p.stats.balanced(), "{uri}");
    }

    // A URI that names nothing is an error that names it.
    let err = prepare::select_documents(
        &select_runtime(),
        &web_from("s3://corpus/none/*.jsonl", &minio.endpoint()),
    )
    .expect_err("nothing matches");
    assert!(matches!(err, PrepareError::Data(_)), "{err}");
    assert!(
        err.to_string().contains("s3://corpus/none/*.jsonl"),
        "{err}"
    );
}
