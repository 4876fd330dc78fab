//! Tokenization: the selected documents stream from the spill through the tokenizer (a
//! batch at a time, in parallel) into the shard writers, train first, then test. With
//! exact-substring dedup on, documents are encoded into a local corpus file first, then
//! cut and written once the whole corpus is indexed.

use std::{path::Path, time::Instant};

use rayon::prelude::*;
use taper_crds::{
    DatasetSpec,
    dataset::DatasetFormat,
    report::{DropReason, PrepareReport, ShardInfo, Stage, SubstringStats},
};

use super::{
    PrepareError, batch::BATCH_DOCS, instruction, select::Selection, shards::ShardWriter,
    spill::Doc, stats::stage_bar, substring,
};
use crate::tokenizer::Tokenizer;

/// One encoded document: its tokens, its loss mask (instruction data) and whether it was
/// cut at `maxSeqLength`.
type Encoded = (Vec<u32>, Option<Vec<u8>>, bool);

/// The shards of both splits, written to `staging`.
pub(crate) struct Shards {
    /// Train shards, in order.
    pub train: Vec<ShardInfo>,
    /// Test shards, in order.
    pub test: Vec<ShardInfo>,
}

/// The job error of a failed exact-substring stage: ids or chunks too large are the
/// spec's; a working file that cannot be written is the local store's.
fn substring_error(e: substring::SubstringError) -> PrepareError {
    use substring::SubstringError as E;
    match e {
        E::Io { path, source } => {
            PrepareError::Store(crate::store::StoreError::Io { path, source })
        }
        E::Libsais(_) => PrepareError::Internal(format!("dedup.substring: {e}")),
        E::TokenTooLarge(_) | E::ChunkTooLarge(_) => {
            PrepareError::Spec(format!("dedup.substring: {e}"))
        }
    }
}

/// Encode the selection into shard files under `staging`, counting what tokenization and
/// exact-substring dedup drop in `report`. `substring_chunk` is the tokens per suffix
/// array when exact-substring dedup is on.
pub(crate) fn encode(
    spec: &DatasetSpec,
    sel: &Selection,
    tokenizer: &Tokenizer,
    staging: &Path,
    substring_chunk: Option<usize>,
    report: &mut PrepareReport,
) -> Result<Shards, PrepareError> {
    let instruction_mode = spec.format == DatasetFormat::Instruction;
    let eot = tokenizer.eot();
    let dtype = tokenizer.dtype();
    let mut writers = [
        ShardWriter::new("train", staging, dtype, instruction_mode),
        ShardWriter::new("test", staging, dtype, instruction_mode),
    ];
    let t = Instant::now();
    let ispec = &spec.instruction;
    let max_len = ispec.max_seq_length.max(2) as usize;
    let mut corpus = match substring_chunk {
        Some(_) => Some(
            substring::CorpusWriter::create(staging.join("substring-corpus.u16"))
                .map_err(substring_error)?,
        ),
        None => None,
    };
    // Each document in the corpus file: (test, source).
    let mut corpus_docs: Vec<(bool, usize)> = Vec::new();
    // Train documents, then test ones: exact-substring dedup sees train first.
    let order: Vec<(usize, bool)> = sel
        .split(false)
        .map(|i| (i, false))
        .chain(sel.split(true).map(|i| (i, true)))
        .collect();
    let bar = stage_bar("tokenize", order.len(), "docs");
    let mut truncated = 0u64;
    for batch in order.chunks(BATCH_DOCS) {
        let docs: Vec<Doc> = batch
            .par_iter()
            .map(|&(i, _)| sel.spill.get(i))
            .collect::<Result<_, _>>()?;
        // An instruction example whose prompt alone fills maxSeqLength is `None`: no
        // response token would be left to learn from.
        let encoded: Vec<Option<Encoded>> = docs
            .par_iter()
            .map(|d| -> Result<Option<Encoded>, PrepareError> {
                bar.inc(1);
                match &d.record {
                    Some(r) if instruction_mode => {
                        let prompt = tokenizer.encode(&instruction::alpaca_prompt(r))?;
                        if prompt.len() + 1 >= max_len {
                            return Ok(None);
                        }
                        let response = tokenizer.encode(&r.output)?;
                        let (t, m, cut) = instruction::encode(
                            &prompt,
                            &response,
                            eot,
                            ispec.mask_prompt,
                            max_len,
                        );
                        Ok(Some((t, Some(m), cut)))
                    }
                    _ => Ok(Some((tokenizer.encode(&d.text)?, None, false))),
                }
            })
            .collect::<Result<_, _>>()?;
        for ((d, e), &(_, test)) in docs.iter().zip(encoded).zip(batch) {
            match e {
                Some((tokens, _, _)) if corpus.is_some() => {
                    if let Some(c) = corpus.as_mut() {
                        c.push(&tokens).map_err(substring_error)?;
                    }
                    corpus_docs.push((test, d.source));
                }
                Some((mut tokens, mask, cut)) => {
                    truncated += u64::from(cut);
                    let w = &mut writers[usize::from(test)];
                    match mask {
                        Some(m) => w.append(&tokens, Some(&m))?,
                        None => {
                            tokens.push(eot);
                            w.append(&tokens, None)?;
                        }
                    }
                }
                None => report.unkeep(
                    &spec.sources[d.source].name,
                    !test,
                    DropReason::PromptTooLong,
                ),
            }
        }
    }
    bar.finish_and_clear();
    super::stats::record_stage(report, Stage::Tokenize, order.len(), order.len(), t);
    if let (Some(writer), Some(chunk)) = (corpus, substring_chunk) {
        let t = Instant::now();
        let corpus = writer.finish().map_err(substring_error)?;
        let mut s = SubstringStats::default();
        let k = spec.dedup.substring.min_length.max(1) as usize;
        let marks =
            substring::find_repeats(&corpus, k, chunk, staging, &mut s).map_err(substring_error)?;
        let mut out = 0;
        for (i, &(test, source)) in corpus_docs.iter().enumerate() {
            let mut tokens = substring::cut(&corpus, &marks, i, &mut s);
            if tokens.is_empty() {
                report.unkeep(
                    &spec.sources[source].name,
                    !test,
                    DropReason::SubstringDuplicate,
                );
                continue;
            }
            out += 1;
            tokens.push(eot);
            writers[usize::from(test)].append(&tokens, None)?;
        }
        report.substring = Some(s);
        super::stats::record_stage(report, Stage::SubstringDedup, corpus_docs.len(), out, t);
    }
    if instruction_mode {
        report.truncated = Some(truncated);
    }
    let [train, test] = writers;
    let shards = Shards {
        train: train.finish()?,
        test: test.finish()?,
    };
    report.train_tokens = shards.train.iter().map(|s| s.tokens).sum();
    report.test_tokens = shards.test.iter().map(|s| s.tokens).sum();
    Ok(shards)
}
