//! Grad-norm: the largest per-example LoRA gradient norm at a fresh adapter.

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// Largest gradient norm.
pub struct GradNorm;

impl SelectionMethod for GradNorm {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let (lora, sweep) = (&x.req.values.lora, &x.req.sweep);
        let Some(norms) = crate::baselines::grad_norms(p, x.pool_tok, lora, sweep)? else {
            return Ok(None);
        };
        Ok(Some(Scored::top(
            norms,
            x,
            serde_json::json!({"lora": lora, "max_len": x.req.values.max_len}),
        )))
    }
}
