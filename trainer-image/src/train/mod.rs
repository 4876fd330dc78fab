//! Training: optimizer, learning-rate schedule, gradient handling and batches.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod overfitting;
pub mod pretrain;
pub mod schedule;
pub mod trainer;
