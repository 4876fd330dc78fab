//! One optimizer step and one evaluation: the core the `pretrain` loop repeats.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use taper_crds::{
    model::GptConfig,
    training::{Precision, ResolvedTraining},
};

use super::{
    checkpoint::TrainerState,
    data::{Batch, BatchSampler, DataError, SamplerState, TokenSplit},
    optim::{AdamW, AdamWConfig, Grads, OptimError},
    schedule::CosineSchedule,
};
use crate::model::{
    Arch, Model, ModelError, gpt::ForwardCtx, ops::cross_entropy, params::ParamStore,
};

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer failed.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// Batches could not be drawn.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// The loss is NaN or infinite.
    #[error("loss is not finite ({0}) at step {1}")]
    NonFiniteLoss(f32, u64),
}

/// The dtype matmuls run in for a training precision.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Bf16 => DType::BF16,
        Precision::F32 => DType::F32,
    }
}

/// Which parameters a run trains.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Tuning {
    /// Every parameter (pretraining, `method: full`).
    #[default]
    Full,
    /// LoRA adapters only; the base is frozen.
    Lora(taper_crds::finetune::Lora),
}

impl Tuning {
    /// Whether the parameter called `name` is trained.
    pub fn trains(&self, name: &str) -> bool {
        match self {
            Self::Full => true,
            Self::Lora(_) => crate::model::lora::is_adapter(name),
        }
    }

    /// The LoRA settings, if any.
    pub fn lora(&self) -> Option<&taper_crds::finetune::Lora> {
        match self {
            Self::Full => None,
            Self::Lora(l) => Some(l),
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step just taken (1-based count of optimizer steps).
    pub step: u64,
    /// Mean loss over the micro-batches.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens consumed.
    pub tokens: u64,
}

/// A GPT, its optimizer and schedule, and a training-data sampler.
#[derive(Debug)]
pub struct Trainer {
    cfg: GptConfig,
    train: ResolvedTraining,
    params: ParamStore,
    model: Model,
    /// The same parameters, detached: evaluation builds no gradient graph.
    eval_model: Model,
    optim: AdamW,
    schedule: CosineSchedule,
    sampler: BatchSampler,
    /// Dropout masks in training (never in evaluation or generation): its own stream,
    /// seeded from the run's seed and saved in checkpoints, so a resumed run draws the
    /// masks an uninterrupted one would have.
    dropout: ChaCha8Rng,
    dropout_seed: u64,
    device: Device,
    tokens: u64,
    lr_scale: f64,
    tuning: Tuning,
}

impl Trainer {
    /// A trainer over `params` (fresh or restored) with every parameter trainable. The
    /// parameters are the master weights, f32 in either precision: with `bf16` the model
    /// computes in bf16 from casts of them (see [`crate::model::gpt::Gpt::with_compute_dtype`]).
    pub fn new(
        cfg: GptConfig,
        train: ResolvedTraining,
        params: ParamStore,
        device: Device,
    ) -> Result<Self, StepError> {
        Self::with_tuning(cfg, train, params, device, Tuning::Full)
    }

    /// A trainer that trains what `tuning` says: with LoRA, `params` hold the base and the
    /// adapters, and only the adapters have optimizer state and gradients.
    pub fn with_tuning(
        cfg: GptConfig,
        train: ResolvedTraining,
        params: ParamStore,
        device: Device,
        tuning: Tuning,
    ) -> Result<Self, StepError> {
        Self::build(cfg, &Arch::Gpt2, train, params, device, tuning)
    }

    /// A trainer of a model of `arch` (GPT-2's shape, or the summary of a Llama, in
    /// `cfg`); see [`Trainer::with_tuning`].
    pub fn build(
        cfg: GptConfig,
        arch: &Arch,
        train: ResolvedTraining,
        params: ParamStore,
        device: Device,
        tuning: Tuning,
    ) -> Result<Self, StepError> {
        let model = Model::build(arch, cfg, &params, tuning.lora())?
            .with_compute_dtype(compute_dtype(train.precision));
        let eval_model = model.detached();
        let optim = AdamW::new(
            &params,
            AdamWConfig {
                beta1: train.betas[0],
                beta2: train.betas[1],
                eps: 1e-8,
                weight_decay: train.weight_decay,
            },
            |name| tuning.trains(name),
        )?;
        let schedule = CosineSchedule {
            max_lr: train.learning_rate,
            min_lr: train.min_learning_rate,
            warmup_steps: train.warmup_steps as u64,
            decay_steps: train.decay_steps as u64,
        };
        let sampler = BatchSampler::new(train.seed as u64);
        let dropout_seed = dropout_seed(train.seed as u64);
        Ok(Self {
            cfg,
            train,
            params,
            model,
            eval_model,
            optim,
            schedule,
            sampler,
            dropout: ChaCha8Rng::seed_from_u64(dropout_seed),
            dropout_seed,
            device,
            tokens: 0,
            lr_scale: 1.0,
            tuning,
        })
    }

    /// Continue from a checkpoint: weights, optimizer moments, step, tokens, learning-rate
    /// scale and the sampler's position, so the next batch is the one an uninterrupted run
    /// would have drawn.
    pub fn restore(
        &mut self,
        state: &TrainerState,
        model: &std::collections::BTreeMap<String, Tensor>,
        optimizer: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<(), StepError> {
        let trained: Vec<String> = self.optim.vars().map(|(n, _)| n.to_string()).collect();
        self.params
            .load_named(model, trained.iter().map(String::as_str))?;
        self.optim.load_state(optimizer, state.step)?;
        self.sampler = BatchSampler::resume(state.sampler);
        let dropout = state.dropout.unwrap_or(SamplerState {
            seed: self.dropout_seed,
            word_pos: 0,
        });
        self.dropout = ChaCha8Rng::seed_from_u64(dropout.seed);
        self.dropout.set_word_pos(dropout.word_pos);
        self.dropout_seed = dropout.seed;
        self.tokens = state.tokens;
        self.lr_scale = state.lr_scale;
        Ok(())
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.optim.step_count()
    }

    /// Training tokens consumed.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The sampler's position.
    pub fn sampler_state(&self) -> SamplerState {
        self.sampler.state()
    }

    /// The dropout stream's position.
    pub fn dropout_state(&self) -> SamplerState {
        SamplerState {
            seed: self.dropout_seed,
            word_pos: self.dropout.get_word_pos(),
        }
    }

    /// Multiplier on the scheduled learning rate.
    pub fn lr_scale(&self) -> f64 {
        self.lr_scale
    }

    /// Multiply the learning rate (now and for the rest of the schedule) by `factor`.
    pub fn scale_lr(&mut self, factor: f64) {
        self.lr_scale *= factor;
    }

    /// The model's architecture.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The detached model, for sampling.
    pub fn eval_model(&self) -> &Model {
        &self.eval_model
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The trained parameters (all of them, or the adapters): what a checkpoint holds.
    pub fn trained_tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        self.optim
            .vars()
            .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
            .collect()
    }

    /// Which parameters are trained.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optim
    }

    /// One optimizer step: `gradientAccumulationSteps` micro-batches, gradient clipping,
    /// the scheduled learning rate, AdamW.
    pub fn step(&mut self, data: &TokenSplit) -> Result<StepStats, StepError> {
        let it = self.optim.step_count();
        let lr = self.schedule.lr(it) * self.lr_scale;
        let accum = self.train.gradient_accumulation_steps.max(1) as usize;
        let (batch, block) = (self.train.batch_size as usize, self.cfg.block_size as usize);
        let mut grads = Grads::new();
        let mut loss_sum = 0.0f32;
        let mut tokens = 0u64;
        for _ in 0..accum {
            let b = self.sampler.batch(data, batch, block, &self.device)?;
            tokens += b.tokens;
            let mut ctx = ForwardCtx {
                dropout_rng: Some(&mut self.dropout),
            };
            let loss = batch_loss(&self.model, &b, &mut ctx)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(StepError::NonFiniteLoss(value, it + 1));
            }
            loss_sum += value;
            let store = (loss / accum as f64)?.backward()?;
            grads.accumulate(&store, self.optim.vars())?;
        }
        let grad_norm = grads.clip_global_norm(self.train.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(StepError::NonFiniteLoss(grad_norm as f32, it + 1));
        }
        self.optim.step(&grads, lr)?;
        self.tokens += tokens;
        Ok(StepStats {
            step: it + 1,
            loss: loss_sum / accum as f32,
            lr,
            grad_norm,
            tokens,
        })
    }

    /// Mean loss over `iterations` batches of `data`, without gradient tracking, from a
    /// separate sampler seeded by `seed` (so evaluation does not move the training stream).
    pub fn evaluate(
        &self,
        data: &TokenSplit,
        iterations: usize,
        seed: u64,
    ) -> Result<f32, StepError> {
        let mut sampler = BatchSampler::new(seed);
        let (batch, block) = (self.train.batch_size as usize, self.cfg.block_size as usize);
        let mut sum = 0.0f32;
        for _ in 0..iterations {
            let b = sampler.batch(data, batch, block, &self.device)?;
            // No dropout RNG: evaluation is deterministic.
            sum +=
                batch_loss(&self.eval_model, &b, &mut ForwardCtx::default())?.to_scalar::<f32>()?;
        }
        Ok(sum / iterations.max(1) as f32)
    }
}

/// Mean cross-entropy of `model` on one batch (over the masked targets, if masked).
pub fn batch_loss(
    model: &Model,
    batch: &Batch,
    ctx: &mut ForwardCtx<'_>,
) -> Result<Tensor, StepError> {
    let logits = model.forward(&batch.x, ctx)?;
    let (b, t, v) = logits.dims3()?;
    let mask = batch.mask.as_ref().map(Tensor::flatten_all).transpose()?;
    Ok(cross_entropy(
        &logits.reshape((b * t, v))?,
        &batch.y.flatten_all()?,
        mask.as_ref(),
    )?)
}

/// The dropout stream's seed: derived from the run's seed, distinct from the sampler's.
fn dropout_seed(seed: u64) -> u64 {
    seed ^ 0x0d70_9047_d70f_0001
}
