//! RDS: cosine of last-token hidden states, max over the target's subtasks
//! of the mean over each subtask.

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// Representation-based data selection.
pub struct Rds;

impl SelectionMethod for Rds {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let Some(s) = crate::baselines::rds_scores(p, x.pool_tok, x.target_tok, &x.req.sweep)?
        else {
            return Ok(None);
        };
        Ok(Some(Scored::top(
            s,
            x,
            serde_json::json!({"max_len": x.req.values.max_len}),
        )))
    }
}
