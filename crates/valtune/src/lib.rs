//! `dsel-valtune`: ToV's validation fine-tune. From a base checkpoint θ_bas,
//! train the same LoRA adapter for one epoch on every validation example of
//! the target at `lr_ratio` × the base learning rate (paper: 1/10), giving
//! θ_val. Output layout as [`dsel_basetrain::finetune`].
//!
//! The rate is constant: no warmup and no decay, so every validation example
//! is applied at `lr_ratio × lr` (with the base run's 3% warmup, HF's linear
//! schedule gives the first step rate 0, and a target that fits one
//! micro-batch would leave θ_val = θ_bas and every ToV score 0).

use std::path::Path;

use anyhow::Result;
use dsel_basetrain::{FinetuneConfig, FinetuneReport};
use dsel_model::Model;
use dsel_tokenize::TokenizedSet;
use serde::{Deserialize, Serialize};

/// Bump when the computation changes.
pub const STAGE_VERSION: &str = "valtune-2";
/// The validation fine-tune's stage name in the artifact store.
pub const STAGE: &str = "valtune";

/// Validation fine-tune options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValtuneConfig {
    /// Fraction of the base learning rate (paper: 0.1).
    pub lr_ratio: f64,
    /// Epochs over the validation examples (paper: 1).
    pub epochs: usize,
}

impl Default for ValtuneConfig {
    fn default() -> Self {
        Self {
            lr_ratio: 0.1,
            epochs: 1,
        }
    }
}

/// The fine-tune configuration valtune derives from the base run's.
pub fn derive_config(base: &FinetuneConfig, v: &ValtuneConfig) -> FinetuneConfig {
    let mut cfg = base.clone();
    cfg.train.lr = base.train.lr * v.lr_ratio;
    cfg.train.epochs = v.epochs;
    cfg.train.warmup_ratio = 0.0;
    cfg.train.schedule = dsel_train::LrShape::Constant;
    cfg.save_epochs = false;
    cfg
}

/// Train θ_val from the base adapter `start` on every example of `target`.
pub fn valtune(
    model: &mut Model,
    start: &Path,
    target: &TokenizedSet,
    base: &FinetuneConfig,
    v: &ValtuneConfig,
    scratch: &Path,
    out: &Path,
) -> Result<FinetuneReport> {
    anyhow::ensure!(
        v.lr_ratio > 0.0 && v.lr_ratio.is_finite(),
        "valtune: lr_ratio must be positive, got {}",
        v.lr_ratio
    );
    anyhow::ensure!(
        v.epochs >= 1,
        "valtune: epochs must be at least 1 (0 leaves θ_val = θ_bas)"
    );
    anyhow::ensure!(
        base.train.lr > 0.0,
        "valtune: the base learning rate must be positive, got {}",
        base.train.lr
    );
    anyhow::ensure!(
        !target.is_empty(),
        "valtune: the target has no usable validation example"
    );
    let all: Vec<usize> = (0..target.len()).collect();
    dsel_basetrain::finetune(
        model,
        Some(start),
        target,
        &all,
        &derive_config(base, v),
        scratch,
        out,
    )
}
