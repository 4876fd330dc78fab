//! Differentiable building blocks.
//!
//! candle's fused `LayerNorm` (with bias, on contiguous input), `softmax_last_dim`,
//! `rms_norm` and `rope` kernels have no backward pass: used in training they silently
//! stop the gradient. Everything here either is composed of ops that candle differentiates
//! (broadcast arithmetic, reductions, `exp`, `log`, `sqrt`, `matmul`, `gather`), or runs a
//! fused kernel without a graph and attaches the backward written out by hand
//! ([`with_backward`]): the softmax and the cross-entropy, whose composed forms make five
//! to seven passes over the largest tensors of a step (the attention scores, the logits)
//! and keep each intermediate for the backward. The composed forms stay as references
//! (`*_composed`), and the tests compare values and gradients with them.

use candle_core::{
    CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor, backend::BackendStorage,
};

use super::fused::add_tiled;

/// The custom op behind [`with_backward`]: its forward copies the value, its backward
/// calls the closure with (input, value, gradient of the value).
struct WithBackward<F> {
    name: &'static str,
    bwd: F,
}

fn check_whole(l: &Layout, name: &str) -> Result<()> {
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(())
    } else {
        candle_core::bail!("{name}: the precomputed value must be a whole contiguous tensor")
    }
}

type BackwardFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

impl CustomOp2 for WithBackward<Box<BackwardFn>> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_whole(l, self.name)?;
        Ok((value.try_clone(l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        value: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_whole(l, self.name)?;
        Ok((value.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        _value: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.bwd)(input, res, grad)?), None))
    }
}

/// `value`, computed from `input` by fused kernels outside the graph, made the result of
/// an op on `input` whose backward is `bwd(input, value, grad_value) -> grad_input`. The
/// forward costs one copy of `value`; nothing but `input` and `value` is kept for the
/// backward. Without gradient tracking on `input`, `value` is returned as it is.
pub fn with_backward(
    name: &'static str,
    input: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    let value = value.contiguous()?;
    let op: WithBackward<Box<BackwardFn>> = WithBackward {
        name,
        bwd: Box::new(bwd),
    };
    input.apply_op2(&value, op)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with
/// the biased variance, as PyTorch, composed of differentiable ops: the path off the CPU,
/// and the reference for the fused [`super::fused::layer_norm`].
pub fn layer_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = xn.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Softmax over the last dimension: candle's fused kernel (one pass, parallel on the CPU),
/// with the backward `y ⊙ (g − Σ g ⊙ y)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    with_backward("softmax-last-dim", x, y, |_, y, g| {
        let gy = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&gy)?
    })
}

/// Softmax over the last dimension composed of differentiable ops: the reference for
/// [`softmax_last_dim`]. The row maximum is subtracted for stability and detached:
/// softmax is invariant to it, so it needs no gradient.
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, stable and differentiable.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32). With `mask`
/// `[N]` (1 = counts), the mean is over the unmasked positions only.
///
/// The loss is `Σᵢ wᵢ (lseᵢ − xᵢ,ₜᵢ)` with `wᵢ = maskᵢ / Σ mask` (or `1/N`), computed
/// without a graph; the backward is `wᵢ (softmax(xᵢ) − onehot(tᵢ))`, from candle's fused
/// softmax. Nothing of size `N × V` is kept between forward and backward but the logits.
/// On the CPU in f32/f64, one fused pass each way (`model::xent`); on a GPU, the same in
/// two kernels of our own (`cross_entropy_cuda`).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16) {
        return cross_entropy_cuda(logits, targets, mask);
    }
    // Half-precision logits are upcast: the log-sum-exp over a large vocabulary needs it.
    let logits = match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    if super::xent::takes(&logits) {
        return super::xent::cross_entropy(&logits, targets, mask);
    }
    let (n, _) = logits.dims2()?;
    let x = logits.detach();
    let targets = targets.unsqueeze(1)?.contiguous()?;
    let max = x.max_keepdim(D::Minus1)?;
    let lse = (x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let per_token = (lse - x.gather(&targets, 1)?)?; // [N, 1]
    let weights = match mask {
        None => Tensor::full(1.0 / n.max(1) as f64, (n, 1), x.device())?.to_dtype(x.dtype())?,
        Some(m) => {
            let m = m.to_dtype(x.dtype())?.reshape((n, 1))?;
            m.broadcast_div(&m.sum_all()?.maximum(1.0)?)?
        }
    };
    let loss = (per_token * &weights)?.sum_all()?;
    with_backward("cross-entropy", &logits, loss, move |logits, _, g| {
        let p = candle_nn::ops::softmax_last_dim(&logits.detach().contiguous()?)?;
        let minus_one = Tensor::full(-1.0f32, (n, 1), p.device())?.to_dtype(p.dtype())?;
        let d = p.scatter_add(&targets, &minus_one, 1)?;
        d.broadcast_mul(&weights.broadcast_mul(g)?)
    })
}

/// [`cross_entropy`] on a GPU: `kernels/cross_entropy.cu`, one pass over the logits (in
/// their own dtype, no f32 copy) forward and one backward, keeping only each row's
/// log-sum-exp between them.
#[cfg(feature = "cuda")]
fn cross_entropy_cuda(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let x = logits.detach().contiguous()?;
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let weights = match mask {
        None => Tensor::full(1.0f32 / n.max(1) as f32, n, x.device())?,
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.reshape(n)?;
            m.broadcast_div(&m.sum_all()?.maximum(1.0)?)?
        }
    };
    let out = x.apply_op3_no_bwd(&targets, &weights, &CrossEntropyCuda::Fwd)?; // [2, n]
    let loss = out.get(0)?.sum_all()?;
    let lse = out.get(1)?;
    with_backward("cross-entropy", logits, loss, move |logits, _, g| {
        let coef = weights.broadcast_mul(&g.to_dtype(DType::F32)?)?;
        let lse_coef = Tensor::stack(&[&lse, &coef], 0)?.contiguous()?;
        let x = logits.detach().contiguous()?;
        x.apply_op3_no_bwd(&targets, &lse_coef, &CrossEntropyCuda::Bwd)
    })
}

/// The kernels of [`cross_entropy_cuda`] as candle ops (GPU only).
#[cfg(feature = "cuda")]
enum CrossEntropyCuda {
    /// (logits, targets, weights) → `[2, rows]`: weighted losses, log-sum-exps.
    Fwd,
    /// (logits, targets, `[2, rows]` log-sum-exps and coefficients) → logits' gradient.
    Bwd,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp3 for CrossEntropyCuda {
    fn name(&self) -> &'static str {
        match self {
            Self::Fwd => "cross-entropy-fwd",
            Self::Bwd => "cross-entropy-bwd",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "{}: a GPU kernel (the CPU uses cross_entropy's own path)",
            self.name()
        )
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, _) = lx.shape().dims2()?;
        match self {
            Self::Fwd => Ok((
                super::cuda::cross_entropy_fwd((x, lx), (t, lt), (w, lw))?,
                Shape::from((2, rows)),
            )),
            Self::Bwd => Ok((
                super::cuda::cross_entropy_bwd((x, lx), (t, lt), (w, lw))?,
                lx.shape().clone(),
            )),
        }
    }
}

/// [`cross_entropy`] composed of differentiable ops: the reference its tests compare with.
pub fn cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let logits = match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    let logp = log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    match mask {
        None => picked.mean_all()?.neg(),
        Some(m) => {
            let m = m.to_dtype(picked.dtype())?;
            let count = m.sum_all()?.maximum(1.0)?;
            (picked * m)?.sum_all()?.neg()?.broadcast_div(&count)
        }
    }
}

/// `x @ w + b` for `x` `[.., in]` and a Conv1D-layout weight `w` `[in, out]` (Hugging
/// Face GPT-2 stores its Linear layers this way). Flattens the leading dimensions so that
/// one GEMM does the work (a 2-D `x` as it is: a reshape is a graph node); on the CPU in
/// f32/f64 as one fused op ([`super::dense`]).
pub fn conv1d_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let flat = lead.len() == 1;
    let n: usize = lead.iter().product();
    let x2 = if flat {
        x.clone()
    } else {
        x.reshape((n, inner[0]))?
    };
    let y = if super::dense::takes(&x2, w, b) {
        super::dense::linear(&x2, w, b)?
    } else {
        let y = x2.matmul(w)?;
        match b {
            Some(b) => add_tiled(&y, b)?,
            None => y,
        }
    };
    if flat {
        return Ok(y);
    }
    let mut out = lead.to_vec();
    out.push(w.dim(1)?);
    y.reshape(out)
}

/// [`conv1d_linear`] with a frozen (untrained) weight and bias: the gradient flows to `x`
/// only. Neither `dW` nor `db` is computed or stored, so a frozen base model costs no
/// gradient memory and a third less backward work than a trainable one.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (w, b) = (w.detach(), b.map(Tensor::detach));
    let y = conv1d_linear(&x.detach(), &w, b.as_ref())?;
    with_backward("frozen-linear", x, y, move |x, _, g| {
        let out = w.dim(1)?;
        let n = g.elem_count() / out;
        g.reshape((n, out))?.matmul(&w.t()?)?.reshape(x.shape())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::check::value_and_grad;
    use candle_core::Device;

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() -> Result<()> {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [-1000.0, 0.0, 1000.0]], &Device::Cpu)?;
        let s = softmax_last_dim(&x)?.to_vec2::<f32>()?;
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let z: f32 = e.iter().sum();
        for (a, b) in s[0].iter().zip(e.iter().map(|v| v / z)) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(s[1], vec![0.0, 0.0, 1.0]);
        Ok(())
    }

    /// Random `[rows, cols]` values in f64 (so fused and composed agree to rounding), with
    /// some entries -inf as a causal mask makes them.
    fn random(rows: usize, cols: usize, seed: u64, masked: bool) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..rows * cols)
            .map(|i| {
                if masked && i % cols > i / cols % cols {
                    f64::NEG_INFINITY
                } else {
                    rng.random_range(-4.0..4.0)
                }
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?;
        d.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_in_value_and_gradient() -> Result<()> {
        for masked in [false, true] {
            let x = random(24, 24, 1, masked)?;
            let w = random(24, 24, 2, false)?;
            let (y1, g1) = value_and_grad(&softmax_last_dim, &x, &w)?;
            let (y2, g2) = value_and_grad(&softmax_last_dim_composed, &x, &w)?;
            assert!(
                max_abs_diff(&y1, &y2)? < 1e-14,
                "values differ (masked: {masked})"
            );
            let scale = g2.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(scale > 1e-3, "the reference gradient is not trivial");
            let d = max_abs_diff(&g1, &g2)?;
            assert!(
                d < 1e-13 * scale.max(1.0),
                "gradients differ by {d} (masked: {masked})"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_cross_entropy_matches_the_composed_one_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let logits = (random(40, 97, 3, false)? * 2.0)?;
        let targets = Tensor::from_vec((0..40u32).map(|i| (i * 37) % 97).collect(), 40, &dev)?;
        let mask = Tensor::from_vec(
            (0..40)
                .map(|i| if i % 3 == 0 { 0.0f64 } else { 1.0 })
                .collect(),
            40,
            &dev,
        )?;
        let one = Tensor::new(1.0f64, &dev)?;
        for m in [None, Some(&mask)] {
            let (l1, g1) = value_and_grad(&|x| cross_entropy(x, &targets, m), &logits, &one)?;
            let (l2, g2) =
                value_and_grad(&|x| cross_entropy_composed(x, &targets, m), &logits, &one)?;
            let (l1, l2) = (l1.to_scalar::<f64>()?, l2.to_scalar::<f64>()?);
            assert!((l1 - l2).abs() < 1e-13 * l2.abs(), "loss {l1} vs {l2}");
            let scale = g2.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(scale > 1e-3);
            let d = max_abs_diff(&g1, &g2)?;
            assert!(d < 1e-14, "gradients differ by {d} (mask: {})", m.is_some());
        }
        // Masked rows get no gradient at all.
        let (_, g) = value_and_grad(&|x| cross_entropy(x, &targets, Some(&mask)), &logits, &one)?;
        let row0 = g.get(0)?.abs()?.sum_all()?.to_scalar::<f64>()?;
        assert_eq!(row0, 0.0);
        Ok(())
    }

    #[test]
    fn fused_ops_without_a_graph_return_the_value_alone() -> Result<()> {
        let x = random(4, 8, 5, false)?;
        let y = softmax_last_dim(&x)?;
        assert!(!y.track_op(), "a constant input builds no graph");
        Ok(())
    }

    #[test]
    fn masked_cross_entropy_averages_only_unmasked_positions() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0.0f32, 0.0], [10.0, 0.0]], &dev)?;
        let targets = Tensor::new(&[0u32, 1], &dev)?;
        let mask = Tensor::new(&[1.0f32, 0.0], &dev)?;
        let l = cross_entropy(&logits, &targets, Some(&mask))?.to_scalar::<f32>()?;
        assert!((l - std::f32::consts::LN_2).abs() < 1e-6, "{l}");
        Ok(())
    }
}
