//! `dsel-sweep`: the per-token loss sweep stage.
//!
//! For one model checkpoint and one tokenized set, computes
//! `log p(token[t] | token[<t])` for every token of every example (0 at the
//! first token) and each example's completion-only mean loss. Outputs:
//! `logp.npy` (f32, aligned with the set's `tokens.npy`) and `loss.npy`
//! (f32, one per example).
//!
//! Work is split into fixed shards of examples; each finished shard is
//! written atomically to a scratch folder with its blake3 beside it
//! ([`dsel_store::write_npy_sealed`]), so a killed sweep resumes at the
//! first missing shard and, since each shard's computation depends only on
//! its own examples, ends byte-identical to an uninterrupted run. A shard
//! whose bytes no longer match its recorded blake3 is recomputed (with a
//! warning), never folded into the artifact. Inside a
//! shard, examples are batched by length under a token budget to keep
//! padding low.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use dsel_model::{Batch, Model};
use dsel_store::shard::UnitFile;
use dsel_store::{NpyArray, UnitWork};
use dsel_tokenize::TokenizedSet;
use serde::{Deserialize, Serialize};

/// Bump when the output format or the computation changes.
pub const STAGE_VERSION: &str = "sweep-1";
/// The sweep stage's name in the artifact store.
pub const STAGE: &str = "sweep";

/// Batching and sharding of a sweep (does not change the numbers beyond
/// floating-point summation order, but is part of the artifact key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepConfig {
    /// Examples per resumable shard.
    pub shard_examples: usize,
    /// Upper bound on batch size × padded length.
    pub batch_tokens: usize,
    /// Upper bound on examples per batch.
    pub max_batch: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            shard_examples: 256,
            batch_tokens: 4096,
            max_batch: 16,
        }
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Examples swept.
    pub examples: usize,
    /// Tokens in those examples (padding excluded).
    pub tokens: u64,
    /// Shards found finished from an earlier, interrupted run.
    pub shards_resumed: usize,
    /// Wall seconds of this run.
    pub seconds: f64,
    /// Tokens per second computed in this run (resumed shards excluded).
    pub tokens_per_second: f64,
}

/// The sealed files of shard `s` (its examples `range` hold `tokens` tokens).
fn shard_files(scratch: &Path, s: usize, tokens: usize, examples: usize) -> Vec<UnitFile> {
    let path = |what: &str| scratch.join(format!("shard-{s:06}.{what}.npy"));
    vec![
        UnitFile {
            path: path("logp"),
            len: tokens,
        },
        UnitFile {
            path: path("loss"),
            len: examples,
        },
    ]
}

/// Compute one shard: per-token log-probs (flat, in example order) and per-example mean loss.
fn sweep_shard(
    model: &Model,
    set: &TokenizedSet,
    range: std::ops::Range<usize>,
    cfg: &SweepConfig,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let offsets = set.offsets();
    let base = offsets[range.start] as usize;
    let mut logp = vec![0f32; offsets[range.end] as usize - base];
    let mut loss = vec![0f32; range.len()];
    let lengths: Vec<usize> = (0..set.len())
        .map(|i| (offsets[i + 1] - offsets[i]) as usize)
        .collect();
    let mut order: Vec<usize> = range.clone().collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    for batch_idx in
        dsel_model::plan_token_batches(&lengths, &order, cfg.batch_tokens, cfg.max_batch)
    {
        let seqs: Vec<(&[u32], &[u8])> = batch_idx.iter().map(|&i| set.example(i)).collect();
        let batch = Batch::new(&seqs, model.device())?;
        // No autograd graph: an adapter's LoRA weights are Vars, and tracking
        // them would keep every intermediate alive (same values either way).
        let lp = model.token_logprobs_inference(&batch)?.to_vec2::<f32>()?;
        for (row, &i) in batch_idx.iter().enumerate() {
            let (ids, mask) = set.example(i);
            let start = offsets[i] as usize - base;
            logp[start..start + ids.len()].copy_from_slice(&lp[row][..ids.len()]);
            let (mut sum, mut n) = (0f64, 0usize);
            for (t, &m) in mask.iter().enumerate() {
                if m == 1 && t > 0 {
                    sum -= lp[row][t] as f64;
                    n += 1;
                }
            }
            loss[i - range.start] = if n == 0 {
                f32::NAN
            } else {
                (sum / n as f64) as f32
            };
        }
    }
    Ok((logp, loss))
}

/// Run (or resume) a sweep of `set` under `model`, keeping shards in
/// `scratch` and writing `logp.npy` and `loss.npy` into `out`.
pub fn run(
    model: &Model,
    set: &TokenizedSet,
    cfg: &SweepConfig,
    scratch: &Path,
    out: &Path,
    label: &str,
) -> Result<SweepReport> {
    run_with(
        model,
        set,
        cfg,
        scratch,
        Some(out),
        label,
        UnitWork::default(),
    )
}

/// [`run`] for one worker's part: the shards `work` owns are computed (those found finished are
/// kept), and when every shard is finished and `out` is given, `logp.npy`
/// and `loss.npy` are written there. Workers `i/N` sharing one scratch
/// folder ([`dsel_store::shard`]) and one process end with the same bytes.
pub fn run_with(
    model: &Model,
    set: &TokenizedSet,
    cfg: &SweepConfig,
    scratch: &Path,
    out: Option<&Path>,
    label: &str,
    work: UnitWork,
) -> Result<SweepReport> {
    anyhow::ensure!(
        cfg.shard_examples > 0 && cfg.batch_tokens > 0 && cfg.max_batch > 0,
        "sweep config: sizes must be positive"
    );
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let start = Instant::now();
    let n = set.len();
    let offsets = set.offsets();
    let n_shards = n.div_ceil(cfg.shard_examples);
    let total_tokens = offsets[n];
    let range_of = |s: usize| s * cfg.shard_examples..((s + 1) * cfg.shard_examples).min(n);
    let tokens_of = |s: usize| {
        let r = range_of(s);
        (offsets[r.end] - offsets[r.start]) as usize
    };
    let files = |s: usize| shard_files(scratch, s, tokens_of(s), range_of(s).len());
    let what = format!("sweep {label}");
    let mut progress = dsel_progress::Progress::new(&what, total_tokens, "tok");
    let (mut done_tokens, mut computed_tokens) = (0u64, 0u64);
    let units = dsel_store::shard::run_units::<f32>(
        n_shards,
        work,
        &what,
        files,
        |s| {
            let range = range_of(s);
            let (lp, loss) = sweep_shard(model, set, range.clone(), cfg)
                .with_context(|| format!("examples {}..{}", range.start, range.end))?;
            tracing::debug!("{what}: shard {}/{n_shards} done", s + 1);
            Ok(vec![lp, loss])
        },
        |s, resumed| {
            let t = tokens_of(s) as u64;
            done_tokens += t;
            if resumed && computed_tokens == 0 {
                // Found done before any work here: not part of the rate.
                progress.resume_at(done_tokens);
            } else {
                if !resumed {
                    computed_tokens += t;
                }
                progress.inc(t);
            }
        },
    )?;
    progress.finish();
    let mut report = SweepReport {
        examples: n,
        tokens: total_tokens,
        shards_resumed: units.resumed,
        ..Default::default()
    };
    if let (Some(out), true) = (out, units.complete()) {
        // Concatenate shards into the final arrays, streaming (memory stays at one shard).
        dsel_store::shard::concat_units::<f32>(
            n_shards,
            &what,
            files,
            0,
            &out.join("logp.npy"),
            &[],
        )?;
        dsel_store::shard::concat_units::<f32>(
            n_shards,
            &what,
            files,
            1,
            &out.join("loss.npy"),
            &[],
        )?;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.tokens_per_second = computed_tokens as f64 / report.seconds.max(1e-9);
    tracing::info!(
        "{what}: {} examples, {} tokens, {:.0} tok/s{}{}",
        n,
        total_tokens,
        report.tokens_per_second,
        if report.shards_resumed > 0 {
            format!(", {} shards resumed", report.shards_resumed)
        } else {
            String::new()
        },
        if units.complete() {
            String::new()
        } else {
            format!(
                "; shard {}: {} of {n_shards} shards computed, {} left to other workers",
                work.shard, units.computed, units.others
            )
        }
    );
    Ok(report)
}

/// A finished sweep opened from its artifact folder.
pub struct SweepResult {
    logp: NpyArray,
    loss: NpyArray,
}

impl SweepResult {
    /// Open `logp.npy` and `loss.npy` in `dir` (memory-mapped).
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            logp: NpyArray::open(dir.join("logp.npy"))?,
            loss: NpyArray::open(dir.join("loss.npy"))?,
        })
    }
    /// Per-token log-probabilities, aligned with the tokenized set.
    pub fn logp(&self) -> Result<&[f32]> {
        self.logp.as_slice::<f32>()
    }
    /// Per-example completion-only mean loss.
    pub fn loss(&self) -> Result<&[f32]> {
        self.loss.as_slice::<f32>()
    }
}
