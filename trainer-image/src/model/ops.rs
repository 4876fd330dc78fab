//! Differentiable building blocks.
//!
//! candle's fused `LayerNorm` (with bias, on contiguous input), `softmax_last_dim`,
//! `rms_norm` and `rope` kernels have no backward pass: used in training they silently
//! stop the gradient. Everything here is composed of ops that candle differentiates
//! (broadcast arithmetic, reductions, `exp`, `log`, `sqrt`, `matmul`, `gather`).

use candle_core::{D, DType, Result, Tensor};

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with
/// the biased variance, as PyTorch.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
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

/// Softmax over the last dimension. The row maximum is subtracted for stability and
/// detached: softmax is invariant to it, so it needs no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
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
/// `[N]` (f32, 1 = counts), the mean is over the unmasked positions only.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    // Half-precision logits are upcast: the log-sum-exp over a large vocabulary needs it.
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
/// one GEMM does the work.
pub fn conv1d_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (lead, inner) = dims.split_at(dims.len() - 1);
    let n: usize = lead.iter().product();
    let y = x.reshape((n, inner[0]))?.matmul(w)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(1)?);
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
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
