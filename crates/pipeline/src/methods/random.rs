//! Random: a uniform sample of the pool (seeded).

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// Uniform random sample.
pub struct Random;

impl SelectionMethod for Random {
    fn select(&self, _: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        Ok(Some(Scored {
            scores: vec![f64::NAN; x.pool_set.len()],
            order: dsel_select::random_n(&x.all(), x.n_select, x.req.seed),
            rounds: Vec::new(),
            config: serde_json::json!({"max_len": x.req.values.max_len}),
        }))
    }
}
