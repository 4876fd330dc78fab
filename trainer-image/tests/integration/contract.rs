//! The trainer-operator contract, end to end through the `taper` binary: every line
//! `taper prepare` and `taper pretrain` print on stdout parses back into the types of
//! `taper_crds::report` (and serialises to the same JSON), and the statuses the operator
//! derives from them say what the run did. The run uses a Hugging Face `tokenizer.json`,
//! and `taper generate` samples from its checkpoint with that tokenizer.

use std::process::Command;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use taper_crds::{
    DatasetStatus, JobStatus,
    conditions::JobPhase,
    report::{DropReason, Outcome, PrepareReport, ProgressEvent},
};

use crate::{
    common::{TempDir, all_rules_off},
    prepare_tokenizers::word_level,
};

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn taper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_taper"))
}

/// Parse `line` as `T` and check that `T` serialises back to the same JSON value: no
/// field the type does not know, none it drops.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(line: &str) -> T {
    let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{line}\ndoes not parse into the contract: {e}"));
    assert_eq!(
        serde_json::to_value(&typed).expect("serialise"),
        value,
        "round trip of {line}"
    );
    typed
}

#[test]
fn every_line_the_trainer_prints_parses_into_the_contract_types() {
    let tmp = TempDir::new("contract");
    let words: Vec<String> = [
        "the", "cat", "dog", "sat", "on", "mat", "a", "ran", "to", "big", "red", "house", "and",
        "saw", "bird", "tree", "under", "small", "blue", "car",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    let tokenizer = tmp.path().join("tokenizer.json");
    std::fs::write(
        &tokenizer,
        serde_json::to_vec(&word_level(&words, 2, "</s>")).expect("json"),
    )
    .expect("tokenizer");

    // 400 distinct documents, then 3 exact copies, 2 malformed lines and an empty text.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut lines: Vec<String> = (0..400)
        .map(|i| {
            let text: Vec<&str> = (0..40 + i % 7)
                .map(|_| words[rng.random_range(0..words.len())].as_str())
                .collect();
            serde_json::json!({"text": text.join(" ")}).to_string()
        })
        .collect();
    lines.extend(lines[..3].to_vec());
    lines.push("{not json".into());
    lines.push(r#"{"body": "no text field"}"#.into());
    lines.push(r#"{"text": "   "}"#.into());
    let corpus = tmp.path().join("corpus.jsonl");
    std::fs::write(&corpus, lines.join("\n")).expect("corpus");

    let data = tmp.path().join("data");
    let ckpt = format!("file://{}", tmp.path().join("ckpt").display());
    let job = tmp.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata: {{name: words}}\nspec:\n  \
             sources: [{{name: words, uri: \"file://{corpus}\", format: jsonl}}]\n  \
             tokenizer: {{type: huggingface, uri: \"file://{tokenizer}\"}}\n  \
             cleaning: {cleaning}\n  \
             dedup: {{minhash: {{enabled: false}}}}\n  split: {{testSize: 0.1}}\n  \
             output: {{uri: \"file://{data}\"}}\n---\n\
             apiVersion: taper.dev/v1alpha1\nkind: PretrainJob\nmetadata: {{name: words-gpt}}\nspec:\n  \
             datasetRef: {{name: words}}\n  model: {{preset: tiny, nLayer: 1, vocabSize: 64}}\n  \
             training: {{batchSize: 4, gradientAccumulationSteps: 1, maxSteps: 6, warmupSteps: 1, precision: f32}}\n  \
             evaluation: {{interval: 2, iterations: 1}}\n  \
             checkpoints: {{interval: 2, keep: 1, uri: \"{ckpt}\"}}\n",
            corpus = corpus.display(),
            tokenizer = tokenizer.display(),
            data = data.display(),
            cleaning = all_rules_off(),
        ),
    )
    .expect("job");

    // taper prepare: one JSON line, the report.
    let out = taper()
        .args(["prepare", "--job"])
        .arg(&job)
        .output()
        .expect("taper runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report_lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(report_lines.len(), 1, "{stdout}");
    let report: PrepareReport = round_trip(report_lines[0]);
    assert_eq!(report.documents_read, 406);
    assert_eq!(report.dropped_for(DropReason::Malformed), 2);
    assert_eq!(report.dropped_for(DropReason::Empty), 1);
    assert_eq!(report.dropped_for(DropReason::ExactDuplicate), 3);
    assert_eq!(report.documents_written(), 400);
    assert!(report.balanced());
    let published: PrepareReport =
        serde_json::from_slice(&std::fs::read(data.join("stats.json")).expect("stats.json"))
            .expect("stats.json parses into the report");
    assert_eq!(published, report, "stats.json is the printed report");
    let manifest_uri = format!("file://{}/manifest.json", data.display());
    assert_eq!(report.manifest.as_deref(), Some(manifest_uri.as_str()));

    let mut dataset = DatasetStatus::default();
    dataset.record_published(&report, now());
    assert_eq!(
        (dataset.documents_read, dataset.documents_written),
        (406, 400)
    );
    assert_eq!(dataset.duplicates.exact, 3);
    assert_eq!(dataset.dropped.get("malformed"), Some(&2));
    assert_eq!(dataset.manifest.as_deref(), Some(manifest_uri.as_str()));

    // taper pretrain: every line a progress event.
    let out = taper()
        .args(["pretrain", "--job"])
        .arg(&job)
        .args(["--work-dir"])
        .arg(tmp.path().join("work"))
        .output()
        .expect("taper runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<ProgressEvent> = stdout.lines().map(round_trip).collect();
    assert!(
        matches!(events.first(), Some(ProgressEvent::Started(s)) if s.step == 0 && s.resumed_from.is_none())
    );
    let kinds = |pred: fn(&ProgressEvent) -> bool| events.iter().filter(|e| pred(e)).count();
    assert_eq!(kinds(|e| matches!(e, ProgressEvent::Step(_))), 6);
    assert_eq!(kinds(|e| matches!(e, ProgressEvent::Eval(_))), 3);
    assert!(kinds(|e| matches!(e, ProgressEvent::Checkpoint(_))) >= 3);
    assert!(matches!(
        events.last(),
        Some(ProgressEvent::Done(d)) if d.reason == Outcome::MaxStepsReached && d.step == 6
    ));

    let mut status = JobStatus::default();
    for e in &events {
        status.observe(e, &now());
    }
    assert_eq!(status.phase, JobPhase::Succeeded);
    assert_eq!(status.step, Some(6));
    let latest = status
        .latest_checkpoint
        .clone()
        .expect("a latest checkpoint");
    assert!(latest.ends_with("step-000000006"), "{latest}");
    // The retained records are the checkpoints left in the store, each with the sha256
    // of its stored manifest.
    let root = tmp.path().join("ckpt");
    let mut stored: Vec<String> = std::fs::read_dir(&root)
        .expect("checkpoints")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    stored.sort();
    let recorded: Vec<String> = status
        .checkpoints
        .iter()
        .map(|c| c.uri.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(recorded, stored);
    for c in &status.checkpoints {
        let dir = c.uri.rsplit('/').next().unwrap_or_default();
        let bytes = std::fs::read(root.join(dir).join("manifest.json")).expect("manifest");
        assert_eq!(c.sha256, hex::encode(Sha256::digest(&bytes)), "{}", c.uri);
    }
    // The best is the evaluation the run printed with the lowest validation loss (every
    // evaluation step here also saved a checkpoint).
    let lowest = events
        .iter()
        .filter_map(|e| match e {
            ProgressEvent::Eval(r) => Some((r.step, r.val_loss)),
            _ => None,
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(step, _)| step)
        .expect("evaluations");
    let best = status.best_checkpoint.clone().expect("a best checkpoint");
    assert!(
        best.ends_with(&format!("step-{lowest:09}")),
        "{best}: the lowest validation loss was at step {lowest}"
    );
    assert!(
        recorded.iter().any(|r| best.ends_with(r.as_str())),
        "{best}"
    );

    // taper generate with the checkpoint's Hugging Face tokenizer.
    let out = taper()
        .args(["generate", "--checkpoint", &ckpt, "--prompt", "the cat"])
        .args(["--max-tokens", "12"])
        .output()
        .expect("taper runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sampled: Vec<&str> = text
        .trim_end()
        .strip_prefix("the cat")
        .expect("the prompt comes first")
        .split_whitespace()
        .collect();
    assert!(sampled.len() >= 6, "{text:?}");
    assert!(
        sampled
            .iter()
            .all(|w| words.iter().any(|v| v == w) || *w == "</s>"),
        "decoded with the word-level vocabulary: {text:?}"
    );
}
