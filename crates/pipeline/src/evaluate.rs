//! Training on a selection and evaluating it.
//!
//! * [`train_on_selection`]: ingest a `selection.jsonl` (tulu-style messages
//!   JSONL, as `runs/<task>-<method>/` holds it), tokenize it with the loaded
//!   model and train LoRA on all of it (stage `train`, through
//!   [`Pipeline::finetune`]).
//! * [`evaluate`]: stage `eval`: the loaded model, optionally with an
//!   adapter, on a target's test examples: completion-only test loss and the
//!   task metric (MMLU accuracy, BBH exact match, TyDiQA F1; a custom target
//!   reports its test loss), computed by `dsel-eval`. The artifact holds
//!   `results.json` ([`EvalReport`]), `items.jsonl` (one
//!   [`dsel_eval::ItemResult`] per metric example) and `losses.jsonl` (one
//!   per loss example).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dsel_basetrain::FinetuneConfig;
use dsel_eval::{BbhOptions, ItemResult, MmluOptions, PromptEncoder, TydiqaOptions};
use dsel_ingest::{Example, ReadOptions, TargetSpec, TargetSplit, TaskName};
use dsel_model::LoraConfig;
use dsel_store::{Artifact, StageSpec, UnitWork};
use dsel_tokenize::TokenizedSet;
use dsel_train::TrainConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Pipeline;

/// Stage name of the fine-tune on a selection.
pub const TRAIN_STAGE: &str = "train";
/// Version of the `eval` stage's computation and output layout (2: scored
/// in units of `unit_examples`, batched within a unit).
pub const EVAL_VERSION: &str = "eval-2";

/// How a selection is trained on (LoRA shape, optimisation, sequence length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOnSelection {
    /// LoRA shape (its seed is replaced by the run seed).
    pub lora: LoraConfig,
    /// Optimisation (its seed is replaced by the run seed).
    pub train: TrainConfig,
    /// Maximum tokens per example.
    pub max_len: usize,
    /// How longer examples are cut (the default keeps the completion and
    /// drops the prompt's start).
    #[serde(default)]
    pub truncation: dsel_tokenize::Truncation,
}

impl TrainOnSelection {
    /// A CPU-sized run: LoRA r 8, alpha 16, no dropout on q,k,v,o; 2 epochs
    /// at lr 2e-4, batches of 8, 256 tokens.
    pub fn cpu() -> Self {
        TrainOnSelection {
            lora: LoraConfig {
                rank: 8,
                alpha: 16.0,
                dropout: 0.0,
                targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
                seed: 0,
            },
            train: TrainConfig {
                epochs: 2,
                lr: 2e-4,
                warmup_ratio: 0.03,
                micro_batch: 8,
                grad_accum: 1,
                ..TrainConfig::default()
            },
            max_len: 256,
            truncation: Default::default(),
        }
    }

    /// LESS's fine-tune on the selected data (`less/scripts/train/base_training_args.sh`):
    /// LoRA r 128, alpha 512, dropout 0.1 on q,k,v,o; 4 epochs, lr 2e-5 with
    /// linear schedule and 3% warmup, no weight decay, 32 examples per step
    /// (8 × 4 accumulation), 2048 tokens.
    pub fn paper() -> Self {
        TrainOnSelection {
            lora: LoraConfig {
                rank: 128,
                alpha: 512.0,
                dropout: 0.1,
                targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
                seed: 0,
            },
            train: TrainConfig {
                epochs: 4,
                lr: 2e-5,
                warmup_ratio: 0.03,
                micro_batch: 8,
                grad_accum: 4,
                ..TrainConfig::default()
            },
            max_len: 2048,
            truncation: Default::default(),
        }
    }

    /// The fine-tune configuration for `seed` (LoRA init and training seeds).
    pub fn finetune_config(&self, seed: u64) -> FinetuneConfig {
        let mut lora = self.lora.clone();
        lora.seed = seed;
        let mut train = self.train.clone();
        train.seed = seed;
        FinetuneConfig {
            lora,
            train,
            save_epochs: false,
            group_by_length: false,
        }
    }
}

fn file_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Train LoRA on every example of `selection_jsonl` with the loaded model
/// (stage [`TRAIN_STAGE`]); returns the fine-tune artifact
/// (`adapter.safetensors`, `train.json`). Ingest (keyed on the file's
/// content), tokenize and train are each cached.
pub fn train_on_selection(
    p: &mut Pipeline,
    selection_jsonl: &Path,
    cfg: &TrainOnSelection,
    seed: u64,
) -> Result<Artifact> {
    p.model()?;
    let fingerprint = file_hash(selection_jsonl)?;
    let spec = StageSpec::new(
        dsel_ingest::STAGE,
        dsel_ingest::STAGE_VERSION,
        json!({"kind": "selection", "fingerprint": fingerprint}),
    );
    let path = selection_jsonl.to_path_buf();
    let label = format!("selection {}", selection_jsonl.display());
    let examples = p.ingest(&spec, &label, || {
        let mut report = dsel_ingest::IngestReport::default();
        let examples =
            dsel_ingest::read_messages_jsonl(&path, &ReadOptions::default(), &mut report)?;
        if examples.is_empty() {
            bail!("{}: no trainable examples", path.display());
        }
        report.kept = examples.len() as u64;
        Ok((examples, report))
    })?;
    let tok = p.tokenize(&examples, cfg.max_len, cfg.truncation, &label)?;
    let n = TokenizedSet::open(tok.dir())?.len();
    if n == 0 {
        bail!(
            "{}: no example left after tokenization (max_len {})",
            selection_jsonl.display(),
            cfg.max_len
        );
    }
    let indices: Vec<usize> = (0..n).collect();
    p.finetune(
        TRAIN_STAGE,
        &label,
        &tok,
        &indices,
        None,
        &cfg.finetune_config(seed),
    )
}

/// Examples per subtask to evaluate (`None`: all), sampled with the seed of
/// [`EvalConfig::sample_seed`] (`dsel_ingest::load_target_test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCaps {
    /// Per MMLU subject.
    pub mmlu: Option<usize>,
    /// Per BBH task.
    pub bbh: Option<usize>,
    /// Per TyDiQA language.
    pub tydiqa: Option<usize>,
    /// Per subtask of a custom target.
    pub custom: Option<usize>,
}

/// What `evaluate` computes (all of it is part of the artifact key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Per-subtask caps.
    pub caps: TaskCaps,
    /// Seed of the capped sampling.
    pub sample_seed: u64,
    /// Compute the task metric (scoring / generation); `false`: test loss only.
    pub metric: bool,
    /// MMLU protocol (shots, answer prefix, candidates). A shot count also
    /// applies to the MMLU test-loss prompts.
    pub mmlu: MmluOptions,
    /// BBH generation (max new tokens, stops).
    pub bbh: BbhOptions,
    /// TyDiQA generation.
    pub tydiqa: TydiqaOptions,
    /// Maximum tokens of a test-loss sequence.
    pub loss_max_len: usize,
    /// Padded tokens per forward batch (loss and MMLU).
    pub batch_tokens: usize,
    /// Test examples per unit: the resumable piece that shard workers
    /// divide (`dsel eval --shard i/N`; unit u goes to worker u mod N).
    pub unit_examples: usize,
}

impl EvalConfig {
    /// A CPU run: 10 questions per MMLU subject (5-shot, LESS protocol), 5
    /// per BBH task (128 new tokens), 20 per TyDiQA language (50 new tokens).
    pub fn cpu() -> Self {
        EvalConfig {
            caps: TaskCaps {
                mmlu: Some(10),
                bbh: Some(5),
                tydiqa: Some(20),
                custom: Some(100),
            },
            sample_seed: 0,
            metric: true,
            mmlu: MmluOptions::less(),
            bbh: BbhOptions::default(),
            tydiqa: TydiqaOptions::default(),
            loss_max_len: 4096,
            batch_tokens: 2048,
            unit_examples: 64,
        }
    }

    /// LESS's evaluation sizes: all of MMLU, 40 per BBH task with 512 new
    /// tokens, 200 per TyDiQA language.
    pub fn paper() -> Self {
        let mut c = Self::cpu();
        c.caps = TaskCaps {
            mmlu: None,
            bbh: Some(40),
            tydiqa: Some(200),
            custom: None,
        };
        c.bbh.max_new_tokens = 512;
        c
    }
}

/// The headline result of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Target (task name or custom file).
    pub task: String,
    /// Mean over test examples of the completion-only mean loss of the reference.
    pub test_loss: f64,
    /// `accuracy` (MMLU), `exact_match` (BBH), `f1` (TyDiQA), `test_loss`
    /// (custom targets, or when the metric is off).
    pub metric_name: String,
    /// The metric in [0, 1] (MMLU: mean over questions; BBH, TyDiQA: mean over subtasks).
    pub metric: f64,
    /// The metric per subtask.
    pub per_subtask: BTreeMap<String, f64>,
    /// Test examples evaluated.
    pub n: usize,
    /// Wall seconds of the evaluation (when it was built).
    pub seconds: f64,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The headline result.
    #[serde(flatten)]
    pub result: EvalResult,
    /// Examples per subtask.
    pub n_per_subtask: BTreeMap<String, usize>,
    /// Test loss per subtask.
    pub loss_per_subtask: BTreeMap<String, f64>,
    /// Examples in the test loss (those whose completion fits `loss_max_len`).
    pub loss_n: usize,
    /// Further metrics (TyDiQA `exact_match`).
    pub extra: BTreeMap<String, f64>,
    /// The per-subtask cap applied.
    pub cap: Option<usize>,
    /// Its sampling seed.
    pub sample_seed: u64,
    /// Ids of the evaluated examples, in order.
    pub sampled_ids: Vec<String>,
    /// Model fingerprint.
    pub model: String,
    /// Adapter artifact key (`None`: the base model).
    pub adapter: Option<String>,
    /// The configuration.
    pub config: EvalConfig,
}

/// Read the report of an `eval` artifact.
pub fn read_report(artifact: &Artifact) -> Result<EvalReport> {
    let path = artifact.path("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write_jsonl(path: &Path, items: &[ItemResult]) -> Result<()> {
    let mut out = Vec::new();
    for it in items {
        serde_json::to_writer(&mut out, it)?;
        out.push(b'\n');
    }
    dsel_store::atomic_write(path, &out)
}

/// Evaluate the loaded model (plus `adapter`, a fine-tune artifact, when
/// given; `lora` is its shape, read from the adapter file when `None`) on
/// `task`'s test examples: stage `eval`, keyed on the model fingerprint, the
/// adapter key, the task, the content of the files its test set is read
/// from ([`dsel_ingest::target_fingerprint`]) and `cfg`.
pub fn evaluate(
    p: &mut Pipeline,
    task: &str,
    adapter: Option<&Artifact>,
    lora: Option<&LoraConfig>,
    cfg: &EvalConfig,
) -> Result<EvalResult> {
    evaluate_part(p, task, adapter, lora, cfg)?
        .context("the evaluation was not assembled: this process only did its part of it")
}

/// [`evaluate`] as `p.work` says ([`crate::Work`]): the test examples are
/// scored in units of [`EvalConfig::unit_examples`] that shard workers
/// divide; `None` when this process only did its part.
pub fn evaluate_part(
    p: &mut Pipeline,
    task: &str,
    adapter: Option<&Artifact>,
    lora: Option<&LoraConfig>,
    cfg: &EvalConfig,
) -> Result<Option<EvalResult>> {
    let spec_t = TargetSpec::parse(task)?;
    let (task_name, named, cap) = match &spec_t {
        TargetSpec::Named(t) => {
            let cap = match t {
                TaskName::Mmlu => cfg.caps.mmlu,
                TaskName::Bbh => cfg.caps.bbh,
                TaskName::Tydiqa => cfg.caps.tydiqa,
            };
            (t.name().to_string(), Some(*t), cap)
        }
        TargetSpec::File(path) => (path.display().to_string(), None, cfg.caps.custom),
    };
    // Every file the test set is read from (named tasks too: their data root's files).
    let task_fp = dsel_ingest::target_fingerprint(&spec_t, &p.data_root, TargetSplit::Test)?;
    let (format, bos_id) = p.chat_format()?;
    let fp = p.model_key()?;
    let m = p.model()?;
    let tokenizer = m
        .raw
        .tokenizer
        .clone()
        .with_context(|| format!("model {} has no tokenizer", m.path.display()))?;
    let mut stop_ids: Vec<u32> = m.raw.config.eos_token_id.into_iter().collect();
    if let Some(id) = m
        .raw
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
    {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    let mut model = p.fresh_model()?;
    if let Some(a) = adapter {
        if let Some(l) = lora {
            model.add_lora(l)?;
        }
        model.load_lora(&a.path("adapter.safetensors"))?;
    }
    // The LoRA actually applied (the adapter file's stored config wins).
    let mut spec = StageSpec::new(
        "eval",
        EVAL_VERSION,
        json!({"model": fp, "task": task_name, "task_fingerprint": task_fp, "eval": cfg,
               "lora": model.lora_config()}),
    )
    .with_seed(cfg.sample_seed);
    if let Some(a) = adapter {
        spec = spec.input(a.key().clone());
    }
    let adapter_key = adapter.map(|a| a.key().as_str().to_string());
    let data_root = p.data_root.clone();
    let label = format!(
        "{task_name} ({})",
        adapter.map_or("base model".to_string(), |a| format!(
            "adapter {}",
            a.key().short()
        ))
    );
    let examples_or_err = || -> Result<Vec<Example>> {
        let (examples, _) =
            dsel_ingest::load_target_test(&spec_t, &data_root, cap, cfg.sample_seed)?;
        if examples.is_empty() {
            bail!("{task_name}: no test examples");
        }
        // MMLU with a chosen shot count: the test loss sees the same prompts.
        match (named, cfg.mmlu.shots) {
            (Some(TaskName::Mmlu), Some(k)) => examples
                .into_iter()
                .map(|mut e| {
                    if let Some(last) = e.messages.last_mut() {
                        last.content = dsel_eval::mmlu_keep_shots(&last.content, k)
                            .with_context(|| format!("example {}", e.id))?
                            .0;
                    }
                    Ok(e)
                })
                .collect(),
            _ => Ok(examples),
        }
    };
    let mut mmlu_opts = cfg.mmlu.clone();
    if cfg.mmlu.shots.is_some() {
        mmlu_opts.shots = None; // applied to the examples above
    }
    let enc = PromptEncoder::new(tokenizer, format, bos_id, stop_ids)?;
    // One unit: the test losses and the metric's items of its examples.
    let score_unit = |examples: &[Example]| -> Result<EvalUnit> {
        let losses = dsel_eval::evaluate_loss(
            &model,
            &enc,
            examples,
            named.is_some(),
            cfg.loss_max_len,
            cfg.batch_tokens,
        )?;
        let items = match (named, cfg.metric) {
            (Some(TaskName::Mmlu), true) => {
                dsel_eval::evaluate_mmlu(&model, &enc, examples, &mmlu_opts)?
            }
            (Some(TaskName::Bbh), true) => {
                dsel_eval::evaluate_bbh(&model, &enc, examples, &cfg.bbh)?
            }
            (Some(TaskName::Tydiqa), true) => {
                dsel_eval::evaluate_tydiqa(&model, &enc, examples, &cfg.tydiqa)?
            }
            _ => Vec::new(),
        };
        Ok(EvalUnit { losses, items })
    };
    let run = |scratch: &Path, out: Option<&Path>, work: UnitWork| -> Result<serde_json::Value> {
        let t0 = Instant::now();
        anyhow::ensure!(
            cfg.unit_examples > 0,
            "eval: unit_examples must be positive"
        );
        let examples = examples_or_err()?;
        let n = examples.len();
        let n_units = n.div_ceil(cfg.unit_examples);
        let range_of = |u: usize| u * cfg.unit_examples..((u + 1) * cfg.unit_examples).min(n);
        let unit_path = |u: usize| scratch.join(format!("unit-{u:06}.json"));
        let what = format!("eval {label}");
        let read = |u: usize| -> Option<EvalUnit> {
            if !dsel_store::trust_sealed(unit_path(u), &what) {
                return None;
            }
            let bytes = std::fs::read(unit_path(u)).ok()?;
            serde_json::from_slice(&bytes).ok()
        };
        tracing::info!("{what}: {n} test examples in {n_units} units");
        let mut progress = dsel_progress::Progress::new(&what, n as u64, "ex");
        let units = dsel_store::shard::run_units_with(
            n_units,
            work,
            &what,
            scratch,
            |u| read(u).is_some(),
            |u| {
                let unit = score_unit(&examples[range_of(u)])?;
                dsel_store::write_sealed(unit_path(u), serde_json::to_vec(&unit)?)
            },
            |u, _| progress.inc(range_of(u).len() as u64),
        )?;
        progress.finish();
        let Some(out) = out.filter(|_| units.complete()) else {
            return Ok(serde_json::json!({"units": units.total, "computed": units.computed}));
        };
        let (mut losses, mut items) = (Vec::new(), Vec::new());
        for u in 0..n_units {
            let unit =
                read(u).with_context(|| format!("{what}: unit {u} vanished or is corrupt"))?;
            losses.extend(unit.losses);
            items.extend(unit.items);
        }
        if losses.is_empty() {
            bail!("{task_name}: no test example could be scored for the loss");
        }
        let (test_loss, loss_per_subtask) = dsel_eval::aggregate(&losses, false);
        let mut extra = BTreeMap::new();
        let (metric_name, macro_avg) = match (named, cfg.metric) {
            (Some(TaskName::Mmlu), true) => ("accuracy", false),
            (Some(TaskName::Bbh), true) => ("exact_match", true),
            (Some(TaskName::Tydiqa), true) => {
                let em: Vec<ItemResult> = items
                    .iter()
                    .map(|i| ItemResult {
                        score: i.exact_match.unwrap_or(0.0),
                        ..i.clone()
                    })
                    .collect();
                extra.insert("exact_match".to_string(), dsel_eval::aggregate(&em, true).0);
                ("f1", true)
            }
            _ => ("test_loss", false),
        };
        let (metric, per_subtask) = if items.is_empty() {
            (test_loss, loss_per_subtask.clone())
        } else {
            dsel_eval::aggregate(&items, macro_avg)
        };
        let mut n_per_subtask: BTreeMap<String, usize> = BTreeMap::new();
        for e in &examples {
            *n_per_subtask.entry(e.subtask.clone()).or_default() += 1;
        }
        let report = EvalReport {
            result: EvalResult {
                task: task_name.clone(),
                test_loss,
                metric_name: metric_name.to_string(),
                metric,
                per_subtask,
                n,
                seconds: t0.elapsed().as_secs_f64(),
            },
            n_per_subtask,
            loss_per_subtask,
            loss_n: losses.len(),
            extra,
            cap,
            sample_seed: cfg.sample_seed,
            sampled_ids: examples.iter().map(|e| e.id.clone()).collect(),
            model: fp.clone(),
            adapter: adapter_key.clone(),
            config: cfg.clone(),
        };
        tracing::info!(
            "{what}: {metric_name} {metric:.4}, test loss {test_loss:.4}, n {n} ({:.1}s)",
            report.result.seconds
        );
        write_jsonl(&out.join("items.jsonl"), &items)?;
        write_jsonl(&out.join("losses.jsonl"), &losses)?;
        dsel_store::atomic_write(
            out.join("results.json"),
            serde_json::to_vec_pretty(&report)?,
        )?;
        Ok(serde_json::to_value(&report.result)?)
    };
    match p.pool_stage(&spec, &label, run)? {
        Some(a) => Ok(Some(read_report(&a)?.result)),
        None => Ok(None),
    }
}

/// One unit of an evaluation's scratch state: its examples' test losses
/// and metric items.
#[derive(Serialize, Deserialize)]
struct EvalUnit {
    losses: Vec<ItemResult>,
    items: Vec<ItemResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    use candle_core::Device;
    use dsel_model::{Batch, Mode};

    use dsel_testkit::data_root;

    fn line(user: &str, assistant: &str) -> String {
        serde_json::to_string(&json!({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]}))
        .unwrap()
    }

    /// Test loss by hand: tulu text, label = answer + "</s>\n", `example_losses`.
    fn hand_loss(
        model: &dsel_model::Model,
        enc: &dyn Fn(&str) -> Vec<u32>,
        user: &str,
        answer: &str,
    ) -> f64 {
        let mut ids = vec![1u32];
        ids.extend(enc(&format!("<|user|>\n{user}\n<|assistant|>\n")));
        let n = ids.len();
        ids.extend(enc(&format!("{answer}</s>\n")));
        let mut mask = vec![0u8; n];
        mask.resize(ids.len(), 1);
        let b = Batch::new(&[(&ids, &mask)], &Device::Cpu).unwrap();
        let l: Vec<f32> = model
            .example_losses(&b, Mode::Eval)
            .unwrap()
            .to_vec1()
            .unwrap();
        l[0] as f64
    }

    #[test]
    fn train_on_a_selection_then_evaluate_with_and_without_the_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let sel = tmp.path().join("selection.jsonl");
        let target = tmp.path().join("target.jsonl");
        let pairs = [
            ("Tom had a red ball.", "He liked to play with it."),
            ("Lily saw a big dog.", "The dog was happy."),
            ("The sun was hot.", "They went to the park."),
            ("Sam found a box.", "It had a toy in it."),
        ];
        let text: Vec<String> = pairs.iter().map(|(u, a)| line(u, a)).collect();
        std::fs::write(&sel, text.join("\n") + "\n").unwrap();
        std::fs::write(&target, text[..2].join("\n") + "\n").unwrap();
        let model_dir = data_root().join("models/stories260K/hf");

        let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
        p.load_model(&model_dir).unwrap();
        let mut cfg = TrainOnSelection::cpu();
        cfg.max_len = 64;
        cfg.train.epochs = 3;
        cfg.train.lr = 5e-3;
        cfg.train.micro_batch = 4;
        let adapter = train_on_selection(&mut p, &sel, &cfg, 3).unwrap();
        assert!(adapter.path("adapter.safetensors").exists());
        assert_eq!(adapter.stage(), TRAIN_STAGE);

        let task = target.display().to_string();
        let ecfg = EvalConfig::cpu();
        let base = evaluate(&mut p, &task, None, None, &ecfg).unwrap();
        let tuned = evaluate(
            &mut p,
            &task,
            Some(&adapter),
            Some(&cfg.finetune_config(3).lora),
            &ecfg,
        )
        .unwrap();
        assert_eq!((base.n, tuned.n), (2, 2));
        assert_eq!(base.metric_name, "test_loss");
        assert_eq!(base.metric, base.test_loss);
        // Independent base-model loss: mean of the two hand-computed losses.
        let raw = &p.model().unwrap().raw;
        let tok = raw.tokenizer.clone().unwrap();
        let mut m = dsel_model::Model::new(raw).unwrap();
        // At the pipeline's (shipped default) precision.
        m.set_precision(p.precision()).unwrap();
        let enc = |s: &str| tok.encode_fast(s, false).unwrap().get_ids().to_vec();
        let want = pairs[..2]
            .iter()
            .map(|(u, a)| hand_loss(&m, &enc, u, a))
            .sum::<f64>()
            / 2.0;
        assert!(
            (base.test_loss - want).abs() < 1e-4,
            "{} vs {want}",
            base.test_loss
        );
        // Training on the target's own examples lowers its loss.
        assert!(
            tuned.test_loss < base.test_loss - 0.05,
            "{} vs {}",
            tuned.test_loss,
            base.test_loss
        );

        // Everything is cached: a second pipeline builds nothing.
        let mut q = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
        q.load_model(&model_dir).unwrap();
        let a2 = train_on_selection(&mut q, &sel, &cfg, 3).unwrap();
        assert_eq!(a2.key(), adapter.key());
        let again = evaluate(&mut q, &task, Some(&a2), None, &ecfg).unwrap();
        assert!((again.test_loss - tuned.test_loss).abs() < 1e-12);
        assert!(q.records.iter().all(|r| r.cache_hit), "{:?}", q.records);
    }

    fn replace_in(path: &Path, from: &str, to: &str) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(from), "{from:?} not in {}", path.display());
        std::fs::write(path, text.replacen(from, to, 1)).unwrap();
    }

    /// A named target's ingest and eval artifacts are keyed on the bytes of
    /// the files they read: editing a row rebuilds them, and another data
    /// root is keyed by its own content. Runs on a copy of one MMLU subject
    /// (its dev file and the first rows of its test file) in a scratch data root.
    #[test]
    fn named_targets_are_keyed_on_the_files_they_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (dev, test) = (
            "tasks/mmlu/dev/anatomy_dev.csv",
            "tasks/mmlu/test/anatomy_test.csv",
        );
        let copy = |root: &Path| {
            for rel in [dev, test] {
                let text = std::fs::read_to_string(data_root().join(rel)).unwrap();
                let text = if rel == test {
                    text.lines().take(3).map(|l| format!("{l}\n")).collect()
                } else {
                    text
                };
                std::fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
                std::fs::write(root.join(rel), text).unwrap();
            }
        };
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        copy(&a);
        copy(&b);
        let cache = tmp.path().join("cache");
        let mmlu = TargetSpec::Named(TaskName::Mmlu);
        let hit = |p: &Pipeline| p.records.last().unwrap().cache_hit;

        // Validation (ingest): keyed on the dev file.
        let mut p = Pipeline::new(&cache, &a).unwrap();
        let v1 = p.ingest_target(&mmlu).unwrap();
        assert_eq!(
            v1.manifest().config["fingerprint"],
            dsel_testkit::expected_target_fingerprint(&a, &[dev])
        );
        replace_in(&a.join(dev), "hyoid bone", "stapes bone");
        let v2 = p.ingest_target(&mmlu).unwrap();
        assert!(!hit(&p), "an edited dev row was served from the cache");
        assert_ne!(v2.key(), v1.key());
        assert_eq!(
            v2.manifest().config["fingerprint"],
            dsel_testkit::expected_target_fingerprint(&a, &[dev])
        );
        let ex = p.examples(&v2).unwrap();
        assert!(ex[0].messages[0].content.contains("stapes bone"));
        // `b` still holds the original rows: its own content's key (v1's).
        let mut q = Pipeline::new(&cache, &b).unwrap();
        assert_eq!(q.ingest_target(&mmlu).unwrap().key(), v1.key());
        assert!(hit(&q));

        // Test (eval): keyed on the test file and the dev file (the shots).
        p.load_model(&data_root().join("models/stories260K/hf"))
            .unwrap();
        let mut cfg = EvalConfig::cpu();
        cfg.caps.mmlu = Some(1);
        cfg.mmlu = MmluOptions {
            shots: Some(0),
            ..MmluOptions::direct()
        };
        let eval_key = |p: &Pipeline| p.records.last().unwrap().key.clone();
        evaluate(&mut p, "mmlu", None, None, &cfg).unwrap();
        let e1 = eval_key(&p);
        let fp = |p: &Pipeline, k: &str| {
            p.store.open_artifact(k).unwrap().manifest().config["task_fingerprint"].clone()
        };
        assert_eq!(
            fp(&p, &e1),
            dsel_testkit::expected_target_fingerprint(&a, &[dev, test])
        );
        replace_in(&a.join(test), "stylomastoid", "jugular");
        evaluate(&mut p, "mmlu", None, None, &cfg).unwrap();
        assert!(!hit(&p), "an edited test row was served from the cache");
        let e2 = eval_key(&p);
        assert_ne!(e2, e1);
        assert_eq!(
            fp(&p, &e2),
            dsel_testkit::expected_target_fingerprint(&a, &[dev, test])
        );
        // The same model on `b`'s (original) files: neither of `a`'s keys.
        q.load_model(&data_root().join("models/stories260K/hf"))
            .unwrap();
        evaluate(&mut q, "mmlu", None, None, &cfg).unwrap();
        assert!(!hit(&q));
        assert!(![&e1, &e2].contains(&&eval_key(&q)));
        assert_eq!(
            fp(&q, &eval_key(&q)),
            dsel_testkit::expected_target_fingerprint(&b, &[dev, test])
        );
    }

    /// Slow in the dev profile (~4.5 min on a loaded 2-core machine: the
    /// stories260K forward over 57 prompts dominates): run with `--ignored`.
    #[test]
    #[ignore]
    fn mmlu_eval_records_caps_and_sampled_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
        p.load_model(&data_root().join("models/stories260K/hf"))
            .unwrap();
        let mut cfg = EvalConfig::cpu();
        cfg.caps.mmlu = Some(1);
        // Zero-shot, letters as the first assistant tokens (single tokens for
        // this tokenizer: one row per question) to keep the test short.
        cfg.mmlu = MmluOptions {
            shots: Some(0),
            ..MmluOptions::direct()
        };
        let t = std::time::Instant::now();
        let r = evaluate(&mut p, "mmlu", None, None, &cfg).unwrap();
        assert_eq!(r.metric_name, "accuracy");
        assert_eq!(r.n, 57);
        assert_eq!(r.per_subtask.len(), 57);
        assert!((0.0..=1.0).contains(&r.metric));
        assert!(r.test_loss.is_finite() && r.test_loss > 0.0);
        let key = p.records.last().unwrap().key.clone();
        let art = p.store.open_artifact(&key).unwrap();
        let rep = read_report(&art).unwrap();
        assert_eq!(rep.cap, Some(1));
        assert_eq!(rep.sampled_ids.len(), 57);
        assert!(rep.n_per_subtask.values().all(|&n| n == 1));
        let items = std::fs::read_to_string(art.path("items.jsonl")).unwrap();
        let items: Vec<ItemResult> = items
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(items.len(), 57);
        let acc = items.iter().map(|i| i.score).sum::<f64>() / 57.0;
        assert!((acc - r.metric).abs() < 1e-12);
        assert!(items
            .iter()
            .all(|i| i.shots == Some(0) && i.logprobs.len() == 4));
        eprintln!("mmlu test: {:.1}s", t.elapsed().as_secs_f64());
    }

    /// The real instruction-tuned model, base, MMLU with 5 questions per
    /// subject (LESS protocol, 5-shot). Slow: run in release with
    /// `cargo test --release -p dsel-pipeline smollm2 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn smollm2_base_mmlu() {
        let model = std::env::var("DSEL_SMOLLM2")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
                ))
            });
        let cache = std::env::var("DSEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache"))
            });
        let mut p = Pipeline::new(&cache, &data_root()).unwrap();
        p.load_model(&model).unwrap();
        let mut cfg = EvalConfig::cpu();
        cfg.caps.mmlu = Some(5);
        let r = evaluate(&mut p, "mmlu", None, None, &cfg).unwrap();
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        assert_eq!(r.n, 285);
        assert!(r.metric > 0.15, "accuracy {}", r.metric);
    }
}
