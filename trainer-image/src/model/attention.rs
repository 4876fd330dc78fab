//! Causal multi-head self-attention on the CPU as one op with its backward, from the
//! fused `q, k, v` projection `[batch, t, 3·c]` to the heads' merged output `[batch, t, c]`.
//!
//! Composed, attention is about fifteen graph nodes per layer (three `narrow`s of `qkv`
//! whose backward each pads a gradient the size of `qkv`, head reshapes, transposes and
//! copies, two batched matmuls, the softmax), and candle's backward adds a zeroed buffer
//! and an add per node. Here one task per (batch, head) multiplies in place through
//! strides, with gemm's kernels on one thread each (the tasks are the parallelism):
//! `S = Q·Kᵀ`, the scaled causal softmax `P`, `Y = P·V`, in blocks of 64 query rows
//! that multiply only the keys up to their last row (the causal mask makes the rest 0,
//! so the products do about 60 % of the full square's work at 256 positions). The
//! backward recomputes `P` rather than keeping it (the largest tensor of a step,
//! `[batch, heads, t, t]`), as flash attention does, then `dV = Pᵀ·dY`, `dP = dY·Vᵀ`, `dS = scale · P ⊙ (dP − Σ P ⊙ dP)`,
//! `dQ = dS·K`, `dK = dSᵀ·Q`, each head writing its own columns of `dqkv`.
//!
//! Used for CPU tensors of f32 or f64 when no dropout applies to the probabilities; the
//! composed path (`model::gpt`) serves the rest, and is the tests' reference.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{
    cpu::{Real, by_dtype, causal_softmax_row, causal_softmax_row_bwd, for_overwrite},
    gemm::{Mat, matmul, matmul_acc},
};

/// The attention output `[rows, c]` of `heads` heads from `qkv` `[rows, 3·c]` (`q`, `k`,
/// `v` side by side, each head's `c / heads` columns in order; `rows` is batch · `t`, or
/// the two dimensions `[batch, t]`), with the causal mask and `softmax(scale · q·kᵀ)`.
pub fn causal_attention(qkv: &Tensor, t: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let c3 = qkv.dim(D::Minus1)?;
    let rows = qkv.elem_count() / c3.max(1);
    if heads == 0 || !c3.is_multiple_of(3 * heads) || t == 0 || !rows.is_multiple_of(t) {
        candle_core::bail!(
            "causal-attention: qkv {:?} is not [batch·{t}, 3·c] with {heads} heads dividing c",
            qkv.dims()
        );
    }
    qkv.contiguous()?.apply_op1(Attention { t, heads, scale })
}

/// The shape of one call: batch, sequence length, width (`c`) and heads.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
}

impl Dims {
    fn of(l: &Layout, t: usize, heads: usize) -> Result<Self> {
        let c3 = l.dims().last().copied().unwrap_or(0);
        Ok(Self {
            b: l.shape().elem_count() / (t * c3).max(1),
            t,
            c: c3 / 3,
            h: heads,
        })
    }

    /// The output's shape: `qkv`'s with a third of its columns.
    fn out_shape(&self, l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.c;
        }
        Shape::from(dims)
    }

    fn hd(&self) -> usize {
        self.c / self.h
    }

    /// Offset of head `h` of batch `b`'s first row in `[batch, t, width]`.
    fn at(&self, bh: usize, width: usize) -> usize {
        (bh / self.h) * self.t * width + (bh % self.h) * self.hd()
    }
}

struct Attention {
    t: usize,
    heads: usize,
    scale: f64,
}

/// `(qkv, dy) → dqkv`.
struct AttentionBwd {
    t: usize,
    heads: usize,
    scale: f64,
}

/// Query rows per block: a block of rows `[r0, r1)` needs the keys `[0, r1)` only, so
/// the products skip most of the masked half of `Q·Kᵀ`.
const BLOCK: usize = 64;

/// The probabilities of query rows `[r0, r1)` of one head into `p` (`[r1 - r0, r1]`, row
/// stride `t`): `S = Q·Kᵀ` over keys `[0, r1)`, then the scaled causal softmax, 0 above
/// the diagonal.
///
/// # Safety
/// `q` and `k` address `[t, hd]` matrices in a live buffer; `p` holds `(r1 - r0)·t`.
unsafe fn probs<T: Real>(
    p: &mut [T],
    q: Mat<T>,
    k: Mat<T>,
    d: Dims,
    r0: usize,
    r1: usize,
    scale: T,
) {
    let t = d.t;
    let pm = Mat::new(p.as_mut_ptr().cast_const(), t, 1);
    // SAFETY: `p` is the caller's private buffer; q and k as it promises.
    unsafe { matmul(1, r1 - r0, r1, d.hd(), pm, q.add(r0 * q.rs()), k.t()) };
    for (i, row) in (r0..r1).zip(p.chunks_mut(t)) {
        causal_softmax_row(&mut row[..r1], i, scale);
    }
}

fn attention_fwd<T: Real>(qkv: &[T], d: Dims, scale: f64) -> Vec<T> {
    let (t, c, hd) = (d.t, d.c, d.hd());
    let scale = T::from_f64(scale);
    // SAFETY: each (batch, head) task overwrites its columns of every row of y.
    let mut y: Vec<T> = unsafe { for_overwrite(d.b * t * c) };
    let x = Mat::new(qkv.as_ptr(), 3 * c, 1);
    let out = Mat::new(y.as_mut_ptr().cast_const(), c, 1);
    (0..d.b * d.h).into_par_iter().for_each(|bh| {
        let (q, y) = (x.add(d.at(bh, 3 * c)), out.add(d.at(bh, c)));
        let mut p = vec![T::zero(); BLOCK.min(t) * t];
        for r0 in (0..t).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(t);
            // SAFETY: q, k, v and this head's columns of y lie within qkv and y, which
            // live until the loop ends; no other task writes these columns of y.
            unsafe {
                probs(&mut p, q, q.add(c), d, r0, r1, scale);
                let pm = Mat::new(p.as_ptr(), t, 1);
                matmul(1, r1 - r0, hd, r1, y.add(r0 * c), pm, q.add(2 * c));
            }
        }
    });
    y
}

fn attention_bwd<T: Real>(qkv: &[T], dy: &[T], d: Dims, scale: f64) -> Vec<T> {
    let (t, c, hd) = (d.t, d.c, d.hd());
    let scale = T::from_f64(scale);
    let mut dqkv = vec![T::zero(); qkv.len()];
    let (x, g, dx) = (
        Mat::new(qkv.as_ptr(), 3 * c, 1),
        Mat::new(dy.as_ptr(), c, 1),
        Mat::new(dqkv.as_mut_ptr().cast_const(), 3 * c, 1),
    );
    (0..d.b * d.h).into_par_iter().for_each(|bh| {
        let (q, g) = (x.add(d.at(bh, 3 * c)), g.add(d.at(bh, c)));
        let (k, v) = (q.add(c), q.add(2 * c));
        let dq = dx.add(d.at(bh, 3 * c));
        let (dk, dv) = (dq.add(c), dq.add(2 * c));
        let mut p = vec![T::zero(); BLOCK.min(t) * t];
        let mut ds = vec![T::zero(); BLOCK.min(t) * t];
        for r0 in (0..t).step_by(BLOCK) {
            let (r1, rows) = ((r0 + BLOCK).min(t), (r0 + BLOCK).min(t) - r0);
            let (q_blk, g_blk) = (q.add(r0 * 3 * c), g.add(r0 * c));
            // SAFETY: as in the forward; this head's columns of dqkv are written by this
            // task alone (dK and dV accumulate over the blocks), `p` and `ds` are its own.
            unsafe {
                probs(&mut p, q, k, d, r0, r1, scale);
                let pm = Mat::new(p.as_ptr(), t, 1);
                matmul_acc(1, true, r1, hd, rows, dv, pm.t(), g_blk);
                let dsm = Mat::new(ds.as_mut_ptr().cast_const(), t, 1);
                matmul(1, rows, r1, hd, dsm, g_blk, v.t());
            }
            for (i, (dr, pr)) in (r0..r1).zip(ds.chunks_mut(t).zip(p.chunks(t))) {
                causal_softmax_row_bwd(&mut dr[..r1], pr, i, scale);
            }
            let dsm = Mat::new(ds.as_ptr(), t, 1);
            // SAFETY: as above.
            unsafe {
                matmul(1, rows, hd, r1, dq.add(r0 * 3 * c), dsm, k);
                matmul_acc(1, true, r1, hd, rows, dk, dsm.t(), q_blk);
            }
        }
    });
    dqkv
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l, self.t, self.heads)?;
        let y = by_dtype!(self.name(), [(s, l)], |x| attention_fwd(x, d, self.scale));
        Ok((y, d.out_shape(l)))
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let bwd = AttentionBwd {
            t: self.t,
            heads: self.heads,
            scale: self.scale,
        };
        Ok(Some(qkv.apply_op2_no_bwd(&g.contiguous()?, &bwd)?))
    }
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1, self.t, self.heads)?;
        if *l2.shape() != d.out_shape(l1) {
            candle_core::bail!("causal-attention-bwd: gradient {:?}", l2.shape());
        }
        let dx = by_dtype!(self.name(), [(s1, l1), (s2, l2)], |x, g| {
            attention_bwd(x, g, d, self.scale)
        });
        Ok((dx, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        check::{max_abs, value_and_grad},
        gpt::attention_composed,
    };
    use candle_core::{DType, Device};

    #[test]
    fn matches_the_composed_attention_in_value_and_gradient() -> Result<()> {
        // 150 positions: three blocks of query rows, the last one partial.
        for (b, t, h, hd) in [(2, 19, 3, 4), (1, 1, 2, 3), (3, 40, 1, 8), (1, 150, 2, 4)] {
            let c = h * hd;
            let qkv = Tensor::randn(0f64, 1.5, (b, t, 3 * c), &Device::Cpu)?;
            let up = Tensor::randn(0f64, 1.0, (b, t, c), &Device::Cpu)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = |x: &Tensor| causal_attention(x, t, h, scale);
            let composed = |x: &Tensor| attention_composed(x, h, scale, 0.0, None);
            let (y1, g1) = value_and_grad(&fused, &qkv, &up)?;
            let (y2, g2) = value_and_grad(&composed, &qkv, &up)?;
            let (dy, dg) = (max_abs(&(&y1 - &y2)?)?, max_abs(&(&g1 - &g2)?)?);
            let gmax = max_abs(&g2)?;
            assert!(
                dy < 1e-14 * max_abs(&y2)?,
                "{b}x{t}x{h}x{hd}: values off by {dy:e}"
            );
            assert!(
                gmax > 1e-2 && dg < 1e-13 * gmax,
                "{b}x{t}x{h}x{hd}: gradients off by {dg:e} (largest {gmax})"
            );
        }
        Ok(())
    }

    #[test]
    fn f32_tracks_f64_and_a_bad_head_count_is_refused() -> Result<()> {
        let qkv = Tensor::randn(0f64, 1.0, (2, 33, 48), &Device::Cpu)?;
        let up = Tensor::randn(0f64, 1.0, (2, 33, 16), &Device::Cpu)?;
        let f = |x: &Tensor| causal_attention(x, 33, 4, 0.5);
        let (y64, g64) = value_and_grad(&f, &qkv, &up)?;
        let (y32, g32) = value_and_grad(&f, &qkv.to_dtype(DType::F32)?, &up.to_dtype(DType::F32)?)?;
        let off = |a: &Tensor, b: &Tensor| -> Result<f64> {
            Ok(max_abs(&(a.to_dtype(DType::F64)? - b)?)? / max_abs(b)?)
        };
        assert!(off(&y32, &y64)? < 1e-6 && off(&g32, &g64)? < 1e-5);
        assert!(causal_attention(&qkv, 33, 5, 0.5).is_err());
        assert!(causal_attention(&qkv, 32, 4, 0.5).is_err());
        // Rows as one dimension, as the GPT's residual stream has them.
        let flat = causal_attention(&qkv.reshape((66, 48))?, 33, 4, 0.5)?;
        assert_eq!(flat.dims(), [66, 16]);
        assert_eq!(max_abs(&(flat.reshape((2, 33, 16))? - &y64)?)?, 0.0);
        Ok(())
    }
}
