//! DSIR: hashed n-gram importance weights, importance resampling (seeded).

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// DSIR over 10,000 hashed uni- and bigram buckets.
pub struct Dsir;

impl SelectionMethod for Dsir {
    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let (docs, queries) = x.texts(p)?;
        let d = dsel_baselines::Dsir::fit(&queries, &docs, 10_000);
        let w = d.log_weights(&docs);
        let order = dsel_baselines::importance_resample(&w, x.n_select, x.req.seed);
        Ok(Some(Scored {
            scores: w,
            order,
            rounds: Vec::new(),
            config: serde_json::json!({"buckets": 10_000, "ngrams": [1, 2]}),
        }))
    }
}
