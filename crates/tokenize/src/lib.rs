//! `dsel-tokenize`: conversations → token ids with completion-only label masks.
//!
//! Each example is rendered to text segments by a [`ChatFormat`] (the model's
//! chat template, or LESS's tulu format), each segment is tokenized on its own
//! (no special tokens added) and the pieces are concatenated, so the label
//! tokens decode back to exactly the assistant text. Sequences longer than
//! `max_len` are cut from the right; an example left with no label token is
//! skipped and counted.
//!
//! The on-disk layout (see ARCHITECTURE.md) is flat: `tokens.npy` (u32),
//! `label_mask.npy` (u8), `offsets.npy` (u64, n+1) and `index.parquet`.

pub mod format;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use dsel_ingest::Example;
use dsel_store::NpyArray;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

pub use format::{ChatFormat, FormatError, Formatter, Segment};

/// The tokenize stage's name in the artifact store.
pub const STAGE: &str = "tokenize";
/// Version of the tokenize stage's output (token, mask and offset arrays,
/// index table).
pub const STAGE_VERSION: &str = "tokenize-1";

/// How a sequence longer than `max_len` is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Truncation {
    /// Keep the first `max_len` tokens (LESS, open-instruct). An example
    /// whose prompt fills the window has no label left and is skipped.
    Right,
    /// When the prompt pushes the completion out of the window, drop tokens
    /// from the prompt's start (after BOS) so the completion starts at
    /// `max(max_len/2, max_len − completion length)`, then cut from the right:
    /// every example keeps at least half a window of completion. The
    /// default: no example is lost to a long prompt (at 256 tokens, right
    /// truncation skipped 16% of the default pool).
    #[default]
    KeepCompletion,
}

/// Options of the tokenization stage (part of its artifact key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeConfig {
    /// Maximum sequence length in tokens.
    pub max_len: usize,
    /// Token id prepended to every sequence (e.g. Llama's `<s>`), if any.
    pub bos_id: Option<u32>,
    /// How longer sequences are cut.
    #[serde(default)]
    pub truncation: Truncation,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a label (predicted and scored), else 0.
    pub labels: Vec<u8>,
    /// True when the sequence was cut to `max_len`.
    pub truncated: bool,
}

/// Why an example was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No label token (no assistant turn, or an empty one).
    NoLabels,
    /// Every label token fell beyond `max_len`.
    NoLabelsAfterTruncation,
    /// The chat format could not render the conversation.
    Format(String),
}

impl Skip {
    /// Short reason used as a counter name in manifests.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::NoLabels => "no_labels",
            Skip::NoLabelsAfterTruncation => "no_labels_after_truncation",
            Skip::Format(_) => "format_error",
        }
    }
}

/// Tokenize one conversation.
pub fn encode(
    tok: &Tokenizer,
    fmt: &Formatter,
    ex: &Example,
    cfg: &TokenizeConfig,
) -> Result<Encoded, Skip> {
    let segments = fmt
        .segments(&ex.messages)
        .map_err(|e| Skip::Format(e.to_string()))?;
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    if let Some(bos) = cfg.bos_id {
        ids.push(bos);
        labels.push(0);
    }
    for seg in &segments {
        let enc = tok
            .encode_fast(seg.text.as_str(), false)
            .map_err(|e| Skip::Format(format!("tokenizer: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        labels.extend(std::iter::repeat_n(seg.label as u8, enc.get_ids().len()));
    }
    // The first token is never predicted.
    if let Some(first) = labels.first_mut() {
        *first = 0;
    }
    if !labels.contains(&1) {
        return Err(Skip::NoLabels);
    }
    let truncated = ids.len() > cfg.max_len;
    if truncated && cfg.truncation == Truncation::KeepCompletion {
        let first_label = labels.iter().position(|&l| l == 1).unwrap_or(0);
        let completion = ids.len() - first_label;
        let start = (cfg.max_len / 2).max(cfg.max_len.saturating_sub(completion));
        if first_label > start {
            let keep_from = usize::from(cfg.bos_id.is_some());
            let drop = first_label - start;
            ids.drain(keep_from..keep_from + drop);
            labels.drain(keep_from..keep_from + drop);
            // The new first token is never predicted.
            if let Some(first) = labels.first_mut() {
                *first = 0;
            }
        }
    }
    if truncated {
        ids.truncate(cfg.max_len);
        labels.truncate(cfg.max_len);
        if !labels.contains(&1) {
            return Err(Skip::NoLabelsAfterTruncation);
        }
    }
    Ok(Encoded {
        ids,
        labels,
        truncated,
    })
}

/// Index row of a tokenized example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRow {
    /// Position of the example in the ingested table.
    pub row: u64,
    /// Stable example id.
    pub id: String,
    /// Source dataset/task.
    pub source: String,
    /// Target subtask ("" for pool data).
    pub subtask: String,
    /// Sequence length in tokens.
    pub n_tokens: u32,
    /// Number of label tokens.
    pub n_labels: u32,
}

/// Counts recorded in the tokenize manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeReport {
    /// Examples read.
    pub examples_in: u64,
    /// Examples kept.
    pub examples_out: u64,
    /// Kept examples cut to `max_len`.
    pub truncated: u64,
    /// Skipped examples by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Total tokens kept.
    pub tokens: u64,
    /// Total label tokens kept.
    pub label_tokens: u64,
    /// Throughput of the tokenization itself.
    pub tokens_per_second: f64,
}

/// Tokenize `examples` in parallel and write the flat arrays and index into `dir`.
pub fn tokenize_to_dir(
    tok: &Tokenizer,
    fmt: &Formatter,
    examples: &[Example],
    cfg: &TokenizeConfig,
    dir: &Path,
) -> Result<TokenizeReport> {
    let start = std::time::Instant::now();
    let encoded: Vec<Result<Encoded, Skip>> = examples
        .par_iter()
        .map(|ex| encode(tok, fmt, ex, cfg))
        .collect();
    let mut report = TokenizeReport {
        examples_in: examples.len() as u64,
        ..Default::default()
    };
    let mut tokens = Vec::new();
    let mut mask = Vec::new();
    let mut offsets = vec![0u64];
    let mut index = Vec::new();
    let mut first_format_error: Option<(String, String)> = None;
    for (row, (ex, enc)) in examples.iter().zip(encoded).enumerate() {
        match enc {
            Ok(e) => {
                report.truncated += e.truncated as u64;
                let n_labels = e.labels.iter().map(|&l| l as u32).sum::<u32>();
                report.label_tokens += n_labels as u64;
                index.push(IndexRow {
                    row: row as u64,
                    id: ex.id.clone(),
                    source: ex.source.clone(),
                    subtask: ex.subtask.clone(),
                    n_tokens: e.ids.len() as u32,
                    n_labels,
                });
                tokens.extend_from_slice(&e.ids);
                mask.extend_from_slice(&e.labels);
                offsets.push(tokens.len() as u64);
            }
            Err(skip) => {
                if let Skip::Format(msg) = &skip {
                    first_format_error.get_or_insert((ex.id.clone(), msg.clone()));
                }
                *report.skipped.entry(skip.reason().to_string()).or_default() += 1;
            }
        }
    }
    if let Some((id, msg)) = first_format_error {
        tracing::warn!("example {id} could not be formatted: {msg} (skipped and counted)");
    }
    report.examples_out = index.len() as u64;
    report.tokens = tokens.len() as u64;
    report.tokens_per_second = report.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
    if index.is_empty() {
        let reasons: Vec<String> = report
            .skipped
            .iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        anyhow::bail!(
            "no example survived tokenization: {} read, all skipped ({}; no_labels = empty \
             completion, no_labels_after_truncation = the prompt fills the {}-token window: \
             raise the max length or use --truncation keep-completion)",
            report.examples_in,
            reasons.join(", "),
            cfg.max_len
        );
    }
    dsel_store::write_npy(dir.join("tokens.npy"), &[tokens.len()], &tokens)?;
    dsel_store::write_npy(dir.join("label_mask.npy"), &[mask.len()], &mask)?;
    dsel_store::write_npy(dir.join("offsets.npy"), &[offsets.len()], &offsets)?;
    dsel_store::write_parquet(dir.join("index.parquet"), &[index_batch(&index)?])?;
    Ok(report)
}

fn index_batch(index: &[IndexRow]) -> Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("subtask", DataType::Utf8, false),
        Field::new("n_tokens", DataType::UInt32, false),
        Field::new("n_labels", DataType::UInt32, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(index.iter().map(|r| r.row))),
        Arc::new(StringArray::from_iter_values(
            index.iter().map(|r| r.id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            index.iter().map(|r| r.source.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            index.iter().map(|r| r.subtask.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(
            index.iter().map(|r| r.n_tokens),
        )),
        Arc::new(UInt32Array::from_iter_values(
            index.iter().map(|r| r.n_labels),
        )),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// A tokenized set opened from disk (arrays memory-mapped).
pub struct TokenizedSet {
    tokens: NpyArray,
    mask: NpyArray,
    offsets: Vec<u64>,
    /// One row per example, in storage order.
    pub index: Vec<IndexRow>,
}

impl TokenizedSet {
    /// Open the arrays written by [`tokenize_to_dir`] in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let tokens = NpyArray::open(dir.join("tokens.npy"))?;
        let mask = NpyArray::open(dir.join("label_mask.npy"))?;
        let offsets_arr = NpyArray::open(dir.join("offsets.npy"))?;
        let offsets = offsets_arr.as_slice::<u64>()?.to_vec();
        let index = read_index(&dir.join("index.parquet"))?;
        let total = tokens.as_slice::<u32>()?.len();
        anyhow::ensure!(
            offsets.len() == index.len() + 1
                && offsets.last().copied() == Some(total as u64)
                && mask.as_slice::<u8>()?.len() == total,
            "{}: tokenized arrays are inconsistent (offsets {}, index {}, tokens {})",
            dir.display(),
            offsets.len(),
            index.len(),
            total
        );
        Ok(Self {
            tokens,
            mask,
            offsets,
            index,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the set holds no example.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Token ids and label mask of example `i`.
    pub fn example(&self, i: usize) -> (&[u32], &[u8]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        // Types and sizes were checked in `open`.
        let toks = self.tokens.as_slice::<u32>().expect("checked in open");
        let mask = self.mask.as_slice::<u8>().expect("checked in open");
        (&toks[a..b], &mask[a..b])
    }

    /// Start offsets of each example in the flat arrays (n+1 entries).
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }
}

/// Read `index.parquet`.
pub fn read_index(path: &Path) -> Result<Vec<IndexRow>> {
    let batches = dsel_store::read_parquet(path)?;
    let mut rows = Vec::new();
    for b in batches {
        let col = |name: &str| -> Result<&ArrayRef> {
            b.column_by_name(name)
                .with_context(|| format!("{}: missing column {name:?}", path.display()))
        };
        let get_u64 = col("row")?
            .as_any()
            .downcast_ref::<UInt64Array>()
            .context("row: not u64")?;
        let id = col("id")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("id: not utf8")?;
        let source = col("source")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("source: not utf8")?;
        let subtask = col("subtask")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("subtask: not utf8")?;
        let n_tokens = col("n_tokens")?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .context("n_tokens: not u32")?;
        let n_labels = col("n_labels")?
            .as_any()
            .downcast_ref::<UInt32Array>()
            .context("n_labels: not u32")?;
        for i in 0..b.num_rows() {
            rows.push(IndexRow {
                row: get_u64.value(i),
                id: id.value(i).to_string(),
                source: source.value(i).to_string(),
                subtask: subtask.value(i).to_string(),
                n_tokens: n_tokens.value(i),
                n_labels: n_labels.value(i),
            });
        }
    }
    Ok(rows)
}
