//! Training: optimizer, learning-rate schedule, gradient handling and batches.

pub mod data;
pub mod optim;
pub mod schedule;
pub mod trainer;
