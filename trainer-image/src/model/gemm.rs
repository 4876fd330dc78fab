//! Matrix products on raw strided buffers through the `gemm` crate (the kernels candle's
//! CPU matmul uses), for the fused CPU ops that multiply in place.
#![allow(unsafe_code)]

use super::cpu::Real;

/// A matrix in memory: its first element and its row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

// Matrices are shared by rayon tasks: the unsafe functions that use them make their
// callers promise that the buffers outlive the tasks and that no two write one element.
unsafe impl<T> Send for Mat<T> {}
unsafe impl<T> Sync for Mat<T> {}

impl<T> Mat<T> {
    pub(crate) fn new(ptr: *const T, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }

    /// The row stride.
    pub(crate) fn rs(self) -> usize {
        self.rs
    }

    pub(crate) fn t(self) -> Self {
        Self::new(self.ptr, self.cs, self.rs)
    }

    pub(crate) fn add(self, offset: usize) -> Self {
        Self::new(self.ptr.wrapping_add(offset), self.rs, self.cs)
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`) for `[m, k] · [k, n]`,
/// on `threads` threads of the rayon pool (1: on this thread alone).
///
/// # Safety
/// Every element the shapes and strides address lies in a live buffer, and `dst`'s
/// elements are written by no one else meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_acc<T: Real>(
    threads: usize,
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: Mat<T>,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    let s = |v: usize| v as isize;
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as the caller promises; gemm reads lhs and rhs and writes dst only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr.cast_mut(),
            s(dst.cs),
            s(dst.rs),
            accumulate,
            lhs.ptr,
            s(lhs.cs),
            s(lhs.rs),
            rhs.ptr,
            s(rhs.cs),
            s(rhs.rs),
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst = lhs · rhs`; see [`matmul_acc`].
///
/// # Safety
/// As [`matmul_acc`].
pub(crate) unsafe fn matmul<T: Real>(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    dst: Mat<T>,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    // SAFETY: as the caller promises.
    unsafe { matmul_acc(threads, false, m, n, k, dst, lhs, rhs) }
}
