//! BM25: each pool example's best lexical match against the target examples.

use anyhow::Result;

use super::{Inputs, Scored, SelectionMethod};
use crate::Pipeline;

/// BM25 (k1 1.2, b 0.75).
pub struct Bm25;

impl SelectionMethod for Bm25 {
    fn select(&self, p: &mut Pipeline, x: &Inputs) -> Result<Option<Scored>> {
        let (docs, queries) = x.texts(p)?;
        let s = dsel_baselines::Bm25::new(&docs).max_scores(&queries);
        Ok(Some(Scored::top(
            s,
            x,
            serde_json::json!({"k1": 1.2, "b": 0.75}),
        )))
    }
}
