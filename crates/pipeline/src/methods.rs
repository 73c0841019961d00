//! `select`: one selection method end to end, writing the run-folder contract
//! (`selection.jsonl`, `scores.parquet`, `summary.json`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use dsel_ingest::{SubsetOptions, TargetSpec};
use dsel_select::{output, Budget, RunSummary, ScoreRow, Transform};
use dsel_store::Artifact;
use dsel_sweep::SweepConfig;
use dsel_tokenize::TokenizedSet;
use dsel_valtune::ValtuneConfig;
use serde::{Deserialize, Serialize};

use crate::tov::TovVariant;
use crate::Pipeline;

mod bm25;
mod dsir;
mod grad_norm;
mod less;
mod max_loss;
mod max_uncertainty;
mod random;
mod rds;
mod tov;

/// One selection method: given the tokenized pool and target, score the
/// pool and choose `n_select` rows. Each method is one file in
/// `methods/`, listed once in the [`registry!`] table below; `select`
/// writes the run folder around it.
pub trait SelectionMethod: Sync {
    /// Scores the pool and chooses the selection; `None` when this process
    /// only did its part of the method's pool-wide stages (the prepare step
    /// or a shard worker, see [`crate::Work`]).
    fn select(&self, p: &mut Pipeline, inputs: &Inputs) -> Result<Option<Scored>>;

    /// Whether the method runs pool-wide model stages (sweeps, gradients,
    /// embeddings of every pool example): the work a sharded run splits
    /// among workers. A method without them (random, BM25, DSIR) does all
    /// of its work in the merge step.
    fn pool_wide(&self) -> bool {
        false
    }

    /// Writes method-specific files into the run folder (LESS: `sorted.csv`).
    fn write_extra(&self, _out: &Path, _inputs: &Inputs, _scores: &[f64]) -> Result<()> {
        Ok(())
    }

    /// Why a selection can fall short of the budget, for the warning.
    fn shortfall_hint(&self) -> &'static str {
        ""
    }

    /// Whether the control-corrected score (`--tov-control`) applies.
    fn takes_control(&self) -> bool {
        false
    }

    /// Rejects the method's own options that cannot work, naming the
    /// command-line option (the shared ones are checked by
    /// [`SelectRequest::validate`]).
    fn validate(&self, _req: &SelectRequest) -> Result<()> {
        Ok(())
    }
}

/// What every method is given.
pub struct Inputs<'a> {
    /// The request.
    pub req: &'a SelectRequest,
    /// The ingested pool.
    pub pool_ing: &'a Artifact,
    /// The tokenized pool.
    pub pool_tok: &'a Artifact,
    /// The tokenized pool, open.
    pub pool_set: &'a TokenizedSet,
    /// The ingested target (validation examples).
    pub target_ing: &'a Artifact,
    /// The tokenized target.
    pub target_tok: &'a Artifact,
    /// How many pool rows to select.
    pub n_select: usize,
}

impl Inputs<'_> {
    /// Every pool row.
    pub fn all(&self) -> Vec<usize> {
        (0..self.pool_set.len()).collect()
    }

    /// Sequence lengths of the pool rows.
    pub fn lengths(&self) -> Vec<u32> {
        self.pool_set.index.iter().map(|r| r.n_tokens).collect()
    }

    /// The pool rows' texts and the target examples' texts (those that
    /// survived tokenization), for the text baselines.
    pub fn texts(&self, p: &mut Pipeline) -> Result<(Vec<String>, Vec<String>)> {
        let pool_examples = p.examples(self.pool_ing)?;
        let target_set = TokenizedSet::open(self.target_tok.dir())?;
        let all_targets = p.examples(self.target_ing)?;
        let docs = self
            .pool_set
            .index
            .iter()
            .map(|r| crate::baselines::text(&pool_examples[r.row as usize]))
            .collect();
        let queries = target_set
            .index
            .iter()
            .map(|r| crate::baselines::text(&all_targets[r.row as usize]))
            .collect();
        Ok((docs, queries))
    }
}

/// What a method returns.
pub struct Scored {
    /// Score per pool row (NaN where the method does not score it).
    pub scores: Vec<f64>,
    /// The selection, best first.
    pub order: Vec<usize>,
    /// Per-round scores per pool row (ToV), empty otherwise.
    pub rounds: Vec<Vec<f64>>,
    /// The method's configuration, recorded in `summary.json`.
    pub config: serde_json::Value,
}

impl Scored {
    /// The `n_select` best rows by `scores`.
    pub fn top(scores: Vec<f64>, x: &Inputs, config: serde_json::Value) -> Self {
        let order = dsel_select::top_n(&scores, &x.all(), x.n_select);
        Scored {
            scores,
            order,
            rounds: Vec::new(),
            config,
        }
    }
}

/// The method table: `Variant => "cli-name", implementation;` with its
/// description. It defines [`Method`] (the CLI's `--method` values, in this
/// order) and its dispatch.
macro_rules! registry {
    ($( $(#[doc = $doc:literal])* $variant:ident => $name:literal, $imp:expr; )*) => {
        /// A selection method (see [`SelectionMethod`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
        pub enum Method {
            $(
                $(#[doc = $doc])*
                #[serde(rename = $name)]
                #[cfg_attr(feature = "clap", value(name = $name))]
                $variant,
            )*
        }

        impl Method {
            /// All methods, in the order listed to users.
            pub const ALL: &'static [Method] = &[$(Method::$variant),*];

            /// The CLI name.
            pub fn name(self) -> &'static str {
                match self {
                    $(Method::$variant => $name,)*
                }
            }

            /// The implementation.
            pub fn implementation(self) -> &'static dyn SelectionMethod {
                match self {
                    $(Method::$variant => &$imp,)*
                }
            }
        }
    };
}

registry! {
    /// ToV Method A (the paper's main method; base chain never sees the target, shared across targets).
    Tov => "tov", tov::Tov(TovVariant::A);
    /// ToV Method B (θ_val fed back into the base chain each round).
    TovB => "tov-b", tov::Tov(TovVariant::B);
    /// Uniform random sample of the pool.
    Random => "random", random::Random;
    /// Max-Uncertainty ψ under the base model.
    MaxUncertainty => "max-uncertainty", max_uncertainty::MaxUncertainty;
    /// Highest completion-only loss under the base model.
    MaxLoss => "max-loss", max_loss::MaxLoss;
    /// Largest per-example LoRA gradient norm at a fresh adapter (B = 0, so ‖∇B‖).
    GradNorm => "grad-norm", grad_norm::GradNorm;
    /// BM25 of each pool example against the target examples (best match).
    Bm25 => "bm25", bm25::Bm25;
    /// DSIR: hashed n-gram importance weights, importance resampling.
    Dsir => "dsir", dsir::Dsir;
    /// RDS: cosine of last-token hidden states, max over subtasks of the mean over the subtask.
    Rds => "rds", rds::Rds;
    /// LESS: projected Adam-preconditioned LoRA gradients matched to the target's.
    Less => "less", less::Less;
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown method {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Which length ToV's equal-count bins are drawn over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BinBy {
    /// The completion (label tokens, `T` in φ = (1/T) Σ_t F(Δ_t)): the length
    /// the per-token mean is taken over, so the length the bias is in.
    #[default]
    Completion,
    /// The whole sequence (prompt + completion).
    Sequence,
}

/// How the ToV selection spends the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SelectionRule {
    /// Half binned top scores, half random from U (paper default).
    #[default]
    ScoreRandom,
    /// All of the budget from the binned top scores.
    ScoreOnly,
}

pub use crate::preset::{Preset, PresetValues, TovDefaults};

/// One `select` run.
#[derive(Debug, Clone)]
pub struct SelectRequest {
    /// Target (task name or file).
    pub task: String,
    /// Method.
    pub method: Method,
    /// Model path (GGUF file, HF folder or llama2.c `.bin`).
    pub model: PathBuf,
    /// Pool mixture name or `.toml` path.
    pub pool: String,
    /// Pool subsetting (limit, per-source cap, seed).
    pub subset: SubsetOptions,
    /// Budget.
    pub budget: Budget,
    /// Preset the remaining values come from.
    pub values: PresetValues,
    /// Per-token transform for ToV.
    pub transform: Transform,
    /// ToV's selection rule.
    pub rule: SelectionRule,
    /// Number of equal-count length bins.
    pub n_bins: usize,
    /// Which length the bins are over.
    pub bin_by: BinBy,
    /// Sweep batching.
    pub sweep: SweepConfig,
    /// Validation fine-tune options.
    pub valtune: ValtuneConfig,
    /// Seed of every random choice.
    pub seed: u64,
    /// Output folder (`runs/<task>-<method>` by default).
    pub out_dir: PathBuf,
    /// The preset (LESS takes its warmup and datastore settings from it).
    pub preset: Preset,
    /// How pool and target examples longer than their max length are cut.
    pub truncation: dsel_tokenize::Truncation,
    /// ToV: control-corrected scores ([`crate::tov::TovConfig::control`]).
    pub control: bool,
}

impl SelectRequest {
    /// Rejects options that would make every score 0 or select nothing
    /// useful, naming the command-line option.
    pub fn validate(&self) -> Result<()> {
        self.method.implementation().validate(self)?;
        anyhow::ensure!(
            self.values.lr.is_finite() && self.values.lr > 0.0,
            "--lr must be positive, got {}: fine-tuning at rate 0 leaves the model unchanged (every ToV score 0)",
            self.values.lr
        );
        anyhow::ensure!(
            self.n_bins >= 1,
            "--bins must be at least 1, got 0 (1 = no length binning)"
        );
        anyhow::ensure!(
            self.values.max_len >= 2 && self.values.target_max_len >= 2,
            "--max-len and --target-max-len must be at least 2 tokens"
        );
        Ok(())
    }
}

/// The ingest report recorded in an ingest artifact's manifest.
fn ingest_report(ing: &Artifact) -> dsel_ingest::IngestReport {
    serde_json::from_value(ing.manifest().info.clone()).unwrap_or_default()
}

/// Ingest and tokenize the target; a target with no usable example is an
/// error naming the file and why each example was skipped.
fn target_tokens(
    p: &mut Pipeline,
    task: &str,
    target: &TargetSpec,
    max_len: usize,
    truncation: dsel_tokenize::Truncation,
) -> Result<(Artifact, Artifact)> {
    let where_ = match target {
        TargetSpec::Named(t) => format!(
            "target {} (validation files under {})",
            t.name(),
            p.data_root.join("tasks").join(t.name()).display()
        ),
        TargetSpec::File(f) => format!("target file {}", f.display()),
    };
    let ing = p
        .ingest_target(target)
        .with_context(|| format!("{where_}: reading the target examples"))?;
    let report = ingest_report(&ing);
    let skips = report
        .skipped_by_reason
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect::<Vec<_>>()
        .join(", ");
    if report.kept == 0 {
        anyhow::bail!(
            "{where_} ({task}) has no usable example: {} records read, all skipped at ingest ({})",
            report.read,
            if skips.is_empty() {
                "no records"
            } else {
                &skips
            }
        );
    }
    let tok = p
        .tokenize(&ing, max_len, truncation, "target")
        .with_context(|| {
            format!(
                "{where_} ({task}) has no usable example ({} of {} records kept at ingest{})",
                report.kept,
                report.read,
                if skips.is_empty() {
                    String::new()
                } else {
                    format!("; skipped {skips}")
                }
            )
        })?;
    Ok((ing, tok))
}

/// A pool example shown in reports: its id, source, score and text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snippet {
    /// Example id.
    pub id: String,
    /// Example source.
    pub source: String,
    /// The method's score.
    pub score: f64,
    /// Length in tokens.
    pub length: u32,
    /// The example's text (turns joined by newlines), cut to
    /// [`SNIPPET_CHARS`] characters.
    pub text: String,
}

/// Characters of an example's text kept in a [`Snippet`].
pub const SNIPPET_CHARS: usize = 400;

/// Everything a selection run produced, for callers that report on it.
#[derive(Debug, Clone)]
pub struct SelectOutcome {
    /// `summary.json`.
    pub summary: RunSummary,
    /// `scores.parquet`, one row per candidate in pool order.
    pub rows: Vec<ScoreRow>,
    /// Per source family (the part of the source before `/`), the
    /// highest- and lowest-scored candidates (`per_family` of each, best first
    /// and worst last); empty when the method has no scores (random).
    pub extremes: Vec<(String, Vec<Snippet>, Vec<Snippet>)>,
}

/// Run a selection method end to end and write its run folder.
pub fn select(p: &mut Pipeline, req: &SelectRequest) -> Result<RunSummary> {
    Ok(select_with_details(p, req)?.summary)
}

/// Per source family, the `per_family` highest- and lowest-scored rows
/// (NaN scores skipped; ties broken by pool position).
pub fn extremes(
    rows: &[ScoreRow],
    text_of: impl Fn(usize) -> String,
    per_family: usize,
) -> Vec<(String, Vec<Snippet>, Vec<Snippet>)> {
    let mut by_family: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, r) in rows.iter().enumerate() {
        if r.score.is_finite() {
            let fam = r.source.split('/').next().unwrap_or(&r.source);
            by_family.entry(fam).or_default().push(i);
        }
    }
    let snippet = |i: usize| {
        let text: String = text_of(i).chars().take(SNIPPET_CHARS).collect();
        Snippet {
            id: rows[i].id.clone(),
            source: rows[i].source.clone(),
            score: rows[i].score,
            length: rows[i].length,
            text,
        }
    };
    by_family
        .into_iter()
        .map(|(fam, mut idx)| {
            idx.sort_by(|&a, &b| rows[b].score.total_cmp(&rows[a].score).then(a.cmp(&b)));
            let top: Vec<Snippet> = idx.iter().take(per_family).map(|&i| snippet(i)).collect();
            let bottom: Vec<Snippet> = idx
                .iter()
                .rev()
                .take(per_family)
                .rev()
                .map(|&i| snippet(i))
                .collect();
            (fam.to_string(), top, bottom)
        })
        .collect()
}

/// The artifacts every method starts from.
struct Prepared {
    pool_ing: Artifact,
    pool_tok: Artifact,
    pool_set: TokenizedSet,
    target_ing: Artifact,
    target_tok: Artifact,
    n_select: usize,
}

impl Prepared {
    /// Loads the model, ingests and tokenizes the pool and the target.
    fn new(p: &mut Pipeline, req: &SelectRequest) -> Result<Self> {
        req.validate()?;
        let target = TargetSpec::parse(&req.task)?;
        p.load_model(&req.model)?;
        let pool_ing = p.ingest_pool(&req.pool, &req.subset)?;
        let pool_tok = p.tokenize(&pool_ing, req.values.max_len, req.truncation, "pool")?;
        let pool_set = TokenizedSet::open(pool_tok.dir())?;
        let n_select = req.budget.resolve(pool_set.len());
        // Every method checks the target first: one with no usable example fails
        // here, naming the file and the skip counts, whatever the method.
        let (target_ing, target_tok) = target_tokens(
            p,
            &req.task,
            &target,
            req.values.target_max_len,
            req.truncation,
        )?;
        Ok(Self {
            pool_ing,
            pool_tok,
            pool_set,
            target_ing,
            target_tok,
            n_select,
        })
    }

    fn inputs<'a>(&'a self, req: &'a SelectRequest) -> Inputs<'a> {
        Inputs {
            req,
            pool_ing: &self.pool_ing,
            pool_tok: &self.pool_tok,
            pool_set: &self.pool_set,
            target_ing: &self.target_ing,
            target_tok: &self.target_tok,
            n_select: self.n_select,
        }
    }
}

/// One part of a sharded selection, as `p.work` says ([`crate::Work`]):
/// the prepare step (ingest, tokenize and the shared stages the pool-wide
/// ones need: fine-tunes, LESS warmup, target features) or one shard
/// worker's units of the method's pool-wide stages. Writes no run folder;
/// [`select`] with [`crate::Work::Merge`] (`dsel merge`) assembles and
/// selects afterwards.
pub fn select_part(p: &mut Pipeline, req: &SelectRequest) -> Result<()> {
    anyhow::ensure!(
        p.work.is_part(),
        "select_part runs the prepare step or a shard worker, not {:?}",
        p.work
    );
    let imp = req.method.implementation();
    if !imp.pool_wide() && matches!(p.work, crate::Work::Shard(_)) {
        tracing::info!(
            "{}: no pool-wide stage to shard; all of its work runs in the merge step",
            req.method.name()
        );
        return Ok(());
    }
    let prepared = Prepared::new(p, req)?;
    if imp.pool_wide() {
        imp.select(p, &prepared.inputs(req))?;
    }
    Ok(())
}

/// [`select`], also returning the score rows and the top and bottom examples
/// per source family.
pub fn select_with_details(p: &mut Pipeline, req: &SelectRequest) -> Result<SelectOutcome> {
    let started = Instant::now();
    anyhow::ensure!(
        !p.work.is_part(),
        "the prepare step and shard workers select nothing: call select_part"
    );
    let prepared = Prepared::new(p, req)?;
    let Prepared {
        pool_ing,
        pool_tok,
        pool_set,
        ..
    } = &prepared;
    let n = pool_set.len();
    let lengths: Vec<u32> = pool_set.index.iter().map(|r| r.n_tokens).collect();
    let imp = req.method.implementation();
    let inputs = prepared.inputs(req);
    let Scored {
        scores,
        order,
        rounds: round_scores,
        config,
    } = imp
        .select(p, &inputs)?
        .context("every pool-wide stage is assembled outside the prepare and shard steps")?;

    // Outputs.
    std::fs::create_dir_all(&req.out_dir)
        .with_context(|| format!("creating {}", req.out_dir.display()))?;
    imp.write_extra(&req.out_dir, &inputs, &scores)?;
    let examples = p.examples(pool_ing)?;
    let mut rank_of = vec![None; n];
    for (r, &i) in order.iter().enumerate() {
        rank_of[i] = Some(r);
    }
    let rows: Vec<ScoreRow> = (0..n)
        .map(|i| ScoreRow {
            id: pool_set.index[i].id.clone(),
            source: pool_set.index[i].source.clone(),
            length: lengths[i],
            score: scores[i],
            rounds: round_scores.iter().map(|r| r[i]).collect(),
            rank: rank_of[i],
        })
        .collect();
    output::write_scores(&req.out_dir.join("scores.parquet"), &rows)?;
    let selected: Vec<&dsel_ingest::Example> = order
        .iter()
        .map(|&i| &examples[pool_set.index[i].row as usize])
        .collect();
    let selected_scores: Vec<f64> = order.iter().map(|&i| scores[i]).collect();
    output::write_selection(
        &req.out_dir.join("selection.jsonl"),
        &selected,
        &selected_scores,
    )?;
    let tok_report: dsel_tokenize::TokenizeReport =
        serde_json::from_value(pool_tok.manifest().info.clone()).unwrap_or_default();
    let pool_skipped: std::collections::BTreeMap<String, u64> = ingest_report(pool_ing)
        .skipped_by_reason
        .into_iter()
        .map(|(reason, c)| (format!("ingest:{reason}"), c))
        .chain(
            tok_report
                .skipped
                .into_iter()
                .map(|(reason, c)| (format!("tokenize:{reason}"), c)),
        )
        .filter(|(_, c)| *c > 0)
        .collect();
    let requested = req.budget.requested(n);
    if order.len() < requested {
        tracing::warn!(
            "budget {} asks for {requested} examples but {} selected {} of {n} pool examples \
             (the pool{} holds no more); summary.json records both",
            req.budget,
            req.method.name(),
            order.len(),
            imp.shortfall_hint()
        );
    }
    let summary = RunSummary {
        task: req.task.clone(),
        method: req.method.name().to_string(),
        model: req.model.display().to_string(),
        pool: req.pool.clone(),
        pool_size: n,
        budget: req.budget.to_string(),
        requested,
        selected: order.len(),
        selected_by_source: output::count_by_source(
            order.iter().map(|&i| pool_set.index[i].source.as_str()),
        ),
        pool_by_source: output::count_by_source(pool_set.index.iter().map(|r| r.source.as_str())),
        pool_skipped,
        stages: p.records.clone(),
        wall_seconds: started.elapsed().as_secs_f64(),
        seed: req.seed,
        config,
    };
    output::write_summary(&req.out_dir.join("summary.json"), &summary)?;
    let extremes = extremes(
        &rows,
        |i| crate::baselines::text(&examples[pool_set.index[i].row as usize]),
        2,
    );
    Ok(SelectOutcome {
        summary,
        rows,
        extremes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_parses_from_its_name() {
        // A method missing from `ALL` cannot be picked on the command line.
        let every = [
            Method::Tov,
            Method::TovB,
            Method::Random,
            Method::MaxUncertainty,
            Method::MaxLoss,
            Method::GradNorm,
            Method::Bm25,
            Method::Dsir,
            Method::Rds,
            Method::Less,
        ];
        for m in every {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
            let json = serde_json::to_value(m).unwrap();
            assert_eq!(json.as_str(), Some(m.name()), "serde and CLI names agree");
        }
        assert_eq!(Method::ALL.len(), every.len());
        assert!("lesss".parse::<Method>().is_err());
    }

    #[test]
    fn bins_default_to_the_completion_length() {
        assert_eq!(BinBy::default(), BinBy::Completion);
        assert_eq!(
            serde_json::to_value(BinBy::Completion).unwrap(),
            "completion"
        );
    }
}
