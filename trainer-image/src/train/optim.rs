//! AdamW with decoupled weight decay on ≥2-D tensors only, bias correction and state that
//! can be checkpointed; global-norm gradient clipping; gradient accumulation.
//!
//! candle-nn's `AdamW` keeps its moments private (so they cannot be saved) and decays
//! every tensor, biases and LayerNorm included; this one follows PyTorch's
//! `torch.optim.AdamW` with nanoGPT's two parameter groups.

use std::collections::BTreeMap;

use candle_core::{D, DType, Tensor, Var, backprop::GradStore};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::cpu::{Real, fusable, with_slice, with_slice_mut};
use crate::model::params::ParamStore;

/// Optimizer hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay of ≥2-D tensors.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a set of named parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
    /// Whether CPU parameters take the fused update (false only in tests).
    fused: bool,
}

/// Why an optimizer step or state restore failed.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Saved state does not match the parameters.
    #[error("optimizer state: {0}")]
    State(String),
}

impl AdamW {
    /// An optimizer for every parameter of `params` whose name `trainable` accepts.
    /// Tensors of two or more dimensions (weights, embeddings) are decayed; biases and
    /// LayerNorm parameters are not.
    pub fn new(
        params: &ParamStore,
        cfg: AdamWConfig,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self, OptimError> {
        let mut slots = Vec::new();
        for (name, var) in params.iter() {
            if !trainable(name) {
                continue;
            }
            // Moments in the parameter's dtype: f32 master weights in mixed precision. Two
            // allocations: the fused CPU update writes each in place.
            let zeros = || Tensor::zeros(var.shape(), var.dtype(), var.device());
            slots.push(Slot {
                name: name.clone(),
                var: var.clone(),
                decay: var.rank() >= 2,
                m: zeros()?,
                v: zeros()?,
            });
        }
        Ok(Self {
            cfg,
            slots,
            step: 0,
            fused: true,
        })
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The trainable parameters, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// One update with learning rate `lr` from `grads` (keyed by the parameters). A
    /// parameter without a gradient is left untouched, as PyTorch does.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<(), OptimError> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            let g = g.to_dtype(slot.var.dtype())?;
            // The decoupled weight decay's factor, for decayed tensors.
            let decay = (slot.decay && self.cfg.weight_decay > 0.0)
                .then_some(1.0 - lr * self.cfg.weight_decay);
            if self.fused && fused_applies(slot, &g) {
                let k = Coef {
                    decay: decay.unwrap_or(1.0),
                    b1,
                    b2,
                    inv_sqrt_bc2: 1.0 / bc2.sqrt(),
                    eps: self.cfg.eps,
                    step_size: lr / bc1,
                };
                match g.dtype() {
                    DType::F32 => fused_update::<f32>(slot, &g, k)?,
                    _ => fused_update::<f64>(slot, &g, k)?,
                }
                continue;
            }
            let mut p = slot.var.as_tensor().detach();
            if let Some(factor) = decay {
                p = (p * factor)?;
            }
            slot.m = ((&slot.m * b1)? + (&g * (1.0 - b1))?)?;
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((slot.v.sqrt()? / bc2.sqrt())? + self.cfg.eps)?;
            let update = (slot.m.broadcast_div(&denom)? * (lr / bc1))?;
            slot.var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Moments as tensors named `m.<param>` and `v.<param>`, for a safetensors checkpoint.
    /// On the CPU they share storage with the optimizer, which updates them in place: copy
    /// them (as [`crate::train::checkpoint::Snapshot`] does) to keep them past the next step.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.clone());
            out.insert(format!("v.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restore moments and the step count saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<(), OptimError> {
        for s in &mut self.slots {
            for (key, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| OptimError::State(format!("{name} is missing")))?;
                if t.dims() != slot.dims() {
                    return Err(OptimError::State(format!(
                        "{name} has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                // A copy of its own: the fused CPU update writes the moments in place.
                *slot = t
                    .to_dtype(s.var.dtype())?
                    .to_device(s.var.device())?
                    .copy()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The coefficients of one AdamW update, as the composed update applies them.
#[derive(Clone, Copy, Debug)]
struct Coef {
    decay: f64,
    b1: f64,
    b2: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
    step_size: f64,
}

/// Whether [`fused_update`] takes this slot: parameter, moments and gradient contiguous
/// on the CPU in f32 or f64.
fn fused_applies(slot: &Slot, g: &Tensor) -> bool {
    [slot.var.as_tensor(), &slot.m, &slot.v, g]
        .iter()
        .all(|t| fusable(t) && t.is_contiguous())
}

/// The AdamW update of one parameter in one pass over parameter, moments and gradient,
/// in place and in parallel, with the composed update's operations in its order (the same
/// roundings: candle's `x * c` is `x · c + 0`, `x / c` is `x · (1/c) + 0`).
fn fused_update<T: Real>(slot: &Slot, g: &Tensor, k: Coef) -> candle_core::Result<()> {
    let c = |x: f64| T::from(x).unwrap_or_else(T::nan);
    let zero = T::zero();
    let (decay, b1, c1, b2, c2) = (c(k.decay), c(k.b1), c(1.0 - k.b1), c(k.b2), c(1.0 - k.b2));
    let (inv_sqrt_bc2, eps, step_size) = (c(k.inv_sqrt_bc2), c(k.eps), c(k.step_size));
    with_slice::<T, _>(g, "adamw", |g| {
        with_slice_mut::<T, _>(slot.var.as_tensor(), |p| {
            with_slice_mut::<T, _>(&slot.m, |m| {
                with_slice_mut::<T, _>(&slot.v, |v| {
                    if p.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
                        candle_core::bail!("adamw: {} parameters, {} gradients", p.len(), g.len());
                    }
                    const CHUNK: usize = 1 << 14;
                    p.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((p, m), v), g)| {
                            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                                *m = (*m * b1 + zero) + (g * c1 + zero);
                                *v = (*v * b2 + zero) + ((g * g) * c2 + zero);
                                let denom = (v.sqrt() * inv_sqrt_bc2 + zero) + eps;
                                *p = (*p * decay + zero) - ((*m / denom) * step_size + zero);
                            }
                        });
                    Ok(())
                })
            })
        })
    })
}

/// `Σ g²` in f64 over a contiguous CPU tensor: fixed chunks, each summed in eight lanes,
/// then the chunks in order, so the result does not depend on the thread count.
fn sum_squares<T: Real>(g: &Tensor) -> candle_core::Result<f64> {
    with_slice::<T, _>(g, "grad norm", |v| {
        let partials: Vec<f64> = v
            .par_chunks(1 << 14)
            .map(|chunk| {
                let mut lanes = [0.0f64; 8];
                let mut eights = chunk.chunks_exact(8);
                for e in &mut eights {
                    for (l, &x) in lanes.iter_mut().zip(e) {
                        let x = x.to_f64();
                        *l += x * x;
                    }
                }
                let rest: f64 = eights.remainder().iter().map(|&x| x.to_f64().powi(2)).sum();
                lanes.iter().sum::<f64>() + rest
            })
            .collect();
        Ok(partials.iter().sum())
    })
}

/// Gradients by parameter name, accumulated over micro-batches.
#[derive(Debug, Default)]
pub struct Grads {
    by_name: BTreeMap<String, Tensor>,
}

impl Grads {
    /// No gradients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the gradients of `store` (from one `backward`) for the named `vars`.
    pub fn accumulate<'a>(
        &mut self,
        store: &GradStore,
        vars: impl Iterator<Item = (&'a str, &'a Var)>,
    ) -> Result<(), OptimError> {
        for (name, var) in vars {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                let sum = match self.by_name.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                self.by_name.insert(name.to_string(), sum);
            }
        }
        Ok(())
    }

    /// Set the gradient of `name` directly.
    pub fn insert(&mut self, name: &str, grad: Tensor) {
        self.by_name.insert(name.to_string(), grad);
    }

    /// The gradient of `name`, if it received one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.by_name.get(name)
    }

    /// Names and gradients.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.by_name.iter()
    }

    /// Global L2 norm over every gradient, summed in f64 on the gradients' device and read
    /// back once (one synchronisation per step on a GPU, not one per tensor). A matrix's
    /// squares are summed row by row first: candle reduces each output element in one GPU
    /// block, so a plain sum over a whole matrix ran on one block, and the norm took 85 ms
    /// of a 293 ms GPT-2-small step on an H200 (`phases.sh`).
    pub fn global_norm(&self) -> Result<f64, OptimError> {
        let mut sum: Option<Tensor> = None;
        let mut cpu_sum = 0.0;
        for g in self.by_name.values() {
            if fusable(g) && g.is_contiguous() {
                cpu_sum += match g.dtype() {
                    DType::F32 => sum_squares::<f32>(g)?,
                    _ => sum_squares::<f64>(g)?,
                };
                continue;
            }
            let sq = g.to_dtype(DType::F64)?.sqr()?;
            let sq = if sq.rank() >= 2 {
                sq.sum(D::Minus1)?.sum_all()?
            } else {
                sq.sum_all()?
            };
            sum = Some(match sum {
                Some(s) => (s + sq)?,
                None => sq,
            });
        }
        Ok(match sum {
            Some(s) => (s.to_scalar::<f64>()? + cpu_sum).sqrt(),
            None => cpu_sum.sqrt(),
        })
    }

    /// Scale gradients so their global norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1).
    /// Returns the norm before clipping. `max_norm <= 0` disables clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64, OptimError> {
        let norm = self.global_norm()?;
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for g in self.by_name.values_mut() {
                    *g = (&*g * coef)?;
                }
            }
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::check::uniform;

    /// f32 values uniform in [-1, 1).
    fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
        uniform(shape, -1.0, 1.0, rng)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("tensor")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    /// The fused CPU update does the composed update's operations in its order, so the
    /// two agree bit for bit in f32, decayed and not, over steps of changing moments
    /// (and over more elements than one parallel chunk, the last one partial).
    #[test]
    fn fused_update_is_the_composed_update_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (w, b) = (random(&[7, 10_001], &mut rng), random(&[33], &mut rng));
        let make = || {
            let mut p = ParamStore::new();
            p.insert_tensor("w", &w).expect("w");
            p.insert_tensor("b", &b).expect("b");
            p
        };
        let (pa, pb) = (make(), make());
        let mut fused = AdamW::new(&pa, AdamWConfig::default(), |_| true).expect("opt");
        let mut composed = AdamW::new(&pb, AdamWConfig::default(), |_| true).expect("opt");
        composed.fused = false;
        for step in 0..4 {
            let mut g = Grads::new();
            g.insert("w", (random(&[7, 10_001], &mut rng) * 0.1).expect("g"));
            g.insert("b", random(&[33], &mut rng));
            let lr = 1e-3 * (step + 1) as f64;
            fused.step(&g, lr).expect("fused step");
            composed.step(&g, lr).expect("composed step");
        }
        for name in ["w", "b"] {
            let (a, b) = (pa.tensor(name).expect("a"), pb.tensor(name).expect("b"));
            assert_ne!(
                values(&a),
                values(&w.flatten_all().expect("w")),
                "{name} moved"
            );
            assert_eq!(values(&a), values(&b), "{name}");
        }
        let (sa, sb) = (fused.state_tensors(), composed.state_tensors());
        for (name, t) in &sa {
            assert_eq!(values(t), values(&sb[name]), "{name}");
        }
    }

    /// The CPU norm sums every element once (eight lanes, a remainder, many chunks).
    #[test]
    fn global_norm_on_the_cpu_sums_every_square() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut g = Grads::new();
        let (w, b) = (random(&[7, 10_001], &mut rng), random(&[5], &mut rng));
        g.insert("w", w.clone());
        g.insert("b", b.clone());
        let want: f64 = values(&w)
            .iter()
            .chain(&values(&b))
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let got = g.global_norm().expect("norm");
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }
}
