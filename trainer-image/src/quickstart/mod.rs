//! The quickstart: the embedded pipeline (`examples/quickstart/pipeline.yaml`) run on this
//! machine's CPU, nothing downloaded. It writes a small invented world ([`world`]): the
//! biographies to pretrain on, the questions to finetune on, the held-out questions and a
//! BPE tokenizer trained on them; then prepares both datasets, pretrains a small GPT and
//! finetunes it with LoRA through the code the pods run (`file://` stores), and asks the
//! finetuned model the held-out questions. Stopped at any point (Ctrl-C), it resumes.

pub mod world;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use taper_crds::{TaperObject, exit};

use crate::{
    generate::{Generator, SampleOptions, instruction_prompt},
    job::{self, JobError},
    manifests, prepare,
    train::pretrain::Outcome,
};

/// The quickstart pipeline, embedded so that `taper quickstart` needs no file.
pub const PIPELINE: &str = include_str!("../../../examples/quickstart/pipeline.yaml");

/// The end-of-text token of the world's tokenizer.
pub const EOT: &str = "<|endoftext|>";

/// Where the pipeline reads the world's files (its `file://` URIs, relative to the
/// working directory).
pub const WORLD_DIR: &str = ".taper/quickstart/world";

/// Where the finetuned, merged model lands (`output.location` + `model`).
pub const MODEL_URI: &str = "file://.taper/quickstart/models/world-chat/model";

/// The world's size and seeds.
const PEOPLE: usize = 200;
const BIOS_PER_PERSON: usize = 20;
const HELD_OUT: f64 = 0.2;
const SEED: u64 = 1337;
const VOCAB: usize = 1024;

/// Write the world's files into `dir` (unless they are there): `biographies.jsonl`,
/// `questions.json` (Alpaca records), `held-out.json` and `tokenizer.json`.
pub fn write_world(dir: &Path) -> Result<Vec<world::Question>, JobError> {
    let io = |e: std::io::Error| JobError::Internal(format!("{}: {e}", dir.display()));
    let w = world::World::generate(PEOPLE, SEED);
    let held = world::held_out_people(PEOPLE, HELD_OUT, SEED + 1);
    let (train, test) = w.questions(|i| held[i]);
    let tokenizer = dir.join("tokenizer.json");
    if tokenizer.exists() {
        return Ok(test);
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let bios = w.biographies(BIOS_PER_PERSON, SEED + 2);
    let lines: String = bios
        .iter()
        .map(|b| format!("{}\n", serde_json::json!({ "text": b })))
        .collect();
    std::fs::write(dir.join("biographies.jsonl"), lines).map_err(io)?;
    let records: Vec<serde_json::Value> = train
        .iter()
        .map(|q| serde_json::json!({"instruction": q.question, "input": "", "output": q.answer}))
        .collect();
    let json = |v: serde_json::Result<Vec<u8>>| v.map_err(|e| JobError::Internal(e.to_string()));
    std::fs::write(
        dir.join("questions.json"),
        json(serde_json::to_vec_pretty(&records))?,
    )
    .map_err(io)?;
    std::fs::write(
        dir.join("held-out.json"),
        json(serde_json::to_vec_pretty(&test))?,
    )
    .map_err(io)?;
    // The tokenizer learns the biographies and the prompts as the model will see them.
    let mut texts = bios;
    texts.extend(
        train
            .iter()
            .chain(&test)
            .map(|q| format!("{}{}", instruction_prompt(&q.question), q.answer)),
    );
    // Written last: its presence means the world is complete.
    let partial = dir.join("tokenizer.json.partial");
    world::train_tokenizer(&texts, VOCAB, &partial)
        .map_err(|e| JobError::Internal(format!("training the tokenizer: {e}")))?;
    std::fs::rename(&partial, &tokenizer).map_err(io)?;
    Ok(test)
}

/// Whether `answer` is `truth`: the same words, ignoring case, surrounding space and a
/// final full stop.
pub fn matches(answer: &str, truth: &str) -> bool {
    let norm = |s: &str| {
        s.trim()
            .trim_end_matches('.')
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    norm(answer) == norm(truth)
}

/// Ask `generator` every question greedily; print each answer and whether it matches.
/// Returns the exact-match accuracy.
pub fn ask(generator: &Generator, questions: &[world::Question]) -> Result<f64, JobError> {
    let opts = SampleOptions {
        max_tokens: 16,
        temperature: 0.0,
        ..Default::default()
    };
    let (mut right, mut misses) = (0usize, 0usize);
    for (i, q) in questions.iter().enumerate() {
        let answer = generator.stream(&instruction_prompt(&q.question), &opts, &mut |_| {})?;
        let ok = matches(&answer, &q.answer);
        right += usize::from(ok);
        misses += usize::from(!ok);
        // Every question on a terminal would scroll for long; show the first of each
        // person and the first misses.
        if i % 15 == 0 || (!ok && misses <= 20) {
            println!(
                "  {} {:<48} → {:<30} {}",
                if ok { "✓" } else { "✗" },
                q.question,
                answer.trim(),
                if ok {
                    String::new()
                } else {
                    format!("(truth: {})", q.answer)
                }
            );
        }
    }
    Ok(right as f64 / questions.len().max(1) as f64)
}

/// Run the quickstart in the working directory; `work_dir` stages checkpoints, `stop` is
/// set by the signal handler. Returns the exit code: 0 when it finished, 75 when it
/// stopped with a checkpoint.
pub fn run(
    rt: &tokio::runtime::Runtime,
    work_dir: PathBuf,
    stop_after: Option<u64>,
    stop: Arc<AtomicBool>,
) -> Result<u8, JobError> {
    let started = Instant::now();
    let objects = manifests::load("embedded quickstart", PIPELINE)?;
    println!("Quickstart (examples/quickstart/pipeline.yaml):");
    for object in &objects {
        println!("  {}", manifests::describe(object));
    }
    println!(
        "\n[1/5] A world of {PEOPLE} invented people: {BIOS_PER_PERSON} biographies each, questions about {} of them (the rest held out) → {WORLD_DIR}/",
        PEOPLE - (HELD_OUT * PEOPLE as f64).round() as usize
    );
    let held_out = write_world(Path::new(WORLD_DIR))?;
    println!("\n[2/5] Preparing the datasets");
    for object in &objects {
        let TaperObject::Dataset(ds) = object else {
            continue;
        };
        let name = ds.metadata.name.as_deref().unwrap_or_default();
        let uri = ds
            .spec
            .output
            .as_ref()
            .map(|o| o.uri.clone())
            .unwrap_or_default();
        let store = rt.block_on(crate::store::open(&uri, None))?;
        if rt.block_on(store.get("manifest.json")).is_ok() {
            println!("      {name}: already prepared at {uri}");
            continue;
        }
        let report = prepare::prepare(rt, ds)?;
        println!(
            "      {name}: {} documents → {} train / {} test tokens",
            report.documents_read, report.train_tokens, report.test_tokens
        );
    }
    let opts = |name: &str| job::PretrainOptions {
        name: Some(name.to_string()),
        data: None,
        checkpoints: None,
        work_dir: work_dir.clone(),
        metrics_addr: None,
        peak_flops: None,
        stop_after,
        namespace: "local".into(),
        device: None,
        stop: stop.clone(),
    };
    let interrupted = |step| {
        println!("\nStopped at step {step} with a checkpoint; run the quickstart again to resume.");
        Ok(exit::RETRYABLE)
    };
    println!(
        "\n[3/5] Pretraining world-gpt on the biographies (progress as JSON lines; Ctrl-C checkpoints and stops, run again to resume)"
    );
    if let Outcome::Interrupted { step } = job::pretrain(rt, &objects, opts("world-gpt"))? {
        return interrupted(step);
    }
    println!("\n[4/5] Finetuning world-chat: a LoRA of world-gpt on the questions");
    if let Outcome::Interrupted { step } = crate::finetune::run(rt, &objects, opts("world-chat"))? {
        return interrupted(step);
    }
    println!(
        "\n[5/5] Asking world-chat the {} held-out questions (about people whose questions it never saw):",
        held_out.len()
    );
    let generator = Generator::load(rt, MODEL_URI)?;
    let accuracy = ask(&generator, &held_out)?;
    println!(
        "\nExact match on held-out questions: {:.1} % ({} questions) in {:.0} s in all.",
        100.0 * accuracy,
        held_out.len(),
        started.elapsed().as_secs_f64()
    );
    println!("\nTalk to it:  taper chat --model {MODEL_URI}");
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_and_its_tokenizer_are_the_same_every_time() {
        let base = std::env::temp_dir().join(format!("taper-world-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        let held_out = write_world(&a).expect("world a");
        write_world(&b).expect("world b");
        for file in [
            "biographies.jsonl",
            "questions.json",
            "held-out.json",
            "tokenizer.json",
        ] {
            let read = |d: &Path| std::fs::read(d.join(file)).expect("file");
            assert!(read(&a) == read(&b), "{file} differs between two runs");
        }
        assert_eq!(held_out.len(), 40 * 5 * 3);
        let tok = crate::tokenizer::Tokenizer::hugging_face(&a.join("tokenizer.json"), "t")
            .expect("loads");
        assert_eq!(tok.vocab_size(), VOCAB as u32);
        // An answer on its own is the tokens it is inside a sentence (the leading space).
        let alone = tok.encode("Lisbon").expect("encode");
        let inside = tok
            .encode("Mara Quill was born in Lisbon.")
            .expect("encode");
        assert!(
            inside.windows(alone.len()).any(|w| w == alone),
            "{alone:?} in {inside:?}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn answers_match_ignoring_case_space_and_a_full_stop() {
        assert!(matches(" Lisbon.", "Lisbon"));
        assert!(matches("computer  science", "Computer Science"));
        assert!(!matches("Lisbon Portugal", "Lisbon"));
        assert!(!matches("", "Lisbon"));
    }
}
