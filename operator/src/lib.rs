//! The Taper operator: reconciles Dataset, PretrainJob and FinetuneJob resources into
//! trainer `batch/v1` Jobs, and their outcome back into status.
//!
//! | module | concern |
//! | --- | --- |
//! | [`config`] | flags and environment |
//! | [`plan`] | validation and resolution of a resource and its references (pure) |
//! | [`build`] | the objects applied for a resource: ConfigMap, RBAC, Job (pure) |
//! | [`lifecycle`] | Job and pod observations → state, reason, restarts (pure) |
//! | [`controller`] | the reconcile pipeline, once for the three kinds |
//! | [`run`] | watches, controllers, leader election |
//! | [`metrics`], [`http`] | `/metrics`, `/healthz`, `/readyz` |

pub mod build;
pub mod config;
pub mod controller;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod plan;
pub mod run;
