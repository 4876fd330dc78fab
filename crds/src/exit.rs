//! Exit codes of the `taper` trainer: the contract between the trainer and the operator.
//!
//! | code | meaning | operator's response ([`classify`]) |
//! | --- | --- | --- |
//! | 0 | success: the work is done and published | mark the resource Succeeded / Ready |
//! | 1 | unexpected internal error | a new pod, counted against `maxRestarts` |
//! | 2 | invalid spec (a manifest the rules let through, an unknown reference) | Failed, no retry |
//! | 3 | invalid data (unreadable source, corrupt shards, nothing left after filtering) | Failed, no retry |
//! | 4 | loss diverged (NaN or infinite after the allowed retries) | Failed, no retry |
//! | 75 | retryable: interrupted by SIGTERM after saving a checkpoint, or the store or network failed | a new pod that resumes; not counted |
//! | 143 | killed by SIGTERM before the trainer's handler ran (stopped from outside while starting) | a new pod that resumes; not counted |
//! | 137 | killed by SIGKILL: out of memory, or the grace period ran out before the checkpoint | a new pod, counted (an OOM would recur forever) |
//! | any other | unknown: a crash, another signal (128 + n) | a new pod, counted |

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

/// A container killed by SIGTERM, as Kubernetes reports it (128 + 15).
pub const KILLED_BY_SIGTERM: i32 = 143;
/// A container killed by SIGKILL, as Kubernetes reports it (128 + 9): OOM or grace period.
pub const KILLED_BY_SIGKILL: i32 = 137;

/// The kind of a trainer failure: decides its exit code, and is the bounded label of
/// error metrics and log fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// The spec is invalid (exit 2).
    InvalidSpec,
    /// The input data is unusable (exit 3).
    InvalidData,
    /// The loss diverged (exit 4).
    LossDiverged,
    /// A transient failure of the store or the network (exit 75).
    Retryable,
    /// Anything else (exit 1).
    Internal,
}

impl Category {
    /// The process exit code of a failure of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::InvalidSpec => INVALID_SPEC,
            Self::InvalidData => INVALID_DATA,
            Self::LossDiverged => LOSS_DIVERGED,
            Self::Retryable => RETRYABLE,
            Self::Internal => INTERNAL,
        }
    }

    /// The category as a metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidSpec => "invalid_spec",
            Self::InvalidData => "invalid_data",
            Self::LossDiverged => "loss_diverged",
            Self::Retryable => "retryable",
            Self::Internal => "internal",
        }
    }
}

/// What the operator does about a trainer container that ended with an exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The work is done: the resource succeeds.
    Succeed,
    /// Retrying cannot help: the resource fails with the code's reason.
    FailPermanently,
    /// A new pod resumes from the latest checkpoint; the attempt counts against
    /// `maxRestarts`.
    RetryCounted,
    /// A new pod resumes from the latest checkpoint; the attempt is not counted.
    RetryNotCounted,
}

/// The operator's response to `code`, as the table of this module says. Signals arrive
/// as Kubernetes reports them, 128 + the signal's number; unknown codes are retried and
/// counted, so that a crash loop ends at `maxRestarts`.
pub fn classify(code: i32) -> Action {
    match code {
        0 => Action::Succeed,
        c if c == INVALID_SPEC as i32 || c == INVALID_DATA as i32 || c == LOSS_DIVERGED as i32 => {
            Action::FailPermanently
        }
        c if c == RETRYABLE as i32 || c == KILLED_BY_SIGTERM => Action::RetryNotCounted,
        _ => Action::RetryCounted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_exits_with_a_code_the_operator_classifies_as_documented() {
        let expected = [
            (Category::InvalidSpec, 2, Action::FailPermanently),
            (Category::InvalidData, 3, Action::FailPermanently),
            (Category::LossDiverged, 4, Action::FailPermanently),
            (Category::Retryable, 75, Action::RetryNotCounted),
            (Category::Internal, 1, Action::RetryCounted),
        ];
        for (category, code, action) in expected {
            assert_eq!(category.exit_code(), code, "{category:?}");
            assert_eq!(classify(i32::from(code)), action, "{category:?}");
        }
    }

    #[test]
    fn every_code_of_the_table_gets_its_response() {
        // The table of this module, written out independently of `classify`.
        let table = [
            (0, Action::Succeed),
            (1, Action::RetryCounted),
            (2, Action::FailPermanently),
            (3, Action::FailPermanently),
            (4, Action::FailPermanently),
            (75, Action::RetryNotCounted),
            (143, Action::RetryNotCounted),
            (137, Action::RetryCounted),
        ];
        for (code, action) in table {
            assert_eq!(classify(code), action, "exit code {code}");
        }
        assert_eq!(classify(SUCCESS as i32), Action::Succeed);
        assert_eq!(classify(INTERNAL as i32), Action::RetryCounted);
        assert_eq!(classify(RETRYABLE as i32), Action::RetryNotCounted);
    }

    #[test]
    fn unknown_codes_and_other_signals_are_retried_and_counted() {
        for code in [
            5,
            42,
            74,
            76,
            127,
            128 + 6,
            128 + 11,
            255,
            -1,
            256,
            i32::MAX,
        ] {
            assert_eq!(classify(code), Action::RetryCounted, "exit code {code}");
        }
    }
}
