//! The run-folder contract `runs/<task>-<method>/` shared by every method:
//! `selection.jsonl` (selected examples, best first, canonical messages),
//! `scores.parquet` (every candidate's score) and `summary.json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Float64Builder, Int64Array, ListBuilder, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use dsel_ingest::Example;
use serde::{Deserialize, Serialize};

/// Record of one pipeline stage in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name (e.g. `sweep`).
    pub stage: String,
    /// What the stage was run on (e.g. `base round 1`).
    pub label: String,
    /// Artifact key.
    pub key: String,
    /// True when the artifact was reused from the cache.
    pub cache_hit: bool,
    /// Wall seconds spent (≈0 on a hit).
    pub seconds: f64,
}

/// `summary.json` of a selection run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Target task name or file.
    pub task: String,
    /// Method name.
    pub method: String,
    /// Model path.
    pub model: String,
    /// Pool mixture name or path.
    pub pool: String,
    /// Candidates after ingest and tokenization.
    pub pool_size: usize,
    /// Budget as given (`5%`, `500`).
    pub budget: String,
    /// Examples the budget asks for from this pool ([`crate::Budget::requested`]).
    #[serde(default)]
    pub requested: usize,
    /// Number of examples selected (less than `requested` when the pool, or
    /// the candidates the method can pick from, hold fewer; a warning is logged).
    pub selected: usize,
    /// Selected count per source.
    pub selected_by_source: BTreeMap<String, usize>,
    /// Pool count per source (to read shares against).
    pub pool_by_source: BTreeMap<String, usize>,
    /// Pool examples dropped before scoring, by reason (`ingest:<reason>`
    /// for records ingest could not use, `tokenize:<reason>` for examples
    /// tokenization skipped).
    #[serde(default)]
    pub pool_skipped: BTreeMap<String, u64>,
    /// Every stage with its key, wall time and whether it was a cache hit.
    pub stages: Vec<StageRecord>,
    /// Total wall seconds of the run.
    pub wall_seconds: f64,
    /// Seed of every random choice in the run.
    pub seed: u64,
    /// The method's full configuration.
    pub config: serde_json::Value,
}

/// One candidate's row in `scores.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRow {
    /// Example id.
    pub id: String,
    /// Example source.
    pub source: String,
    /// Sequence length in tokens.
    pub length: u32,
    /// Final score (NaN where the method does not score this example, e.g. U in ToV).
    pub score: f64,
    /// Per-round scores (ToV), empty otherwise.
    pub rounds: Vec<f64>,
    /// Position in the selection (0 = best), if selected.
    pub rank: Option<usize>,
}

/// Write `scores.parquet` atomically.
pub fn write_scores(path: &Path, rows: &[ScoreRow]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("length", DataType::UInt32, false),
        Field::new("score", DataType::Float64, false),
        Field::new("selected", DataType::Boolean, false),
        Field::new("rank", DataType::Int64, true),
        Field::new(
            "round_scores",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            false,
        ),
    ]));
    let mut rounds = ListBuilder::new(Float64Builder::new());
    for r in rows {
        rounds.values().append_slice(&r.rounds);
        rounds.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.source.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.length))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.score))),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.rank.is_some())),
        )),
        Arc::new(Int64Array::from_iter(
            rows.iter().map(|r| r.rank.map(|x| x as i64)),
        )),
        Arc::new(rounds.finish()),
    ];
    let batch = RecordBatch::try_new(schema, cols)?;
    dsel_store::write_parquet(path, &[batch])
}

#[derive(Serialize)]
struct SelectedLine<'a> {
    id: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    subtask: &'a str,
    rank: usize,
    score: Option<f64>,
    messages: &'a [dsel_ingest::Message],
}

/// Write `selection.jsonl` atomically: one line per selected example, best
/// first, `{"id","source","rank","score","messages":[{"role","content"}]}`
/// (loadable as tulu-style messages JSONL by this tool and others).
pub fn write_selection(path: &Path, examples: &[&Example], scores: &[f64]) -> Result<()> {
    let mut out = Vec::new();
    for (rank, (ex, &s)) in examples.iter().zip(scores).enumerate() {
        let line = SelectedLine {
            id: &ex.id,
            source: &ex.source,
            subtask: &ex.subtask,
            rank,
            score: s.is_finite().then_some(s),
            messages: &ex.messages,
        };
        serde_json::to_writer(&mut out, &line)?;
        out.push(b'\n');
    }
    dsel_store::atomic_write(path, &out)
}

/// Write `summary.json` atomically (pretty-printed).
pub fn write_summary(path: &Path, summary: &RunSummary) -> Result<()> {
    let text = serde_json::to_vec_pretty(summary).context("serialising summary")?;
    dsel_store::atomic_write(path, &text)
}

/// Count examples per source.
pub fn count_by_source<'a>(sources: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in sources {
        *m.entry(s.to_string()).or_default() += 1;
    }
    m
}
