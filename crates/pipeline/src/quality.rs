//! `quality`: does a method find the target's own data? A held-out source
//! recall benchmark anyone can rerun (`make quality`).
//!
//! For each FLAN-CoT task held out in turn: the target is the task's first
//! `n_target` rows; the pool is the default mixture (FLAN-CoT, T0,
//! AlpacaEval) with that task's file replaced by its remaining rows, sampled
//! to `pool_limit` examples with the run's seed. Every method selects the
//! same budget; for each (task, method, seed) the benchmark records
//!
//! * **share**: the fraction of the selection from the held-out task, against
//!   the task's share of the pool (what random gets in expectation); their
//!   ratio is the **lift** (1 = random);
//! * **percentile**: the mean percentile rank of the task's pool examples
//!   under the method's raw scores (0 = ranked first, 0.5 = random), which
//!   does not depend on the selection rule (binning, Score+Random);
//! * **downstream** (when `n_test` > 0): a further `n_test` rows of the task,
//!   in neither target nor pool, are its test set; each selection is
//!   LoRA-trained on (the preset's fine-tune, the run's seed) and its test
//!   loss compared with random's (paired by seed) and with the base model's;
//! * **cost**: the recorded build wall and CPU seconds and bytes of every
//!   artifact the selection used (its cost from a clean cache), the part of
//!   it that depends on the target (what a second target pays on a warm
//!   cache) and the run's peak resident memory.
//!
//! The derived target and pool files are written under the output folder at
//! run time from the shared data; nothing derived is committed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dsel_ingest::SubsetOptions;
use dsel_select::ScoreRow;
use serde::{Deserialize, Serialize};

use crate::compare::{mean_std, selection_cost};
use crate::evaluate::{self, TrainOnSelection};
use crate::methods::{self, Method, SelectRequest};
use crate::Pipeline;

/// One row of the benchmark: a method and its ToV options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityMethod {
    /// Display name (`tov`, `tov+control`, …).
    pub name: String,
    /// The selection method.
    pub method: Method,
    /// ToV's control-corrected score.
    pub control: bool,
    /// ToV's selection as the top scores over all candidates
    /// (`--rule score-only --bins 1`, the cpu preset's) instead of
    /// ALGORITHMS.md's Score+Random over 10 completion-length bins (a ToV
    /// row without `+top`, whatever the preset).
    #[serde(default)]
    pub top: bool,
}

impl std::str::FromStr for QualityMethod {
    type Err = String;
    /// A method name, optionally followed by `+control` (the
    /// control-corrected score) and/or `+top` (score-only over one bin);
    /// both apply to tov and tov-b only.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split('+');
        let method: Method = parts.next().unwrap_or_default().parse()?;
        let (mut control, mut top) = (false, false);
        for m in parts {
            let flag = match m {
                "control" => &mut control,
                "top" => &mut top,
                _ => return Err(format!("{s}: unknown modifier `+{m}` (control, top)")),
            };
            if std::mem::replace(flag, true) {
                return Err(format!("{s}: `+{m}` given twice"));
            }
        }
        if (control || top) && !method.implementation().takes_control() {
            return Err(format!(
                "{s}: +control and +top apply to tov and tov-b only"
            ));
        }
        Ok(QualityMethod {
            name: s.to_string(),
            method,
            control,
            top,
        })
    }
}

/// What the benchmark runs.
#[derive(Debug, Clone)]
pub struct QualityOptions {
    /// FLAN-CoT tasks held out in turn (file stems under `pools/flan_v2_cot`).
    pub tasks: Vec<String>,
    /// Methods compared.
    pub methods: Vec<QualityMethod>,
    /// Seeds 1..=seeds (pool sample, U, LoRA init, data order, random picks).
    pub seeds: u64,
    /// Held-out rows used as the target.
    pub n_target: usize,
    /// Pool examples sampled from the mixture.
    pub pool_limit: usize,
    /// Further held-out rows of the task used as the downstream test set
    /// (0: no downstream fine-tune and evaluation).
    pub n_test: usize,
}

/// One (task, method, seed) measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityRun {
    /// Held-out task.
    pub task: String,
    /// Method row name.
    pub method: String,
    /// Seed.
    pub seed: u64,
    /// Pool size after tokenization.
    pub pool_size: usize,
    /// Pool examples from the held-out task.
    pub pool_matching: usize,
    /// Examples selected.
    pub selected: usize,
    /// Selected examples from the held-out task.
    pub selected_matching: usize,
    /// Mean percentile rank of the task's pool examples under the raw scores
    /// (None for methods without scores).
    pub percentile: Option<f64>,
    /// Wall seconds of the selection run.
    pub wall_seconds: f64,
    /// ToV only: the mean percentile of the task's examples under other
    /// scores computed from the same sweeps ([`tov_variants`]), by name.
    #[serde(default)]
    pub variants: Vec<(String, f64)>,
    /// ToV only: the lift over random of the same-size selection under other
    /// selection rules applied to the raw and control-corrected scores
    /// ([`TovVariants::rules`]), by name.
    #[serde(default)]
    pub rule_lifts: Vec<(String, f64)>,
    /// Test loss on the task's test rows after LoRA-training on the
    /// selection (None without downstream).
    #[serde(default)]
    pub test_loss: Option<f64>,
    /// Test loss of the model without fine-tuning (the same for every run
    /// of a task).
    #[serde(default)]
    pub no_finetune_loss: Option<f64>,
    /// Recorded build wall seconds of every artifact the selection used:
    /// its cost from a clean cache.
    #[serde(default)]
    pub cold_seconds: f64,
    /// The part of `cold_seconds` spent on artifacts that depend on the
    /// target: a second target's cost when the rest is cached.
    #[serde(default)]
    pub target_seconds: f64,
    /// Recorded build CPU seconds (all threads) of the same artifacts.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// Bytes of the same artifacts.
    #[serde(default)]
    pub artifact_bytes: u64,
    /// Peak resident memory during the selection, MiB (the process's
    /// high-water mark, reset before the run where Linux allows; it
    /// includes memory the allocator kept from earlier runs).
    #[serde(default)]
    pub peak_mib: f64,
}

impl QualityRun {
    /// Share of the selection from the held-out task.
    pub fn share(&self) -> f64 {
        self.selected_matching as f64 / self.selected.max(1) as f64
    }

    /// The held-out task's share of the pool.
    pub fn pool_share(&self) -> f64 {
        self.pool_matching as f64 / self.pool_size.max(1) as f64
    }

    /// `share / pool_share` (1 = random in expectation).
    pub fn lift(&self) -> f64 {
        self.share() / self.pool_share().max(1e-12)
    }
}

/// Mean percentile rank (0 = best, 1 = worst) of the rows whose source is
/// `source`, among rows with a finite score; ties share their mean rank.
/// None when no matching row has a finite score.
pub fn mean_percentile(rows: &[ScoreRow], source: &str) -> Option<f64> {
    let mut scored: Vec<(f64, bool)> = rows
        .iter()
        .filter(|r| r.score.is_finite())
        .map(|r| (r.score, r.source == source))
        .collect();
    let n = scored.len();
    if n < 2 {
        return None;
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut sum, mut count) = (0.0, 0usize);
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scored[j + 1].0 == scored[i].0 {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 / (n - 1) as f64;
        for s in &scored[i..=j] {
            if s.1 {
                sum += mid;
                count += 1;
            }
        }
        i = j + 1;
    }
    (count > 0).then(|| sum / count as f64)
}

/// The files one held-out task is benchmarked with ([`prepare_task`]).
#[derive(Debug, Clone)]
pub struct TaskFiles {
    /// The target: the task's first `n_target` rows.
    pub target: PathBuf,
    /// The downstream test set: the next `n_test` rows (None when 0).
    pub test: Option<PathBuf>,
    /// The pool mixture (`pool.toml`) with the task's remaining rows.
    pub mixture: PathBuf,
    /// The task's source name in the pool (`flan_v2_cot/<task>`).
    pub source: String,
}

/// Writes the held-out target, the test rows and the pool mixture for
/// `task` under `dir`: rows `[0, n_target)` are the target, the next
/// `n_test` the test set, the rest go to the pool.
pub fn prepare_task(
    data_root: &Path,
    task: &str,
    n_target: usize,
    n_test: usize,
    dir: &Path,
) -> Result<TaskFiles> {
    // Mixture entries are resolved under the data root: write absolute paths.
    let data_root = &std::fs::canonicalize(data_root)
        .with_context(|| format!("data root {}", data_root.display()))?;
    let flan = data_root.join("pools/flan_v2_cot");
    let file = flan.join(format!("{task}_train.tsv"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let held = n_target + n_test;
    anyhow::ensure!(
        lines.len() > held,
        "{}: {} rows, fewer than the {n_target} target and {n_test} test rows held out plus one",
        file.display(),
        lines.len()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The mixture names the derived file by absolute path: a relative `--out`
    // would otherwise be resolved under the data root.
    let dir = &std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let write_rows = |name: String, rows: &[&str]| -> Result<PathBuf> {
        let path = dir.join(name);
        dsel_store::atomic_write(&path, (rows.join("\n") + "\n").into_bytes())?;
        Ok(path)
    };
    let target = write_rows(format!("{task}_heldout.tsv"), &lines[..n_target])?;
    let test = (n_test > 0)
        .then(|| write_rows(format!("{task}_test.tsv"), &lines[n_target..held]))
        .transpose()?;
    let rest = write_rows(format!("{task}_train.tsv"), &lines[held..])?;
    let source = format!("flan_v2_cot/{task}");
    let mut toml =
        format!("description = \"quality benchmark: default mixture with {task} held out\"\n");
    let mut others: Vec<PathBuf> = std::fs::read_dir(&flan)
        .with_context(|| format!("listing {}", flan.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("_train.tsv") && n != format!("{task}_train.tsv"))
        })
        .collect();
    others.sort();
    let entry = |toml: &mut String, path: &Path, format: &str, source: Option<&str>| {
        let _ = write!(
            toml,
            "\n[[entry]]\npath = {:?}\nformat = \"{format}\"\n",
            path.display().to_string()
        );
        if let Some(s) = source {
            let _ = writeln!(toml, "source = \"{s}\"");
        }
    };
    for p in &others {
        entry(&mut toml, p, "flan-cot", None);
    }
    entry(&mut toml, &rest, "flan-cot", Some(&source));
    entry(
        &mut toml,
        &data_root.join("pools/t0_50k/data_per_template"),
        "t0",
        None,
    );
    entry(
        &mut toml,
        &data_root.join("pools/alpaca_eval"),
        "alpaca-eval",
        None,
    );
    let mixture = dir.join("pool.toml");
    dsel_store::atomic_write(&mixture, toml.into_bytes())?;
    Ok(TaskFiles {
        target,
        test,
        mixture,
        source,
    })
}

/// Runs the benchmark: every (task, seed, method) selection through `p`,
/// `base` giving the model, preset values, budget and every other option;
/// with `n_test` > 0 each selection is also trained on and evaluated
/// (the preset's fine-tune and evaluation). Writes `table.md`,
/// `table.csv`, `runs.json`, `diagnosis.md` and `report.html` into `out`.
pub fn run(
    p: &mut Pipeline,
    base: &SelectRequest,
    opts: &QualityOptions,
    out: &Path,
) -> Result<Vec<QualityRun>> {
    anyhow::ensure!(opts.seeds >= 1, "--seeds must be at least 1");
    anyhow::ensure!(
        !opts.tasks.is_empty(),
        "--tasks must name at least one task"
    );
    // Selections are trained on with the pool's truncation (as `compare`).
    let train = TrainOnSelection {
        truncation: base.truncation,
        ..base.preset.train()
    };
    let eval = base.preset.eval();
    let mut runs = Vec::new();
    for task in &opts.tasks {
        let files = prepare_task(
            &p.data_root,
            task,
            opts.n_target,
            opts.n_test,
            &out.join("data").join(task),
        )?;
        let source = &files.source;
        let no_finetune_loss = match &files.test {
            Some(test) => {
                p.load_model(&base.model)?;
                let ev = evaluate::evaluate(p, &test.display().to_string(), None, None, &eval)?;
                tracing::info!(
                    "quality: {task}: test loss without fine-tuning {:.4}",
                    ev.test_loss
                );
                Some(ev.test_loss)
            }
            None => None,
        };
        for seed in 1..=opts.seeds {
            for m in &opts.methods {
                let mut req = base.clone();
                req.task = files.target.display().to_string();
                req.method = m.method;
                if m.method.implementation().takes_control() {
                    // A ToV row names its score and rule: plain = ALGORITHMS.md's
                    // (Score+Random over its length bins), whatever the preset.
                    let paper = crate::preset::TovDefaults::paper();
                    req.control = m.control;
                    (req.rule, req.n_bins) = if m.top {
                        (methods::SelectionRule::ScoreOnly, 1)
                    } else {
                        (paper.rule, paper.n_bins)
                    };
                }
                req.pool = files.mixture.display().to_string();
                req.subset = SubsetOptions {
                    limit: Some(opts.pool_limit),
                    per_source_cap: None,
                    seed,
                    stratify: false,
                };
                req.seed = seed;
                req.values.lora.seed = seed;
                req.out_dir = out
                    .join("runs")
                    .join(format!("{task}-{}-seed{seed}", m.name));
                p.records.clear();
                dsel_store::reset_peak_rss();
                tracing::info!("quality: {task}, {}, seed {seed}", m.name);
                let o = methods::select_with_details(p, &req)
                    .with_context(|| format!("quality: {task} {} seed {seed}", m.name))?;
                let peak_mib = dsel_store::process_peak_rss_mib();
                let cost = selection_cost(p, &o.summary.stages)?;
                let test_loss = match &files.test {
                    Some(test) => {
                        let adapter = evaluate::train_on_selection(
                            p,
                            &req.out_dir.join("selection.jsonl"),
                            &train,
                            seed,
                        )?;
                        let ev = evaluate::evaluate(
                            p,
                            &test.display().to_string(),
                            Some(&adapter),
                            Some(&train.lora),
                            &eval,
                        )?;
                        Some(ev.test_loss)
                    }
                    None => None,
                };
                let run = QualityRun {
                    task: task.clone(),
                    method: m.name.clone(),
                    seed,
                    pool_size: o.summary.pool_size,
                    pool_matching: o.summary.pool_by_source.get(source).copied().unwrap_or(0),
                    selected: o.summary.selected,
                    selected_matching: o
                        .summary
                        .selected_by_source
                        .get(source)
                        .copied()
                        .unwrap_or(0),
                    percentile: mean_percentile(&o.rows, source),
                    wall_seconds: o.summary.wall_seconds,
                    variants: Vec::new(),
                    rule_lifts: Vec::new(),
                    test_loss,
                    no_finetune_loss,
                    cold_seconds: cost.cold_seconds,
                    target_seconds: cost.target_seconds,
                    cpu_seconds: cost.cpu_seconds,
                    artifact_bytes: cost.bytes,
                    peak_mib,
                };
                let run = if m.method.implementation().takes_control() {
                    let v = tov_variants(p, &o.summary.stages, &o.rows, source)?;
                    let rules = v.rules(&o.rows, &req, run.selected, source);
                    let pool_share = run.pool_share().max(1e-12);
                    QualityRun {
                        variants: v.percentiles,
                        rule_lifts: rules
                            .into_iter()
                            .map(|(n, share)| (n, share / pool_share))
                            .collect(),
                        ..run
                    }
                } else {
                    run
                };
                tracing::info!(
                    "quality: {task} {} seed {seed}: share {:.3} (pool {:.3}, lift {:.2}), percentile {}, test loss {}",
                    m.name,
                    run.share(),
                    run.pool_share(),
                    run.lift(),
                    run.percentile.map_or("—".into(), |x| format!("{x:.3}")),
                    run.test_loss.map_or("—".into(), |x| format!("{x:.4}"))
                );
                runs.push(run);
                // Rewritten after every run: an interrupted benchmark keeps
                // what it finished (and a re-run takes it from the cache).
                write_outputs(&runs, opts, base, out)?;
            }
        }
    }
    Ok(runs)
}

/// ToV diagnosis from the stage outputs of a finished round-1 run: the mean
/// percentile of `source`'s candidates (those with a finite score, i.e.
/// outside U) under variants of the score, each a function of the per-token
/// Δ_t = log p_val − log p_bas (and Δ_ctl of the control fine-tune, when the
/// run had one):
///
/// * `mean` (the default, F = identity), `mean abs` (F = abs), `mean relu`;
/// * `mean, no last 2` — the last two label tokens (the end-of-turn marker of
///   a chat template) left out, `last 2 only`;
/// * `sum` — Σ_t instead of the mean (mostly completion length);
/// * `mean − ctl` — the control-corrected score, and `mean − ctl, no last 2`.
pub fn tov_variants(
    p: &Pipeline,
    stages: &[dsel_select::StageRecord],
    rows: &[ScoreRow],
    source: &str,
) -> Result<TovVariants> {
    let dir = |stage: &str, label: &str| -> Option<PathBuf> {
        stages
            .iter()
            .find(|r| r.stage == stage && r.label == label)
            .map(|r| p.store.root().join(stage).join(&r.key))
    };
    let (Some(tok), Some(bas), Some(val)) = (
        dir("tokenize", "pool"),
        dir("sweep", "base round 1"),
        dir("sweep", "val round 1"),
    ) else {
        return Ok(TovVariants::default());
    };
    let set = dsel_tokenize::TokenizedSet::open(&tok)?;
    let lb = dsel_sweep::SweepResult::open(&bas)?;
    let lv = dsel_sweep::SweepResult::open(&val)?;
    let (lb, lv) = (lb.logp()?, lv.logp()?);
    let ctl_res = dir("sweep", "control round 1")
        .map(|d| dsel_sweep::SweepResult::open(&d))
        .transpose()?;
    let lc = ctl_res.as_ref().map(|r| r.logp()).transpose()?;
    let offsets = set.offsets();
    type Variant = (&'static str, fn(&[f64], &[f64]) -> f64);
    fn m(v: &[f64]) -> f64 {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
    fn head(v: &[f64]) -> &[f64] {
        &v[..v.len().saturating_sub(2)]
    }
    fn tail(v: &[f64]) -> &[f64] {
        &v[v.len().saturating_sub(2)..]
    }
    let mut variants: Vec<Variant> = vec![
        ("mean", |d, _| m(d)),
        ("mean abs", |d, _| {
            m(&d.iter().map(|x| x.abs()).collect::<Vec<_>>())
        }),
        ("mean relu", |d, _| {
            m(&d.iter().map(|x| x.max(0.0)).collect::<Vec<_>>())
        }),
        ("mean, no last 2", |d, _| m(head(d))),
        ("last 2 only", |d, _| m(tail(d))),
        ("sum", |d, _| d.iter().sum()),
    ];
    if lc.is_some() {
        variants.push(("mean − ctl", |d, c| m(d) - m(c)));
        variants.push(("mean − ctl, no last 2", |d, c| m(head(d)) - m(head(c))));
    }
    let mut scores = vec![vec![f64::NAN; rows.len()]; variants.len()];
    for (i, row) in rows.iter().enumerate() {
        if !row.score.is_finite() {
            continue; // U: not a candidate
        }
        let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
        let mask = &set.example(i).1;
        let (mut d, mut c) = (Vec::new(), Vec::new());
        for t in 1..(b - a) {
            if mask[t] == 1 {
                d.push(lv[a + t] as f64 - lb[a + t] as f64);
                if let Some(lc) = lc {
                    c.push(lc[a + t] as f64 - lb[a + t] as f64);
                }
            }
        }
        for (k, (_, f)) in variants.iter().enumerate() {
            scores[k][i] = f(&d, &c);
        }
    }
    let percentiles = variants
        .iter()
        .zip(&scores)
        .filter_map(|((name, _), sc)| {
            let rs: Vec<ScoreRow> = rows
                .iter()
                .zip(sc)
                .map(|(r, &s)| ScoreRow {
                    score: s,
                    ..r.clone()
                })
                .collect();
            mean_percentile(&rs, source).map(|p| (name.to_string(), p))
        })
        .collect();
    let keep = ["mean", "mean − ctl"];
    Ok(TovVariants {
        percentiles,
        scores: variants
            .iter()
            .zip(scores)
            .filter(|((name, _), _)| keep.contains(name))
            .map(|((name, _), sc)| (name.to_string(), sc))
            .collect(),
        completion_lengths: set.index.iter().map(|r| r.n_labels).collect(),
    })
}

/// ToV's score variants of one run ([`tov_variants`]).
#[derive(Debug, Clone, Default)]
pub struct TovVariants {
    /// Mean percentile of the held-out task's candidates, per score variant.
    pub percentiles: Vec<(String, f64)>,
    /// The raw (`mean`) and control-corrected (`mean − ctl`) scores per
    /// pool row (NaN in U), for [`TovVariants::rules`].
    pub scores: Vec<(String, Vec<f64>)>,
    /// Label tokens per pool row (the completion-length bins).
    pub completion_lengths: Vec<u32>,
}

/// The selection rules [`TovVariants::rules`] compares: name, Score+Random
/// (else score-only), number of length bins (`None` = the run's `--bins`).
pub const RULE_VARIANTS: [(&str, bool, Option<usize>); 4] = [
    ("score+random, bins", true, None),
    ("score only, bins", false, None),
    ("score+random, no bins", true, Some(1)),
    ("score only, no bins", false, Some(1)),
];

impl TovVariants {
    /// The share of a `n_select` selection from `source` under each rule of
    /// [`RULE_VARIANTS`] applied to each kept score, named `score: rule`.
    /// Bins and the random half follow `req` (`--bin-by`, `--bins`, the
    /// seed), so the run's own rule on its own score reproduces its
    /// selection.
    pub fn rules(
        &self,
        rows: &[ScoreRow],
        req: &SelectRequest,
        n_select: usize,
        source: &str,
    ) -> Vec<(String, f64)> {
        let sequence: Vec<u32> = rows.iter().map(|r| r.length).collect();
        let lengths = match req.bin_by {
            methods::BinBy::Completion => &self.completion_lengths,
            methods::BinBy::Sequence => &sequence,
        };
        // U (unscored) and the candidates are the same for every score.
        let (u, scored): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&i| rows[i].score.is_nan());
        let mut out = Vec::new();
        for (name, scores) in &self.scores {
            for (rule, random_half, bins) in RULE_VARIANTS {
                let n_bins = bins.unwrap_or(req.n_bins);
                let order = if random_half {
                    dsel_select::score_plus_random(
                        scores, lengths, &scored, &u, n_select, n_bins, req.seed,
                    )
                } else {
                    dsel_select::binned_top(scores, lengths, &scored, n_select, n_bins)
                };
                let hits = order.iter().filter(|&&i| rows[i].source == source).count();
                out.push((
                    format!("{name}: {rule}"),
                    hits as f64 / order.len().max(1) as f64,
                ));
            }
        }
        out
    }
}

/// The per-(task, method) aggregate over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityCell {
    /// Held-out task (`all` for the mean over tasks).
    pub task: String,
    /// Method row name.
    pub method: String,
    /// Share mean and std over seeds.
    pub share: (f64, f64),
    /// Pool share (mean over seeds).
    pub pool_share: f64,
    /// Lift mean and std over seeds.
    pub lift: (f64, f64),
    /// Percentile mean and std over seeds (None without scores).
    pub percentile: Option<(f64, f64)>,
    /// Mean wall seconds.
    pub wall: f64,
    /// Downstream test loss mean and std over seeds (None without it).
    pub loss: Option<(f64, f64)>,
    /// Test loss minus random's of the same task and seed, mean and std
    /// over the pairs (None for random itself, without downstream or
    /// without a random row).
    pub gap: Option<(f64, f64)>,
    /// Mean test loss without fine-tuning.
    pub no_finetune: Option<f64>,
    /// Mean recorded cost from a clean cache ([`QualityRun::cold_seconds`]).
    pub cold: f64,
    /// Mean target-dependent part of it ([`QualityRun::target_seconds`]).
    pub target: f64,
    /// Mean recorded CPU seconds.
    pub cpu: f64,
    /// Mean artifact bytes.
    pub bytes: f64,
    /// Largest peak resident memory, MiB.
    pub peak_mib: f64,
    /// Runs aggregated.
    pub n: usize,
}

impl QualityCell {
    /// The gap to random in units of its own spread over seeds (None
    /// without a gap or with a zero spread).
    pub fn gap_in_stds(&self) -> Option<f64> {
        self.gap
            .and_then(|(m, sd)| (sd > 0.0 && sd.is_finite()).then(|| m / sd))
    }
}

/// Aggregates runs per (task, method) in first-seen order, then per method over all tasks.
pub fn aggregate(runs: &[QualityRun]) -> Vec<QualityCell> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in runs {
        let k = (r.task.clone(), r.method.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut methods: Vec<String> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
    }
    let cell = |task: &str, method: &str, group: Vec<&QualityRun>| {
        let mean = |f: &dyn Fn(&QualityRun) -> f64| {
            group.iter().map(|r| f(r)).sum::<f64>() / group.len() as f64
        };
        let losses: Vec<f64> = group.iter().filter_map(|r| r.test_loss).collect();
        let gaps: Vec<f64> = group
            .iter()
            .filter_map(|r| {
                let random = runs
                    .iter()
                    .find(|q| q.method == "random" && q.task == r.task && q.seed == r.seed)?;
                Some(r.test_loss? - random.test_loss?)
            })
            .collect();
        let no_ft: Vec<f64> = group.iter().filter_map(|r| r.no_finetune_loss).collect();
        let share: Vec<f64> = group.iter().map(|r| r.share()).collect();
        let lift: Vec<f64> = group.iter().map(|r| r.lift()).collect();
        let pct: Vec<f64> = group.iter().filter_map(|r| r.percentile).collect();
        QualityCell {
            task: task.to_string(),
            method: method.to_string(),
            share: mean_std(&share),
            pool_share: group.iter().map(|r| r.pool_share()).sum::<f64>() / group.len() as f64,
            lift: mean_std(&lift),
            percentile: (!pct.is_empty()).then(|| mean_std(&pct)),
            wall: mean(&|r| r.wall_seconds),
            loss: (!losses.is_empty()).then(|| mean_std(&losses)),
            // Random's gap to itself is 0 by construction: not shown.
            gap: (method != "random" && !gaps.is_empty()).then(|| mean_std(&gaps)),
            no_finetune: (!no_ft.is_empty()).then(|| mean_std(&no_ft).0),
            cold: mean(&|r| r.cold_seconds),
            target: mean(&|r| r.target_seconds),
            cpu: mean(&|r| r.cpu_seconds),
            bytes: mean(&|r| r.artifact_bytes as f64),
            peak_mib: group.iter().map(|r| r.peak_mib).fold(0.0, f64::max),
            n: group.len(),
        }
    };
    let mut cells: Vec<QualityCell> = keys
        .iter()
        .map(|(t, m)| {
            cell(
                t,
                m,
                runs.iter()
                    .filter(|r| &r.task == t && &r.method == m)
                    .collect(),
            )
        })
        .collect();
    for m in &methods {
        cells.push(cell(
            "all",
            m,
            runs.iter().filter(|r| &r.method == m).collect(),
        ));
    }
    cells
}

fn pm(x: (f64, f64), digits: usize) -> String {
    format!("{:.*} ± {:.*}", digits, x.0, digits, x.1)
}

fn write_outputs(
    runs: &[QualityRun],
    opts: &QualityOptions,
    base: &SelectRequest,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cells = aggregate(runs);
    let mut md = format!(
        "Held-out source recall: target = {} held-out rows of each FLAN-CoT task; pool = the default mixture \
         with that task's remaining rows, {} examples sampled per seed; budget {}; model {}; seeds 1..={}.\n\
         share = fraction of the selection from the held-out task; lift = share / the task's pool share \
         (1 = random); percentile = mean rank of the task's pool examples under the raw scores (0 = first, 0.5 = random).\n\n\
         | task | method | share | pool share | lift | percentile | wall s |\n|---|---|---|---|---|---|---|\n",
        opts.n_target,
        opts.pool_limit,
        base.budget,
        base.model.display(),
        opts.seeds
    );
    for c in &cells {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {} | {} | {:.0} |",
            c.task,
            c.method,
            pm(c.share, 3),
            c.pool_share,
            pm(c.lift, 2),
            c.percentile.map_or("—".into(), |p| pm(p, 3)),
            c.wall
        );
    }
    if cells.iter().any(|c| c.loss.is_some()) {
        let _ = write!(
            md,
            "\nDownstream: LoRA trained on each selection (the preset's fine-tune, the run's seed), \
             test loss on {} further held-out rows of the task (in neither target nor pool); gap = \
             loss − random's loss of the same task and seed (negative = better than random), mean ± std \
             over seeds; gap/σ = the gap's mean over its std; \"beats random\" when the gap is below \
             zero by more than its std (\"one seed\": no spread to compare with).\n\n\
             | task | method | test loss | no fine-tune | gap to random | gap/σ | beats random |\n|---|---|---|---|---|---|---|\n",
            opts.n_test
        );
        for c in cells.iter().filter(|c| c.loss.is_some()) {
            let verdict = match c.gap {
                _ if c.method == "random" => "—",
                _ if c.n < 2 => "one seed",
                Some((m, sd)) if m < -sd => "yes",
                Some((m, sd)) if m > sd => "no (worse)",
                Some(_) => "within spread",
                None => "—",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {verdict} |",
                c.task,
                c.method,
                c.loss.map_or("—".into(), |l| pm(l, 4)),
                c.no_finetune.map_or("—".into(), |l| format!("{l:.4}")),
                c.gap.map_or("—".into(), |g| pm(g, 4)),
                c.gap_in_stds().map_or("—".into(), |z| format!("{z:+.2}")),
            );
        }
    }
    let _ = write!(
        md,
        "\nCost of each selection (mean over seeds): cold = recorded build seconds of every artifact \
         it used (from a clean cache); warm = the part that depends on the target (a second target's \
         cost when the rest is cached); CPU = recorded build CPU seconds, all threads; peak = the largest \
         resident-memory high-water mark of its runs; MB = its artifacts' bytes.\n\n\
         | method | cold s | warm s | CPU s | peak MiB | MB | lift | gap to random |\n|---|---|---|---|---|---|---|---|\n"
    );
    for c in cells.iter().filter(|c| c.task == "all") {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
            c.method,
            c.cold,
            c.target,
            c.cpu,
            c.peak_mib,
            c.bytes / 1e6,
            pm(c.lift, 2),
            c.gap.map_or("—".into(), |g| pm(g, 4)),
        );
    }
    dsel_store::atomic_write(out.join("table.md"), md.into_bytes())?;
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "task",
        "method",
        "seed",
        "pool_size",
        "pool_matching",
        "selected",
        "selected_matching",
        "share",
        "lift",
        "percentile",
        "wall_seconds",
        "test_loss",
        "no_finetune_loss",
        "cold_seconds",
        "target_seconds",
        "cpu_seconds",
        "artifact_bytes",
        "peak_mib",
    ])?;
    for r in runs {
        w.write_record([
            r.task.clone(),
            r.method.clone(),
            r.seed.to_string(),
            r.pool_size.to_string(),
            r.pool_matching.to_string(),
            r.selected.to_string(),
            r.selected_matching.to_string(),
            format!("{:.6}", r.share()),
            format!("{:.6}", r.lift()),
            r.percentile.map_or(String::new(), |p| format!("{p:.6}")),
            format!("{:.3}", r.wall_seconds),
            r.test_loss.map_or(String::new(), |l| format!("{l:.6}")),
            r.no_finetune_loss
                .map_or(String::new(), |l| format!("{l:.6}")),
            format!("{:.3}", r.cold_seconds),
            format!("{:.3}", r.target_seconds),
            format!("{:.3}", r.cpu_seconds),
            r.artifact_bytes.to_string(),
            format!("{:.1}", r.peak_mib),
        ])?;
    }
    dsel_store::atomic_write(out.join("table.csv"), w.into_inner()?)?;
    dsel_store::atomic_write(out.join("runs.json"), serde_json::to_vec_pretty(runs)?)?;
    dsel_store::atomic_write(out.join("report.html"), report_html(&cells).into_bytes())?;
    dsel_store::atomic_write(out.join("diagnosis.md"), diagnosis_md(runs).into_bytes())?;
    Ok(())
}

/// ToV's diagnosis: the mean percentile of the held-out task's candidates
/// under each score variant ([`tov_variants`]), then the lift of the
/// selection under each selection rule ([`TovVariants::rules`]), per (task,
/// ToV row), mean ± std over seeds.
fn diagnosis_md(runs: &[QualityRun]) -> String {
    let mut md = String::from(
        "ToV score variants from the same sweeps: mean percentile rank of the held-out task's \
         candidates (0 = ranked first, 0.5 = random), mean ± std over seeds.\n\n",
    );
    md.push_str(&variant_table(runs, |r| &r.variants));
    md.push_str(
        "\nSelection rules on the raw (`mean`) and control-corrected (`mean − ctl`) scores: \
         lift of a selection of the run's size (share of the held-out task ÷ its pool share; \
         1 = random), mean ± std over seeds. `bins` = the run's `--bins` equal-count length \
         bins (`--bin-by`); Score+Random takes half the budget at random from U.\n\n",
    );
    md.push_str(&variant_table(runs, |r| &r.rule_lifts));
    md
}

/// One markdown table: a row per (task, method) with variants, a column per
/// variant name, mean ± std over seeds.
fn variant_table(runs: &[QualityRun], get: fn(&QualityRun) -> &[(String, f64)]) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for (n, _) in get(r) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let mut md = String::from("| task | method |");
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(names.len()));
    md.push('\n');
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in runs.iter().filter(|r| !get(r).is_empty()) {
        let k = (r.task.clone(), r.method.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (t, m) in keys {
        let _ = write!(md, "| {t} | {m} |");
        for n in &names {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.task == t && r.method == m)
                .filter_map(|r| get(r).iter().find(|(k, _)| k == n).map(|x| x.1))
                .collect();
            if v.is_empty() {
                md.push_str(" — |");
            } else {
                let _ = write!(md, " {} |", pm(mean_std(&v), 3));
            }
        }
        md.push('\n');
    }
    md
}

/// A self-contained page: per task, one bar per method for the lift over
/// random (a line at 1) and one for the percentile rank (a line at 0.5),
/// with the seeds' standard deviation as whiskers.
fn report_html(cells: &[QualityCell]) -> String {
    use crate::compare::svg::{interval_plot, Interval};
    let mut tasks: Vec<&str> = Vec::new();
    for c in cells {
        if !tasks.contains(&c.task.as_str()) {
            tasks.push(&c.task);
        }
    }
    let charts: Vec<_> = tasks
        .iter()
        .map(|t| {
            let of_task: Vec<&QualityCell> = cells.iter().filter(|c| c.task == *t).collect();
            let lift: Vec<Interval> = of_task
                .iter()
                .map(|c| Interval {
                    label: &c.method,
                    mean: c.lift.0,
                    std: c.lift.1,
                })
                .collect();
            let pct: Vec<Interval> = of_task
                .iter()
                .filter_map(|c| {
                    c.percentile.map(|p| Interval {
                        label: &c.method,
                        mean: p.0,
                        std: p.1,
                    })
                })
                .collect();
            let gap: Vec<Interval> = of_task
                .iter()
                .filter_map(|c| {
                    c.gap.map(|g| Interval {
                        label: &c.method,
                        mean: g.0,
                        std: g.1,
                    })
                })
                .collect();
            minijinja::context! {
                task => t.to_string(),
                lift => interval_plot(&lift, Some(1.0), 2),
                percentile => (!pct.is_empty()).then(|| interval_plot(&pct, Some(0.5), 3)),
                gap => (!gap.is_empty()).then(|| interval_plot(&gap, Some(0.0), 4)),
            }
        })
        .collect();
    let cost: Vec<_> = cells
        .iter()
        .filter(|c| c.task == "all")
        .map(|c| {
            minijinja::context! {
                method => c.method.clone(),
                cold => format!("{:.0}", c.cold),
                warm => format!("{:.0}", c.target),
                cpu => format!("{:.0}", c.cpu),
                peak => format!("{:.0}", c.peak_mib),
                mb => format!("{:.1}", c.bytes / 1e6),
                lift => pm(c.lift, 2),
                gap => c.gap.map_or("—".into(), |g| pm(g, 4)),
            }
        })
        .collect();
    crate::compare::templates()
        .get_template("quality.html")
        .and_then(|t| t.render(minijinja::context! { tasks => charts, cost => cost }))
        .unwrap_or_else(|e| panic!("rendering quality.html: {e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source: &str, score: f64) -> ScoreRow {
        ScoreRow {
            id: String::new(),
            source: source.into(),
            length: 1,
            score,
            rounds: vec![],
            rank: None,
        }
    }

    #[test]
    fn percentile_is_zero_for_the_top_one_for_the_bottom_and_shares_ties() {
        let rows = vec![
            row("a", 3.0),
            row("b", 2.0),
            row("a", 1.0),
            row("b", f64::NAN),
        ];
        // a at ranks 0 and 2 of 3 scored rows: percentiles 0 and 1.
        assert_eq!(mean_percentile(&rows, "a"), Some(0.5));
        assert_eq!(mean_percentile(&rows, "b"), Some(0.5));
        let ties = vec![row("a", 1.0), row("b", 1.0), row("b", 0.0)];
        assert_eq!(mean_percentile(&ties, "a"), Some(0.25));
        assert_eq!(mean_percentile(&[row("a", f64::NAN)], "a"), None);
    }

    #[test]
    fn method_names_take_a_control_suffix_for_tov_only() {
        let m: QualityMethod = "tov+control".parse().unwrap();
        assert!(m.control && m.method == Method::Tov);
        assert!("bm25+control".parse::<QualityMethod>().is_err());
        assert!(!"less".parse::<QualityMethod>().unwrap().control);
        let m: QualityMethod = "tov-b+control+top".parse().unwrap();
        assert!(m.control && m.top && m.method == Method::TovB);
        let m: QualityMethod = "tov+top".parse().unwrap();
        assert!(!m.control && m.top);
        for bad in ["bm25+top", "tov+top+top", "tov+bins"] {
            assert!(bad.parse::<QualityMethod>().is_err(), "{bad}");
        }
    }
}
