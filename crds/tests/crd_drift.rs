//! The committed CRD manifests are exactly what `crdgen` writes. Regenerate them with
//! `cargo run -p taper-crds --bin crdgen` after changing an API type.

use std::path::PathBuf;

#[test]
fn committed_crds_match_crdgen() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/taper/crds");
    let mut expected_files = Vec::new();
    for crd in taper_crds::crds() {
        let name = taper_crds::crd_file_name(&crd);
        let path = dir.join(&name);
        let want = taper_crds::crd_yaml(&crd).expect("CRD renders as YAML");
        let have = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `cargo run -p taper-crds --bin crdgen`",
                path.display()
            )
        });
        assert!(
            have == want,
            "{} differs from what crdgen writes; run `cargo run -p taper-crds --bin crdgen` and commit the result",
            path.display()
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("charts/taper/crds exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present,
        expected_files,
        "stale CRD files in {}",
        dir.display()
    );
}

#[test]
fn schema_is_structural_and_uses_only_known_formats() {
    // Kubernetes knows these formats; anything else (schemars' `uint32`, for one) is
    // silently ignored by the API server, so it would not validate what it claims.
    const KNOWN: &[&str] = &[
        "int32",
        "int64",
        "double",
        "float",
        "date-time",
        "byte",
        "date",
        "int-or-string",
    ];
    fn walk(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        let serde_json::Value::Object(map) = v else {
            return;
        };
        for (key, child) in map {
            match key.as_str() {
                "properties" => {
                    for (name, schema) in child.as_object().into_iter().flatten() {
                        walk(schema, &format!("{path}.{name}"), out);
                    }
                }
                "items" | "additionalProperties" => walk(child, &format!("{path}[]"), out),
                "$ref" | "anyOf" | "oneOf" | "allOf" | "not" => {
                    out.push(format!("{path}: uses {key}"))
                }
                "format" => {
                    if let Some(f) = child.as_str()
                        && !KNOWN.contains(&f)
                    {
                        out.push(format!("{path}: unknown format {f}"));
                    }
                }
                _ => {}
            }
        }
    }
    let mut problems = Vec::new();
    for crd in taper_crds::crds() {
        let v = serde_json::to_value(&crd).expect("CRD serializes");
        walk(
            &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            crd.metadata.name.as_deref().unwrap_or("?"),
            &mut problems,
        );
    }
    assert!(
        problems.is_empty(),
        "non-structural schema parts:\n{}",
        problems.join("\n")
    );
}
