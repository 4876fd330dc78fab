//! Exit codes of the `taper` trainer: the contract between the trainer and the operator.
//!
//! | code | meaning | operator's response |
//! | --- | --- | --- |
//! | 0 | success: the work is done and published | mark the resource Succeeded / Ready |
//! | 1 | unexpected internal error | a new pod, counted against `maxRestarts` |
//! | 2 | invalid spec (a manifest the rules let through, an unknown reference) | Failed, no retry |
//! | 3 | invalid data (unreadable source, corrupt shards, nothing left after filtering) | Failed, no retry |
//! | 4 | loss diverged (NaN or infinite after the allowed retries) | Failed, no retry |
//! | 75 | retryable: interrupted by SIGTERM after saving a checkpoint, or the store or network failed | a new pod that resumes; not counted |

/// Success.
pub const SUCCESS: u8 = 0;
/// An unexpected internal error; retried up to `maxRestarts`.
pub const INTERNAL: u8 = 1;
/// The spec is invalid; retrying cannot help.
pub const INVALID_SPEC: u8 = 2;
/// The input data is unusable; retrying cannot help.
pub const INVALID_DATA: u8 = 3;
/// The loss diverged; retrying cannot help.
pub const LOSS_DIVERGED: u8 = 4;
/// Interrupted or a transient failure; a new pod resumes from the latest checkpoint
/// (`EX_TEMPFAIL` of sysexits.h).
pub const RETRYABLE: u8 = 75;

/// Whether a pod that exited with `code` should be replaced by one that resumes.
pub fn is_retryable(code: i32) -> bool {
    code == RETRYABLE as i32 || code == INTERNAL as i32
}
