//! The `taper` binary as a user runs it.

use std::process::Command;

fn taper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_taper"))
}

#[test]
fn version_names_the_program() {
    let out = taper().arg("--version").output().expect("taper runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("taper "));
}

#[test]
fn quickstart_validates_the_embedded_pipeline() {
    let out = taper().arg("quickstart").output().expect("taper runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PretrainJob shakespeare-mini"), "{stdout}");
}

#[test]
fn validate_refuses_a_bad_manifest_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("taper-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {name: bad}\n\
         spec:\n  datasetRef: {name: d}\n  model: {preset: gpt2-small, nHead: 7}\n",
    )
    .expect("write manifest");
    let out = taper()
        .args(["validate", "--job"])
        .arg(&file)
        .output()
        .expect("taper runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "permanent error exit code; stderr: {stderr}"
    );
    assert!(stderr.contains("nHead must divide nEmbd"), "{stderr}");
    assert!(stderr.contains("PretrainJob bad"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
