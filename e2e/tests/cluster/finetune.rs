//! A FinetuneJob through the operator: on the Succeeded PretrainJob `gpt` and an
//! instruction Dataset, the operator resolves the base to its best checkpoint, the pod runs
//! `taper finetune` (LoRA, merged), and the adapter and model land in MinIO with their URIs
//! in the FinetuneJob's status.

use serde_json::json;

use crate::{
    operator::{Setup, condition, resource, s3_keys},
    support::{eventually_or, kubectl, ok},
};

pub(crate) fn finetune_checks(s: &Setup, describe: impl Fn() -> String) {
    // Alpaca records about sums: a tiny instruction set the pod's `file://` can read.
    let records: Vec<serde_json::Value> = (0..120)
        .map(|i| {
            json!({"instruction": format!("What is {} plus {}?", i % 11, i / 11),
                   "input": "", "output": format!("{}", i % 11 + i / 11)})
        })
        .collect();
    let path = s.work.join("sums.json");
    std::fs::write(&path, serde_json::to_vec(&records).expect("json")).expect("records");
    let manifests = format!(
        "apiVersion: taper.dev/v1alpha1\nkind: Dataset\nmetadata: {{name: sums, namespace: ml}}\nspec:\n  \
         format: instruction\n  sources: [{{name: sums, uri: \"file://{path}\", format: alpaca-json}}]\n  \
         dedup: {{exact: false, minhash: {{enabled: false}}, decontamination: {{enabled: false}}}}\n  \
         split: {{testSize: 20}}\n  instruction: {{maxSeqLength: 64}}\n---\n\
         apiVersion: taper.dev/v1alpha1\nkind: FinetuneJob\nmetadata: {{name: chat, namespace: ml}}\nspec:\n  \
         baseModel: {{pretrainJobRef: {{name: gpt, checkpoint: best}}}}\n  datasetRef: {{name: sums}}\n  \
         method: {{type: lora, lora: {{r: 4, alpha: 8, targets: [c_attn]}}}}\n  \
         training: {{batchSize: 2, gradientAccumulationSteps: 1, maxSteps: 6, warmupSteps: 1, precision: f32}}\n  \
         evaluation: {{interval: 3, iterations: 1}}\n  checkpoints: {{interval: 3, keep: 1}}\n  \
         output: {{merge: true}}\n  resources: {{gpus: 0}}\n",
        path = path.display()
    );
    ok(
        &kubectl(&s.admin, &["apply", "-f", "-"], Some(&manifests)),
        "Dataset sums and FinetuneJob chat",
    );
    let fj = eventually_or(360, "FinetuneJob chat Succeeded", describe, || {
        resource(&s.admin, "finetunejob", "chat").filter(|f| f["status"]["phase"] == "Succeeded")
    });
    let st = &fj["status"];
    assert_eq!(st["step"], 6, "{st}");
    assert_eq!(
        st["adapterUri"], "s3://taper/ml/finetunejobs/chat/adapter",
        "{st}"
    );
    assert_eq!(
        st["modelUri"], "s3://taper/ml/finetunejobs/chat/model",
        "{st}"
    );
    assert_eq!(
        condition(&fj, "Ready").and_then(|c| c["reason"].as_str()),
        Some("MaxStepsReached"),
        "{st}"
    );
    let keys = s3_keys(&s.s3_endpoint, "ml/finetunejobs/chat/");
    for want in [
        "ml/finetunejobs/chat/adapter/adapter_model.safetensors",
        "ml/finetunejobs/chat/adapter/adapter_config.json",
        "ml/finetunejobs/chat/adapter/manifest.json",
        "ml/finetunejobs/chat/model/model.safetensors",
        "ml/finetunejobs/chat/model/config.json",
        "ml/finetunejobs/chat/model/manifest.json",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} not in {keys:?}");
    }
    assert!(
        keys.iter()
            .any(|k| k.starts_with("ml/finetunejobs/chat/checkpoints/step-")),
        "checkpoints under the output: {keys:?}"
    );
}
