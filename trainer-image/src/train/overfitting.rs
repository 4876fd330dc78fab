//! The overfitting policy's state: the best validation loss, evaluations without
//! improvement, and what to do when patience runs out.

use taper_crds::training::{Overfitting, OverfittingAction};

/// What the overfitting policy decided after an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The validation loss improved (a new best).
    Improved,
    /// No improvement, patience not exhausted (or the policy is `None`).
    Continue,
    /// Patience exhausted: multiply the learning rate by `factor`.
    ReduceLearningRate,
    /// Patience exhausted: stop with the best checkpoint.
    StopEarly,
}

/// Best validation loss and evaluations without improvement: the overfitting policy's state.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tracker {
    /// Lowest validation loss so far.
    pub best: Option<f32>,
    /// Step of the lowest validation loss.
    pub best_step: Option<u64>,
    /// Evaluations since the last improvement.
    pub bad_evals: u32,
}

impl Tracker {
    /// Record the validation loss of step `step` and decide, per `policy`. An improvement
    /// smaller than `minDelta` does not count; after `ReduceLearningRate` the patience
    /// starts over.
    pub fn observe(&mut self, step: u64, val_loss: f32, policy: &Overfitting) -> Decision {
        if self
            .best
            .is_none_or(|b| val_loss < b - policy.min_delta as f32)
        {
            self.best = Some(val_loss);
            self.best_step = Some(step);
            self.bad_evals = 0;
            return Decision::Improved;
        }
        self.bad_evals += 1;
        if self.bad_evals < policy.patience.max(1) as u32 {
            return Decision::Continue;
        }
        match policy.action {
            OverfittingAction::None => Decision::Continue,
            OverfittingAction::ReduceLearningRate => {
                self.bad_evals = 0;
                Decision::ReduceLearningRate
            }
            OverfittingAction::StopEarly => Decision::StopEarly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: OverfittingAction) -> Overfitting {
        Overfitting {
            action,
            patience: 2,
            factor: 0.5,
            min_delta: 0.01,
        }
    }

    #[test]
    fn stop_early_after_patience_evaluations_without_improvement() {
        let p = policy(OverfittingAction::StopEarly);
        let mut t = Tracker::default();
        assert_eq!(t.observe(100, 3.0, &p), Decision::Improved);
        assert_eq!(t.observe(200, 2.5, &p), Decision::Improved);
        assert_eq!(
            t.observe(300, 2.495, &p),
            Decision::Continue,
            "below minDelta is no improvement"
        );
        assert_eq!(t.observe(400, 2.6, &p), Decision::StopEarly);
        assert_eq!(
            (t.best, t.best_step),
            (Some(2.5), Some(200)),
            "the best is kept"
        );
    }

    #[test]
    fn reduce_learning_rate_restarts_patience_and_none_never_acts() {
        let p = policy(OverfittingAction::ReduceLearningRate);
        let mut t = Tracker::default();
        t.observe(1, 2.0, &p);
        assert_eq!(t.observe(2, 2.1, &p), Decision::Continue);
        assert_eq!(t.observe(3, 2.2, &p), Decision::ReduceLearningRate);
        assert_eq!(
            t.observe(4, 2.3, &p),
            Decision::Continue,
            "patience starts over"
        );
        assert_eq!(t.observe(5, 2.3, &p), Decision::ReduceLearningRate);

        let p = policy(OverfittingAction::None);
        let mut t = Tracker::default();
        t.observe(1, 2.0, &p);
        for step in 2..10 {
            assert_eq!(t.observe(step, 3.0, &p), Decision::Continue);
        }
    }
}
