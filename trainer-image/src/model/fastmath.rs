//! Vectorisable f32 `exp`, GELU, softmax and log-sum-exp for the CPU ops.
//!
//! libm's `erff` and `expf` are scalar calls with branches; over the MLP's widest
//! activation (`[batch·t, 4·c]`, every layer, forward and backward) and the attention
//! probabilities they were 12 % of a baby-GPT step. These forms are branchless
//! polynomials that the compiler vectorises, compiled a second time with AVX2 and FMA and
//! chosen at run time when the CPU has them (so the binary still runs on any x86-64).
//!
//! Accuracy (tests below, against f64 libm): `exp` within 2.5e-7 relative on [-87, 88];
//! `erfc` after Numerical Recipes' `erfcc` (fractional error under 1.2e-7 in exact
//! arithmetic), so GELU and its derivative stay within 2e-6 of the reference for
//! |x| ≤ 4 and within 2e-5 beyond, with no cancellation of `1 + erf` in the negative
//! tail (there the error comes from rounding x² to f32); the softmax within 1e-6.

// The coefficients are written as their sources publish them.
#![allow(clippy::excessive_precision)]

use std::f32::consts::{FRAC_1_SQRT_2, LOG2_E};

/// Added to a float below 2²², `1.5 · 2²³` leaves it rounded to an integer in the low
/// mantissa bits: a float-to-integer conversion without a (saturating, scalar) cast.
const ROUND: f32 = 12_582_912.0;

/// `e^x` for f32, branchless: `2^n · p(r)` with `x = n·ln 2 + r`, Cephes' polynomial.
/// Arguments are clamped to [-87.3, 88.3]: below, the result is about 1.2e-38 (the
/// smallest normal f32) rather than a subnormal or 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let rounded = x * LOG2_E + ROUND;
    let n = rounded - ROUND;
    // ln 2 in two parts, so that `x - n·ln 2` loses nothing.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // n in two's complement, from the mantissa bits; then 2^n as an exponent field.
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `erfc(z)` for `z ≥ 0` (Numerical Recipes' `erfcc`).
#[inline(always)]
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp(-z * z + poly)
}

/// The standard normal distribution's cdf `Φ(x) = (1 + erf(x/√2)) / 2`, without the
/// cancellation of `1 + erf` for negative `x`.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let e = 0.5 * erfc_pos(x.abs() * FRAC_1_SQRT_2);
    if x >= 0.0 { 1.0 - e } else { e }
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_28;

#[inline(always)]
fn gelu_generic(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * normal_cdf(v);
    }
}

#[inline(always)]
fn gelu_grad_generic(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
        let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
        *o = gv * (normal_cdf(v) + v * pdf);
    }
}

/// `row = softmax(scale · row)` in place. The max and the sum run in eight lanes, so
/// that they vectorise (a fixed order all the same).
#[inline(always)]
fn softmax_generic(row: &mut [f32], scale: f32) {
    let m = max8(row) * scale;
    for v in row.iter_mut() {
        *v = exp(*v * scale - m);
    }
    let mut z = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (z, &v) in z.iter_mut().zip(c) {
            *z += v;
        }
    }
    let z: f32 = z.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let r = 1.0 / z;
    row.iter_mut().for_each(|v| *v *= r);
}

/// The largest element of `row` (-inf if empty), in eight lanes so that it vectorises.
#[inline(always)]
fn max8(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    chunks.remainder().iter().fold(
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
        |a, &b| a.max(b),
    )
}

/// `ln Σ e^x` over the row, as `m + ln Σ e^(x − m)` with `m` its maximum; the sum in
/// eight lanes, in a fixed order.
#[inline(always)]
fn log_sum_exp_generic(row: &[f32]) -> f32 {
    let m = max8(row);
    let mut z = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (z, &v) in z.iter_mut().zip(c) {
            *z += exp(v - m);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| exp(v - m)).sum();
    m + (z.iter().sum::<f32>() + rest).ln()
}

/// `out = scale · e^(x − shift)`.
#[inline(always)]
fn exp_shifted_generic(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scale * exp(v - shift);
    }
}

/// `$name` built for one instruction set: the portable body, compiled with its features
/// so that the compiler vectorises it to that width.
macro_rules! built_for {
    ($features:literal, $name:ident, $generic:ident, ($($arg:ident: $ty:ty),+) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name($($arg: $ty),+) $(-> $ret)? {
            $generic($($arg),+)
        }
    };
}

built_for!("avx2,fma", gelu_avx2, gelu_generic, (x: &[f32], out: &mut [f32]));
built_for!("avx2,fma", gelu_grad_avx2, gelu_grad_generic, (x: &[f32], g: &[f32], out: &mut [f32]));
built_for!("avx2,fma", softmax_avx2, softmax_generic, (row: &mut [f32], scale: f32));
built_for!("avx512f,avx512dq,avx512vl,avx2,fma", gelu_avx512, gelu_generic, (x: &[f32], out: &mut [f32]));
built_for!("avx512f,avx512dq,avx512vl,avx2,fma", gelu_grad_avx512, gelu_grad_generic, (x: &[f32], g: &[f32], out: &mut [f32]));
built_for!("avx512f,avx512dq,avx512vl,avx2,fma", softmax_avx512, softmax_generic, (row: &mut [f32], scale: f32));
built_for!("avx2,fma", log_sum_exp_avx2, log_sum_exp_generic, (row: &[f32]) -> f32);
built_for!("avx512f,avx512dq,avx512vl,avx2,fma", log_sum_exp_avx512, log_sum_exp_generic, (row: &[f32]) -> f32);
built_for!("avx2,fma", exp_shifted_avx2, exp_shifted_generic, (x: &[f32], shift: f32, scale: f32, out: &mut [f32]));
built_for!("avx512f,avx512dq,avx512vl,avx2,fma", exp_shifted_avx512, exp_shifted_generic, (x: &[f32], shift: f32, scale: f32, out: &mut [f32]));

/// The widest instruction set of this CPU that the functions here are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Isa {
    Portable,
    Avx2,
    Avx512,
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// `$generic` or its build for `$isa`, or for the CPU's [`isa`] if that is lower.
macro_rules! dispatch {
    ($isa:expr, $generic:ident, $avx2:ident, $avx512:ident, ($($arg:expr),+)) => {{
        // Never above the CPU's, whatever was asked.
        let level: Isa = std::cmp::min($isa, isa());
        match level {
            // SAFETY: the CPU has the features the function is built for (`isa()`).
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx512 => unsafe { $avx512($($arg),+) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { $avx2($($arg),+) },
            _ => $generic($($arg),+),
        }
    }};
}

/// `out = gelu(x)`, exact (erf) form.
pub(crate) fn gelu(x: &[f32], out: &mut [f32]) {
    dispatch!(isa(), gelu_generic, gelu_avx2, gelu_avx512, (x, out))
}

/// `out = g · gelu'(x)`, `gelu'(x) = Φ(x) + x·φ(x)`.
pub(crate) fn gelu_grad(x: &[f32], g: &[f32], out: &mut [f32]) {
    dispatch!(
        isa(),
        gelu_grad_generic,
        gelu_grad_avx2,
        gelu_grad_avx512,
        (x, g, out)
    )
}

/// `row = softmax(scale · row)` in place, for `scale > 0`.
pub(crate) fn softmax(row: &mut [f32], scale: f32) {
    dispatch!(
        isa(),
        softmax_generic,
        softmax_avx2,
        softmax_avx512,
        (row, scale)
    )
}

/// `ln Σ e^x` over `row` (the log-sum-exp of a row of logits).
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    dispatch!(
        isa(),
        log_sum_exp_generic,
        log_sum_exp_avx2,
        log_sum_exp_avx512,
        (row)
    )
}

/// `out = scale · e^(x − shift)` (with `shift` a row's log-sum-exp: its probabilities).
pub(crate) fn exp_shifted(x: &[f32], shift: f32, scale: f32, out: &mut [f32]) {
    dispatch!(
        isa(),
        exp_shifted_generic,
        exp_shifted_avx2,
        exp_shifted_avx512,
        (x, shift, scale, out)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The normal cdf in f64 through `erfc`, which keeps its relative precision in the
    /// negative tail (`1 + erf` would not).
    fn cdf64(x: f64) -> f64 {
        0.5 * candle_core::cpu::erf::erfc_f64(-x / 2f64.sqrt())
    }

    /// Relative error of `got` against `want`, floored at the smallest normal f32 so that
    /// underflow to 0 counts as exact.
    fn rel(got: f32, want: f64) -> f64 {
        if want.abs() < f32::MIN_POSITIVE as f64 {
            return (got as f64).abs();
        }
        ((got as f64) - want).abs() / want.abs()
    }

    /// Every build this CPU can run, the portable one first.
    fn levels() -> Vec<Isa> {
        let all = [Isa::Portable, Isa::Avx2, Isa::Avx512];
        let levels: Vec<Isa> = all.into_iter().filter(|&l| l <= isa()).collect();
        eprintln!("fastmath builds tested: {levels:?}");
        levels
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_f64() {
        let worst = grid(-87.0, 88.0, 200_003)
            .into_iter()
            .map(|x| rel(exp(x), (x as f64).exp()))
            .fold(0.0, f64::max);
        assert!(worst < 2.5e-7, "exp off by {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_and_its_gradient_match_the_erf_form_on_every_build() {
        let x = grid(-12.0, 12.0, 100_001);
        let g: Vec<f32> = x.iter().map(|v| 1.0 + 0.25 * v.sin()).collect();
        // (gelu, gelu', the size of gelu''s terms: its zero near -0.75 is a cancellation).
        let want = |v: f32| {
            let v = v as f64;
            let cdf = cdf64(v);
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (v * cdf, cdf + v * pdf, cdf + v.abs() * pdf)
        };
        // Relative error: under `near` for |x| ≤ 4, under `far` beyond (deep in the
        // negative tail, x² rounded to f32 limits any f32 evaluation of e^(-x²/2)).
        let (near, far) = (2e-6, 2e-5);
        // Error relative to the reference's (value, scale).
        let check = |name: &str, got: &[f32], want: &dyn Fn(f32) -> (f64, f64)| {
            for (&v, &o) in x.iter().zip(got) {
                let (w, scale) = want(v);
                if scale > 1e-30 {
                    let bound = if v.abs() <= 4.0 { near } else { far };
                    let e = ((o as f64) - w).abs() / scale;
                    assert!(e < bound, "{name} at {v}: {o} against {w} ({e:e})");
                }
            }
        };
        let mut y = vec![0.0; x.len()];
        let value = |v: f32| (want(v).0, want(v).0.abs());
        let gv = |v: f32| 1.0 + 0.25 * (v as f64).sin();
        let grad = |v: f32| (gv(v) * want(v).1, gv(v) * want(v).2);
        for level in levels() {
            dispatch!(level, gelu_generic, gelu_avx2, gelu_avx512, (&x, &mut y));
            check(&format!("{level:?} gelu"), &y, &value);
            dispatch!(
                level,
                gelu_grad_generic,
                gelu_grad_avx2,
                gelu_grad_avx512,
                (&x, &g, &mut y)
            );
            check(&format!("{level:?} gradient"), &y, &grad);
        }
        gelu(&x, &mut y);
        check("dispatched gelu", &y, &value);
    }

    #[test]
    fn softmax_matches_f64_on_rows_of_every_remainder() {
        for n in [1, 7, 8, 9, 31, 256] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 1.7).collect();
            let scale = 0.37f32;
            let m = row
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64 * 0.37f32 as f64));
            let e: Vec<f64> = row
                .iter()
                .map(|&v| (v as f64 * scale as f64 - m).exp())
                .collect();
            let z: f64 = e.iter().sum();
            for level in levels() {
                let name = format!("{level:?}");
                let mut got = row.clone();
                dispatch!(
                    level,
                    softmax_generic,
                    softmax_avx2,
                    softmax_avx512,
                    (&mut got, scale)
                );
                for (g, w) in got.iter().zip(&e) {
                    let e = rel(*g, w / z);
                    assert!(e < 1e-6, "{name}, {n} wide: {g} against {} ({e:e})", w / z);
                }
            }
        }
    }

    #[test]
    fn log_sum_exp_and_shifted_exp_match_f64_on_rows_of_every_remainder() {
        for n in [1, 7, 8, 9, 31, 1024, 50_304] {
            // Logits spread over [-30, 30]: the sum is dominated by a few terms.
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 601) as f32 - 300.0) * 0.1)
                .collect();
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            for level in levels() {
                let got = dispatch!(
                    level,
                    log_sum_exp_generic,
                    log_sum_exp_avx2,
                    log_sum_exp_avx512,
                    (&row)
                );
                // Absolute: an error in ln Σ is a relative error of the probabilities.
                let e = (got as f64 - lse).abs();
                assert!(e < 2e-6, "{level:?}, {n} wide: {got} against {lse} ({e:e})");
                let mut out = vec![0f32; n];
                dispatch!(
                    level,
                    exp_shifted_generic,
                    exp_shifted_avx2,
                    exp_shifted_avx512,
                    (&row, got, 0.5, &mut out)
                );
                for (&o, &v) in out.iter().zip(&row) {
                    let arg = v as f64 - got as f64;
                    let want = 0.5 * arg.exp();
                    // exp's own error, and that of rounding `x − shift` to f32.
                    let bound = 2.5e-7 + arg.abs() * f64::from(f32::EPSILON);
                    let e = rel(o, want);
                    assert!(e < bound, "{level:?}: {o} against {want} ({e:e})");
                }
            }
        }
        assert_eq!(log_sum_exp(&[0.0]), 0.0);
        assert!((log_sum_exp(&[0.0, 0.0]) - std::f32::consts::LN_2).abs() < 1e-7);
    }
}
