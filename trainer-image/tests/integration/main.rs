//! The trainer's integration tests, linked into one test binary: each test file would
//! otherwise link candle, the AWS SDK and the e2e helpers again (minutes of linking and
//! hundreds of megabytes per binary on a 2-core CI machine).
//!
//! Run one group with a filter, e.g. `cargo test -p taper-trainer --test integration prepare_pipeline::`.

mod checkpoint_resume;
mod cli;
mod common;
mod contract;
mod dropout;
mod finetune;
mod gpt_gradients;
mod hf_models;
mod learns_shakespeare;
mod mixed_precision;
mod optimizer_reference;
mod prepare_hostile;
mod prepare_pipeline;
mod prepare_sources;
mod prepare_tokenizers;
