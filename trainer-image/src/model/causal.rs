//! Causal softmax of attention scores as one fused op with its backward: on a GPU the
//! composed form (upcast, scale, add the mask, softmax, downcast) made six passes over the
//! largest tensors of a step, `[batch, heads, t, t]`, each kept in f32 for the backward,
//! and was most of a GPT-2-small step's time and memory. Here the forward reads the
//! scores once and writes the probabilities once, in the scores' dtype; the backward
//! reads the probabilities and their gradient once and writes the scores' gradient.
//!
//! The CUDA kernels are `kernels/causal_softmax.cu` (compiled to PTX by `build.rs`,
//! launched by `model/cuda.rs`). The CPU implementation below is the same formula, row by
//! row, and exists so that the op, its mask and its backward are tested without a GPU;
//! training on the CPU keeps the composed path ([`attention_probs`]), whose kernels are
//! parallel there.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Result, Shape, Tensor,
};

use super::ops::{softmax_last_dim, softmax_last_dim_composed};

/// Attention probabilities from the raw scores `q·kᵀ` `[batch, heads, t, t]`, in the
/// scores' dtype: on a GPU the fused [`causal_softmax`]; on the CPU the composed ops
/// (half precision upcast to f32, scale, the additive causal mask, softmax, downcast).
pub fn attention_probs(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cuda() {
        return causal_softmax(scores, scale);
    }
    let dt = scores.dtype();
    let up = match dt {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    };
    let mask = causal_mask(scores.dim(D::Minus1)?, scores.device(), up)?;
    let att = (scores.to_dtype(up)? * scale)?.broadcast_add(&mask)?;
    softmax_last_dim(&att)?.to_dtype(dt)
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
/// The result has `x`'s dtype. A GPU computes in f32 (f32 or bf16 scores); the CPU in f64
/// (f32 or f64 scores, others through f32).
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

/// The whole contiguous buffer of `l` (the op takes nothing else).
fn whole<'a, T>(v: &'a [T], l: &Layout, name: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{name}: expected a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.dims()
        .last()
        .copied()
        .filter(|&t| t > 0)
        .ok_or_else(|| candle_core::Error::Msg("causal-softmax: empty scores".into()))
}

/// The CPU forward of one dtype: rows of `t`, row `r` being query position `r mod t`.
fn cpu_rows_fwd<T: candle_core::WithDType>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    for (r, (xr, yr)) in x.chunks(t).zip(y.chunks_mut(t)).enumerate() {
        let i = r % t;
        let s: Vec<f64> = xr[..=i].iter().map(|v| v.to_f64() * scale).collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
        for (o, v) in yr.iter_mut().zip(&s) {
            *o = T::from_f64((v - m).exp() / z);
        }
    }
    y
}

fn cpu_rows_bwd<T: candle_core::WithDType>(y: &[T], g: &[T], t: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); y.len()];
    for (r, ((yr, gr), dr)) in y
        .chunks(t)
        .zip(g.chunks(t))
        .zip(dx.chunks_mut(t))
        .enumerate()
    {
        let i = r % t;
        let d: f64 = yr[..=i]
            .iter()
            .zip(&gr[..=i])
            .map(|(a, b)| a.to_f64() * b.to_f64())
            .sum();
        for ((o, a), b) in dr.iter_mut().zip(&yr[..=i]).zip(&gr[..=i]) {
            *o = T::from_f64(scale * a.to_f64() * (b.to_f64() - d));
        }
    }
    dx
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = last_dim(l)?;
        let scale = self.scale;
        let y = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(cpu_rows_fwd(whole(v, l, self.name())?, t, scale))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(cpu_rows_fwd(whole(v, l, self.name())?, t, scale))
            }
            _ => candle_core::bail!("causal-softmax: f32 or f64 on the CPU"),
        };
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
        let name = self.name();
        let dx = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(cpu_rows_bwd(
                whole(y, ly, name)?,
                whole(g, lg, name)?,
                t,
                scale,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(cpu_rows_bwd(
                whole(y, ly, name)?,
                whole(g, lg, name)?,
                t,
                scale,
            )),
            _ => candle_core::bail!("causal-softmax-bwd: f32 or f64 on the CPU, one dtype"),
        };
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
