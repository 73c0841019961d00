//! GREATS: greedy selection maximising the approximate drop of validation
//! loss after the step (Wang et al., NeurIPS 2024).

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use dsel_model::rng::hash_words;
use dsel_model::{Batch, Mode, Model};

use crate::ghost::{linear_cross_gram, GradFactors, InnerProductMode};
use crate::{check_k, since, OnlineSelector, SelectContext, Selection, TrainGrads};

/// Greedy GREATS selection. `t[i]` is candidate `i`'s mean inner product
/// with the validation gradients, `gram` the `B × B` row-major candidate
/// Gram matrix, `c` the coefficient of the step on the *summed* gradients of
/// the chosen, `Δθ = −c Σ_{i∈S} g_i` (for a step on their mean with
/// SGD-equivalent rate `η`, `c = η / k`; see [`Greats`]). The
/// second-order utility `c Σ_S t_i − c² Σ_{i<j∈S} G_ij` (self terms
/// dropped, as in the reference) is maximised greedily:
///
/// ```text
/// s = c t;  repeat k times: j = argmax s (ties → lowest index);
///           pick j;  s -= c² G[j, :];  s[j] = −∞
/// ```
///
/// Implemented on `s/c` (`s = t`, `s -= c G[j, :]`), which orders the
/// candidates identically for `c > 0` and still ranks by `t` when `c = 0`
/// (the first warmup step). Returns the picks in order. With `G = 0` this
/// is the top-`k` of `t`.
pub fn greedy_select(t: &[f64], gram: &[f64], c: f64, k: usize) -> Result<Vec<usize>> {
    let b = t.len();
    if !(c.is_finite() && c >= 0.0) {
        bail!("greedy_select: the step coefficient must be finite and >= 0, got {c}");
    }
    if gram.len() != b * b {
        bail!(
            "greedy_select: Gram matrix has {} entries, expected {b}×{b}",
            gram.len()
        );
    }
    check_k("greedy_select", k, b)?;
    let mut s: Vec<f64> = t
        .iter()
        .map(|&v| if v.is_nan() { f64::NEG_INFINITY } else { v })
        .collect();
    let mut taken = vec![false; b];
    let mut chosen = Vec::with_capacity(k);
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for i in 0..b {
            if taken[i] {
                continue;
            }
            match best {
                None => best = Some(i),
                Some(j) if s[i] > s[j] => best = Some(i),
                _ => {}
            }
        }
        let Some(j) = best else { break };
        taken[j] = true;
        chosen.push(j);
        for i in 0..b {
            let g = gram[j * b + i];
            if g.is_finite() {
                s[i] -= c * g;
            }
        }
        s[j] = f64::NEG_INFINITY;
    }
    Ok(chosen)
}

/// Adam's effective per-coordinate step on one LoRA weight, as a multiple
/// of the learning rate: `sqrt(n) / ρ`, where `gram` is the `B × B`
/// (row-major) Gram matrix of the candidates' gradients of that weight
/// (`n` coordinates) and
///
/// ```text
/// ρ² = mean_i G_ii / k + (1 − 1/k) · mean_{i≠j} G_ij
/// ```
///
/// is the expected squared norm of the weight's mean gradient
/// `ḡ_S = (1/k) Σ_{i∈S} g_i` over a uniformly random `k`-subset `S` of the
/// candidates (exactly `‖ḡ‖²` of the whole batch when `k = B`); so
/// `ρ / sqrt(n)` is the RMS of one coordinate of the gradient the step will
/// see. 0 when that gradient vanishes (Adam does not move such coordinates,
/// e.g. LoRA's `A` at the first step, while `B = 0`).
///
/// **The approximation** (used by [`Greats`]). GREATS's Taylor expansion
/// needs the step as a linear map of the chosen gradients. AdamW's step is
/// `−lr · m̂ / (sqrt(v̂) + ε)` per coordinate, about `lr` in size whatever
/// the gradient's scale (exactly `lr · sign(ḡ)` at the first step, where
/// `m̂ = ḡ` and `v̂ = ḡ²`; `|Δ| ≲ lr` later, Kingma & Ba §2.1): SGD with
/// the per-coordinate rate `lr / sqrt(v̂)`. We replace `sqrt(v̂)` by one
/// number per LoRA weight matrix, the RMS coordinate of that weight's
/// gradient, `ρ / sqrt(n)`, so the linearised step `−lr (sqrt(n)/ρ) ḡ_S`
/// has AdamW's length `lr · sqrt(n)` on every weight. Why: the selector
/// does not see the optimizer state, and ghost inner products are plain
/// Frobenius products per weight matrix, so a per-coordinate
/// preconditioner cannot enter them, but a per-weight scalar can (it
/// weights that weight's inner products). One scalar for all weights
/// instead would let the weights with the largest gradients dominate,
/// where AdamW moves every weight by about `lr` per coordinate. Measured on
/// stories260K with a fresh LoRA (test
/// `greats_first_order_term_predicts_a_real_adamw_step`): the predicted
/// first-order drop of the validation loss is 2.0× the real AdamW step's
/// (sign-like steps spend length on a weight's small coordinates too), 4.4×
/// with one scalar for all weights, 0.19× with the reference's raw `lr` on
/// the summed loss. Dropped: `ε`
/// (negligible unless gradients are ~1e-8), weight decay (0 here) and
/// momentum (the past steps' `m` does not depend on the choice; the current
/// gradient enters `m` with weight `1 − β₁` and is carried into later steps
/// with weights summing to about 1, and like the reference we count its
/// whole effect at once).
pub fn adamw_weight_scale(gram: &[f64], b: usize, k: usize, n: usize) -> f64 {
    if b == 0 || k == 0 || gram.len() != b * b {
        return 0.0;
    }
    let diag = (0..b).map(|i| gram[i * b + i]).sum::<f64>() / b as f64;
    let off = if b > 1 {
        let total: f64 = gram.iter().sum();
        (total - diag * b as f64) / (b * (b - 1)) as f64
    } else {
        0.0
    };
    let kf = k.min(b) as f64;
    let rho2 = diag / kf + (1.0 - 1.0 / kf) * off;
    if !(rho2.is_finite() && rho2 > 0.0) {
        return 0.0;
    }
    (n as f64).sqrt() / rho2.sqrt()
}

/// The GREATS selector.
///
/// Per step: per-example LoRA gradients of the candidates (one forward +
/// backward in the step's train mode, so with its dropout) and of
/// `n_val_per_step` validation examples sampled with `(seed, step)` (eval
/// mode); per LoRA weight `w`, `t_i^w` = mean over those of `⟨g_i, g_v⟩`
/// and `G_ij^w = ⟨g_i, g_j⟩` restricted to `w`, by [`linear_cross_gram`]
/// ([`InnerProductMode::Auto`]: ghost where `2·T₁·T₂ < p·q`).
///
/// **The step actually taken.** The step is AdamW with rate `lr` (the
/// step's, or the configured one) on the *mean* loss of the `k` chosen,
/// whose gradient is `ḡ_S = (1/k) Σ_{i∈S} g_i`; linearised
/// ([`adamw_weight_scale`]) it moves weight `w` by `−lr · a_w · ḡ_S^w` with
/// `a_w = sqrt(n_w)/ρ_w`. The validation-loss drop to second order (Hessian
/// replaced by the identity, as in the reference) is then
///
/// ```text
/// U(S) = (lr/k) Σ_{i∈S} t̃_i − ½ (lr/k)² Σ_{i,j∈S} G̃_ij,
/// t̃_i = Σ_w a_w t_i^w,   G̃_ij = Σ_w a_w² G_ij^w,
/// ```
///
/// so the first-order term of each pick carries `lr/k` and the pairwise
/// term `(lr/k)²` — [`greedy_select`]`(t̃, G̃, lr/k, k)`, which like the
/// reference drops the self terms `½ (lr/k)² G̃_ii` and subtracts each pair
/// once. (The reference uses `lr · t` and `lr² · G`: SGD on the *summed*
/// loss, off by `1/k` and by Adam's normalisation.) The gradient of the chosen examples' mean loss
/// comes back in [`Selection::train`]; [`Selection::scores`] are the plain
/// `t_i = Σ_w t_i^w`.
pub struct Greats {
    val: Vec<(Vec<u32>, Vec<u8>)>,
    n_val_per_step: usize,
    lr: Option<f64>,
    seed: u64,
    /// How inner products are computed (default [`InnerProductMode::Auto`]).
    pub mode: InnerProductMode,
}

impl Greats {
    /// A GREATS selector over the validation examples `val` (`(ids, label
    /// mask)`), sampling `n_val_per_step` of them per step; `lr` is the
    /// AdamW learning rate the utility assumes (`None`: the step's).
    pub fn new(
        val: Vec<(Vec<u32>, Vec<u8>)>,
        n_val_per_step: usize,
        lr: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        if val.is_empty() {
            bail!("greats: needs at least one validation example");
        }
        if n_val_per_step == 0 {
            bail!("greats: n_val_per_step must be at least 1");
        }
        if let Some((i, _)) = val
            .iter()
            .enumerate()
            .find(|(_, (ids, m))| ids.is_empty() || ids.len() != m.len())
        {
            bail!("greats: validation example {i} is empty or its label mask has the wrong length");
        }
        if let Some(l) = lr {
            if !(l.is_finite() && l >= 0.0) {
                bail!("greats: lr must be finite and >= 0, got {l}");
            }
        }
        Ok(Greats {
            val,
            n_val_per_step,
            lr,
            seed,
            mode: InnerProductMode::Auto,
        })
    }

    /// Indices of the validation examples used at `step`: a seeded partial
    /// Fisher–Yates draw of `min(n_val_per_step, n)` distinct examples.
    pub fn val_indices(&self, step: u64) -> Vec<usize> {
        let n = self.val.len();
        let m = self.n_val_per_step.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..m {
            let h = hash_words(self.seed, &[0x4752_4541, step, i as u64]);
            let j = i + (h % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(m);
        idx
    }
}

impl OnlineSelector for Greats {
    fn name(&self) -> &str {
        "greats"
    }

    fn select(&mut self, m: &Model, c: &Batch, k: usize, ctx: &SelectContext) -> Result<Selection> {
        let t0 = Instant::now();
        let b = c.batch_size();
        check_k("greats", k, b)?;
        let fc = GradFactors::compute(
            m,
            c,
            Mode::Train {
                dropout_seed: ctx.dropout_seed,
            },
        )?;
        let vi = self.val_indices(ctx.step);
        let seqs: Vec<(&[u32], &[u8])> = vi
            .iter()
            .map(|&i| (self.val[i].0.as_slice(), self.val[i].1.as_slice()))
            .collect();
        let vb = Batch::new(&seqs, m.device())?;
        let fv = GradFactors::compute(m, &vb, Mode::Eval)?;
        // Per LoRA weight: the B × B candidate Gram and the B mean validation
        // inner products, stacked so that they come to the host at once.
        let (mut grams, mut tvs) = (Vec::new(), Vec::new());
        for (f1, f2) in fc.weights.iter().zip(&fv.weights) {
            grams.push(linear_cross_gram(f1, f1, self.mode)?.to_dtype(DType::F64)?);
            tvs.push(
                linear_cross_gram(f1, f2, self.mode)?
                    .to_dtype(DType::F64)?
                    .mean(1)?,
            );
        }
        let grams: Vec<Vec<f64>> = Tensor::stack(&grams, 0)?
            .reshape((grams.len(), b * b))?
            .to_vec2()?;
        let tvs: Vec<Vec<f64>> = Tensor::stack(&tvs, 0)?.to_vec2()?;
        let sizes: Vec<usize> = m
            .lora_params()
            .iter()
            .map(|(_, v)| v.elem_count())
            .collect();
        if sizes.len() != grams.len() {
            bail!(
                "greats: {} LoRA parameters, {} gradient factors",
                sizes.len(),
                grams.len()
            );
        }
        let mut t = vec![0f64; b];
        let mut t_adam = vec![0f64; b];
        let mut gram_adam = vec![0f64; b * b];
        for ((gw, tw), &n) in grams.iter().zip(&tvs).zip(&sizes) {
            let a = adamw_weight_scale(gw, b, k, n);
            for i in 0..b {
                t[i] += tw[i];
                t_adam[i] += a * tw[i];
            }
            for (acc, &g) in gram_adam.iter_mut().zip(gw) {
                *acc += a * a * g;
            }
        }
        let lr = self.lr.unwrap_or(ctx.lr);
        let chosen = greedy_select(&t_adam, &gram_adam, lr / k as f64, k)?;
        let scores = t;
        let seconds = since(t0);
        let (loss, grads) = fc.mean_grad(&chosen)?;
        Ok(Selection {
            chosen,
            scores,
            seconds,
            train: Some(TrainGrads { loss, grads }),
        })
    }
}
