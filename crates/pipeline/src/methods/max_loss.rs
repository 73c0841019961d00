//! Max-loss: the highest completion-only loss under the base model.

use anyhow::Result;
use dsel_sweep::SweepResult;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// Highest base-model loss.
pub struct MaxLoss;

impl SelectionMethod for MaxLoss {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let Some(sw) = p.sweep("base model", x.pool_tok, None, &x.req.sweep)? else {
            return Ok(None);
        };
        let loss: Vec<f64> = SweepResult::open(sw.dir())?
            .loss()?
            .iter()
            .map(|&v| v as f64)
            .collect();
        Ok(Some(Scored::top(
            loss,
            x,
            serde_json::json!({"sweep": x.req.sweep, "max_len": x.req.values.max_len}),
        )))
    }
}
