//! What the fused CPU ops share: the float type they compute in (f32, or f64 for the
//! tests), their storages as slices, and deterministic reductions over rows (fixed
//! blocks of rows summed in a fixed order, whatever the thread count).

use std::cell::RefCell;
use std::marker::PhantomData;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// A float the fused CPU ops compute in: f32 or f64.
pub(crate) trait Real: WithDType + Float {
    /// `out = gelu(x)`, the exact (erf) form.
    fn gelu(x: &[Self], out: &mut [Self]);
    /// `out = g · gelu'(x)`.
    fn gelu_grad(x: &[Self], g: &[Self], out: &mut [Self]);
    /// `row = softmax(scale · row)` in place (`scale > 0`).
    fn softmax(row: &mut [Self], scale: Self);
    /// `ln Σ e^x` over `row`.
    fn log_sum_exp(row: &[Self]) -> Self;
    /// `out = scale · e^(x − shift)`.
    fn exp_shifted(x: &[Self], shift: Self, scale: Self, out: &mut [Self]);
    /// The elements of a storage of this dtype, mutably.
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}

/// f32 through the vectorised forms of [`super::fastmath`].
impl Real for f32 {
    fn gelu(x: &[Self], out: &mut [Self]) {
        super::fastmath::gelu(x, out)
    }

    fn gelu_grad(x: &[Self], g: &[Self], out: &mut [Self]) {
        super::fastmath::gelu_grad(x, g, out)
    }

    fn softmax(row: &mut [Self], scale: Self) {
        super::fastmath::softmax(row, scale)
    }

    fn log_sum_exp(row: &[Self]) -> Self {
        super::fastmath::log_sum_exp(row)
    }

    fn exp_shifted(x: &[Self], shift: Self, scale: Self, out: &mut [Self]) {
        super::fastmath::exp_shifted(x, shift, scale, out)
    }

    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            other => candle_core::bail!("expected f32, got {:?}", other.dtype()),
        }
    }
}

/// f64 through libm's `erf`: the precision the tests compare with.
impl Real for f64 {
    fn gelu(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5
                * v
                * (1.0 + candle_core::cpu::erf::erf_f64(v * std::f64::consts::FRAC_1_SQRT_2));
        }
    }

    fn gelu_grad(x: &[Self], g: &[Self], out: &mut [Self]) {
        let r2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
            let cdf =
                0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v * std::f64::consts::FRAC_1_SQRT_2));
            *o = gv * (cdf + v * r2pi * (-0.5 * v * v).exp());
        }
    }

    fn softmax(row: &mut [Self], scale: Self) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v * scale));
        let mut z = 0.0;
        for v in row.iter_mut() {
            *v = (*v * scale - m).exp();
            z += *v;
        }
        row.iter_mut().for_each(|v| *v /= z);
    }

    fn log_sum_exp(row: &[Self]) -> Self {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
    }

    fn exp_shifted(x: &[Self], shift: Self, scale: Self, out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = scale * (v - shift).exp();
        }
    }

    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            other => candle_core::bail!("expected f64, got {:?}", other.dtype()),
        }
    }
}

/// Whether the fused CPU ops take `t`: a CPU tensor of f32 or f64.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Rows summed by one task of a reduction over rows; fixed, so that the order of the
/// floating-point sums is too.
pub(crate) const ROWS_PER_BLOCK: usize = 64;

/// The elements of a contiguous tensor.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let v = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// A buffer of `n` elements for a kernel that writes every one of them before anything
/// reads it: `vec![0; n]` without the zero fill, a pass over memory that such a kernel's
/// own writes make redundant (about 800 MB a step of the baby GPT, 2.5 % of its time).
/// candle's CPU backend allocates its own outputs the same way.
///
/// # Safety
/// The caller writes every element before any is read.
#[allow(unsafe_code, clippy::uninit_vec)]
pub(crate) unsafe fn for_overwrite<T: Real>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: capacity n; f32 and f64 have no invalid bit patterns, and the caller
    // promises to write each element before reading it.
    unsafe { v.set_len(n) };
    v
}

/// `f` on the elements of the contiguous CPU tensor `t` (its storage's read lock held
/// meanwhile).
pub(crate) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("{op}: {:?} is not on the CPU", t.device());
    };
    f(contiguous_slice(storage, layout, op)?)
}

/// `f` on the elements of the contiguous CPU tensor `t`, borrowed mutably through
/// candle's in-place op hook (which holds `t`'s storage lock meanwhile). Calls may nest
/// on tensors of distinct storages; on the same storage they would deadlock.
pub(crate) fn with_slice_mut<T: Real, R>(
    t: &Tensor,
    f: impl FnOnce(&mut [T]) -> Result<R>,
) -> Result<R> {
    struct Once<T, F, R> {
        f: RefCell<Option<F>>,
        out: RefCell<Option<Result<R>>>,
        dtype: PhantomData<T>,
    }
    impl<T: Real, F: FnOnce(&mut [T]) -> Result<R>, R> candle_core::InplaceOp1 for Once<T, F, R> {
        fn name(&self) -> &'static str {
            "taper-slice-mut"
        }

        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let (a, b) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
            if let Some(f) = self.f.borrow_mut().take() {
                *self.out.borrow_mut() = Some(f(&mut T::slice_mut(s)?[a..b]));
            }
            Ok(())
        }
    }
    let op = Once {
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
        dtype: PhantomData::<T>,
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .unwrap_or_else(|| candle_core::bail!("with_slice_mut: {:?} is not on the CPU", t.device()))
}

/// `body` over the storages' elements as slices of f32 or f64, as the first storage's
/// dtype says (the others must have it too), wrapped back into a storage.
macro_rules! by_dtype {
    ($op:expr, [$(($s:expr, $l:expr)),+], |$($v:ident),+| $body:expr) => {{
        let first = [$($s),+][0];
        match first {
            candle_core::CpuStorage::F32(_) => {
                $(let $v = $crate::model::cpu::contiguous_slice::<f32>($s, $l, $op)?;)+
                candle_core::CpuStorage::F32($body)
            }
            candle_core::CpuStorage::F64(_) => {
                $(let $v = $crate::model::cpu::contiguous_slice::<f64>($s, $l, $op)?;)+
                candle_core::CpuStorage::F64($body)
            }
            other => candle_core::bail!("{}: f32 or f64 on the CPU, got {:?}", $op, candle_core::backend::BackendStorage::dtype(other)),
        }
    }};
}
pub(crate) use by_dtype;

/// The sum, in order, of the partial sums (each `width` wide) of fixed blocks of rows: the
/// deterministic end of every reduction over rows here.
pub(crate) fn sum_blocks<T: Real>(partials: Vec<Vec<T>>, width: usize) -> Vec<T> {
    let mut acc = vec![T::zero(); width];
    for p in partials {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// `g [k·width] → Σₖ g [width]`: the gradient of a tensor repeated `k` times.
pub(crate) fn sum_tiles<T: Real>(g: &[T], width: usize) -> Vec<T> {
    let partials = g
        .par_chunks(ROWS_PER_BLOCK * width)
        .map(|block| {
            let mut p = vec![T::zero(); width];
            for row in block.chunks(width) {
                for (a, &v) in p.iter_mut().zip(row) {
                    *a += v;
                }
            }
            p
        })
        .collect();
    sum_blocks(partials, width)
}

/// Row `i` of a causal softmax, in place: `softmax(scale · row[..=i])`, 0 beyond.
pub(crate) fn causal_softmax_row<T: Real>(row: &mut [T], i: usize, scale: T) {
    let (keep, masked) = row.split_at_mut(i + 1);
    T::softmax(keep, scale);
    masked.fill(T::zero());
}

/// The backward of [`causal_softmax_row`], in place: `row` holds the gradient of the
/// probabilities `p` on entry and that of the scores on return,
/// `scale · p ⊙ (g − Σ p ⊙ g)` on `[..=i]` and 0 beyond (a masked score's gradient).
pub(crate) fn causal_softmax_row_bwd<T: Real>(row: &mut [T], p: &[T], i: usize, scale: T) {
    let (keep, masked) = row.split_at_mut(i + 1);
    let p = &p[..=i];
    let dot = keep.iter().zip(p).fold(T::zero(), |a, (&g, &y)| a + g * y);
    for (o, &y) in keep.iter_mut().zip(p) {
        *o = scale * y * (*o - dot);
    }
    masked.fill(T::zero());
}

/// The gradients a packed backward buffer holds for `inputs`, in order and each of its
/// input's shape; `None` for an input that takes no gradient (a frozen or constant one).
pub(crate) fn unpack_grads<const N: usize>(
    packed: &Tensor,
    inputs: [&Tensor; N],
) -> Result<[Option<Tensor>; N]> {
    let mut start = 0;
    let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (slot, input) in out.iter_mut().zip(inputs) {
        let len = input.elem_count();
        if input.track_op() {
            *slot = Some(packed.narrow(0, start, len)?.reshape(input.shape())?);
        }
        start += len;
    }
    Ok(out)
}
