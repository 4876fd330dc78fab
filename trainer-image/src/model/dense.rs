//! A linear layer on the CPU as one op with its backward: `y = x·W + b` for `x`
//! `[n, in]` and a Conv1D-layout `W` `[in, out]`.
//!
//! Composed, it is a matmul node and a bias-add node, and candle's backward gives each
//! node's input a zeroed buffer and an add: the add node's costs the size of `y`, the
//! widest activation of the MLP. Here the forward writes the bias into `y` and
//! accumulates `x·W` onto it with one GEMM; the backward computes `dx = dy·Wᵀ`,
//! `dW = xᵀ·dy` (GEMMs on the rayon pool, through strides, no transposed copies) and
//! `db` (deterministic block sums), packed into one buffer.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{
    cpu::{Real, by_dtype, for_overwrite, fusable, sum_tiles, unpack_grads},
    gemm::{Mat, matmul_acc},
};

/// Whether [`linear`] takes these operands: 2-D `x`, and everything a CPU tensor of one
/// dtype, f32 or f64.
pub(crate) fn takes(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let same = |t: &Tensor| fusable(t) && t.dtype() == x.dtype();
    x.rank() == 2 && w.rank() == 2 && same(x) && same(w) && b.is_none_or(same)
}

/// `x·w + b` for `x` `[n, in]`, `w` `[in, out]`, `b` `[out]`, as one op (see the module's
/// comment); the operands must satisfy [`takes`].
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let ((_, k), (k2, out)) = (x.dims2()?, w.dims2()?);
    if k != k2 || b.is_some_and(|b| b.dims() != [out]) {
        candle_core::bail!(
            "linear: x {:?}, w {:?}, b {:?}",
            x.dims(),
            w.dims(),
            b.map(Tensor::dims)
        );
    }
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(out, w.dtype(), w.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, Dense)
}

struct Dense;

/// `(x, w, dy) → [dx, dw, db]` packed in one vector.
struct DenseBwd;

fn dense_fwd<T: Real>(x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let out = b.len();
    let k = w.len() / out.max(1);
    let n = x.len() / k.max(1);
    let mut y = Vec::with_capacity(n * out);
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    // SAFETY: x is [n, k], w [k, out] and y [n, out], all live and contiguous; y is
    // written by this call alone.
    unsafe {
        matmul_acc(
            rayon::current_num_threads(),
            true,
            n,
            out,
            k,
            Mat::new(y.as_mut_ptr().cast_const(), out, 1),
            Mat::new(x.as_ptr(), k, 1),
            Mat::new(w.as_ptr(), out, 1),
        );
    }
    y
}

fn dense_bwd<T: Real>(x: &[T], w: &[T], g: &[T], out: usize) -> Vec<T> {
    let k = w.len() / out.max(1);
    let n = x.len() / k.max(1);
    let len = x.len() + w.len() + out;
    let mut packed = if n == 0 || k == 0 || out == 0 {
        // Products over an empty dimension may leave their destination unwritten.
        vec![T::zero(); len]
    } else {
        // SAFETY: dx and dw are overwritten by the products below, db by the copy after.
        unsafe { for_overwrite(len) }
    };
    let (xm, wm, gm) = (
        Mat::new(x.as_ptr(), k, 1),
        Mat::new(w.as_ptr(), out, 1),
        Mat::new(g.as_ptr(), out, 1),
    );
    let base = packed.as_mut_ptr().cast_const();
    // dx and dw take the same number of multiply-adds: run them side by side, each on
    // half the threads, rather than one after the other on all of them (no gemm has to
    // synchronise its threads with the other's).
    let threads = rayon::current_num_threads();
    let (a, b) = (threads.div_ceil(2), threads / 2);
    let (dx, dw) = (Mat::new(base, k, 1), Mat::new(base, out, 1).add(n * k));
    // SAFETY: dx is packed[..n·k] ([n, k]) and dw packed[n·k..n·k + k·out] ([k, out]),
    // disjoint, each written by one product alone; the operands are live, contiguous and
    // only read.
    rayon::join(
        || unsafe { matmul_acc(a, false, n, k, out, dx, gm, wm.t()) },
        || unsafe { matmul_acc(b.max(1), false, k, out, n, dw, xm.t(), gm) },
    );
    packed[x.len() + w.len()..].copy_from_slice(&sum_tiles(g, out));
    packed
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "linear"
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
            dense_fwd(x, w, b)
        });
        Ok((y, Shape::from((l1.dims()[0], l2.dims()[1]))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &DenseBwd)?;
        let [dx, dw, db] = unpack_grads(&packed, [x, w, b])?;
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for DenseBwd {
    fn name(&self) -> &'static str {
        "linear-bwd"
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
        let out = l2.dims()[1];
        let packed = by_dtype!(self.name(), [(s1, l1), (s2, l2), (s3, l3)], |x, w, g| {
            dense_bwd(x, w, g, out)
        });
        let len = l1.shape().elem_count() + l2.shape().elem_count() + out;
        Ok((packed, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::{max_abs, value_and_grads};
    use candle_core::{Device, Var};

    #[test]
    fn matches_matmul_plus_bias_in_value_and_every_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // 150 rows: more than two blocks of the bias reduction.
        let (n, k, out) = (150, 24, 40);
        let x = Tensor::randn(0f64, 1.0, (n, k), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (k, out), &dev)?;
        let b = Tensor::randn(0f64, 1.0, out, &dev)?;
        let up = Tensor::randn(0f64, 1.0, (n, out), &dev)?;
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<Vec<Tensor>> {
            let (y, grads) = value_and_grads(f, &[&x, &w, &b], &up)?;
            Ok([vec![y], grads].concat())
        };
        let fused = run(&|t| linear(&t[0], &t[1], Some(&t[2])))?;
        let composed = run(&|t| t[0].matmul(&t[1])?.broadcast_add(&t[2]))?;
        for (name, a, r) in ["value", "dx", "dw", "db"]
            .iter()
            .zip(&fused)
            .zip(&composed)
            .map(|((n, a), r)| (n, a, r))
        {
            let scale = max_abs(r)?;
            let d = max_abs(&(a - r)?)?;
            assert!(scale > 1e-2 && d < 1e-13 * scale, "{name} off by {d:e}");
        }
        // Without a bias; and a frozen weight gets no gradient.
        let y = linear(&x, &w, None)?;
        assert!(max_abs(&(y - x.matmul(&w)?)?)? < 1e-12);
        let xv = Var::from_tensor(&x)?;
        let grads = linear(xv.as_tensor(), &w, None)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none() && grads.get(xv.as_tensor()).is_some());
        assert!(
            linear(&x, &w.t()?, None).is_err(),
            "mismatched shapes are refused"
        );
        Ok(())
    }
}
