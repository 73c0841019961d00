//! The training loop: epochs of deterministic micro-batches, gradient
//! accumulation, AdamW with a linear warmup schedule, checkpoints and
//! bit-identical resume.
//!
//! # Batching and loss weighting
//!
//! Epoch `e` visits the examples in [`epoch_order`]`(n, seed, e)` (or `0..n`
//! when `shuffle` is false), cut into micro-batches of `micro_batch` examples;
//! the last micro-batch of an epoch holds the remainder and may be smaller.
//! Consecutive groups of `grad_accum` micro-batches form one optimizer step;
//! the last group of an epoch may hold fewer micro-batches. Windows never span
//! two epochs, so an epoch has `ceil(ceil(n / micro_batch) / grad_accum)`
//! optimizer steps and the schedule's `total_steps` is `epochs` times that.
//!
//! The loss function returns the mean loss over the examples of its
//! micro-batch. A micro-batch of `b` examples in a step of `N` examples in total
//! contributes its gradient with weight `b / N`, so each optimizer step
//! follows the gradient of the mean loss over the step's examples, whatever
//! the sizes of its micro-batches (a short last micro-batch is weighted by its
//! true size, not by `1 / grad_accum`). The step loss reported to
//! [`TrainHooks::on_step`] is that example-weighted mean, and an epoch's
//! `mean_loss` is the mean over all examples of the epoch.
//!
//! # Checkpoints and resume
//!
//! At the end of every epoch and every `checkpoint_every_steps` optimizer steps
//! the loop writes to `ckpt_dir`: the variable values
//! (`vars-<seq>.safetensors`), the optimizer state
//! (`optimizer-<seq>.safetensors`, see [`AdamW::save`]) and last
//! `checkpoint.json`, which names those two files and records the position
//! (epoch, next micro-batch in the epoch, optimizer step, micro-step), the
//! statistics accumulated so far and a fingerprint of the run (configuration,
//! number of examples, variable names, shapes, dtypes and initial values).
//! Every file is written atomically (temporary file + rename) with its blake3
//! recorded beside it (`<file>.blake3`, see [`dsel_store::write_sealed`]),
//! and the files of older checkpoints are deleted only after the new
//! `checkpoint.json` is in place, so a run killed at any point leaves a
//! valid checkpoint.
//! Checkpoints are taken only at optimizer-step boundaries, so no partial
//! gradient accumulation is ever saved: a run killed inside an accumulation
//! window redoes that window's micro-batches.
//!
//! When [`train`] starts and `checkpoint.json` exists with the same
//! fingerprint, variables and optimizer are restored and training continues
//! from the recorded position; with a different fingerprint the checkpoint is
//! ignored (and replaced by the first new one). A checkpoint whose files do
//! not match their recorded blake3 (or have none), or whose caller state
//! [`TrainHooks::can_resume`] rejects, is ignored too, with a warning: the
//! run starts over rather than continue from damaged state. Given a deterministic loss
//! function (using [`StepContext::dropout_seed`] for its randomness), the final
//! variables and moments of a killed-and-resumed run are bit-identical to an
//! uninterrupted run's. A run that already finished returns its report without
//! training. One `ckpt_dir` must not be used by two runs at the same time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adamw::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator};
use crate::error::TrainError;
use crate::io::{read_safetensors, safetensors_bytes};
use crate::schedule::{batches, dropout_seed, epoch_order, LinearSchedule};

/// Name of the checkpoint index file inside `ckpt_dir`.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// Value of the `format` field of `checkpoint.json`.
pub const CHECKPOINT_FORMAT: &str = "dsel-train-checkpoint/1";

/// Configuration of a training run (everything in it enters the checkpoint
/// fingerprint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Number of passes over the examples.
    pub epochs: usize,
    /// Peak learning rate of the linear schedule.
    pub lr: f64,
    /// Fraction of all optimizer steps spent warming up (`ceil(ratio · total)` steps); project default 0.03.
    pub warmup_ratio: f64,
    /// Examples per loss-function call.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Seed of the epoch shuffles and of the dropout seeds.
    pub seed: u64,
    /// Shuffle the examples each epoch (else visit them in index order).
    pub shuffle: bool,
    /// Clip the total gradient norm of each step to this value (PyTorch semantics); `None` = no clipping.
    pub max_grad_norm: Option<f64>,
    /// Also checkpoint every this many optimizer steps (epoch ends are always checkpointed).
    pub checkpoint_every_steps: Option<u64>,
    /// AdamW hyper-parameters.
    pub adam: AdamWConfig,
    /// Shape of the learning-rate schedule: linear warmup + decay (HF's,
    /// the default) or constant. Omitted from the serialized config when
    /// linear, so keys of runs that predate the field are unchanged.
    #[serde(default, skip_serializing_if = "LrShape::is_linear")]
    pub schedule: LrShape,
}

/// The shape of a run's learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrShape {
    /// Linear warmup over `ceil(warmup_ratio · total)` steps (the first at
    /// rate 0, as in HF's `get_linear_schedule_with_warmup`), then linear
    /// decay to 0.
    #[default]
    Linear,
    /// Every step at the peak rate; `warmup_ratio` must be 0.
    Constant,
}

impl LrShape {
    /// True for [`LrShape::Linear`].
    pub fn is_linear(&self) -> bool {
        *self == LrShape::Linear
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            lr: 2e-5,
            warmup_ratio: 0.03,
            micro_batch: 1,
            grad_accum: 1,
            seed: 0,
            shuffle: true,
            max_grad_norm: None,
            checkpoint_every_steps: None,
            adam: AdamWConfig::default(),
            schedule: LrShape::Linear,
        }
    }
}

impl TrainConfig {
    /// Checks every field is in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| -> Result<()> {
            Err(TrainError::InvalidConfig { field, reason }.into())
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("must be finite and >= 0, got {}", self.lr));
        }
        if !(self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio)) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", self.warmup_ratio),
            );
        }
        if self.schedule == LrShape::Constant && self.warmup_ratio != 0.0 {
            return bad(
                "warmup_ratio",
                format!(
                    "must be 0 with a constant schedule, got {}",
                    self.warmup_ratio
                ),
            );
        }
        if self.micro_batch == 0 {
            return bad("micro_batch", "must be >= 1, got 0".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be >= 1, got 0".into());
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return bad("max_grad_norm", format!("must be finite and > 0, got {m}"));
            }
        }
        if self.checkpoint_every_steps == Some(0) {
            return bad(
                "checkpoint_every_steps",
                "must be >= 1 when set, got 0".into(),
            );
        }
        self.adam.validate()
    }
}

/// How a run of `n_examples` is cut into steps (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// `ceil(n / micro_batch)`.
    pub micro_batches_per_epoch: usize,
    /// `ceil(micro_batches_per_epoch / grad_accum)`.
    pub steps_per_epoch: u64,
    /// `epochs · steps_per_epoch`.
    pub total_steps: u64,
    /// `ceil(warmup_ratio · total_steps)`.
    pub warmup_steps: u64,
}

/// The step plan and schedule of a run.
pub fn plan(n_examples: usize, cfg: &TrainConfig) -> Result<(TrainPlan, LinearSchedule)> {
    cfg.validate()?;
    if n_examples == 0 {
        bail!("cannot train on 0 examples");
    }
    let micro = n_examples.div_ceil(cfg.micro_batch);
    let steps_per_epoch = micro.div_ceil(cfg.grad_accum) as u64;
    let total_steps = steps_per_epoch * cfg.epochs as u64;
    let schedule = match cfg.schedule {
        LrShape::Linear => LinearSchedule::from_ratio(cfg.lr, total_steps, cfg.warmup_ratio),
        LrShape::Constant => LinearSchedule::constant(cfg.lr, total_steps),
    };
    Ok((
        TrainPlan {
            micro_batches_per_epoch: micro,
            steps_per_epoch,
            total_steps,
            warmup_steps: schedule.warmup_steps,
        },
        schedule,
    ))
}

/// What the loss function is told about the micro-batch it computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepContext {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Optimizer step this micro-batch belongs to (0-based over the run).
    pub step: u64,
    /// Micro-batch counter (0-based over the run).
    pub micro_step: u64,
    /// Seed for this micro-batch's dropout masks: [`dropout_seed`]`(seed, micro_step)`.
    pub dropout_seed: u64,
    /// Learning rate of this step.
    pub lr: f64,
}

/// Statistics of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Optimizer steps in the epoch.
    pub steps: u64,
    /// Index of the epoch's first optimizer step.
    pub first_step: u64,
    /// Examples seen in the epoch.
    pub examples: u64,
    /// Mean learning rate over the epoch's optimizer steps (LESS weighs checkpoints by it).
    pub mean_lr: f64,
    /// Mean loss over the epoch's examples.
    pub mean_loss: f64,
    /// Mean total gradient norm over the epoch's steps (only when clipping is on).
    pub mean_grad_norm: Option<f64>,
    /// Tokens, when [`TrainHooks::tokens`] reports them.
    pub tokens: Option<u64>,
    /// Wall-clock seconds spent (summed over resumed calls; not deterministic).
    pub seconds: f64,
    /// Mean loss of each optimizer step of the epoch, in order (the loss curve).
    #[serde(default)]
    pub step_losses: Vec<f64>,
}

/// Result of [`train`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// One summary per epoch.
    pub epochs: Vec<EpochSummary>,
    /// The step plan.
    pub plan: TrainPlan,
    /// Optimizer steps taken (equals `plan.total_steps`).
    pub steps: u64,
    /// Micro-batches processed.
    pub micro_steps: u64,
    /// Examples processed over all epochs.
    pub examples: u64,
    /// Tokens, when [`TrainHooks::tokens`] reports them.
    pub tokens: Option<u64>,
    /// Wall-clock seconds (summed over resumed calls; not deterministic).
    pub seconds: f64,
    /// Optimizer step this call resumed from, when it restored a checkpoint.
    pub resumed_from_step: Option<u64>,
}

/// Callbacks of the training loop; every method has a default that does nothing.
pub trait TrainHooks {
    /// Called after each optimizer step (`step` is the 0-based index of the
    /// step just taken, `lr` its learning rate, `loss` its example-weighted mean loss).
    fn on_step(&mut self, step: u64, lr: f64, loss: f64) -> Result<()> {
        let _ = (step, lr, loss);
        Ok(())
    }

    /// Called at the end of each epoch, before its checkpoint is written, with
    /// the optimizer holding the epoch's final state (stages save per-epoch
    /// adapters and optimizer state here). A resumed run calls it only for the
    /// epochs it finishes; an error aborts the run and the epoch's end is
    /// replayed (hook included) on resume, so the hook should write atomically.
    fn on_epoch_end(
        &mut self,
        epoch: usize,
        summary: &EpochSummary,
        optimizer: &AdamW,
    ) -> Result<()> {
        let _ = (epoch, summary, optimizer);
        Ok(())
    }

    /// Called just before the loop writes a resumable checkpoint into `dir`
    /// at position `step` (the number of optimizer steps taken). Callers
    /// with state the loop does not know about (an online selector's
    /// memory) save it here, named by `step`, so that a resume finds the
    /// state of exactly the checkpoint it restores.
    fn before_checkpoint(&mut self, step: u64, dir: &Path) -> Result<()> {
        let _ = (step, dir);
        Ok(())
    }

    /// Called before the loop restores the checkpoint in `dir` at position
    /// `step`: return `false` when the state saved by
    /// [`TrainHooks::before_checkpoint`] for it is missing or damaged, and
    /// the run starts from scratch instead (the hook logs why).
    fn can_resume(&mut self, step: u64, dir: &Path) -> Result<bool> {
        let _ = (step, dir);
        Ok(true)
    }

    /// Called once when the loop resumes from the checkpoint in `dir` at
    /// position `step`, before any further step.
    fn on_resume(&mut self, step: u64, dir: &Path) -> Result<()> {
        let _ = (step, dir);
        Ok(())
    }

    /// Number of tokens in the given examples, if the caller wants tokens
    /// counted in the report (must be deterministic).
    fn tokens(&mut self, indices: &[usize]) -> Option<u64> {
        let _ = indices;
        None
    }
}

/// Hooks that do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// Serde helper: `f64` as its shortest round-trip decimal string, so values
/// restored from `checkpoint.json` are bit-identical (NaN and infinities too).
mod f64_exact {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{x:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<f64>().map_err(serde::de::Error::custom)
    }
}

/// Running statistics of one epoch (exactly serialisable).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct EpochAcc {
    epoch: usize,
    first_step: u64,
    steps: u64,
    examples: u64,
    #[serde(with = "f64_exact")]
    lr_sum: f64,
    /// Σ over micro-batches of (mean loss · examples).
    #[serde(with = "f64_exact")]
    loss_sum: f64,
    #[serde(with = "f64_exact")]
    grad_norm_sum: f64,
    grad_norms: u64,
    tokens: Option<u64>,
    #[serde(with = "f64_exact")]
    seconds: f64,
    /// Mean loss of each optimizer step (finite: non-finite losses abort).
    #[serde(default)]
    step_losses: Vec<f64>,
}

impl EpochAcc {
    fn new(epoch: usize, first_step: u64) -> Self {
        EpochAcc {
            epoch,
            first_step,
            ..Default::default()
        }
    }

    fn summary(&self) -> EpochSummary {
        let div = |a: f64, b: u64| if b == 0 { 0.0 } else { a / b as f64 };
        EpochSummary {
            epoch: self.epoch,
            steps: self.steps,
            first_step: self.first_step,
            examples: self.examples,
            mean_lr: div(self.lr_sum, self.steps),
            mean_loss: div(self.loss_sum, self.examples),
            mean_grad_norm: (self.grad_norms > 0).then(|| div(self.grad_norm_sum, self.grad_norms)),
            tokens: self.tokens,
            seconds: self.seconds,
            step_losses: self.step_losses.clone(),
        }
    }
}

/// Where the loop stands (always at an optimizer-step boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    /// Current epoch (== epochs when finished).
    epoch: usize,
    /// Index of the next micro-batch within the epoch's order.
    batch_in_epoch: usize,
    /// Optimizer steps taken.
    step: u64,
    /// Micro-batches processed.
    micro_step: u64,
}

/// Contents of `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointIndex {
    format: String,
    fingerprint: String,
    seq: u64,
    vars_file: String,
    optimizer_file: String,
    position: Position,
    completed: Vec<EpochAcc>,
    current: EpochAcc,
    /// For people reading the file; the fingerprint is authoritative.
    config: TrainConfig,
    n_examples: usize,
}

/// Fingerprint of a run: configuration, number of examples, variable names,
/// shapes, dtypes and initial values.
fn fingerprint(vars: &[(String, Var)], n_examples: usize, cfg: &TrainConfig) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let meta = serde_json::json!({
        "format": CHECKPOINT_FORMAT,
        "config": serde_json::to_value(cfg)?,
        "n_examples": n_examples,
        "vars": vars.iter().map(|(n, v)| serde_json::json!({
            "name": n, "shape": v.dims(), "dtype": format!("{:?}", v.dtype()),
        })).collect::<Vec<_>>(),
    });
    h.update(serde_json::to_string(&meta)?.as_bytes());
    for (name, var) in vars {
        let t = var.as_tensor().flatten_all()?;
        if var.dtype() == DType::F64 {
            let vals: Vec<f64> = t.to_vec1()?;
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect();
            h.update(&bytes);
        } else {
            let vals: Vec<f32> = t
                .to_dtype(DType::F32)?
                .to_vec1()
                .with_context(|| format!("reading variable `{name}`"))?;
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect();
            h.update(&bytes);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

fn is_ours(file_name: &str) -> bool {
    // A temporary file `dsel_store::atomic_write` left behind: `.<name>.tmp-<nonce>`.
    if let Some(inner) = dsel_store::temp_file_target(file_name) {
        let base = inner
            .strip_suffix(dsel_store::DIGEST_SUFFIX)
            .unwrap_or(inner);
        return base == CHECKPOINT_FILE || is_ours(inner);
    }
    let file_name = file_name
        .strip_suffix(dsel_store::DIGEST_SUFFIX)
        .unwrap_or(file_name);
    (file_name.starts_with("vars-") || file_name.starts_with("optimizer-"))
        && file_name.ends_with(".safetensors")
}

/// Largest `<seq>` of `vars-<seq>.safetensors` / `optimizer-<seq>.safetensors` in `dir`.
fn max_seq_in(dir: &Path) -> Result<u64> {
    let mut max = 0;
    if !dir.exists() {
        return Ok(0);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".safetensors").and_then(|s| {
            s.strip_prefix("vars-")
                .or_else(|| s.strip_prefix("optimizer-"))
        });
        if let Some(seq) = stem.and_then(|s| s.parse::<u64>().ok()) {
            max = max.max(seq);
        }
    }
    Ok(max)
}

struct Checkpointer {
    dir: PathBuf,
    next_seq: u64,
    fingerprint: String,
    config: TrainConfig,
    n_examples: usize,
}

impl Checkpointer {
    /// The checkpoint index, when there is one whose bytes match their
    /// recorded blake3 (a damaged or unsealed one is ignored, logged).
    fn read_index(&self) -> Result<Option<CheckpointIndex>> {
        let path = self.dir.join(CHECKPOINT_FILE);
        if !dsel_store::trust_sealed(&path, "training checkpoint") {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let idx: CheckpointIndex = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: line {}, column {}: not a valid training checkpoint index ({e}); delete the folder to start over",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        if idx.format != CHECKPOINT_FORMAT {
            bail!(
                "{}: field `format` is `{}`, expected `{CHECKPOINT_FORMAT}`",
                path.display(),
                idx.format
            );
        }
        Ok(Some(idx))
    }

    fn write(
        &mut self,
        opt: &AdamW,
        pos: Position,
        completed: &[EpochAcc],
        current: &EpochAcc,
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let vars_file = format!("vars-{seq:06}.safetensors");
        let optimizer_file = format!("optimizer-{seq:06}.safetensors");

        let tensors: Vec<(String, Tensor)> = opt
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "dsel-train-vars/1".to_string());
        meta.insert("step".to_string(), pos.step.to_string());
        let bytes = safetensors_bytes(&tensors, meta)?;
        dsel_store::write_sealed(self.dir.join(&vars_file), &bytes)?;
        dsel_store::write_sealed(self.dir.join(&optimizer_file), opt.state_bytes()?)?;

        let idx = CheckpointIndex {
            format: CHECKPOINT_FORMAT.to_string(),
            fingerprint: self.fingerprint.clone(),
            seq,
            vars_file: vars_file.clone(),
            optimizer_file: optimizer_file.clone(),
            position: pos,
            completed: completed.to_vec(),
            current: current.clone(),
            config: self.config.clone(),
            n_examples: self.n_examples,
        };
        let json = serde_json::to_string_pretty(&idx)?;
        dsel_store::write_sealed(self.dir.join(CHECKPOINT_FILE), json.as_bytes())?;

        // Only now are older files unreferenced.
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("listing {}", self.dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let base = name
                .strip_suffix(dsel_store::DIGEST_SUFFIX)
                .unwrap_or(&name);
            if is_ours(&name) && base != vars_file && base != optimizer_file {
                std::fs::remove_file(entry.path()).with_context(|| {
                    format!("removing stale checkpoint file {}", entry.path().display())
                })?;
            }
        }
        tracing::debug!(dir = %self.dir.display(), step = pos.step, seq, "checkpoint written");
        Ok(())
    }
}

/// Restores variables from a checkpoint's vars file.
fn restore_vars(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let (tensors, _) = read_safetensors(path, &device)?;
    let mut staged = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", path.display()))?;
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            bail!(
                "{}: tensor `{name}` is {:?} {:?}, the variable is {:?} {:?}",
                path.display(),
                t.dtype(),
                t.dims(),
                var.dtype(),
                var.dims()
            );
        }
        staged.push(t.to_device(var.device())?);
    }
    for ((_, var), t) in vars.iter().zip(staged) {
        var.set(&t)?;
    }
    Ok(())
}

fn scalar_loss(loss: &Tensor) -> Result<f64> {
    if loss.elem_count() != 1 {
        bail!(
            "the loss function must return a scalar (one element), got shape {:?}",
            loss.dims()
        );
    }
    let v: Vec<f64> = loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v[0])
}

/// Trains `vars` on `n_examples` examples with AdamW and the linear warmup
/// schedule, checkpointing to and resuming from `ckpt_dir` (see the module
/// docs for batching, loss weighting and resume).
///
/// `loss_fn(indices, ctx)` gets the example indices of one micro-batch and
/// returns its scalar loss, the mean over those examples, computed from the
/// variables so that `backward` reaches every one of them (a variable without
/// gradient is an error naming it). An error from `loss_fn` or a hook aborts
/// the run; calling `train` again with the same arguments resumes from the
/// last checkpoint.
pub fn train(
    vars: Vec<(String, Var)>,
    n_examples: usize,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    loss_fn: &mut dyn FnMut(&[usize], &StepContext) -> Result<Tensor>,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainReport> {
    let (plan, schedule) = plan(n_examples, cfg)?;
    let fp = fingerprint(&vars, n_examples, cfg)?;
    let mut opt = AdamW::new(vars.clone(), cfg.adam)?;

    let mut ck = Checkpointer {
        dir: ckpt_dir.to_path_buf(),
        next_seq: max_seq_in(ckpt_dir)? + 1,
        fingerprint: fp.clone(),
        config: cfg.clone(),
        n_examples,
    };

    let mut pos = Position {
        epoch: 0,
        batch_in_epoch: 0,
        step: 0,
        micro_step: 0,
    };
    let mut completed: Vec<EpochAcc> = Vec::new();
    let mut current = EpochAcc::new(0, 0);
    let mut resumed_from_step = None;

    if let Some(idx) = ck.read_index()? {
        ck.next_seq = ck.next_seq.max(idx.seq + 1);
        // Damaged state is never resumed: every file must be the bytes written.
        let intact = idx.fingerprint == fp
            && [&idx.vars_file, &idx.optimizer_file]
                .iter()
                .all(|f| dsel_store::trust_sealed(ckpt_dir.join(f), "training checkpoint"))
            && hooks.can_resume(idx.position.step, ckpt_dir)?;
        if idx.fingerprint == fp && !intact {
            tracing::warn!(
                dir = %ckpt_dir.display(),
                step = idx.position.step,
                "the checkpoint's state is damaged or incomplete; starting from scratch"
            );
        } else if idx.fingerprint == fp {
            let p = idx.position;
            let consistent = p.epoch <= cfg.epochs
                && p.batch_in_epoch <= plan.micro_batches_per_epoch
                && idx.completed.len() == p.epoch
                && p.step <= plan.total_steps;
            if !consistent {
                bail!(
                    "{}: recorded position {:?} does not fit the run ({} epochs, {} micro-batches per epoch); delete the folder to start over",
                    ckpt_dir.join(CHECKPOINT_FILE).display(),
                    p,
                    cfg.epochs,
                    plan.micro_batches_per_epoch
                );
            }
            restore_vars(&ckpt_dir.join(&idx.vars_file), &vars)?;
            opt.load(&ckpt_dir.join(&idx.optimizer_file))?;
            if opt.step_count() != p.step {
                bail!(
                    "{}: optimizer state has step {} but the checkpoint position is step {}",
                    ckpt_dir.join(&idx.optimizer_file).display(),
                    opt.step_count(),
                    p.step
                );
            }
            tracing::info!(
                dir = %ckpt_dir.display(),
                epoch = p.epoch,
                step = p.step,
                "resuming training from checkpoint"
            );
            pos = p;
            completed = idx.completed;
            current = idx.current;
            resumed_from_step = Some(p.step);
            hooks.on_resume(p.step, ckpt_dir)?;
        } else {
            tracing::info!(
                dir = %ckpt_dir.display(),
                "checkpoint belongs to a different run (fingerprint {} vs {}); starting from scratch",
                idx.fingerprint,
                fp
            );
        }
    }

    let mut progress = dsel_progress::Progress::new("train", plan.total_steps, "steps");
    progress.resume_at(pos.step);
    let (progress_start, mut progress_examples) = (Instant::now(), 0u64);
    let mut acc = GradAccumulator::new(&vars);

    while pos.epoch < cfg.epochs {
        let epoch = pos.epoch;
        let order: Vec<usize> = if cfg.shuffle {
            epoch_order(n_examples, cfg.seed, epoch as u64)
        } else {
            (0..n_examples).collect()
        };
        let micro: Vec<&[usize]> = batches(&order, cfg.micro_batch)?.collect();

        while pos.batch_in_epoch < micro.len() {
            let t0 = Instant::now();
            let window_end = (pos.batch_in_epoch + cfg.grad_accum).min(micro.len());
            let window = &micro[pos.batch_in_epoch..window_end];
            let n_step: usize = window.iter().map(|b| b.len()).sum();
            let lr = schedule.lr(pos.step);
            let mut micro_step = pos.micro_step;
            let mut step_loss_sum = 0.0f64;
            let mut step_tokens: Option<u64> = None;

            for mb in window {
                let ctx = StepContext {
                    epoch,
                    step: pos.step,
                    micro_step,
                    dropout_seed: dropout_seed(cfg.seed, micro_step),
                    lr,
                };
                let loss = loss_fn(mb, &ctx).with_context(|| {
                    format!(
                        "loss function failed at epoch {epoch}, step {}, micro-step {micro_step}",
                        pos.step
                    )
                })?;
                let value = scalar_loss(&loss)?;
                if !value.is_finite() {
                    return Err(TrainError::NonFiniteLoss {
                        loss: value,
                        epoch,
                        step: pos.step,
                        micro_step,
                    }
                    .into());
                }
                let grads = loss
                    .backward()
                    .with_context(|| format!("backward pass at micro-step {micro_step}"))?;
                acc.add(&grads, mb.len() as f64 / n_step as f64)?;
                step_loss_sum += value * mb.len() as f64;
                if let Some(t) = hooks.tokens(mb) {
                    step_tokens = Some(step_tokens.unwrap_or(0) + t);
                }
                micro_step += 1;
            }

            let mut grads = acc.take();
            let grad_norm = match cfg.max_grad_norm {
                Some(max) => Some(clip_grad_norm(&mut grads, &vars, max)?),
                None => None,
            };
            opt.step(&grads, lr)
                .with_context(|| format!("optimizer step {} (epoch {epoch})", pos.step))?;
            drop(grads);

            let step_loss = step_loss_sum / n_step as f64;
            current.steps += 1;
            current.examples += n_step as u64;
            current.lr_sum += lr;
            current.loss_sum += step_loss_sum;
            current.step_losses.push(step_loss);
            if let Some(g) = grad_norm {
                current.grad_norm_sum += g;
                current.grad_norms += 1;
            }
            if let Some(t) = step_tokens {
                current.tokens = Some(current.tokens.unwrap_or(0) + t);
            }
            current.seconds += t0.elapsed().as_secs_f64();

            let taken = pos.step;
            pos.step += 1;
            pos.micro_step = micro_step;
            pos.batch_in_epoch = window_end;

            hooks.on_step(taken, lr, step_loss)?;
            progress_examples += n_step as u64;
            progress.set_position(pos.step);
            progress.set_message(format!(
                "epoch {epoch} loss {step_loss:.4} lr {lr:.2e} {:.1} ex/s",
                progress_examples as f64 / progress_start.elapsed().as_secs_f64().max(1e-9)
            ));

            let epoch_done = pos.batch_in_epoch == micro.len();
            if let Some(every) = cfg.checkpoint_every_steps {
                if !epoch_done && pos.step.is_multiple_of(every) {
                    hooks.before_checkpoint(pos.step, ckpt_dir)?;
                    ck.write(&opt, pos, &completed, &current)?;
                }
            }
        }

        let summary = current.summary();
        tracing::info!(
            "epoch {} done: {} steps, mean loss {:.5}, mean lr {:.3e}",
            epoch,
            summary.steps,
            summary.mean_loss,
            summary.mean_lr
        );
        hooks.on_epoch_end(epoch, &summary, &opt)?;
        completed.push(std::mem::replace(
            &mut current,
            EpochAcc::new(epoch + 1, pos.step),
        ));
        pos.epoch += 1;
        pos.batch_in_epoch = 0;
        hooks.before_checkpoint(pos.step, ckpt_dir)?;
        ck.write(&opt, pos, &completed, &current)?;
    }
    progress.finish();

    let epochs: Vec<EpochSummary> = completed.iter().map(EpochAcc::summary).collect();
    let tokens = epochs
        .iter()
        .fold(None, |acc: Option<u64>, e| match (acc, e.tokens) {
            (a, None) => a,
            (a, Some(t)) => Some(a.unwrap_or(0) + t),
        });
    Ok(TrainReport {
        steps: pos.step,
        micro_steps: pos.micro_step,
        examples: epochs.iter().map(|e| e.examples).sum(),
        tokens,
        seconds: epochs.iter().map(|e| e.seconds).sum(),
        epochs,
        plan,
        resumed_from_step,
    })
}
