//! Taper's trainer: dataset preparation, GPT pretraining and finetuning with candle.

pub mod model;
pub mod train;
