//! `compare`: every requested method on one pool and budget, each selection
//! trained on and evaluated (over one or more seeds), online selectors
//! trained on the same pool, and the "no fine-tuning" / "full pool"
//! references, side by side with what each cost. Writes
//! `runs/<task>-compare/{table.md, table.csv, compare.json, report.html}`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dsel_select::Budget;
use serde::{Deserialize, Serialize};

use crate::evaluate::{self, EvalConfig, EvalResult, TrainOnSelection};
use crate::methods::{self, Method, SelectRequest, Snippet};
use crate::online::{OnlineTrainConfig, SelectorConfig, SelectorKind};
use crate::Pipeline;

mod report;
pub mod svg;

pub use report::html;
pub(crate) use report::templates;

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Static selection methods (each trained on and evaluated).
    pub methods: Vec<Method>,
    /// Online selectors (each a training run on the pool).
    pub selectors: Vec<SelectorKind>,
    /// Optimizer steps of each online run.
    pub online_steps: usize,
    /// Seeds per row: seed `s, s+1, …` drive the selection, the LoRA
    /// initialisation and the data order.
    pub seeds: usize,
    /// Also train on the whole (sub-sampled) pool.
    pub full_pool: bool,
}

/// Which kind of row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowKind {
    /// No fine-tuning, or the whole pool.
    Reference,
    /// A static selection, then a fine-tune on it.
    Static,
    /// Online batch selection inside the training loop.
    Online,
}

/// One seed of one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// Wall seconds the selection took in this call (cache hits ≈ 0).
    pub selection_seconds: f64,
    /// Wall seconds of building every artifact the selection depends on, as
    /// recorded when each was built: its cost from a clean cache. Online
    /// rows: seconds spent selecting inside the training loop.
    pub selection_compute_seconds: f64,
    /// CPU seconds (all threads) of the same builds.
    pub selection_cpu_seconds: f64,
    /// Wall seconds of the fine-tune (when it was built).
    pub train_seconds: f64,
    /// Evaluation of the fine-tuned model.
    pub eval: EvalResult,
    /// Training loss of each optimizer step (the loss curve).
    pub step_losses: Vec<f64>,
}

/// One row of the comparison: a method over its seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareRow {
    /// Method name (`no-finetune`, `full-pool`, a method, or `online:<selector>`).
    pub method: String,
    /// Kind of row.
    pub kind: RowKind,
    /// One entry per seed.
    pub runs: Vec<SeedRun>,
    /// Peak resident memory of the process after this row, MiB (a running
    /// maximum: rows run in order in one process).
    pub peak_mib: f64,
    /// Bytes of every artifact the selection used (first seed).
    pub artifact_bytes: u64,
    /// Selected (static) or trained (online) examples per source, first seed.
    pub selected_by_source: BTreeMap<String, usize>,
    /// Scores of the selected examples, first seed (score histogram).
    pub selected_scores: Vec<f64>,
    /// Token lengths of the selected examples, first seed.
    pub selected_lengths: Vec<u32>,
    /// Per source family: the highest- and lowest-scored pool examples.
    pub extremes: Vec<(String, Vec<Snippet>, Vec<Snippet>)>,
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

impl CompareRow {
    /// A row with no runs yet.
    pub fn new(method: impl Into<String>, kind: RowKind) -> Self {
        CompareRow {
            method: method.into(),
            kind,
            runs: vec![],
            peak_mib: 0.0,
            artifact_bytes: 0,
            selected_by_source: BTreeMap::new(),
            selected_scores: vec![],
            selected_lengths: vec![],
            extremes: vec![],
        }
    }

    fn stat(&self, f: impl Fn(&SeedRun) -> f64) -> (f64, f64) {
        mean_std(&self.runs.iter().map(f).collect::<Vec<_>>())
    }
    /// Target test loss over seeds: (mean, std).
    pub fn test_loss(&self) -> (f64, f64) {
        self.stat(|r| r.eval.test_loss)
    }
    /// Task metric over seeds: (mean, std).
    pub fn metric(&self) -> (f64, f64) {
        self.stat(|r| r.eval.metric)
    }
    /// Mean selection CPU seconds (from a clean cache).
    pub fn selection_cpu(&self) -> f64 {
        self.stat(|r| r.selection_cpu_seconds).0
    }
    /// Mean selection wall seconds (from a clean cache).
    pub fn selection_compute(&self) -> f64 {
        self.stat(|r| r.selection_compute_seconds).0
    }
    /// Name of the task metric.
    pub fn metric_name(&self) -> &str {
        self.runs
            .first()
            .map(|r| r.eval.metric_name.as_str())
            .unwrap_or("")
    }
}

/// `compare.json`: the whole comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// Target.
    pub task: String,
    /// Pool mixture.
    pub pool: String,
    /// Candidates after tokenization.
    pub pool_size: usize,
    /// Budget as given.
    pub budget: String,
    /// Token lengths of every candidate (length-distribution plot).
    pub pool_lengths: Vec<u32>,
    /// Candidates per source.
    pub pool_by_source: BTreeMap<String, usize>,
    /// What the rows were trained with.
    pub train: TrainOnSelection,
    /// Optimizer steps of the online rows.
    pub online_steps: usize,
    /// The rows, in the order they ran.
    pub rows: Vec<CompareRow>,
}

/// What a selection's artifacts cost when they were built.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SelectionCost {
    /// Recorded build wall seconds of every distinct artifact: the
    /// selection's cost from a clean cache.
    pub cold_seconds: f64,
    /// The part of `cold_seconds` whose artifacts depend on the target: a
    /// second target's cost when the rest is cached.
    pub target_seconds: f64,
    /// Recorded build CPU seconds (all threads) of every distinct artifact.
    pub cpu_seconds: f64,
    /// Bytes of every distinct artifact.
    pub bytes: u64,
}

/// The recorded cost of the artifacts behind `stages`, each counted once.
/// An artifact depends on the target when it is a target's ingest or one of
/// its inputs does (stages are recorded after their inputs).
pub fn selection_cost(p: &Pipeline, stages: &[dsel_select::StageRecord]) -> Result<SelectionCost> {
    let mut seen = BTreeSet::new();
    let mut target_dependent = BTreeSet::new();
    let mut cost = SelectionCost::default();
    for r in stages {
        if !seen.insert(r.key.as_str()) {
            continue;
        }
        let a = p
            .store
            .open_artifact(&r.key)
            .with_context(|| format!("opening the {} artifact {}", r.stage, r.key))?;
        let m = a.manifest();
        let depends = crate::is_target_ingest(m)
            || m.inputs
                .iter()
                .any(|k| target_dependent.contains(k.as_str()));
        if depends {
            target_dependent.insert(r.key.as_str());
            cost.target_seconds += m.build_seconds;
        }
        cost.cold_seconds += m.build_seconds;
        cost.cpu_seconds += m.build_cpu_seconds;
        cost.bytes += m.total_bytes();
    }
    Ok(cost)
}

/// The per-step losses a fine-tune artifact's `train.json` recorded.
fn step_losses_of(artifact: &dsel_store::Artifact) -> Vec<f64> {
    let Ok(text) = std::fs::read_to_string(artifact.path("train.json")) else {
        return vec![];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec![];
    };
    v["train"]["epochs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["step_losses"].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_f64())
        .collect()
}

/// The run folder of one row's selection: `<out>/selections/<row>` (and
/// `-seed<seed>` after the first seed), inside the comparison's own folder.
fn run_dir(out_dir: &Path, name: &str, seed_index: usize, seed: u64) -> PathBuf {
    let dir = out_dir.join("selections");
    if seed_index == 0 {
        dir.join(name)
    } else {
        dir.join(format!("{name}-seed{seed}"))
    }
}

/// One static row (a method, or the whole pool when `full_pool`) over its seeds.
#[allow(clippy::too_many_arguments)]
fn static_row(
    p: &mut Pipeline,
    base: &SelectRequest,
    method: Method,
    name: &str,
    full_pool: bool,
    opts: &CompareOptions,
    train: &TrainOnSelection,
    eval: &EvalConfig,
    out_dir: &Path,
) -> Result<CompareRow> {
    let kind = if full_pool {
        RowKind::Reference
    } else {
        RowKind::Static
    };
    let mut row = CompareRow::new(name, kind);
    for s in 0..opts.seeds.max(1) {
        let seed = base.seed + s as u64;
        let mut req = base.clone();
        req.method = method;
        req.seed = seed;
        if full_pool {
            req.budget = Budget::Fraction(1.0);
        }
        req.out_dir = run_dir(out_dir, name, s, seed);
        p.records.clear();
        let outcome = methods::select_with_details(p, &req)?;
        let cost = selection_cost(p, &outcome.summary.stages)?;
        let adapter =
            evaluate::train_on_selection(p, &req.out_dir.join("selection.jsonl"), train, seed)?;
        let train_seconds = adapter.manifest().build_seconds;
        let step_losses = step_losses_of(&adapter);
        let ev = evaluate::evaluate(p, &base.task, Some(&adapter), Some(&train.lora), eval)?;
        if s == 0 {
            row.artifact_bytes = cost.bytes;
            row.selected_by_source = outcome.summary.selected_by_source.clone();
            let mut selected: Vec<&dsel_select::ScoreRow> =
                outcome.rows.iter().filter(|r| r.rank.is_some()).collect();
            selected.sort_by_key(|r| r.rank);
            row.selected_scores = selected.iter().map(|r| r.score).collect();
            row.selected_lengths = selected.iter().map(|r| r.length).collect();
            if !full_pool {
                row.extremes = outcome.extremes.clone();
            }
        }
        row.runs.push(SeedRun {
            seed,
            selection_seconds: outcome.summary.wall_seconds,
            selection_compute_seconds: cost.cold_seconds,
            selection_cpu_seconds: cost.cpu_seconds,
            train_seconds,
            eval: ev,
            step_losses,
        });
        row.peak_mib = dsel_store::process_peak_rss_mib();
    }
    Ok(row)
}

/// One online-selector row over its seeds.
#[allow(clippy::too_many_arguments)]
fn online_row(
    p: &mut Pipeline,
    base: &SelectRequest,
    kind: SelectorKind,
    opts: &CompareOptions,
    train: &TrainOnSelection,
    eval: &EvalConfig,
    pool_tok: &dsel_store::Artifact,
    target_tok: &dsel_store::Artifact,
) -> Result<CompareRow> {
    let mut row = CompareRow::new(format!("online:{}", kind.name()), RowKind::Online);
    let pool = dsel_tokenize::TokenizedSet::open(pool_tok.dir())?;
    for s in 0..opts.seeds.max(1) {
        let seed = base.seed + s as u64;
        let mut cfg = OnlineTrainConfig::new(SelectorConfig::default_for(kind), train.lora.clone());
        cfg.steps = opts.online_steps;
        cfg.candidates = train.train.micro_batch;
        cfg.lr = train.train.lr;
        cfg.seed = seed;
        p.records.clear();
        let (adapter, report) = crate::online::train_online(p, pool_tok, target_tok, &cfg)?;
        let m = adapter.manifest();
        let ev = evaluate::evaluate(p, &base.task, Some(&adapter), Some(&train.lora), eval)?;
        if s == 0 {
            row.artifact_bytes = m.total_bytes();
            let chosen = read_chosen(&adapter.path("steps.jsonl"))?;
            row.selected_by_source = dsel_select::output::count_by_source(
                chosen
                    .iter()
                    .filter(|&&i| i < pool.len())
                    .map(|&i| pool.index[i].source.as_str()),
            );
            row.selected_lengths = chosen
                .iter()
                .filter(|&&i| i < pool.len())
                .map(|&i| pool.index[i].n_tokens)
                .collect();
        }
        row.runs.push(SeedRun {
            seed,
            selection_seconds: report.select_seconds,
            selection_compute_seconds: report.select_seconds,
            selection_cpu_seconds: m.build_cpu_seconds * report.select_fraction,
            train_seconds: m.build_seconds,
            eval: ev,
            step_losses: report
                .train
                .epochs
                .iter()
                .flat_map(|e| e.step_losses.iter().copied())
                .collect(),
        });
        row.peak_mib = dsel_store::process_peak_rss_mib();
    }
    Ok(row)
}

/// Pool indices trained on by an online run, from its `steps.jsonl`.
fn read_chosen(path: &Path) -> Result<Vec<usize>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let rec: dsel_online::StepRecord = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a step record", path.display(), i + 1))?;
        out.extend(rec.chosen);
    }
    Ok(out)
}

/// Run the comparison. `base` is the request every method shares (its
/// `method`, `seed` and `out_dir` are replaced per row). Outputs are
/// rewritten after every row, so an interrupted comparison keeps what it
/// finished (and a re-run gets those rows from the cache).
pub fn compare(
    p: &mut Pipeline,
    base: &SelectRequest,
    opts: &CompareOptions,
    train: &TrainOnSelection,
    eval: &EvalConfig,
    out_dir: &Path,
) -> Result<CompareReport> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Selections are trained on with the pool's truncation.
    let train = &TrainOnSelection {
        truncation: base.truncation,
        ..train.clone()
    };
    p.load_model(&base.model)?;
    let pool_ing = p.ingest_pool(&base.pool, &base.subset)?;
    let pool_tok = p.tokenize(&pool_ing, base.values.max_len, base.truncation, "pool")?;
    let pool_set = dsel_tokenize::TokenizedSet::open(pool_tok.dir())?;
    let mut report = CompareReport {
        task: base.task.clone(),
        pool: base.pool.clone(),
        pool_size: pool_set.len(),
        budget: base.budget.to_string(),
        pool_lengths: pool_set.index.iter().map(|r| r.n_tokens).collect(),
        pool_by_source: dsel_select::output::count_by_source(
            pool_set.index.iter().map(|r| r.source.as_str()),
        ),
        train: train.clone(),
        online_steps: opts.online_steps,
        rows: vec![],
    };
    drop(pool_set);

    let reference = evaluate::evaluate(p, &base.task, None, None, eval)?;
    let mut none = CompareRow::new("no-finetune", RowKind::Reference);
    none.runs.push(SeedRun {
        seed: base.seed,
        selection_seconds: 0.0,
        selection_compute_seconds: 0.0,
        selection_cpu_seconds: 0.0,
        train_seconds: 0.0,
        eval: reference,
        step_losses: vec![],
    });
    none.peak_mib = dsel_store::process_peak_rss_mib();
    report.rows.push(none);
    write_outputs(out_dir, &report)?;

    for &m in &opts.methods {
        let row = static_row(p, base, m, m.name(), false, opts, train, eval, out_dir)?;
        report.rows.push(row);
        write_outputs(out_dir, &report)?;
    }
    if !opts.selectors.is_empty() {
        let target = dsel_ingest::TargetSpec::parse(&base.task)?;
        let target_ing = p.ingest_target(&target)?;
        let target_tok = p.tokenize(
            &target_ing,
            base.values.target_max_len,
            base.truncation,
            "target",
        )?;
        for &k in &opts.selectors {
            let row = online_row(p, base, k, opts, train, eval, &pool_tok, &target_tok)?;
            report.rows.push(row);
            write_outputs(out_dir, &report)?;
        }
    }
    if opts.full_pool {
        let row = static_row(
            p,
            base,
            Method::Random,
            "full-pool",
            true,
            opts,
            train,
            eval,
            out_dir,
        )?;
        report.rows.push(row);
        write_outputs(out_dir, &report)?;
    }
    Ok(report)
}

fn share_text(m: &BTreeMap<String, usize>) -> String {
    let total: usize = m.values().sum();
    let mut by_family: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, v) in m {
        *by_family
            .entry(k.split('/').next().unwrap_or(k))
            .or_default() += v;
    }
    by_family
        .iter()
        .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / total.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pm(ms: (f64, f64), digits: usize, seeds: usize) -> String {
    if seeds > 1 {
        format!("{:.*} ± {:.*}", digits, ms.0, digits, ms.1)
    } else {
        format!("{:.*}", digits, ms.0)
    }
}

/// Write `table.md`, `table.csv`, `compare.json` and `report.html`.
pub fn write_outputs(dir: &Path, report: &CompareReport) -> Result<()> {
    let mut md = String::from(
        "| method | selection CPU s | selection wall s | peak MiB | artifact MB | selected share by source | test loss | metric | seeds |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record([
        "method",
        "kind",
        "selection_cpu_seconds",
        "selection_wall_seconds",
        "peak_mib",
        "artifact_bytes",
        "test_loss_mean",
        "test_loss_std",
        "metric_name",
        "metric_mean",
        "metric_std",
        "n",
        "seeds",
    ])?;
    for r in &report.rows {
        let seeds = r.runs.len();
        let _ = std::fmt::Write::write_fmt(
            &mut md,
            format_args!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} | {} {} | {} |\n",
                r.method,
                r.selection_cpu(),
                r.selection_compute(),
                r.peak_mib,
                r.artifact_bytes as f64 / 1e6,
                share_text(&r.selected_by_source),
                pm(r.test_loss(), 4, seeds),
                r.metric_name(),
                pm(r.metric(), 3, seeds),
                seeds
            ),
        );
        let (tl, tls) = r.test_loss();
        let (mm, ms) = r.metric();
        csv.write_record([
            r.method.clone(),
            serde_json::to_value(r.kind)?
                .as_str()
                .unwrap_or("")
                .to_string(),
            format!("{:.3}", r.selection_cpu()),
            format!("{:.3}", r.selection_compute()),
            format!("{:.1}", r.peak_mib),
            r.artifact_bytes.to_string(),
            format!("{tl:.6}"),
            format!("{tls:.6}"),
            r.metric_name().to_string(),
            format!("{mm:.6}"),
            format!("{ms:.6}"),
            r.runs.first().map(|x| x.eval.n).unwrap_or(0).to_string(),
            seeds.to_string(),
        ])?;
    }
    dsel_store::atomic_write(dir.join("table.md"), md.as_bytes())?;
    dsel_store::atomic_write(dir.join("table.csv"), csv.into_inner()?)?;
    dsel_store::atomic_write(dir.join("compare.json"), serde_json::to_vec_pretty(report)?)?;
    dsel_store::atomic_write(dir.join("report.html"), html(report).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn share_text_groups_by_family() {
        let m: BTreeMap<String, usize> = [
            ("t0/x".to_string(), 3usize),
            ("flan_v2_cot/y".to_string(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(share_text(&m), "flan_v2_cot 25%, t0 75%");
    }

    #[test]
    fn seed_runs_get_their_own_folders_inside_the_comparison() {
        // Any folder name works: nothing is derived from it.
        let out = Path::new("runs/tov-b");
        assert_eq!(
            run_dir(out, "tov-b", 0, 0),
            Path::new("runs/tov-b/selections/tov-b")
        );
        assert_eq!(
            run_dir(out, "tov-b", 1, 1),
            Path::new("runs/tov-b/selections/tov-b-seed1")
        );
    }
}
