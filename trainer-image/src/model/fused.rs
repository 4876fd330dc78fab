//! Fused CPU ops with their backward: LayerNorm, GELU, and the add of a tensor repeated
//! along the leading dimensions (a bias, the position embeddings).
//!
//! candle composes each of these from generic ops, and its backward pays for every node:
//! a zeroed gradient buffer plus an add per input, and single-threaded reductions over
//! leading dimensions for broadcast operands. A composed LayerNorm is nine nodes forward
//! and about twenty passes over the activations backward, with its weight and bias
//! gradients reduced over the batch one strided element at a time; candle's GELU backward
//! is eleven elementwise passes over the MLP's widest activation. Here each op is one
//! parallel pass forward and one backward (rayon, rows at a time), in the tensor's dtype
//! (f32, or f64 for the tests). Reductions over rows sum fixed blocks of rows in a fixed
//! order, so results do not depend on the thread count or on scheduling.
//!
//! The dispatching functions ([`layer_norm`], [`gelu`], [`add_tiled`]) take this path for
//! CPU tensors of f32 or f64 and fall back to candle's ops elsewhere (a GPU, bf16).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::cpu::{
    ROWS_PER_BLOCK, Real, by_dtype, for_overwrite, fusable, sum_blocks, sum_tiles, unpack_grads,
};

// ---------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) · weight + bias` with
/// the biased variance (PyTorch's): fused on the CPU in f32/f64 and on a GPU in f32
/// (`kernels/layer_norm.cu`; mixed precision keeps LayerNorm in f32), composed elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    let on_cpu = fusable(x);
    let on_gpu = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
    if !((on_cpu || on_gpu) && same(weight) && bias.is_none_or(same)) {
        return super::ops::layer_norm_composed(x, weight, bias, eps);
    }
    let c = weight.elem_count();
    if x.dim(D::Minus1)? != c || bias.is_some_and(|b| b.elem_count() != c) {
        candle_core::bail!(
            "layer-norm: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            weight.dims(),
            bias.map(Tensor::dims)
        );
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => weight.detach().zeros_like()?,
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias, LayerNorm { eps })
}

struct LayerNorm {
    eps: f64,
}

/// `(x, weight, grad) → [dx, dweight, dbias]` packed in one vector.
struct LayerNormBwd {
    eps: f64,
}

/// The shape of [`LayerNormBwd`]'s packed output for `x` (`l1`) and the weight (`l2`):
/// `dx`, then `dweight` and `dbias` of the weight's size.
fn packed_shape(l1: &Layout, l2: &Layout) -> Shape {
    Shape::from(l1.shape().elem_count() + 2 * l2.shape().elem_count())
}

/// Mean and `1 / sqrt(var + eps)` of a row.
fn moments<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / n;
    let var = row
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, (var + eps).sqrt().recip())
}

fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    let eps = T::from_f64(eps);
    // SAFETY: every row of y is written below.
    #[allow(unsafe_code)]
    let mut y = unsafe { for_overwrite(x.len()) };
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .with_min_len(16)
        .for_each(|(yr, xr)| {
            let (mean, rstd) = moments(xr, eps);
            for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * wi + bi;
            }
        });
    y
}

/// `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ w`, per row; `dw = Σ g ⊙ x̂`
/// and `db = Σ g` over rows.
fn ln_bwd<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    let (n, eps) = (T::from_f64(c as f64), T::from_f64(eps));
    // SAFETY: dx (every row) and then dw and db are written below.
    #[allow(unsafe_code)]
    let mut out = unsafe { for_overwrite(x.len() + 2 * c) };
    let (dx, wb) = out.split_at_mut(x.len());
    let block = ROWS_PER_BLOCK * c;
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(g.par_chunks(block))
        .map(|((dxb, xb), gb)| {
            let mut p = vec![T::zero(); 2 * c];
            let (pw, pb) = p.split_at_mut(c);
            for ((dxr, xr), gr) in dxb.chunks_mut(c).zip(xb.chunks(c)).zip(gb.chunks(c)) {
                let (mean, rstd) = moments(xr, eps);
                let (mut s1, mut s2) = (T::zero(), T::zero());
                for i in 0..c {
                    let xh = (xr[i] - mean) * rstd;
                    let gh = gr[i] * w[i];
                    s1 += gh;
                    s2 += gh * xh;
                    pw[i] += gr[i] * xh;
                    pb[i] += gr[i];
                }
                let (m1, m2) = (s1 / n, s2 / n);
                for i in 0..c {
                    let xh = (xr[i] - mean) * rstd;
                    dxr[i] = rstd * (gr[i] * w[i] - m1 - xh * m2);
                }
            }
            p
        })
        .collect();
    wb.copy_from_slice(&sum_blocks(partials, 2 * c));
    out
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = by_dtype!(self.name(), [(s1, l1), (s2, l2), (s3, l3)], |x, w, b| {
            ln_fwd(x, w, b, self.eps)
        });
        Ok((y, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = super::cuda::layer_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.eps as f32)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let [dx, dw, db] = unpack_grads(&packed, [x, w, b])?;
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(self.name(), [(s1, l1), (s2, l2), (s3, l3)], |x, w, g| {
            ln_bwd(x, w, g, self.eps)
        });
        Ok((out, packed_shape(l1, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::layer_norm_bwd((s1, l1), (s2, l2), (s3, l3), self.eps as f32)?;
        Ok((out, packed_shape(l1, l2)))
    }
}

// ---------------------------------------------------------------------------------------
// GELU

/// GELU with the exact (erf) form, PyTorch's `nn.GELU()`: fused on the CPU in f32/f64,
/// candle's `gelu_erf` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

/// `(x, g) → g · gelu'(x)`.
struct GeluBwd;

/// Elements per task of the elementwise ops.
const CHUNK: usize = 16_384;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    // SAFETY: `T::gelu` writes every element of each chunk.
    #[allow(unsafe_code)]
    let mut y = unsafe { for_overwrite(x.len()) };
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| T::gelu(x, y));
    y
}

/// `gelu'(x) = Φ(x) + x·φ(x)`, the normal distribution's cdf and density.
fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    // SAFETY: `T::gelu_grad` writes every element of each chunk.
    #[allow(unsafe_code)]
    let mut dx = unsafe { for_overwrite(x.len()) };
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| T::gelu_grad(x, g, dx));
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = by_dtype!(self.name(), [(s, l)], |x| gelu_fwd(x));
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dx = by_dtype!(self.name(), [(s1, l1), (s2, l2)], |x, g| gelu_bwd(x, g));
        Ok((dx, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Adding a tensor repeated along the leading dimensions

/// `x + b` where `b`'s shape is the trailing part of `x`'s (a bias `[out]` on `[n, out]`,
/// position embeddings `[t, c]` on `[batch, t, c]`): fused on the CPU in f32/f64, whose
/// backward sums `b`'s gradient over the repeats in parallel; `broadcast_add` elsewhere.
pub fn add_tiled(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(fusable(x) && fusable(b) && x.dtype() == b.dtype()) {
        return x.broadcast_add(b);
    }
    let (xd, bd) = (x.dims(), b.dims());
    if bd.len() > xd.len() || xd[xd.len() - bd.len()..] != *bd {
        candle_core::bail!("add-tiled: {bd:?} is not the trailing shape of {xd:?}");
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddTiled)
}

struct AddTiled;

/// `g [k·m] → Σₖ g [m]`.
struct SumTiles {
    width: usize,
}

fn add_tiled_fwd<T: Real>(x: &[T], b: &[T]) -> Vec<T> {
    // SAFETY: every row of y is written below.
    #[allow(unsafe_code)]
    let mut y = unsafe { for_overwrite(x.len()) };
    let rows = (4096 / b.len().max(1)).max(1);
    y.par_chunks_mut(b.len())
        .zip(x.par_chunks(b.len()))
        .with_min_len(rows)
        .for_each(|(yr, xr)| {
            for ((o, &v), &bv) in yr.iter_mut().zip(xr).zip(b) {
                *o = v + bv;
            }
        });
    y
}

impl CustomOp2 for AddTiled {
    fn name(&self) -> &'static str {
        "add-tiled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = by_dtype!(self.name(), [(s1, l1), (s2, l2)], |x, b| add_tiled_fwd(
            x, b
        ));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = if b.track_op() {
            let width = b.elem_count();
            let sum = g.contiguous()?.apply_op1_no_bwd(&SumTiles { width })?;
            Some(sum.reshape(b.shape())?)
        } else {
            None
        };
        Ok((x.track_op().then(|| g.clone()), db))
    }
}

impl CustomOp1 for SumTiles {
    fn name(&self) -> &'static str {
        "sum-tiles"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.width;
        let out = by_dtype!(self.name(), [(s, l)], |g| sum_tiles(g, width));
        Ok((out, Shape::from(width)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        check::{max_abs, value_and_grads},
        ops::layer_norm_composed,
    };
    use candle_core::{DType, Device};

    fn randn(shape: &[usize], std: f64) -> Result<Tensor> {
        Tensor::randn(0f64, std, shape, &Device::Cpu)
    }

    /// Largest difference relative to the reference's largest magnitude, which must not
    /// be trivial.
    fn rel(got: &Tensor, want: &Tensor) -> Result<f64> {
        let scale = max_abs(want)?;
        assert!(scale > 1e-3, "the reference is trivial");
        Ok(max_abs(&(got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?)? / scale)
    }

    #[test]
    fn layer_norm_matches_the_composed_one_in_value_and_every_gradient() -> Result<()> {
        // 150 rows: more than two blocks of the weight and bias reductions.
        let (x, w, b) = (
            randn(&[3, 50, 24], 2.0)?,
            randn(&[24], 1.0)?,
            randn(&[24], 1.0)?,
        );
        let x = (x + 0.7)?;
        let up = randn(&[3, 50, 24], 1.0)?;
        let fused = |t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5);
        let composed = |t: &[Tensor]| layer_norm_composed(&t[0], &t[1], Some(&t[2]), 1e-5);
        let (y1, g1) = value_and_grads(&fused, &[&x, &w, &b], &up)?;
        let (y2, g2) = value_and_grads(&composed, &[&x, &w, &b], &up)?;
        assert!(rel(&y1, &y2)? < 1e-14, "values");
        for (name, a, b) in [("x", 0, 0), ("weight", 1, 1), ("bias", 2, 2)] {
            let e = rel(&g1[a], &g2[b])?;
            assert!(e < 1e-13, "gradient of {name} off by {e:e}");
        }
        // Without a bias, and with a frozen weight: x still gets its gradient.
        let fused = |t: &[Tensor]| layer_norm(&t[0], &w, None, 1e-5);
        let composed = |t: &[Tensor]| layer_norm_composed(&t[0], &w, None, 1e-5);
        let (y1, g1) = value_and_grads(&fused, &[&x], &up)?;
        let (y2, g2) = value_and_grads(&composed, &[&x], &up)?;
        assert!(rel(&y1, &y2)? < 1e-14 && rel(&g1[0], &g2[0])? < 1e-13);
        Ok(())
    }

    /// Central differences in f64, the reference for GELU's gradient: candle's own
    /// backward rounds 1/√(2π) to six digits.
    #[test]
    fn gelu_matches_the_erf_form_and_its_finite_differences() -> Result<()> {
        let x = randn(&[7, 301], 2.0)?;
        let up = randn(&[7, 301], 1.0)?;
        let (y, g) = value_and_grads(&|t| gelu(&t[0]), &[&x], &up)?;
        assert!(rel(&y, &x.gelu_erf()?)? < 1e-15, "values");
        let h = 1e-6;
        let fd = ((gelu(&(&x + h)?)? - gelu(&(&x - h)?)?)? / (2.0 * h))?;
        let e = rel(&g[0], &(fd * &up)?)?;
        assert!(e < 1e-8, "gradient off its finite differences by {e:e}");
        Ok(())
    }

    #[test]
    fn add_tiled_matches_broadcast_add_for_a_bias_and_for_positions() -> Result<()> {
        for (xs, bs) in [(vec![150, 40], vec![40]), (vec![3, 5, 8], vec![5, 8])] {
            let (x, b, up) = (randn(&xs, 1.0)?, randn(&bs, 1.0)?, randn(&xs, 1.0)?);
            let (y1, g1) = value_and_grads(&|t| add_tiled(&t[0], &t[1]), &[&x, &b], &up)?;
            let (y2, g2) = value_and_grads(&|t| t[0].broadcast_add(&t[1]), &[&x, &b], &up)?;
            assert!(rel(&y1, &y2)? == 0.0, "values");
            assert!(rel(&g1[0], &g2[0])? == 0.0, "gradient of x");
            let e = rel(&g1[1], &g2[1])?;
            assert!(e < 1e-14, "gradient of the tiled operand off by {e:e}");
        }
        let err = add_tiled(&randn(&[4, 6], 1.0)?, &randn(&[4], 1.0)?);
        assert!(err.is_err(), "a shape that is not trailing is refused");
        Ok(())
    }

    #[test]
    fn f32_results_track_the_f64_ones() -> Result<()> {
        let (x, w, b) = (
            randn(&[40, 96], 3.0)?,
            randn(&[96], 1.0)?,
            randn(&[96], 1.0)?,
        );
        let up = randn(&[40, 96], 1.0)?;
        let f32s = |ts: &[&Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| t.to_dtype(DType::F32)).collect()
        };
        let ln = |t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5);
        let (y64, g64) = value_and_grads(&ln, &[&x, &w, &b], &up)?;
        let v = f32s(&[&x, &w, &b, &up])?;
        let (y32, g32) = value_and_grads(&ln, &[&v[0], &v[1], &v[2]], &v[3])?;
        assert!(rel(&y32, &y64)? < 1e-6);
        for (a, b) in g32.iter().zip(&g64) {
            assert!(rel(a, b)? < 1e-5);
        }
        let (y64, g64) = value_and_grads(&|t| gelu(&t[0]), &[&x], &up)?;
        let (y32, g32) = value_and_grads(&|t| gelu(&t[0]), &[&v[0]], &v[3])?;
        assert!(rel(&y32, &y64)? < 1e-6 && rel(&g32[0], &g64[0])? < 1e-6);
        Ok(())
    }

    #[test]
    fn reductions_do_not_depend_on_the_thread_count() -> Result<()> {
        let x = randn(&[1000, 64], 1.0)?.to_dtype(DType::F32)?;
        let (w, b) = (Tensor::ones(64, DType::F32, &Device::Cpu)?, x.get(0)?);
        let up = randn(&[1000, 64], 1.0)?.to_dtype(DType::F32)?;
        let ln = |t: &[Tensor]| layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5);
        let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let (_, g) = pool.install(|| value_and_grads(&ln, &[&x, &w, &b], &up))?;
            g.iter().map(|t| t.flatten_all()?.to_vec1()).collect()
        };
        assert_eq!(run(1)?, run(3)?);
        Ok(())
    }
}
