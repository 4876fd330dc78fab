//! Learning-rate schedule: linear warmup, then cosine decay to the minimum (nanoGPT's `get_lr`).

/// Warmup and cosine-decay parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Step at which the decay reaches `min_lr`.
    pub decay_steps: u64,
}

impl CosineSchedule {
    /// Learning rate for step `it` (0-based): `max_lr · (it+1)/warmup` during warmup (so
    /// step 0 does not waste a step at rate 0), then a half cosine from `max_lr` at
    /// `warmup` to `min_lr` at `decay_steps`, then `min_lr`.
    pub fn lr(&self, it: u64) -> f64 {
        if it < self.warmup_steps {
            return self.max_lr * (it + 1) as f64 / self.warmup_steps as f64;
        }
        if it > self.decay_steps || self.decay_steps <= self.warmup_steps {
            return self.min_lr;
        }
        let ratio = (it - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = CosineSchedule {
            max_lr: 6e-4,
            min_lr: 6e-5,
            warmup_steps: 10,
            decay_steps: 100,
        };
        assert!((s.lr(0) - 6e-5).abs() < 1e-12);
        assert!((s.lr(9) - 6e-4).abs() < 1e-12);
        assert!((s.lr(10) - 6e-4).abs() < 1e-12);
        assert!(
            (s.lr(55) - (6e-5 + 0.5 * (6e-4 - 6e-5))).abs() < 1e-12,
            "halfway is the mean"
        );
        assert!((s.lr(100) - 6e-5).abs() < 1e-12);
        assert_eq!(s.lr(1000), 6e-5);
        let mut last = f64::INFINITY;
        for it in 10..=100 {
            assert!(s.lr(it) <= last, "monotone decay after warmup");
            last = s.lr(it);
        }
    }
}
