//! Max-Uncertainty: ψ of the base model's per-token predictions (ALGORITHMS.md).

use anyhow::Result;
use dsel_sweep::SweepResult;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// Max-Uncertainty under the base model.
pub struct MaxUncertainty;

impl SelectionMethod for MaxUncertainty {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let Some(sw) = p.sweep("base model", x.pool_tok, None, &x.req.sweep)? else {
            return Ok(None);
        };
        let sw = SweepResult::open(sw.dir())?;
        let mask: Vec<u8> = (0..x.pool_set.len())
            .flat_map(|i| x.pool_set.example(i).1.iter().copied())
            .collect();
        let psi = dsel_select::max_uncertainty(sw.logp()?, &mask, x.pool_set.offsets());
        Ok(Some(Scored::top(
            psi,
            x,
            serde_json::json!({"sweep": x.req.sweep, "max_len": x.req.values.max_len}),
        )))
    }
}
