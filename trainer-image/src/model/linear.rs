//! A Linear layer in Hugging Face GPT-2's Conv1D layout (`W` `[in, out]`; Llama's
//! `[out, in]` weights are transposed to it when loaded), trainable or frozen, with an
//! optional LoRA adapter.

use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

use super::{
    ModelError,
    gpt::dropout,
    lora,
    ops::{conv1d_linear, frozen_linear},
    params::ParamStore,
};

/// The parameter `name` of `params`, detached when `frozen` (no gradient graph reaches it).
pub(crate) fn param(params: &ParamStore, name: &str, frozen: bool) -> Result<Tensor, ModelError> {
    let t = params.tensor(name)?;
    Ok(if frozen { t.detach() } else { t })
}

/// A LoRA adapter on a Linear layer (see [`super::lora`]).
#[derive(Debug)]
pub(crate) struct Adapter {
    /// `[r, in]`.
    pub(crate) a: Tensor,
    /// `[out, r]`.
    pub(crate) b: Tensor,
    /// `alpha / r`.
    pub(crate) scale: f64,
    /// Dropout on the adapter's input.
    pub(crate) dropout: f64,
}

#[derive(Debug)]
pub(crate) struct Lin {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    /// Frozen: no gradient for the weight and bias (a LoRA base).
    pub(crate) frozen: bool,
    pub(crate) adapter: Option<Adapter>,
}

impl Lin {
    /// The layer at `path` (`{path}.weight`, and `{path}.bias` with `bias`) of `params`:
    /// frozen when `lora` is given, with its adapter when `path` is among `adapted`.
    pub(crate) fn from_params(
        params: &ParamStore,
        path: &str,
        bias: bool,
        lora: Option<&taper_crds::finetune::Lora>,
        adapted: &[String],
    ) -> Result<Self, ModelError> {
        let frozen = lora.is_some();
        let adapter = match lora {
            Some(l) if adapted.iter().any(|a| a == path) => Some(Adapter {
                a: params.tensor(&format!("{path}.lora_A.weight"))?,
                b: params.tensor(&format!("{path}.lora_B.weight"))?,
                scale: lora::scale(l),
                dropout: l.dropout,
            }),
            _ => None,
        };
        Ok(Self {
            weight: param(params, &format!("{path}.weight"), frozen)?,
            bias: bias
                .then(|| param(params, &format!("{path}.bias"), frozen))
                .transpose()?,
            frozen,
            adapter,
        })
    }

    pub(crate) fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            frozen: self.frozen,
            adapter: self.adapter.as_ref().map(|a| Adapter {
                a: a.a.detach(),
                b: a.b.detach(),
                scale: a.scale,
                dropout: a.dropout,
            }),
        }
    }

    /// `x @ w + b` (plus the adapter's `dropout(x)·Aᵀ·Bᵀ·scale`) in `dtype`: input and
    /// parameters are cast (a no-op in f32), and the output is in `dtype`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        dtype: DType,
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(dtype)?;
        let bias = self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?;
        let w = self.weight.to_dtype(dtype)?;
        let y = if self.frozen {
            frozen_linear(&x, &w, bias.as_ref())?
        } else {
            conv1d_linear(&x, &w, bias.as_ref())?
        };
        let Some(ad) = &self.adapter else {
            return Ok(y);
        };
        let h = dropout(&x, ad.dropout, rng)?;
        let h = conv1d_linear(&h, &ad.a.to_dtype(dtype)?.t()?, None)?;
        let h = conv1d_linear(&h, &ad.b.to_dtype(dtype)?.t()?, None)?;
        y + (h * ad.scale)?
    }
}
