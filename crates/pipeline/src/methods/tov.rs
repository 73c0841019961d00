//! ToV, Train on Validation (ALGORITHMS.md): the per-token loss change of a
//! validation fine-tune, length-binned, Score+Random or score-only. Method A
//! (`tov`) and B (`tov-b`).

use anyhow::Result;
use dsel_basetrain::FinetuneConfig;
use dsel_train::{AdamWConfig, TrainConfig};

use super::{BinBy, Inputs, Preset, Scored, SelectRequest, SelectionMethod, SelectionRule};
use crate::tov::{self, TovConfig, TovVariant};
use crate::Pipeline;

/// ToV with the given variant.
pub struct Tov(pub TovVariant);

impl SelectionMethod for Tov {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let (req, n) = (x.req, x.pool_set.len());
        let v = &req.values;
        let cfg = TovConfig {
            variant: self.0,
            u_size: v.u_size,
            rounds: v.rounds,
            base: FinetuneConfig {
                lora: v.lora.clone(),
                train: TrainConfig {
                    epochs: 1,
                    lr: v.lr,
                    warmup_ratio: 0.03,
                    micro_batch: v.micro_batch,
                    grad_accum: v.grad_accum,
                    seed: req.seed,
                    shuffle: true,
                    max_grad_norm: Some(1.0),
                    checkpoint_every_steps: Some(8),
                    adam: AdamWConfig::default(),
                    schedule: Default::default(),
                },
                save_epochs: false,
                group_by_length: req.preset == Preset::Cpu,
            },
            valtune: req.valtune.clone(),
            transform: req.transform,
            seed: req.seed,
            control: req.control,
        };
        let Some(s) = tov::score(p, x.pool_tok, x.target_tok, &cfg, &req.sweep)? else {
            return Ok(None);
        };
        let scored: Vec<usize> = (0..n).filter(|i| s.u.binary_search(i).is_err()).collect();
        let bin_lengths: Vec<u32> = match req.bin_by {
            BinBy::Completion => x.pool_set.index.iter().map(|r| r.n_labels).collect(),
            BinBy::Sequence => x.lengths(),
        };
        let order = match req.rule {
            SelectionRule::ScoreRandom => dsel_select::score_plus_random(
                &s.scores,
                &bin_lengths,
                &scored,
                &s.u,
                x.n_select,
                req.n_bins,
                req.seed,
            ),
            SelectionRule::ScoreOnly => {
                dsel_select::binned_top(&s.scores, &bin_lengths, &scored, x.n_select, req.n_bins)
            }
        };
        let config = serde_json::json!({"tov": cfg, "rule": req.rule, "n_bins": req.n_bins, "bin_by": req.bin_by, "sweep": req.sweep,
                                        "max_len": req.values.max_len});
        Ok(Some(Scored {
            scores: s.scores,
            order,
            rounds: s.rounds,
            config,
        }))
    }

    fn shortfall_hint(&self) -> &'static str {
        ", or the candidates outside U plus U's random half,"
    }

    fn takes_control(&self) -> bool {
        true
    }

    fn validate(&self, req: &SelectRequest) -> Result<()> {
        anyhow::ensure!(
            req.valtune.epochs >= 1,
            "--val-epochs must be at least 1: 0 epochs leaves θ_val = θ_bas and every ToV score 0"
        );
        anyhow::ensure!(
            req.valtune.lr_ratio.is_finite() && req.valtune.lr_ratio > 0.0,
            "--val-lr-ratio must be positive, got {}: the validation fine-tune would not move and every ToV score would be 0",
            req.valtune.lr_ratio
        );
        anyhow::ensure!(req.values.rounds >= 1, "--rounds must be at least 1, got 0");
        Ok(())
    }
}
