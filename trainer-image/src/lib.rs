//! Taper's trainer: dataset preparation, GPT pretraining and finetuning with candle.

pub mod generate;
pub mod job;
pub mod metrics;
pub mod model;
pub mod prepare;
pub mod store;
pub mod train;
