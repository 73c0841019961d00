//! The simple selectors: Regular (no selection), Max-Loss, Grad-Norm.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};
use dsel_model::{Batch, Mode, Model};

use crate::ghost::{squared_norms, GradFactors, InnerProductMode};
use crate::{check_k, since, top_k, OnlineSelector, SelectContext, Selection, TrainGrads};

/// No selection: the first `k` candidates (the candidate batch is already a
/// seeded shuffle of the pool). Scores are all 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct Regular;

impl OnlineSelector for Regular {
    fn name(&self) -> &str {
        "none"
    }

    fn select(&mut self, _: &Model, c: &Batch, k: usize, _: &SelectContext) -> Result<Selection> {
        check_k("none", k, c.batch_size())?;
        Ok(Selection {
            chosen: (0..k).collect(),
            scores: vec![0.0; c.batch_size()],
            seconds: 0.0,
            train: None,
        })
    }
}

/// `[B]` per-example completion-only mean NLL without an autograd graph.
pub fn losses_inference(model: &Model, batch: &Batch) -> Result<Vec<f64>> {
    let lp = model.token_logprobs_inference(batch)?;
    let mask = batch.label_mask.to_dtype(lp.dtype())?;
    let num = (lp * &mask)?.sum(1)?;
    let den = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
    Ok((num / den)?.neg()?.to_dtype(DType::F64)?.to_vec1()?)
}

/// Top-`k` per-example loss from one no-grad forward.
#[derive(Debug, Default, Clone, Copy)]
pub struct MaxLoss;

impl OnlineSelector for MaxLoss {
    fn name(&self) -> &str {
        "max-loss"
    }

    fn select(&mut self, m: &Model, c: &Batch, k: usize, _: &SelectContext) -> Result<Selection> {
        let t0 = Instant::now();
        check_k("max-loss", k, c.batch_size())?;
        let scores = losses_inference(m, c)?;
        Ok(Selection {
            chosen: top_k(&scores, k),
            scores,
            seconds: since(t0),
            train: None,
        })
    }
}

/// Top-`k` norm of the per-example LoRA gradient (one forward + backward on
/// the candidates in the step's train mode; norms by the ghost identity or
/// materialised, see [`InnerProductMode::Auto`]). Returns the chosen
/// examples' training gradient from the same pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct GradNorm;

impl OnlineSelector for GradNorm {
    fn name(&self) -> &str {
        "grad-norm"
    }

    fn select(&mut self, m: &Model, c: &Batch, k: usize, ctx: &SelectContext) -> Result<Selection> {
        let t0 = Instant::now();
        check_k("grad-norm", k, c.batch_size())?;
        let f = GradFactors::compute(
            m,
            c,
            Mode::Train {
                dropout_seed: ctx.dropout_seed,
            },
        )?;
        let sq: Tensor = squared_norms(&f, InnerProductMode::Auto)?;
        let scores: Vec<f64> = sq
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| v.max(0.0).sqrt())
            .collect();
        let chosen = top_k(&scores, k);
        let seconds = since(t0);
        let (loss, grads) = f.mean_grad(&chosen)?;
        Ok(Selection {
            chosen,
            scores,
            seconds,
            train: Some(TrainGrads { loss, grads }),
        })
    }
}
