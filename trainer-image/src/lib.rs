//! Taper's trainer: dataset preparation, GPT pretraining and finetuning with candle.

pub mod chat;
pub mod cleanup;
pub mod dashboards;
pub mod dataset;
pub mod device;
pub mod finetune;
pub mod generate;
pub mod job;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod prepare;
pub mod quickstart;
pub mod status;
pub mod store;
pub mod tokenizer;
pub mod train;

/// mimalloc for every binary built on this crate (`taper`, its tests and benchmarks):
/// candle allocates a fresh tensor buffer per op, and glibc's malloc handed the large ones
/// back to the kernel after each use, so every step page-faulted them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
