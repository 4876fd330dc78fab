//! Taper's trainer: dataset preparation, GPT pretraining and finetuning with candle.

pub mod cleanup;
pub mod dashboards;
pub mod dataset;
pub mod device;
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
