//! Training with online batch selection: candidate batches of `B` drawn by
//! the training loop, `k` chosen per step by a selector.

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use dsel_model::{Batch, LoraConfig, Mode, Model};
use dsel_tokenize::TokenizedSet;
use dsel_train::{epoch_order, AdamWConfig, StepContext, TrainConfig, TrainHooks, TrainReport};
use serde::{Deserialize, Serialize};

use crate::{OnlineSelector, SelectContext, SelectorConfig};

/// Optimizer steps between resumable checkpoints of an online run.
pub const CHECKPOINT_EVERY: u64 = 10;

/// Bump when the online-training computation or output layout changes.
pub const STAGE_VERSION: &str = "train-online-2";

/// Indexed `(token ids, label mask)` examples.
pub trait ExampleSource {
    /// Number of examples.
    fn len(&self) -> usize;
    /// True when there is no example.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `i` (`i < len()`).
    fn example(&self, i: usize) -> (&[u32], &[u8]);
}

impl ExampleSource for TokenizedSet {
    fn len(&self) -> usize {
        TokenizedSet::len(self)
    }
    fn example(&self, i: usize) -> (&[u32], &[u8]) {
        TokenizedSet::example(self, i)
    }
}

impl ExampleSource for [(Vec<u32>, Vec<u8>)] {
    fn len(&self) -> usize {
        <[_]>::len(self)
    }
    fn example(&self, i: usize) -> (&[u32], &[u8]) {
        (&self[i].0, &self[i].1)
    }
}

impl ExampleSource for Vec<(Vec<u32>, Vec<u8>)> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn example(&self, i: usize) -> (&[u32], &[u8]) {
        (&self[i].0, &self[i].1)
    }
}

/// Everything that decides an online-selection training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineRunConfig {
    /// The selector and its hyper-parameters.
    pub selector: SelectorConfig,
    /// LoRA shape and initialisation.
    pub lora: LoraConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Candidate batch size `B` (the training loop's micro-batch).
    pub candidates: usize,
    /// Examples trained per step `k`; `None` = the selector's default
    /// ([`SelectorConfig::default_k`]: UDS's keep ratio, else `max(1, B/2)`).
    pub k: Option<usize>,
    /// Peak learning rate (linear schedule).
    pub lr: f64,
    /// Warmup fraction of the steps.
    pub warmup_ratio: f64,
    /// Gradient clipping (PyTorch semantics), if any.
    pub max_grad_norm: Option<f64>,
    /// AdamW hyper-parameters.
    pub adam: AdamWConfig,
    /// Seed of the candidate order, dropout and every selector choice.
    pub seed: u64,
}

impl OnlineRunConfig {
    /// Defaults: 100 steps, B = 8, the selector's `k` (4, UDS 2), lr 1e-4,
    /// warmup 0.03, no clipping, seed 0.
    pub fn new(selector: SelectorConfig, lora: LoraConfig) -> Self {
        OnlineRunConfig {
            selector,
            lora,
            steps: 100,
            candidates: 8,
            k: None,
            lr: 1e-4,
            warmup_ratio: 0.03,
            max_grad_norm: None,
            adam: AdamWConfig::default(),
            seed: 0,
        }
    }

    /// `k` after applying the default.
    pub fn k(&self) -> usize {
        self.k
            .unwrap_or_else(|| self.selector.default_k(self.candidates))
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("online training: steps must be at least 1");
        }
        if self.candidates == 0 {
            bail!("online training: candidates (B) must be at least 1");
        }
        self.selector.validate()?;
        let k = self.k();
        if k == 0 || k > self.candidates {
            bail!(
                "online training: k must be in 1..={} (B), got {k}",
                self.candidates
            );
        }
        self.lora.validate()?;
        self.train_config().validate()
    }

    /// The training-loop configuration: one epoch over `steps · B` virtual
    /// examples in order, micro-batch `B`, one micro-batch per step, and
    /// a resumable checkpoint every [`CHECKPOINT_EVERY`] steps.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: 1,
            lr: self.lr,
            warmup_ratio: self.warmup_ratio,
            micro_batch: self.candidates,
            grad_accum: 1,
            seed: self.seed,
            shuffle: false,
            max_grad_norm: self.max_grad_norm,
            checkpoint_every_steps: Some(CHECKPOINT_EVERY),
            adam: self.adam,
            schedule: Default::default(),
        }
    }
}

/// One line of `steps.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer step (0-based).
    pub step: u64,
    /// Pool indices of the candidate batch.
    pub candidates: Vec<usize>,
    /// Pool indices of the chosen examples, in choice order.
    pub chosen: Vec<usize>,
    /// One score per candidate (see [`crate::Selection::scores`]).
    pub scores: Vec<f64>,
    /// Seconds spent selecting.
    pub select_seconds: f64,
    /// Wall seconds of the whole step (selection, forward/backward, optimizer).
    pub step_seconds: f64,
    /// Mean loss of the chosen examples.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Tokens of the chosen examples.
    pub tokens: u64,
}

/// Summary of an online-selection run (`report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineReport {
    /// Selector name.
    pub selector: String,
    /// Optimizer steps.
    pub steps: u64,
    /// Candidate batch size `B`.
    pub candidates: usize,
    /// Examples trained per step.
    pub k: usize,
    /// Examples trained on in total (`steps · k`).
    pub examples_trained: u64,
    /// Tokens of the trained examples.
    pub tokens_trained: u64,
    /// Sum of step wall seconds.
    pub seconds: f64,
    /// Sum of selection seconds.
    pub select_seconds: f64,
    /// `select_seconds / seconds`.
    pub select_fraction: f64,
    /// Optimizer steps per second.
    pub steps_per_second: f64,
    /// Mean loss of the chosen examples over the run.
    pub mean_loss: f64,
    /// Mean loss of the chosen examples over the last 10% of steps (at least one).
    pub final_loss: f64,
    /// The training loop's report.
    pub train: TrainReport,
}

/// Mean over `indices` of each example's completion-only mean NLL under
/// `model` (eval mode, no autograd graph), in batches of `batch_size`.
pub fn mean_loss<S: ExampleSource + ?Sized>(
    model: &Model,
    set: &S,
    indices: &[usize],
    batch_size: usize,
) -> Result<f64> {
    if indices.is_empty() {
        bail!("mean_loss: no examples");
    }
    let mut total = 0.0;
    for chunk in indices.chunks(batch_size.max(1)) {
        let seqs: Vec<(&[u32], &[u8])> = chunk.iter().map(|&i| set.example(i)).collect();
        let batch = Batch::new(&seqs, model.device())?;
        total += crate::simple::losses_inference(model, &batch)?
            .iter()
            .sum::<f64>();
    }
    Ok(total / indices.len() as f64)
}

/// A scalar with value `loss` whose gradient with respect to `vars` is `grads`:
/// `Σ_p ⟨var_p, G_p⟩ − Σ_p ⟨var_p, G_p⟩|detached + loss`.
fn surrogate_loss(vars: &[(String, Var)], grads: &[Tensor], loss: f64) -> Result<Tensor> {
    if vars.len() != grads.len() {
        bail!(
            "selector returned {} gradients for {} LoRA parameters",
            grads.len(),
            vars.len()
        );
    }
    let mut lin: Option<Tensor> = None;
    let mut constant = 0.0f64;
    for ((name, v), g) in vars.iter().zip(grads) {
        if g.dims() != v.dims() {
            bail!(
                "selector gradient for {name} has shape {:?}, the parameter {:?}",
                g.dims(),
                v.dims()
            );
        }
        let g = g.to_dtype(v.dtype())?;
        let term = (v.as_tensor() * &g)?.sum_all()?;
        constant += (v.as_detached_tensor() * &g)?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        lin = Some(match lin {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    let lin = lin.context("no LoRA parameters")?;
    Ok((lin + (loss - constant))?)
}

struct Shared {
    records: Vec<StepRecord>,
    pending: Option<StepRecord>,
    last: Instant,
}

struct Hooks<'a> {
    shared: &'a RefCell<Shared>,
    selector: &'a RefCell<Box<dyn OnlineSelector>>,
    /// Test hook: fail right after this many steps (a simulated kill).
    interrupt_after: Option<u64>,
}

/// What an online run keeps beside a training checkpoint at `step`.
#[derive(Serialize, Deserialize)]
struct SavedState {
    step: u64,
    selector: serde_json::Value,
    records: Vec<StepRecord>,
}

fn state_file(dir: &Path, step: u64) -> std::path::PathBuf {
    dir.join(format!("online-state-{step:08}.json"))
}

impl TrainHooks for Hooks<'_> {
    fn before_checkpoint(&mut self, step: u64, dir: &Path) -> Result<()> {
        let saved = SavedState {
            step,
            selector: self.selector.borrow().state()?,
            records: self.shared.borrow().records.clone(),
        };
        // With its blake3 beside it: a resume trusts only the bytes written.
        dsel_store::write_sealed(state_file(dir, step), serde_json::to_vec(&saved)?)?;
        // Keep the newest two: the checkpoint being written and the one it replaces.
        let mut old: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                    f.starts_with("online-state-") && !dsel_store::is_digest_file(f)
                })
            })
            .collect();
        old.sort();
        for p in old.iter().rev().skip(2) {
            let _ = dsel_store::remove_sealed(p);
        }
        Ok(())
    }

    fn can_resume(&mut self, step: u64, dir: &Path) -> Result<bool> {
        // A damaged or unsealed selector state (the UDS buffer, the step
        // log) makes the run start over rather than continue from it.
        Ok(dsel_store::trust_sealed(
            state_file(dir, step),
            "online-training state",
        ))
    }

    fn on_resume(&mut self, step: u64, dir: &Path) -> Result<()> {
        let path = state_file(dir, step);
        let saved: SavedState =
            serde_json::from_slice(&std::fs::read(&path).with_context(|| {
                format!(
                    "resuming online training at step {step}: reading {}",
                    path.display()
                )
            })?)
            .with_context(|| format!("{}: not an online-training state", path.display()))?;
        if saved.step != step || saved.records.len() as u64 != step {
            bail!(
                "{}: state is for step {} with {} records, the checkpoint is at step {step}",
                path.display(),
                saved.step,
                saved.records.len()
            );
        }
        self.selector.borrow_mut().restore(&saved.selector)?;
        self.shared.borrow_mut().records = saved.records;
        tracing::info!("online training resumes at step {step}");
        Ok(())
    }

    fn on_step(&mut self, step: u64, lr: f64, loss: f64) -> Result<()> {
        let mut s = self.shared.borrow_mut();
        let now = Instant::now();
        let secs = now.duration_since(s.last).as_secs_f64();
        s.last = now;
        let mut rec = s
            .pending
            .take()
            .with_context(|| format!("online training: no selection recorded for step {step}"))?;
        rec.step_seconds = secs;
        rec.lr = lr;
        rec.loss = loss;
        tracing::debug!(
            "step {step}: loss {loss:.4}, select {:.3}s of {secs:.3}s",
            rec.select_seconds
        );
        s.records.push(rec);
        if self.interrupt_after == Some(step + 1) {
            bail!(
                "online training interrupted after step {} (test hook)",
                step + 1
            );
        }
        Ok(())
    }
}

/// Trains fresh LoRA adapters of `model` for `cfg.steps` optimizer steps.
/// Step `s` draws the candidates `B` pool examples at positions
/// `s·B .. (s+1)·B` of the concatenated seeded epoch orders of the pool
/// ([`epoch_order`]`(pool.len(), seed, e)` for `e = 0, 1, …`), the selector
/// picks `k`, and the step trains on their mean loss (in the step's dropout
/// mode). `val` feeds GREATS. Writes `adapter.safetensors`, `steps.jsonl`
/// (one [`StepRecord`] per line) and `report.json` ([`OnlineReport`]) into
/// `out`; `scratch` holds the training loop's checkpoints (every
/// [`CHECKPOINT_EVERY`] steps) with the selector's state (the UDS buffer) and
/// the step log beside each, so a killed run resumes where it stopped and
/// ends identical to an uninterrupted one.
pub fn run_online<P, V>(
    model: &mut Model,
    pool: &P,
    val: &V,
    cfg: &OnlineRunConfig,
    scratch: &Path,
    out: &Path,
) -> Result<OnlineReport>
where
    P: ExampleSource + ?Sized,
    V: ExampleSource + ?Sized,
{
    run_online_interruptible(model, pool, val, cfg, scratch, out, None)
}

/// [`run_online`] that fails right after `interrupt_after` steps, as if the
/// process were killed there (for resume tests).
#[doc(hidden)]
pub fn run_online_interruptible<P, V>(
    model: &mut Model,
    pool: &P,
    val: &V,
    cfg: &OnlineRunConfig,
    scratch: &Path,
    out: &Path,
    interrupt_after: Option<u64>,
) -> Result<OnlineReport>
where
    P: ExampleSource + ?Sized,
    V: ExampleSource + ?Sized,
{
    cfg.validate()?;
    if pool.is_empty() {
        bail!("online training: the pool is empty");
    }
    let val_examples: Vec<(Vec<u32>, Vec<u8>)> = if cfg.selector.needs_validation() {
        (0..val.len())
            .map(|i| {
                let (a, b) = val.example(i);
                (a.to_vec(), b.to_vec())
            })
            .collect()
    } else {
        Vec::new()
    };
    let selector: RefCell<Box<dyn OnlineSelector>> =
        RefCell::new(cfg.selector.build(cfg.seed, val_examples)?);
    let (b, k) = (cfg.candidates, cfg.k());
    let n_virtual = cfg.steps * b;
    let mut order = Vec::with_capacity(n_virtual);
    let mut epoch = 0u64;
    while order.len() < n_virtual {
        order.extend(epoch_order(pool.len(), cfg.seed, epoch));
        epoch += 1;
    }
    order.truncate(n_virtual);

    model.add_lora(&cfg.lora)?;
    let vars = model.lora_params();
    let device = model.device().clone();
    let ckpt = scratch.join("train-checkpoints");
    std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let shared = RefCell::new(Shared {
        records: Vec::with_capacity(cfg.steps),
        pending: None,
        last: Instant::now(),
    });
    let model_ref: &Model = model;
    let train_cfg = cfg.train_config();
    let mut loss_fn = |idx: &[usize], ctx: &StepContext| -> Result<Tensor> {
        let pool_idx: Vec<usize> = idx.iter().map(|&v| order[v]).collect();
        let seqs: Vec<(&[u32], &[u8])> = pool_idx.iter().map(|&i| pool.example(i)).collect();
        let batch = Batch::new(&seqs, &device)?;
        let kk = k.min(batch.batch_size());
        let sctx = SelectContext {
            step: ctx.step,
            dropout_seed: ctx.dropout_seed,
            lr: ctx.lr,
        };
        let mut selector = selector.borrow_mut();
        let sel = selector.select(model_ref, &batch, kk, &sctx)?;
        let mut seen = vec![false; batch.batch_size()];
        if sel.chosen.len() != kk
            || sel
                .chosen
                .iter()
                .any(|&c| c >= seen.len() || std::mem::replace(&mut seen[c], true))
        {
            bail!(
                "selector {} returned an invalid choice {:?} (need {kk} distinct positions below {})",
                selector.name(),
                sel.chosen,
                batch.batch_size()
            );
        }
        let chosen_pool: Vec<usize> = sel.chosen.iter().map(|&c| pool_idx[c]).collect();
        let tokens = chosen_pool
            .iter()
            .map(|&i| pool.example(i).0.len() as u64)
            .sum();
        let loss = match &sel.train {
            Some(tg) => surrogate_loss(&vars, &tg.grads, tg.loss)?,
            None => {
                let sub: Vec<(&[u32], &[u8])> =
                    chosen_pool.iter().map(|&i| pool.example(i)).collect();
                let sub = Batch::new(&sub, &device)?;
                model_ref
                    .example_losses(
                        &sub,
                        Mode::Train {
                            dropout_seed: ctx.dropout_seed,
                        },
                    )?
                    .mean_all()?
            }
        };
        shared.borrow_mut().pending = Some(StepRecord {
            step: ctx.step,
            candidates: pool_idx,
            chosen: chosen_pool,
            scores: sel.scores,
            select_seconds: sel.seconds,
            step_seconds: 0.0,
            loss: 0.0,
            lr: ctx.lr,
            tokens,
        });
        Ok(loss)
    };
    let mut hooks = Hooks {
        shared: &shared,
        selector: &selector,
        interrupt_after,
    };
    shared.borrow_mut().last = Instant::now();
    let train = dsel_train::train(
        vars.clone(),
        n_virtual,
        &train_cfg,
        &ckpt,
        &mut loss_fn,
        &mut hooks,
    )?;
    model_ref.save_lora(&out.join("adapter.safetensors"))?;
    let records = shared.into_inner().records;
    if records.len() != cfg.steps {
        bail!(
            "online training: recorded {} steps, expected {}",
            records.len(),
            cfg.steps
        );
    }
    let mut lines = Vec::new();
    for r in &records {
        serde_json::to_writer(&mut lines, r)?;
        lines.push(b'\n');
    }
    dsel_store::atomic_write(out.join("steps.jsonl"), &lines)?;
    let seconds: f64 = records.iter().map(|r| r.step_seconds).sum();
    let select_seconds: f64 = records.iter().map(|r| r.select_seconds).sum();
    let tail = (records.len() / 10).max(1);
    let report = OnlineReport {
        selector: selector.borrow().name().to_string(),
        steps: records.len() as u64,
        candidates: b,
        k,
        examples_trained: records.iter().map(|r| r.chosen.len() as u64).sum(),
        tokens_trained: records.iter().map(|r| r.tokens).sum(),
        seconds,
        select_seconds,
        select_fraction: select_seconds / seconds.max(1e-12),
        steps_per_second: records.len() as f64 / seconds.max(1e-12),
        mean_loss: records.iter().map(|r| r.loss).sum::<f64>() / records.len() as f64,
        final_loss: records[records.len() - tail..]
            .iter()
            .map(|r| r.loss)
            .sum::<f64>()
            / tail as f64,
        train,
    };
    dsel_store::atomic_write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
