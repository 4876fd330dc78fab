//! Causal softmax of attention scores as one fused op with its backward: on a GPU the
//! composed form (upcast, scale, add the mask, softmax, downcast) made six passes over the
//! largest tensors of a step, `[batch, heads, t, t]`, each kept in f32 for the backward,
//! and was most of a GPT-2-small step's time and memory. Here the forward reads the
//! scores once and writes the probabilities once, in the scores' dtype; the backward
//! reads the probabilities and their gradient once and writes the scores' gradient.
//!
//! The CUDA kernels are `kernels/causal_softmax.cu` (compiled to PTX by `build.rs`,
//! launched by `model/cuda.rs`). The CPU implementation below is the same formula, rows
//! in parallel (rayon), touching only the columns on and below the diagonal; it replaced
//! the composed path on the CPU too, whose backward was seven nodes over the scores.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Result, Shape, Tensor,
};

use rayon::prelude::*;

use super::{
    cpu::{Real, by_dtype, causal_softmax_row, causal_softmax_row_bwd},
    ops::softmax_last_dim_composed,
};

/// Attention probabilities from the raw scores `q·kᵀ` `[batch, heads, t, t]`, in the
/// scores' dtype: the fused [`causal_softmax`] on every device.
pub fn attention_probs(scores: &Tensor, scale: f64) -> Result<Tensor> {
    causal_softmax(scores, scale)
}

/// The additive causal mask `[t, t]` in `dtype`: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(t: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// [`causal_softmax`] composed of differentiable ops (scale, the additive mask, softmax),
/// in `x`'s dtype: the reference the tests and `check-kernels` compare it with.
pub(crate) fn causal_softmax_composed(x: &Tensor, scale: f64) -> Result<Tensor> {
    let mask = causal_mask(x.dim(D::Minus1)?, x.device(), x.dtype())?;
    softmax_last_dim_composed(&(x * scale)?.broadcast_add(&mask)?)
}

/// `softmax(scale · x)` over the last dimension with the causal mask: for `x` of shape
/// `[.., t, t]`, row `i` of each `[t, t]` matrix keeps columns `j ≤ i` and is 0 beyond.
/// The result has `x`'s dtype. A GPU computes in f32 (f32 or bf16 scores); the CPU in the
/// scores' dtype (f32 or f64; others through f32).
pub fn causal_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        candle_core::bail!("causal-softmax: expected scores [.., t, t], got {dims:?}");
    }
    if x.device().is_cpu() && !matches!(x.dtype(), DType::F32 | DType::F64) {
        return causal_softmax(&x.to_dtype(DType::F32)?, scale)?.to_dtype(x.dtype());
    }
    x.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f64,
}

/// `(y, g) → dx`: the backward of [`CausalSoftmax`], from its value `y`.
struct CausalSoftmaxBwd {
    scale: f64,
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .filter(|&t| t > 0)
        .ok_or_else(|| candle_core::Error::Msg("causal-softmax: empty scores".into()))
}

/// The CPU forward: rows of `t`, row `r` being query position `r mod t`, in parallel, in
/// the scores' dtype.
fn cpu_rows_fwd<T: Real>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut y = x.to_vec();
    y.par_chunks_mut(t)
        .enumerate()
        .with_min_len(8)
        .for_each(|(r, row)| causal_softmax_row(row, r % t, scale));
    y
}

/// `dx = scale · y ⊙ (g − Σ y ⊙ g)` per row, 0 above the diagonal.
fn cpu_rows_bwd<T: Real>(y: &[T], g: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = g.to_vec();
    dx.par_chunks_mut(t)
        .zip(y.par_chunks(t))
        .enumerate()
        .with_min_len(8)
        .for_each(|(r, (row, yr))| causal_softmax_row_bwd(row, yr, r % t, scale));
    dx
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l)?;
        let scale = self.scale;
        let y = by_dtype!(self.name(), [(s, l)], |x| cpu_rows_fwd(x, t, scale));
        Ok((y, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::causal_softmax(
            "causal_softmax_fwd",
            &[(s, l)],
            last_dim(l)?,
            self.scale as f32,
        )?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let bwd = CausalSoftmaxBwd { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &bwd)?))
    }
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(ly)?;
        let scale = self.scale;
        let dx = by_dtype!(self.name(), [(y, ly), (g, lg)], |y, g| {
            cpu_rows_bwd(y, g, t, scale)
        });
        Ok((dx, ly.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = super::cuda::causal_softmax(
            "causal_softmax_bwd",
            &[(y, ly), (g, lg)],
            last_dim(ly)?,
            self.scale as f32,
        )?;
        Ok((dx, ly.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::value_and_grad;
    use candle_core::Device;

    #[test]
    fn matches_scale_mask_softmax_in_value_and_gradient() -> Result<()> {
        let x = Tensor::randn(0f64, 3.0, (2, 3, 17, 17), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (2, 3, 17, 17), &Device::Cpu)?;
        let scale = 0.37;
        let (y1, g1) = value_and_grad(&|x| causal_softmax(x, scale), &x, &w)?;
        let (y2, g2) = value_and_grad(&|x| causal_softmax_composed(x, scale), &x, &w)?;
        let dy = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let dg = (&g1 - &g2)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let gmax = g2.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(dy < 1e-14, "values differ by {dy}");
        assert!(
            gmax > 0.05 && dg < 1e-14 * gmax.max(1.0),
            "gradients differ by {dg} (largest {gmax})"
        );
        // Above the diagonal: probability 0, gradient 0.
        let upper = |m: &Tensor| -> Result<f64> {
            let v = m.flatten_all()?.to_vec1::<f64>()?;
            Ok(v.iter()
                .enumerate()
                .filter(|(k, _)| k % 17 > k / 17 % 17)
                .map(|(_, a)| a.abs())
                .sum())
        };
        assert_eq!((upper(&y1)?, upper(&g1)?), (0.0, 0.0));
        Ok(())
    }

    #[test]
    fn bf16_scores_on_the_cpu_go_through_f32() -> Result<()> {
        let x = Tensor::randn(0f32, 2.0, (4, 8, 8), &Device::Cpu)?;
        let y = causal_softmax(&x.to_dtype(DType::BF16)?, 0.5)?;
        assert_eq!(y.dtype(), DType::BF16);
        let want = causal_softmax_composed(&x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?, 0.5)?;
        let d = (y.to_dtype(DType::F32)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 4e-3, "bf16 result off by {d}");
        Ok(())
    }
}
