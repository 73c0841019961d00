//! `dsel-basetrain`: LoRA fine-tuning of a model on (a subset of) a tokenized
//! set — the `warmup` stage of LESS and the `base-train` stage of ToV, and the
//! engine under `valtune`.
//!
//! Output folder layout: `adapter.safetensors` (LoRA weights after the last
//! epoch), `optimizer.safetensors` (AdamW m, v, step), `train.json`
//! ([`FinetuneReport`]) and, when `save_epochs` is on, `epoch-<k>/` with the
//! adapter and optimizer state after epoch k (1-based). Training checkpoints
//! live in a scratch folder so a killed run resumes where it stopped.
//!
//! The loss of a micro-batch is the mean over its examples of each example's
//! completion-only mean loss.
//!
//! Learning rate: the configured schedule. Base-train and the LESS warmup keep
//! Hugging Face's linear schedule with 3% warmup on purpose (the reference
//! runs use it): its first optimizer step has rate 0, so that step moves no
//! weight, but its gradients still enter AdamW's moments, which the later
//! steps (and LESS's preconditioning) use. ToV's validation fine-tune uses a
//! constant rate instead (see `dsel-valtune`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use dsel_model::{Batch, LoraConfig, Mode, Model};
use dsel_tokenize::TokenizedSet;
use dsel_train::{AdamW, EpochSummary, StepContext, TrainConfig, TrainHooks, TrainReport};
use serde::{Deserialize, Serialize};

/// Bump when the training computation or output layout changes.
pub const STAGE_VERSION: &str = "finetune-1";

/// Everything that decides a fine-tuning run (part of its artifact key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// LoRA shape and initialisation (used when there is no start adapter to continue).
    pub lora: LoraConfig,
    /// Optimisation.
    pub train: TrainConfig,
    /// Save the adapter and optimizer state after every epoch (LESS warmup).
    pub save_epochs: bool,
    /// Visit examples longest first instead of shuffled, so micro-batches hold
    /// similar lengths and padding is small (a CPU speed-up; off in the paper preset).
    #[serde(default)]
    pub group_by_length: bool,
}

/// What a fine-tuning run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// The training loop's report (per-epoch mean LR and loss, steps, …).
    pub train: TrainReport,
    /// Examples trained on.
    pub examples: usize,
    /// Tokens per epoch.
    pub tokens_per_epoch: u64,
    /// Wall seconds of this call.
    pub seconds: f64,
    /// Tokens processed per second in this call.
    pub tokens_per_second: f64,
    /// Every micro-batch this call trained on, in order: its optimizer step,
    /// learning rate and the set rows it held (a resumed call lists only the
    /// micro-batches after the checkpoint it resumed from). In memory only:
    /// not written to `train.json` or the manifest (it grows with the data).
    #[serde(skip)]
    pub micro_batches: Vec<MicroBatchRecord>,
}

/// One trained micro-batch (see [`FinetuneReport::micro_batches`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroBatchRecord {
    /// 0-based optimizer step the micro-batch belongs to.
    pub step: u64,
    /// Learning rate of that step.
    pub lr: f64,
    /// Rows of the tokenized set in the micro-batch.
    pub rows: Vec<usize>,
}

struct Hooks<'a> {
    model: &'a Model,
    out: &'a Path,
    save_epochs: bool,
    set: &'a TokenizedSet,
    indices: &'a [usize],
}

impl TrainHooks for Hooks<'_> {
    fn on_step(&mut self, step: u64, lr: f64, loss: f64) -> Result<()> {
        tracing::debug!("step {step}: lr {lr:.3e} loss {loss:.4}");
        Ok(())
    }

    fn on_epoch_end(
        &mut self,
        epoch: usize,
        summary: &EpochSummary,
        optimizer: &AdamW,
    ) -> Result<()> {
        tracing::info!(
            "epoch {}: mean loss {:.4}, mean lr {:.3e}",
            epoch + 1,
            summary.mean_loss,
            summary.mean_lr
        );
        if self.save_epochs {
            let dir = self.out.join(format!("epoch-{}", epoch + 1));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            self.model.save_lora(&dir.join("adapter.safetensors"))?;
            optimizer.save(&dir.join("optimizer.safetensors"))?;
        }
        optimizer.save(&self.out.join("optimizer.safetensors"))?;
        Ok(())
    }

    fn tokens(&mut self, indices: &[usize]) -> Option<u64> {
        Some(
            indices
                .iter()
                .map(|&j| self.set.example(self.indices[j]).0.len() as u64)
                .sum(),
        )
    }
}

/// Fine-tune LoRA adapters of `model` on `set[indices]`, starting from the
/// adapter in `start` (or a fresh seeded LoRA when `None`), writing the
/// result into `out` and training checkpoints into `scratch`.
pub fn finetune(
    model: &mut Model,
    start: Option<&Path>,
    set: &TokenizedSet,
    indices: &[usize],
    cfg: &FinetuneConfig,
    scratch: &Path,
    out: &Path,
) -> Result<FinetuneReport> {
    anyhow::ensure!(
        !indices.is_empty(),
        "fine-tuning needs at least one example"
    );
    if let Some(&bad) = indices.iter().find(|&&i| i >= set.len()) {
        anyhow::bail!(
            "example index {bad} out of range (set has {} examples)",
            set.len()
        );
    }
    let started = Instant::now();
    let mut train_cfg = cfg.train.clone();
    let ordered: Vec<usize>;
    let indices: &[usize] = if cfg.group_by_length {
        let mut v = indices.to_vec();
        v.sort_by_key(|&i| (std::cmp::Reverse(set.example(i).0.len()), i));
        train_cfg.shuffle = false;
        ordered = v;
        &ordered
    } else {
        indices
    };
    model.add_lora(&cfg.lora)?;
    if let Some(path) = start {
        model
            .load_lora(path)
            .with_context(|| format!("loading start adapter {}", path.display()))?;
    }
    let vars = model.lora_params();
    let tokens_per_epoch: u64 = indices.iter().map(|&i| set.example(i).0.len() as u64).sum();
    let device = model.device().clone();
    let model_ref: &Model = model;
    let mut micro_batches: Vec<MicroBatchRecord> = Vec::new();
    let mut loss_fn = |batch_idx: &[usize], ctx: &StepContext| -> Result<Tensor> {
        micro_batches.push(MicroBatchRecord {
            step: ctx.step,
            lr: ctx.lr,
            rows: batch_idx.iter().map(|&j| indices[j]).collect(),
        });
        let seqs: Vec<(&[u32], &[u8])> =
            batch_idx.iter().map(|&j| set.example(indices[j])).collect();
        let batch = Batch::new(&seqs, &device)?;
        let losses = model_ref.example_losses(
            &batch,
            Mode::Train {
                dropout_seed: ctx.dropout_seed,
            },
        )?;
        Ok(losses.mean_all()?)
    };
    let mut hooks = Hooks {
        model: model_ref,
        out,
        save_epochs: cfg.save_epochs,
        set,
        indices,
    };
    let ckpt = scratch.join("train-checkpoints");
    std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;
    let report = dsel_train::train(
        vars,
        indices.len(),
        &train_cfg,
        &ckpt,
        &mut loss_fn,
        &mut hooks,
    )?;
    model_ref.save_lora(&out.join("adapter.safetensors"))?;
    let seconds = started.elapsed().as_secs_f64();
    let trained_tokens = tokens_per_epoch * cfg.train.epochs as u64;
    let report = FinetuneReport {
        train: report,
        examples: indices.len(),
        tokens_per_epoch,
        seconds,
        tokens_per_second: trained_tokens as f64 / seconds.max(1e-9),
        micro_batches,
    };
    dsel_store::atomic_write(out.join("train.json"), serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
