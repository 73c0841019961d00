//! `dsel-online`: online batch selection inside the training loop.
//!
//! At every optimizer step the training loop draws a candidate batch of `B`
//! examples; an [`OnlineSelector`] picks `k` of them and the step trains on
//! those only. Selectors, by name ([`SelectorKind`]):
//!
//! * `greats` — [`Greats`]: per-example LoRA gradients of the candidates and
//!   of a few sampled validation examples, inner products by the ghost trick
//!   where cheaper (see [`ghost`]), greedy selection with the Gram
//!   correction, both terms scaled to the step actually taken (AdamW on the
//!   mean loss of the `k` chosen, see [`Greats`])
//!   (Wang et al., NeurIPS 2024);
//! * `uds` — [`Uds`]: one no-grad forward; nuclear norm of each example's
//!   logits matrix plus `α` times the mean distance of a random projection of
//!   the logits (scaled like the reference's FFT projection, so that its `α`
//!   applies) to a FIFO buffer of past selections; keeps [`KeepRatio`] of
//!   the candidates, 1 of 4 by default (arXiv 2510.16882);
//! * `maxloss` — [`MaxLoss`]: top-`k` per-example loss (one no-grad forward);
//! * `gradnorm` — [`GradNorm`]: top-`k` per-example LoRA gradient norm;
//! * `none` — [`Regular`]: the first `k` candidates (the candidates are a
//!   seeded shuffle of the pool, so this is plain training on `k` examples
//!   per step — the baseline "same number of trained examples").
//!
//! Selectors that already hold the candidates' per-example gradients
//! (GREATS, Grad-Norm) return the gradient of the selected examples' mean
//! loss ([`Selection::train`]) so the step needs no second forward/backward;
//! [`run_online`] turns it into a surrogate loss with exactly that gradient.

#![warn(missing_docs)]

pub mod ghost;
pub mod greats;
pub mod linalg;
pub mod run;
pub mod simple;
pub mod uds;

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use dsel_model::{Batch, Model};
use serde::{Deserialize, Serialize};

pub use ghost::{
    cross_gram, linear_cross_gram, squared_norms, GradFactors, InnerProductMode, LinearFactors,
};
pub use greats::{adamw_weight_scale, greedy_select, Greats};
pub use run::{
    mean_loss, run_online, run_online_interruptible, ExampleSource, OnlineReport, OnlineRunConfig,
    StepRecord, CHECKPOINT_EVERY, STAGE_VERSION,
};
pub use simple::{GradNorm, MaxLoss, Regular};
pub use uds::{FifoBuffer, Uds, REFERENCE_PAD_ROWS};

/// What a selector is told about the step it selects for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectContext {
    /// Optimizer step (0-based).
    pub step: u64,
    /// Seed of this step's dropout masks (the training loop's).
    pub dropout_seed: u64,
    /// Learning rate of this step.
    pub lr: f64,
}

/// Gradient of the selected examples' mean loss, computed by the selector.
#[derive(Debug, Clone)]
pub struct TrainGrads {
    /// Mean loss of the selected examples (of the pass that produced the gradients).
    pub loss: f64,
    /// One tensor per LoRA parameter, in [`Model::lora_params`] order and shapes.
    pub grads: Vec<Tensor>,
}

/// A selector's choice for one candidate batch.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Positions (rows of the candidate batch) of the chosen examples, in the
    /// order they were chosen; `k` distinct positions.
    pub chosen: Vec<usize>,
    /// One score per candidate (the selector's ranking criterion; for GREATS
    /// the first-order scores `t_i = mean_v ⟨g_i, g_v⟩`, for Regular all 0).
    pub scores: Vec<f64>,
    /// Wall-clock seconds spent selecting.
    pub seconds: f64,
    /// The training gradient of the chosen examples, when the selector had it anyway.
    pub train: Option<TrainGrads>,
}

/// A rule picking `k` of the `B` examples of a candidate batch.
pub trait OnlineSelector {
    /// The selector's name (as in [`SelectorKind::name`]).
    fn name(&self) -> &str;

    /// Chooses `k` of the `candidates` (1 ≤ k ≤ B) for the current `model`.
    fn select(
        &mut self,
        model: &Model,
        candidates: &Batch,
        k: usize,
        ctx: &SelectContext,
    ) -> Result<Selection>;

    /// State carried from step to step (UDS's buffer), for checkpoints;
    /// `Null` for selectors whose choices depend only on the step.
    fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }

    /// Restores what [`OnlineSelector::state`] returned.
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// Selector names a user picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SelectorKind {
    /// Plain training on the first `k` candidates.
    None,
    /// GREATS.
    Greats,
    /// Utility-Diversity Sampling.
    Uds,
    /// Top-k loss.
    #[cfg_attr(feature = "clap", value(alias = "maxloss"))]
    MaxLoss,
    /// Top-k gradient norm.
    #[cfg_attr(feature = "clap", value(alias = "gradnorm"))]
    GradNorm,
}

impl SelectorKind {
    /// Every selector, in the order listed to users.
    pub const ALL: [SelectorKind; 5] = [
        SelectorKind::None,
        SelectorKind::Greats,
        SelectorKind::Uds,
        SelectorKind::MaxLoss,
        SelectorKind::GradNorm,
    ];

    /// The name on the command line (spelled like the static methods';
    /// `maxloss` and `gradnorm` are accepted as older spellings).
    pub fn name(self) -> &'static str {
        match self {
            SelectorKind::None => "none",
            SelectorKind::Greats => "greats",
            SelectorKind::Uds => "uds",
            SelectorKind::MaxLoss => "max-loss",
            SelectorKind::GradNorm => "grad-norm",
        }
    }
}

impl std::str::FromStr for SelectorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = match s {
            "maxloss" => "max-loss",
            "gradnorm" => "grad-norm",
            s => s,
        };
        SelectorKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = SelectorKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown selector {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// How many of the candidates UDS keeps: `kept` of every `of` (the
/// reference keeps 1 of 4, and 1 of 8 in its smaller-budget runs). Written
/// and parsed as `kept/of`, e.g. `1/4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRatio {
    /// Examples kept …
    pub kept: usize,
    /// … of this many candidates.
    pub of: usize,
}

impl KeepRatio {
    /// The reference's default: 1 of 4.
    pub const REFERENCE: KeepRatio = KeepRatio { kept: 1, of: 4 };

    /// `kept` of `of`; needs `1 ≤ kept ≤ of`.
    pub fn new(kept: usize, of: usize) -> Result<Self> {
        let r = KeepRatio { kept, of };
        r.validate()?;
        Ok(r)
    }

    /// Checks `1 ≤ kept ≤ of`.
    pub fn validate(&self) -> Result<()> {
        if self.kept == 0 || self.kept > self.of {
            bail!("keep ratio {}/{}: need 1 ≤ kept ≤ of", self.kept, self.of);
        }
        Ok(())
    }

    /// Examples kept of a candidate batch of `b`: `⌊b · kept / of⌋`, at
    /// least 1 and at most `b` (B = 8 at 1/4 keeps 2; B = 6 keeps 1).
    pub fn k(&self, b: usize) -> usize {
        (b * self.kept / self.of.max(1)).clamp(1, b.max(1))
    }
}

impl std::fmt::Display for KeepRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kept, self.of)
    }
}

impl std::str::FromStr for KeepRatio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("keep ratio {s:?}: expected kept/of, e.g. 1/4");
        let (a, b) = s.trim().split_once('/').ok_or_else(bad)?;
        let kept: usize = a.trim().parse().map_err(|_| bad())?;
        let of: usize = b.trim().parse().map_err(|_| bad())?;
        KeepRatio::new(kept, of).map_err(|e| e.to_string())
    }
}

/// A selector and its hyper-parameters (serialisable; part of artifact keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SelectorConfig {
    /// Plain training on the first `k` candidates.
    None,
    /// GREATS.
    Greats {
        /// Validation examples sampled per step (reference code: 2).
        n_val_per_step: usize,
        /// The AdamW learning rate the utility assumes; `None` = the step's
        /// learning rate (reference code). Linearised per LoRA weight as
        /// described at [`Greats`] and [`greats::adamw_weight_scale`].
        lr: Option<f64>,
    },
    /// UDS.
    Uds {
        /// Weight `α` of the inter-sample diversity, on the reference's
        /// embedding scale (see [`Uds`]); reference 1.5e-3 to 2.5e-3.
        alpha: f64,
        /// Rows of the bilinear projection (along time); reference 8.
        proj_rows: usize,
        /// Total embedding size (`proj_rows × columns`); reference 1024.
        proj_dim: usize,
        /// FIFO buffer capacity; reference 1024.
        buffer: usize,
        /// Candidates kept per step when the run does not fix `k`;
        /// reference 1 of 4.
        keep: KeepRatio,
    },
    /// Top-k loss.
    MaxLoss,
    /// Top-k gradient norm.
    GradNorm,
}

impl SelectorConfig {
    /// Default hyper-parameters of a selector kind.
    pub fn default_for(kind: SelectorKind) -> Self {
        match kind {
            SelectorKind::None => SelectorConfig::None,
            SelectorKind::Greats => SelectorConfig::Greats {
                n_val_per_step: 2,
                lr: None,
            },
            SelectorKind::Uds => SelectorConfig::Uds {
                alpha: 2e-3,
                proj_rows: 8,
                proj_dim: 1024,
                buffer: 1024,
                keep: KeepRatio::REFERENCE,
            },
            SelectorKind::MaxLoss => SelectorConfig::MaxLoss,
            SelectorKind::GradNorm => SelectorConfig::GradNorm,
        }
    }

    /// The kind of this configuration.
    pub fn kind(&self) -> SelectorKind {
        match self {
            SelectorConfig::None => SelectorKind::None,
            SelectorConfig::Greats { .. } => SelectorKind::Greats,
            SelectorConfig::Uds { .. } => SelectorKind::Uds,
            SelectorConfig::MaxLoss => SelectorKind::MaxLoss,
            SelectorConfig::GradNorm => SelectorKind::GradNorm,
        }
    }

    /// Examples trained per step out of `b` candidates when the run does not
    /// fix `k`: UDS's [`KeepRatio`], `max(1, B/2)` for the others (GREATS's
    /// reference code keeps half).
    pub fn default_k(&self, b: usize) -> usize {
        match self {
            SelectorConfig::Uds { keep, .. } => keep.k(b),
            _ => (b / 2).max(1),
        }
    }

    /// Checks the ranges a run needs before it starts (UDS's keep ratio,
    /// GREATS's validation examples per step); [`SelectorConfig::build`]
    /// checks the rest.
    pub fn validate(&self) -> Result<()> {
        match self {
            SelectorConfig::Uds { keep, .. } => keep.validate()?,
            SelectorConfig::Greats { n_val_per_step, .. } if *n_val_per_step == 0 => {
                bail!("greats: n_val_per_step must be at least 1")
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets UDS's keep ratio; other selectors are left unchanged.
    pub fn set_uds_keep(&mut self, ratio: KeepRatio) {
        if let SelectorConfig::Uds { keep, .. } = self {
            *keep = ratio;
        }
    }

    /// Sets GREATS's validation examples per step; other selectors are left
    /// unchanged.
    pub fn set_greats_val_per_step(&mut self, n: usize) {
        if let SelectorConfig::Greats { n_val_per_step, .. } = self {
            *n_val_per_step = n;
        }
    }

    /// True when the selector needs validation examples (GREATS).
    pub fn needs_validation(&self) -> bool {
        matches!(self, SelectorConfig::Greats { .. })
    }

    /// Builds the selector. `val` are the validation examples `(ids, label
    /// mask)` (GREATS only; must be non-empty for it); `seed` drives every
    /// random choice of the selector.
    pub fn build(
        &self,
        seed: u64,
        val: Vec<(Vec<u32>, Vec<u8>)>,
    ) -> Result<Box<dyn OnlineSelector>> {
        Ok(match self {
            SelectorConfig::None => Box::new(Regular),
            SelectorConfig::Greats { n_val_per_step, lr } => {
                Box::new(Greats::new(val, *n_val_per_step, *lr, seed)?)
            }
            SelectorConfig::Uds {
                alpha,
                proj_rows,
                proj_dim,
                buffer,
                keep,
            } => {
                keep.validate()?;
                Box::new(Uds::new(*alpha, *proj_rows, *proj_dim, *buffer, seed)?)
            }
            SelectorConfig::MaxLoss => Box::new(MaxLoss),
            SelectorConfig::GradNorm => Box::new(GradNorm),
        })
    }
}

/// Checks `1 ≤ k ≤ B`.
pub(crate) fn check_k(name: &str, k: usize, b: usize) -> Result<()> {
    if k == 0 || k > b {
        bail!("{name}: k must be in 1..={b} (the candidate batch size), got {k}");
    }
    Ok(())
}

/// Positions of the `k` largest scores, best first (ties: lower position
/// first; NaN ranks last).
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| {
        let s = scores[i];
        if s.is_nan() {
            f64::NEG_INFINITY
        } else {
            s
        }
    };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Seconds since `t0`.
pub(crate) fn since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}
