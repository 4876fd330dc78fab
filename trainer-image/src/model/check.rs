//! `taper check-kernels`: the fused ops of [`super::ops`] against their composed
//! references on a device, in value and gradient, and timed. The GPU device check runs it
//! on the GPU; the unit tests run it on the CPU.
//!
//! Each op runs on inputs drawn from a seeded RNG, shaped as in GPT-2 small's step: the
//! attention scores `[B, H, T, T]` with the causal mask, and the logits `[B·T, vocab]`.
//! The composed reference is differentiated by candle's autograd from elementary ops, in
//! f64 on the CPU (where it exists) so that the reference carries no rounding of its own
//! worth mentioning; values and gradients are compared relative to the reference's
//! largest magnitude.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::causal::{causal_mask, causal_softmax, causal_softmax_composed};
use super::fused::layer_norm;
use super::ops::{
    cross_entropy, cross_entropy_composed, layer_norm_composed, softmax_last_dim,
    softmax_last_dim_composed,
};

/// One op's comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelCheck {
    /// What was checked.
    pub op: &'static str,
    /// Input shape.
    pub shape: Vec<usize>,
    /// Largest |fused − reference| of the value, over the reference's largest |value|.
    pub value_error: f64,
    /// Largest |fused − reference| of the input gradient, over its largest |gradient|.
    pub grad_error: f64,
    /// Forward + backward of the fused op on the device, milliseconds (median of 5).
    pub fused_ms: f64,
    /// Forward + backward of the composed op on the device, milliseconds (median of 5).
    pub composed_ms: f64,
    /// The bound both errors must stay under.
    pub tolerance: f64,
}

impl KernelCheck {
    /// Whether both errors are within the tolerance.
    pub fn passed(&self) -> bool {
        self.value_error <= self.tolerance && self.grad_error <= self.tolerance
    }
}

/// Value and input gradient of `Σ f(x) ⊙ w` (a random `w` makes every output matter).
pub(crate) fn value_and_grad(
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(x)?;
    let y = f(var.as_tensor())?;
    let grads = y.broadcast_mul(w)?.sum_all()?.backward()?;
    let g = grads
        .get(var.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
        .clone();
    Ok((y.detach(), g))
}

/// Value and the gradient of each input of `Σ f(inputs) ⊙ w`: [`value_and_grad`] for
/// ops of several differentiable inputs.
#[cfg(test)]
pub(crate) fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    w: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let store = y.broadcast_mul(w)?.sum_all()?.backward()?;
    let grads = ts
        .iter()
        .map(|t| {
            store
                .get(t)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))
        })
        .collect::<Result<_>>()?;
    Ok((y.detach(), grads))
}

/// The largest magnitude in `t`, as f64.
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> Result<f64> {
    t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar()
}

fn relative_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let want = want.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
    let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(f64::MIN_POSITIVE))
}

fn median_ms(
    device: &Device,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..6 {
        device.synchronize()?;
        let start = Instant::now();
        let (_, g) = value_and_grad(f, x, w)?;
        drop(g);
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.remove(0); // the first call loads kernels
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// f64 values uniform in `[lo, hi)` on the CPU.
pub(crate) fn uniform(shape: &[usize], lo: f64, hi: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Compare one fused op with its composed reference on `device`, in f32.
fn compare(
    op: &'static str,
    device: &Device,
    fused: &dyn Fn(&Tensor) -> Result<Tensor>,
    composed: &dyn Fn(&Tensor) -> Result<Tensor>,
    x64: &Tensor,
    w64: &Tensor,
    tolerance: f64,
) -> Result<KernelCheck> {
    compare_in(op, device, DType::F32, fused, composed, x64, w64, tolerance)
}

/// Compare one fused op, run on `device` in `dtype`, with its composed reference.
#[allow(clippy::too_many_arguments)]
fn compare_in(
    op: &'static str,
    device: &Device,
    dtype: DType,
    fused: &dyn Fn(&Tensor) -> Result<Tensor>,
    composed: &dyn Fn(&Tensor) -> Result<Tensor>,
    x64: &Tensor,
    w64: &Tensor,
    tolerance: f64,
) -> Result<KernelCheck> {
    // The reference: composed, f64, on the CPU.
    let (want_y, want_g) = value_and_grad(composed, x64, w64)?;
    // The fused op on the device, in `dtype` (as training runs it).
    let x = x64.to_dtype(dtype)?.to_device(device)?;
    let w = w64.to_dtype(dtype)?.to_device(device)?;
    let (y, g) = value_and_grad(fused, &x, &w)?;
    Ok(KernelCheck {
        op,
        shape: x64.dims().to_vec(),
        value_error: relative_error(&y, &want_y)?,
        grad_error: relative_error(&g, &want_g)?,
        fused_ms: median_ms(device, fused, &x, &w)?,
        composed_ms: median_ms(device, composed, &x, &w)?,
        tolerance,
    })
}

/// Check the fused softmax (on masked attention scores `[batch, heads, t, t]`), the fused
/// cross-entropy (on logits `[rows, vocab]`, with and without a loss mask) and LayerNorm
/// (on `[rows, heads · 64]`, the gradient of its input, weight and bias).
pub fn check_fused_ops(
    device: &Device,
    (batch, heads, t): (usize, usize, usize),
    (rows, vocab): (usize, usize),
) -> Result<Vec<KernelCheck>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x7a9e);
    // f32 rounding of inputs and arithmetic: a few ulps of the largest value.
    let tolerance = 1e-5;
    let mut out = Vec::new();

    let scores = uniform(&[batch, heads, t, t], -6.0, 6.0, &mut rng)?;
    let causal = causal_mask(t, &Device::Cpu, DType::F64)?;
    let w = uniform(&[batch, heads, t, t], -1.0, 1.0, &mut rng)?;
    // The attention's op: scale, causal mask and softmax fused (on raw scores), in f32 and
    // in bf16, whose roundings of the scores, the probabilities and the gradient (2⁻⁹
    // relative each) bound its error: 8e-3 is two bf16 steps at the largest value.
    let scale = 0.125;
    for (dtype, name, tol) in [
        (DType::F32, "causal softmax (scale, mask) f32", tolerance),
        (DType::BF16, "causal softmax (scale, mask) bf16", 8e-3),
    ] {
        out.push(compare_in(
            name,
            device,
            dtype,
            &|x| causal_softmax(x, scale),
            &|x| causal_softmax_composed(x, scale),
            &scores,
            &w,
            tol,
        )?);
    }
    let scores = scores.broadcast_add(&causal)?;
    out.push(compare(
        "softmax (causal)",
        device,
        &softmax_last_dim,
        &softmax_last_dim_composed,
        &scores,
        &w,
        tolerance,
    )?);

    let logits = uniform(&[rows, vocab], -8.0, 8.0, &mut rng)?;
    let targets: Vec<u32> = (0..rows)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mask: Vec<f32> = (0..rows)
        .map(|_| if rng.random_bool(0.7) { 1.0 } else { 0.0 })
        .collect();
    let one = Tensor::new(1.0f64, &Device::Cpu)?;
    // Targets and mask live on the device of the logits they meet.
    let on = |dev: &Device| -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::new(targets.as_slice(), dev)?,
            Tensor::new(mask.as_slice(), dev)?,
        ))
    };
    let (t_cpu, m_cpu) = on(&Device::Cpu)?;
    let (t_dev, m_dev) = on(device)?;
    for masked in [false, true] {
        let pick = |x: &Tensor| -> (Tensor, Option<Tensor>) {
            let (t, m) = if x.device().is_cpu() {
                (&t_cpu, &m_cpu)
            } else {
                (&t_dev, &m_dev)
            };
            (t.clone(), masked.then(|| m.clone()))
        };
        let fused = |x: &Tensor| {
            let (t, m) = pick(x);
            cross_entropy(x, &t, m.as_ref())
        };
        let composed = |x: &Tensor| {
            let (t, m) = pick(x);
            cross_entropy_composed(x, &t, m.as_ref())
        };
        out.push(compare(
            if masked {
                "cross-entropy (masked)"
            } else {
                "cross-entropy"
            },
            device,
            &fused,
            &composed,
            &logits,
            &one,
            tolerance,
        )?);
    }

    // LayerNorm on `[rows, heads · 64]` (768 wide for GPT-2 small), the gradient of each
    // of its three inputs in turn (the others held as constants).
    let width = heads * 64;
    let reference = [
        uniform(&[rows, width], -3.0, 3.0, &mut rng)?,
        uniform(&[width], 0.5, 1.5, &mut rng)?,
        uniform(&[width], -0.5, 0.5, &mut rng)?,
    ];
    let on_device = reference
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.to_device(device))
        .collect::<Result<Vec<_>>>()?;
    let up = uniform(&[rows, width], -1.0, 1.0, &mut rng)?;
    type LayerNormFn = fn(&Tensor, &Tensor, Option<&Tensor>, f64) -> Result<Tensor>;
    for (slot, name) in [
        (0, "layer norm (input)"),
        (1, "layer norm (weight)"),
        (2, "layer norm (bias)"),
    ] {
        // The reference runs in f64 on the CPU, the op under test in f32 on the device.
        let with = |f: LayerNormFn| {
            let (reference, on_device) = (&reference, &on_device);
            move |v: &Tensor| -> Result<Tensor> {
                let consts = if v.dtype() == DType::F64 {
                    &reference[..]
                } else {
                    &on_device[..]
                };
                let mut args = consts.to_vec();
                args[slot] = v.clone();
                f(&args[0], &args[1], Some(&args[2]), 1e-5)
            }
        };
        out.push(compare(
            name,
            device,
            &with(layer_norm),
            &with(layer_norm_composed),
            &reference[slot],
            &up,
            tolerance,
        )?);
    }
    Ok(out)
}

/// The checks as a Markdown table.
pub fn table(device: &Device, checks: &[KernelCheck]) -> String {
    let mut s = format!(
        "| op on {} | shape | value error | gradient error | fused fwd+bwd ms | composed fwd+bwd ms | result |\n|---|---|---:|---:|---:|---:|---|\n",
        if device.is_cuda() { "cuda" } else { "cpu" }
    );
    for c in checks {
        s.push_str(&format!(
            "| {} | {:?} | {:.1e} | {:.1e} | {:.2} | {:.2} | {} (≤ {:.0e}) |\n",
            c.op,
            c.shape,
            c.value_error,
            c.grad_error,
            c.fused_ms,
            c.composed_ms,
            if c.passed() { "PASS" } else { "FAIL" },
            c.tolerance
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_ops_pass_their_check_on_the_cpu() -> Result<()> {
        let checks = check_fused_ops(&Device::Cpu, (2, 2, 32), (64, 500))?;
        eprintln!("{}", table(&Device::Cpu, &checks));
        assert_eq!(checks.len(), 8);
        for c in &checks {
            assert!(c.passed(), "{c:?}");
            assert!(
                c.grad_error > 0.0,
                "{}: f32 against f64 cannot be exact",
                c.op
            );
        }
        Ok(())
    }

    #[test]
    fn the_check_fails_a_wrong_gradient() -> Result<()> {
        // A softmax whose backward drops the Σ g⊙y term must not pass.
        let wrong = |x: &Tensor| {
            let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
            super::super::ops::with_backward("wrong", x, y, |_, y, g| y * g)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = uniform(&[4, 16], -3.0, 3.0, &mut rng)?;
        let w = uniform(&[4, 16], -1.0, 1.0, &mut rng)?;
        let c = compare(
            "wrong",
            &Device::Cpu,
            &wrong,
            &softmax_last_dim_composed,
            &x,
            &w,
            1e-5,
        )?;
        assert!(c.value_error < 1e-6 && c.grad_error > 1e-2, "{c:?}");
        assert!(!c.passed());
        Ok(())
    }

    /// candle-core is patched (vendor/README.md) to store the first gradient reaching a
    /// node instead of adding it into zeros: a node reached twice must still get the sum,
    /// a subtracted one the negation, and a gradient shared by two nodes must stay theirs.
    #[test]
    fn patched_backward_sums_every_gradient_reaching_a_node() -> Result<()> {
        let x = Var::new(&[1.5f64, -2.0, 0.25], &Device::Cpu)?;
        let y = Var::new(&[0.5f64, 3.0, -1.0], &Device::Cpu)?;
        // f = Σ (x·x + x) − Σ (y − x·y) − Σ (x + y)
        //   ⇒ ∂f/∂x = 2x + 1 + y − 1 = 2x + y,   ∂f/∂y = −1 + x − 1 = x − 2.
        let f = ((x.mul(&x)? + x.as_tensor())?.sum_all()?
            - (y.as_tensor() - x.mul(&y)?)?.sum_all()?)?;
        let f = (f - (x.as_tensor() + y.as_tensor())?.sum_all()?)?;
        let grads = f.backward()?;
        let gx = grads.get(&x).expect("x has a gradient").to_vec1::<f64>()?;
        let gy = grads.get(&y).expect("y has a gradient").to_vec1::<f64>()?;
        assert_eq!(
            gx,
            vec![2.0 * 1.5 + 0.5, 2.0 * -2.0 + 3.0, 2.0 * 0.25 - 1.0]
        );
        assert_eq!(gy, vec![1.5 - 2.0, -2.0 - 2.0, 0.25 - 2.0]);
        Ok(())
    }
}
