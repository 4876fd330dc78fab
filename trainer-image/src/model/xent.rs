//! Softmax cross-entropy over the vocabulary on the CPU, forward and backward as one pass
//! each over the logits.
//!
//! Composed (`ops::cross_entropy_composed`), the loss is a max, a subtraction, `exp`, a
//! sum, `log`, a gather and the weighting, each a pass over `[rows, vocab]` through libm's
//! scalar `expf`; the backward added candle's softmax and a scatter. Here the forward
//! keeps only each row's log-sum-exp (`rows` numbers, in parallel over rows with the
//! vectorised `exp` of [`super::fastmath`]); the backward writes
//! `g · wᵢ · (e^(xᵢⱼ − lseᵢ) − [j = tᵢ])` into a buffer it does not zero first.

use candle_core::{D, DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::{
    cpu::{Real, for_overwrite, fusable, with_slice},
    ops::with_backward,
};

/// Rows per rayon task: 1.6 MB of f32 logits at GPT-2's vocabulary, 32 KB at the
/// quickstart's.
const ROWS_PER_TASK: usize = 8;

/// Whether [`cross_entropy`] takes these logits: a 2-D CPU tensor of f32 or f64.
pub(crate) fn takes(logits: &Tensor) -> bool {
    fusable(logits) && logits.rank() == 2
}

/// The mean cross-entropy of `logits` `[rows, vocab]` against `targets` `[rows]` (any
/// integer dtype), weighted by `mask / max(Σ mask, 1)` (or `1 / rows`); see
/// `ops::cross_entropy`, whose CPU path this is. A target outside the vocabulary is an
/// error naming its row.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    let targets: Vec<u32> = targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    if targets.len() != rows {
        candle_core::bail!(
            "cross-entropy: {} targets for {rows} rows of logits",
            targets.len()
        );
    }
    if let Some((row, t)) = targets
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        candle_core::bail!(
            "cross-entropy: target {t} of row {row} is outside the vocabulary of {vocab}"
        );
    }
    let weights: Vec<f64> = match mask {
        None => vec![1.0 / rows.max(1) as f64; rows],
        Some(m) => {
            let m: Vec<f64> = m.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            if m.len() != rows {
                candle_core::bail!("cross-entropy: a mask of {} for {rows} rows", m.len());
            }
            let count = m.iter().sum::<f64>().max(1.0);
            m.iter().map(|v| v / count).collect()
        }
    };
    let x = logits.contiguous()?;
    match x.dtype() {
        DType::F32 => fused::<f32>(&x, targets, &weights),
        DType::F64 => fused::<f64>(&x, targets, &weights),
        other => candle_core::bail!("cross-entropy: f32 or f64 logits on the CPU, got {other:?}"),
    }
}

fn fused<T: Real>(x: &Tensor, targets: Vec<u32>, weights: &[f64]) -> Result<Tensor> {
    let vocab = x.dim(D::Minus1)?;
    // Rows of the logits as chunks (of at least 1: `chunks(0)` panics).
    let width = vocab.max(1);
    let weights: Vec<T> = weights.iter().map(|&w| T::from_f64(w)).collect();
    let (lse, loss) = with_slice::<T, _>(x, "cross-entropy", |x| {
        let lse: Vec<T> = x
            .par_chunks(width)
            .with_min_len(ROWS_PER_TASK)
            .map(T::log_sum_exp)
            .collect();
        // In row order, in f64: the same loss whatever the thread count.
        let loss = lse
            .iter()
            .zip(&targets)
            .zip(&weights)
            .enumerate()
            .fold(0f64, |acc, (i, ((&l, &t), &w))| {
                acc + (w * (l - x[i * vocab + t as usize])).to_f64()
            });
        Ok((lse, loss))
    })?;
    let value = Tensor::new(T::from_f64(loss), x.device())?;
    with_backward("cross-entropy", x, value, move |logits, _, g| {
        let g = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let logits = logits.contiguous()?;
        let d = with_slice::<T, _>(&logits, "cross-entropy-bwd", |x| {
            // SAFETY: every row of d is written in full by `exp_shifted` below.
            #[allow(unsafe_code)]
            let mut d: Vec<T> = unsafe { for_overwrite(x.len()) };
            d.par_chunks_mut(width)
                .zip(x.par_chunks(width))
                .with_min_len(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(i, (dr, xr))| {
                    let c = T::from_f64(g) * weights[i];
                    T::exp_shifted(xr, lse[i], c, dr);
                    dr[targets[i] as usize] -= c;
                });
            Ok(d)
        })?;
        Tensor::from_vec(d, logits.shape(), &Device::Cpu)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::value_and_grad;
    use crate::model::ops::cross_entropy_composed;

    fn logits(rows: usize, vocab: usize, dtype: DType) -> Result<Tensor> {
        let v: Vec<f64> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 1009) as f64 - 504.0) / 60.0)
            .collect();
        Tensor::from_vec(v, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)
    }

    /// The loss and its gradient against the composed ops (in f64, to rounding; in f32,
    /// to f32's precision of the vectorised `exp`), with and without a mask, on a
    /// vocabulary that leaves a remainder after the eight lanes and rows that do not
    /// fill the last task.
    #[test]
    fn matches_the_composed_loss_in_value_and_gradient() -> Result<()> {
        let (rows, vocab) = (37, 1003);
        let dev = Device::Cpu;
        let targets = Tensor::from_vec(
            (0..rows as u32).map(|i| (i * 389) % vocab as u32).collect(),
            rows,
            &dev,
        )?;
        let mask = Tensor::from_vec(
            (0..rows).map(|i| f64::from(u8::from(i % 4 != 1))).collect(),
            rows,
            &dev,
        )?;
        let up = Tensor::new(1.7f64, &dev)?;
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 2e-6)] {
            let x = logits(rows, vocab, dtype)?;
            for m in [None, Some(&mask)] {
                let up = up.to_dtype(dtype)?;
                let (l1, g1) = value_and_grad(&|x| cross_entropy(x, &targets, m), &x, &up)?;
                let x64 = x.to_dtype(DType::F64)?;
                let (l2, g2) = value_and_grad(
                    &|x| cross_entropy_composed(x, &targets, m),
                    &x64,
                    &up.to_dtype(DType::F64)?,
                )?;
                let (l1, l2) = (
                    l1.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    l2.to_scalar::<f64>()?,
                );
                assert!(
                    (l1 - l2).abs() < tol * l2.abs(),
                    "{dtype:?}: loss {l1} vs {l2}"
                );
                let scale = g2.abs()?.max_all()?.to_scalar::<f64>()?;
                let d = (g1.to_dtype(DType::F64)? - &g2)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(
                    scale > 1e-3 && d < tol * scale,
                    "{dtype:?}: gradient off by {d:e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_refused_naming_its_row() -> Result<()> {
        let x = logits(3, 5, DType::F32)?;
        let t = Tensor::new(&[0u32, 4, 5], &Device::Cpu)?;
        let e = cross_entropy(&x, &t, None)
            .expect_err("target 5 of 5")
            .to_string();
        assert!(e.contains("target 5 of row 2"), "{e}");
        Ok(())
    }
}
