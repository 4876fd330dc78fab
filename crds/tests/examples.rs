//! Every manifest under `examples/` parses into the typed structs and passes the CEL rules.

use std::path::{Path, PathBuf};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_parses_and_passes_the_cel_rules() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(
        files.len() >= 5,
        "expected the quickstart and gpt2-small examples, found {files:?}"
    );

    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable example");
        let objects = taper_crds::parse_manifests(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!objects.is_empty(), "{} holds no object", file.display());
        for object in &objects {
            let result = match object {
                taper_crds::TaperObject::Dataset(o) => kube::core::cel::validate_cel(o.as_ref()),
                taper_crds::TaperObject::PretrainJob(o) => {
                    kube::core::cel::validate_cel(o.as_ref())
                }
                taper_crds::TaperObject::FinetuneJob(o) => {
                    kube::core::cel::validate_cel(o.as_ref())
                }
            };
            if let Err(e) = result {
                panic!(
                    "{} {} in {}: {e}",
                    object.kind(),
                    object.name(),
                    file.display()
                );
            }
            kinds.insert(object.kind());
        }
    }
    assert_eq!(kinds.len(), 3, "examples cover all three kinds");
}

#[test]
fn the_quickstart_pipeline_is_small_enough_for_a_cpu() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/pipeline.yaml");
    let objects = taper_crds::parse_manifests(&std::fs::read_to_string(path).expect("quickstart"))
        .expect("quickstart parses");
    for object in objects {
        if let taper_crds::TaperObject::PretrainJob(pj) = object {
            let m = pj.spec.model.resolve();
            let params = m.vocab_size * m.n_embd + m.n_layer * 12 * m.n_embd * m.n_embd;
            assert!(
                params < 10_000_000,
                "quickstart model has {params} parameters"
            );
            assert_eq!(pj.spec.resources.gpus, Some(0));
        }
    }
}
