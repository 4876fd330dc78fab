//! Named trainable parameters: creation with a seeded GPT-2 initialisation, and
//! safetensors I/O with Hugging Face GPT-2 names.

use std::{collections::BTreeMap, path::Path};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::ModelError;

/// Parameters by name, in a stable (sorted) order so that iteration, checkpoints and
/// optimizer state line up across runs and devices.
#[derive(Debug, Default)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
}

/// How one parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Every element this value (LayerNorm weights: 1, biases: 0).
    Const(f32),
    /// Uniform in `[-bound, bound)` (LoRA's `A`: PyTorch's Kaiming-uniform with
    /// `a = √5`, whose bound is `1/√fan_in`).
    Uniform(f64),
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a parameter; values come from `rng`, which makes initialisation identical on
    /// every device for a given seed.
    pub fn insert_init(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<(), ModelError> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c; n],
            Init::Normal(std) => {
                let normal = Normal::new(0.0f64, std)
                    .map_err(|e| ModelError::Config(format!("bad init std {std}: {e}")))?;
                (0..n).map(|_| normal.sample(rng) as f32).collect()
            }
            Init::Uniform(bound) => {
                use rand::Rng;
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
        };
        let t = Tensor::from_vec(values, shape, device)?;
        self.vars.insert(name.to_string(), Var::from_tensor(&t)?);
        Ok(())
    }

    /// Insert a copy of an existing tensor as a parameter, keeping its dtype.
    pub fn insert_tensor(&mut self, name: &str, t: &Tensor) -> Result<(), ModelError> {
        let v = Var::from_tensor(t)?;
        self.vars.insert(name.to_string(), v);
        Ok(())
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Result<&Var, ModelError> {
        self.vars
            .get(name)
            .ok_or_else(|| ModelError::MissingParameter(name.to_string()))
    }

    /// The parameter called `name` as a tensor (sharing storage with the parameter).
    pub fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        Ok(self.get(name)?.as_tensor().clone())
    }

    /// A copy of every parameter converted to `dtype` (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        let mut vars = BTreeMap::new();
        for (name, var) in &self.vars {
            vars.insert(
                name.clone(),
                Var::from_tensor(&var.as_tensor().to_dtype(dtype)?)?,
            );
        }
        Ok(Self { vars })
    }

    /// Parameters in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Total scalar count.
    pub fn numel(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Every parameter as a (name, tensor) map, for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Write every parameter to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let tensors: std::collections::HashMap<String, Tensor> =
            self.tensors().into_iter().collect();
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Overwrite every parameter with the tensor of the same name in `tensors`. Names may
    /// carry Hugging Face's `transformer.` prefix; extra entries (attention-mask buffers,
    /// `lm_head.weight`, which is tied) are ignored; a missing or misshapen one is an error.
    pub fn load_from(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), ModelError> {
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .or_else(|| tensors.get(&format!("transformer.{name}")))
                .ok_or_else(|| ModelError::MissingParameter(name.clone()))?;
            set_checked(name, var, t)?;
        }
        Ok(())
    }

    /// Overwrite the parameters named in `names` from `tensors` (a checkpoint of the
    /// trainable ones); the others are left as they are.
    pub fn load_named<'a>(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ModelError> {
        for name in names {
            let var = self.get(name)?;
            let t = tensors
                .get(name)
                .ok_or_else(|| ModelError::MissingParameter(name.to_string()))?;
            set_checked(name, var, t)?;
        }
        Ok(())
    }

    /// Whether a parameter called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// Load from a safetensors file; see [`ParamStore::load_from`].
    pub fn load(&self, path: &Path, device: &Device) -> Result<(), ModelError> {
        let tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(path, device)?
            .into_iter()
            .collect();
        self.load_from(&tensors)
    }
}

/// Set `var` (the parameter `name`) to `t`, converted to its dtype and device; another
/// shape is an error naming the parameter.
fn set_checked(name: &str, var: &Var, t: &Tensor) -> Result<(), ModelError> {
    if t.dims() != var.dims() {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: var.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    Ok(())
}

/// A ChaCha RNG for parameter initialisation from a seed.
pub fn init_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
