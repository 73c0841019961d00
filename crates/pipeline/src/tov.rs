//! ToV (Train on Validation), Methods A and B, as in ALGORITHMS.md.
//!
//! Round k trains θ_bas on the subset U for one epoch from θ, then θ_val from
//! θ_bas on the target's validation examples at a fraction of the LR, sweeps
//! the pool under both, and adds `φ_k(x) = mean_t F(Δ_t)` for every x ∉ U.
//! Method A (the paper's main method) continues the base chain from θ_bas,
//! so the base chain and its sweeps never see the target and are shared
//! (same artifact keys) by every target; Method B feeds θ_val back
//! (θ ← θ_val), so every round after the first depends on the target.

use anyhow::Result;
use dsel_basetrain::FinetuneConfig;
use dsel_select::Transform;
use dsel_store::Artifact;
use dsel_sweep::{SweepConfig, SweepResult};
use dsel_tokenize::TokenizedSet;
use dsel_valtune::ValtuneConfig;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::Pipeline;

/// Which way the base trajectory continues after each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TovVariant {
    /// Method A (the paper's main method): θ ← θ_bas; base checkpoints and
    /// sweeps are target independent.
    A,
    /// Method B (the paper's variant for the analysis): θ ← θ_val, the
    /// validation step is fed back into the base chain.
    B,
}

/// Everything that decides a ToV scoring run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TovConfig {
    /// Method A or B.
    pub variant: TovVariant,
    /// |U|: size of the random base-training subset (paper: 4096).
    pub u_size: usize,
    /// L: number of rounds (paper: 4).
    pub rounds: usize,
    /// Base fine-tune of one round (one epoch on U); `train.seed` is offset by the round index.
    pub base: FinetuneConfig,
    /// Validation fine-tune (paper: LR ratio 1/10, one epoch).
    pub valtune: ValtuneConfig,
    /// Per-token transform F.
    pub transform: Transform,
    /// Seed of U.
    pub seed: u64,
    /// Control-corrected scores: also fine-tune θ_bas the same way on a
    /// seeded random sample of the pool the size of the target (θ_ctl, a
    /// target-independent artifact but for the sample's size) and score by
    /// `φ(θ_bas → θ_val) − φ(θ_bas → θ_ctl)`, which removes the shift any
    /// short fine-tune gives every example (see [`control_sample`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
}

/// The control fine-tune's sample: `n` pool rows drawn with `seed`, from U
/// first (U is never scored, so training on it cannot favour or penalise a
/// candidate) and topped up from the candidates outside U when `n > |U|`.
/// Sorted.
pub fn control_sample(n_pool: usize, u: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x636f_6e74_726f_6c00);
    let mut out: Vec<usize> = if n <= u.len() {
        sample(&mut rng, u.len(), n)
            .into_iter()
            .map(|i| u[i])
            .collect()
    } else {
        let rest: Vec<usize> = (0..n_pool)
            .filter(|i| u.binary_search(i).is_err())
            .collect();
        let extra = (n - u.len()).min(rest.len());
        let mut v = u.to_vec();
        v.extend(
            sample(&mut rng, rest.len(), extra)
                .into_iter()
                .map(|i| rest[i]),
        );
        v
    };
    out.sort_unstable();
    out
}

/// Scores of a ToV run.
#[derive(Debug, Clone)]
pub struct TovScores {
    /// Mean over rounds of φ_k (NaN for examples in U, which are not scored).
    pub scores: Vec<f64>,
    /// φ_k per example, one vector per round.
    pub rounds: Vec<Vec<f64>>,
    /// The base-training subset U (sorted).
    pub u: Vec<usize>,
}

/// Padded tokens one validation fine-tune micro-batch may hold (memory bound:
/// BBH's 3-shot prompts reach 1024 tokens).
pub const VALTUNE_BATCH_TOKENS: usize = 2048;

/// Shrink the micro-batch (to a divisor of the configured one) so that
/// `micro_batch × longest ≤ budget`, raising gradient accumulation to keep
/// the same examples per optimizer step.
pub fn fit_micro_batch(cfg: &FinetuneConfig, longest: usize, budget: usize) -> FinetuneConfig {
    let mut out = cfg.clone();
    let mb = cfg.train.micro_batch;
    let fit = (budget / longest.max(1)).max(1);
    if fit < mb {
        let new_mb = (1..=fit).rev().find(|d| mb.is_multiple_of(*d)).unwrap_or(1);
        out.train.micro_batch = new_mb;
        out.train.grad_accum = cfg.train.grad_accum * (mb / new_mb);
    }
    out
}

/// The seeded subset U of `0..n` (sorted), of size `min(u_size, n - 1)`.
pub fn choose_u(n: usize, u_size: usize, seed: u64) -> Vec<usize> {
    let k = u_size.min(n.saturating_sub(1));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u = sample(&mut rng, n, k).into_vec();
    u.sort_unstable();
    u
}

/// Run ToV on a tokenized pool and target; returns per-example scores
/// (`None` when this process only did its part of the sweeps, see
/// [`crate::Work`]).
pub fn score(
    p: &mut Pipeline,
    pool: &Artifact,
    target: &Artifact,
    cfg: &TovConfig,
    sweep: &SweepConfig,
) -> Result<Option<TovScores>> {
    anyhow::ensure!(cfg.rounds >= 1, "ToV needs at least one round");
    let pool_set = TokenizedSet::open(pool.dir())?;
    let n = pool_set.len();
    anyhow::ensure!(n >= 2, "ToV needs a pool of at least 2 examples, got {n}");
    let u = choose_u(n, cfg.u_size, cfg.seed);
    let mut in_u = vec![false; n];
    for &i in &u {
        in_u[i] = true;
    }
    let offsets = pool_set.offsets().to_vec();
    let mask: Vec<u8> = {
        let mut m = Vec::with_capacity(offsets[n] as usize);
        for i in 0..n {
            m.extend_from_slice(pool_set.example(i).1);
        }
        m
    };
    let (longest_target, n_target) = {
        let t = TokenizedSet::open(target.dir())?;
        let longest = (0..t.len())
            .map(|i| t.example(i).0.len())
            .max()
            .unwrap_or(1);
        (longest, t.len())
    };
    let ctl_rows = if cfg.control {
        control_sample(n, &u, n_target, cfg.seed)
    } else {
        Vec::new()
    };
    let mut theta: Option<Artifact> = None;
    let mut rounds = Vec::with_capacity(cfg.rounds);
    for k in 0..cfg.rounds {
        let mut base_cfg = cfg.base.clone();
        base_cfg.train.seed = cfg.base.train.seed + k as u64;
        base_cfg.train.epochs = 1;
        let bas = p.finetune(
            "base-train",
            &format!("round {}", k + 1),
            pool,
            &u,
            theta.as_ref(),
            &base_cfg,
        )?;
        let val_cfg = fit_micro_batch(&base_cfg, longest_target, VALTUNE_BATCH_TOKENS);
        let val = p.valtune(
            &format!("round {}", k + 1),
            &bas,
            target,
            &val_cfg,
            &cfg.valtune,
        )?;
        let sb = p.sweep(
            &format!("base round {}", k + 1),
            pool,
            Some((&bas, &base_cfg.lora)),
            sweep,
        )?;
        let sv = p.sweep(
            &format!("val round {}", k + 1),
            pool,
            Some((&val, &base_cfg.lora)),
            sweep,
        )?;
        let sc = if cfg.control {
            // θ_ctl: the validation fine-tune's recipe on a random pool sample.
            let ctl_cfg = dsel_valtune::derive_config(&val_cfg, &cfg.valtune);
            let ctl = p.finetune(
                "tov-control",
                &format!("round {}", k + 1),
                pool,
                &ctl_rows,
                Some(&bas),
                &ctl_cfg,
            )?;
            p.sweep(
                &format!("control round {}", k + 1),
                pool,
                Some((&ctl, &base_cfg.lora)),
                sweep,
            )?
        } else {
            None
        };
        theta = Some(match cfg.variant {
            TovVariant::A => bas,
            TovVariant::B => val,
        });
        // A prepare step or shard worker did its part of the sweeps; the
        // next rounds' fine-tunes do not depend on them.
        let (Some(sb), Some(sv)) = (sb, sv) else {
            continue;
        };
        if cfg.control && sc.is_none() {
            continue;
        }
        let (sb, sv) = (SweepResult::open(sb.dir())?, SweepResult::open(sv.dir())?);
        let mut phi =
            dsel_select::tov_round(sv.logp()?, sb.logp()?, &mask, &offsets, cfg.transform);
        if let Some(sc) = sc {
            let sc = SweepResult::open(sc.dir())?;
            let phi_ctl =
                dsel_select::tov_round(sc.logp()?, sb.logp()?, &mask, &offsets, cfg.transform);
            for (a, c) in phi.iter_mut().zip(&phi_ctl) {
                *a -= c;
            }
        }
        for (i, s) in phi.iter_mut().enumerate() {
            if in_u[i] {
                *s = f64::NAN;
            }
        }
        let scored = phi.iter().filter(|s| !s.is_nan()).count();
        if scored > 0 && phi.iter().all(|s| s.is_nan() || *s == 0.0) {
            anyhow::bail!(
                "ToV round {}: θ_val equals θ_bas (every one of the {scored} candidates' \
                 per-token log-probs is unchanged, so every score is 0): the validation \
                 fine-tune did not move the adapter; check --lr, --val-lr-ratio and \
                 --val-epochs and that the target has label tokens",
                k + 1
            );
        }
        rounds.push(phi);
    }
    if rounds.len() < cfg.rounds {
        return Ok(None);
    }
    let scores = (0..n)
        .map(|i| rounds.iter().map(|r| r[i]).sum::<f64>() / cfg.rounds as f64)
        .collect();
    Ok(Some(TovScores { scores, rounds, u }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batch_fits_the_token_budget_and_keeps_the_step_size() {
        let mut cfg = FinetuneConfig {
            lora: dsel_model::LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: vec!["q".into()],
                seed: 0,
            },
            train: dsel_train::TrainConfig {
                micro_batch: 8,
                grad_accum: 1,
                ..Default::default()
            },
            save_epochs: false,
            group_by_length: false,
        };
        let f = fit_micro_batch(&cfg, 1024, 2048);
        assert_eq!((f.train.micro_batch, f.train.grad_accum), (2, 4));
        let f = fit_micro_batch(&cfg, 700, 2048);
        assert_eq!((f.train.micro_batch, f.train.grad_accum), (2, 4));
        let f = fit_micro_batch(&cfg, 200, 2048);
        assert_eq!((f.train.micro_batch, f.train.grad_accum), (8, 1));
        cfg.train.micro_batch = 6;
        let f = fit_micro_batch(&cfg, 600, 2048);
        assert_eq!((f.train.micro_batch, f.train.grad_accum), (3, 2));
    }

    #[test]
    fn u_is_seeded_sorted_and_leaves_candidates() {
        let a = choose_u(100, 10, 3);
        assert_eq!(a, choose_u(100, 10, 3));
        assert_ne!(a, choose_u(100, 10, 4));
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
        assert_eq!(choose_u(5, 10, 0).len(), 4);
    }

    #[test]
    fn control_sample_comes_from_u_first_then_the_rest() {
        let u = choose_u(100, 10, 3);
        let small = control_sample(100, &u, 4, 9);
        assert_eq!(small.len(), 4);
        assert!(small.iter().all(|i| u.contains(i)));
        assert_eq!(small, control_sample(100, &u, 4, 9), "seeded");
        let big = control_sample(100, &u, 25, 9);
        assert_eq!(big.len(), 25);
        assert!(u.iter().all(|i| big.contains(i)), "all of U, then 15 more");
        assert!(big.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            control_sample(12, &u[..2], 50, 1).len(),
            12,
            "capped by the pool"
        );
    }
}
