//! LESS: projected Adam-preconditioned LoRA gradients of the pool (a
//! reusable datastore) matched to the target's; also writes LESS's
//! `sorted.csv`.

use std::path::Path;

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// LESS with the preset's settings.
pub struct Less;

impl SelectionMethod for Less {
    fn pool_wide(&self) -> bool {
        true
    }

    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let cfg = x.req.preset.less(x.req.seed);
        let Some(s) = crate::less::score(p, x.pool_tok, x.target_tok, &cfg)? else {
            return Ok(None);
        };
        Ok(Some(Scored::top(
            s.scores,
            x,
            serde_json::json!({"less": cfg, "report": s.report, "max_len": x.req.values.max_len}),
        )))
    }

    fn write_extra(&self, out: &Path, x: &Inputs, scores: &[f64]) -> Result<()> {
        let ids: Vec<String> = x.pool_set.index.iter().map(|r| r.id.clone()).collect();
        crate::less::write_sorted_csv(&out.join("sorted.csv"), &ids, scores)
    }
}
