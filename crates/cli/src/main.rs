//! `dsel`: choose fine-tuning data. A thin command-line layer over the
//! workspace's libraries: every subcommand parses options and calls them.

mod bench;
mod slurm;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dsel_ingest::{SubsetOptions, TargetSpec};
use dsel_pipeline::methods::{self, Method, Preset, SelectRequest, SelectionRule};
use dsel_pipeline::{compare, evaluate, Pipeline};
use dsel_select::{Budget, Transform};
use dsel_store::GcOptions;
use dsel_sweep::SweepConfig;
use dsel_valtune::ValtuneConfig;

/// Choose which fine-tuning data to train a language model on.
#[derive(Parser, Debug)]
#[command(name = "dsel", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// Artifact cache folder (every stage's output lives here, keyed by content).
    #[arg(long, global = true, env = "DSEL_CACHE", default_value = ".cache")]
    cache: PathBuf,
    /// Root of the shared data (pools, tasks, models).
    #[arg(
        long,
        global = true,
        env = "DSEL_DATA_ROOT",
        default_value = "../shared/data"
    )]
    data_root: PathBuf,
    /// Precision of the model's matrix products: `bf16` (bf16 inputs, f32
    /// accumulation; weights, norms, softmax, LoRA weights, gradients and
    /// optimizer state stay f32), `f32`, or `auto`: bf16 where the processor
    /// runs bf16 products on its own units (AVX512-BF16 or AMX), else f32.
    /// Part of every model stage's key.
    #[arg(long, global = true, env = "DSEL_PRECISION", value_enum, default_value_t = PrecisionChoice::Auto)]
    precision: PrecisionChoice,
    /// File locks on the cache (`off` for a filesystem whose locks are
    /// missing or hang: builds of one artifact are then not serialised and
    /// `cache gc` refuses to run; sharded runs need no lock).
    #[arg(long, global = true, env = "DSEL_LOCKS", default_value = "on", value_parser = clap::builder::BoolishValueParser::new(), value_name = "on|off")]
    locks: bool,
}

/// `--precision`: a fixed precision or the machine's fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PrecisionChoice {
    /// bf16 where the processor runs bf16 products natively (AVX512-BF16 or AMX), else f32.
    Auto,
    /// bf16 GEMM inputs, f32 accumulation.
    Bf16,
    /// f32 throughout.
    F32,
}

impl Global {
    /// The precision to run at.
    fn precision(&self) -> dsel_model::Precision {
        match self.precision {
            PrecisionChoice::Auto => dsel_model::Precision::fastest(),
            PrecisionChoice::Bf16 => dsel_model::Precision::Bf16,
            PrecisionChoice::F32 => dsel_model::Precision::F32,
        }
    }

    /// A pipeline over the cache and data root, at the chosen precision.
    fn pipeline(&self) -> Result<Pipeline> {
        let mut p = Pipeline::new(&self.cache, &self.data_root)?;
        p.set_precision(self.precision());
        p.store.set_locking(self.locks);
        Ok(p)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Score the pool against a target with one method and write runs/<task>-<method>/.
    Select(SelectArgs),
    /// Ingest a pool mixture and/or a target into canonical example tables (cached).
    Ingest(IngestArgs),
    /// Ingest and tokenize a pool and/or a target with a model's tokenizer (cached).
    Tokenize(TokenizeArgs),
    /// Per-token loss sweep of a pool under the base model (cached).
    Sweep(SweepArgs),
    /// LoRA fine-tune the model on a selection (runs/<task>-<method>/selection.jsonl) (cached).
    Train(TrainArgs),
    /// Evaluate the model (optionally fine-tuned on a selection) on a target's test set (cached).
    Eval(EvalArgs),
    /// Train with online batch selection (GREATS, UDS, max-loss, grad-norm, none) and evaluate.
    TrainOnline(TrainOnlineArgs),
    /// Run several methods, train on each selection, evaluate, and write runs/<task>-compare/.
    Compare(CompareArgs),
    /// Held-out source recall benchmark: does each method select the target's
    /// own task? (FLAN-CoT tasks held out in turn; writes runs/quality/.)
    Quality(QualityArgs),
    /// `select --merge`: assemble a sharded selection (after `select
    /// --prepare` and every `select --shard i/N` worker, on the same cache)
    /// and select; a unit no worker computed is an error.
    Merge(RunArgs),
    /// Write (and with --submit, submit) Slurm jobs that run a selection
    /// sharded over N tasks: prepare, a job array of shard workers, merge.
    Slurm(slurm::SlurmArgs),
    /// Inspect and maintain the artifact cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Throughput benchmarks: GEMM GFLOP/s, forward and LoRA train-step tokens/s, peak memory.
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug, Clone)]
struct PoolArgs {
    /// Pool mixture: a name in pipelines/pools/ (default, tiny, flan-cot, t0) or a .toml path.
    #[arg(long, default_value = "default")]
    pool: String,
    #[arg(long, help = pool_limit_help())]
    pool_limit: Option<usize>,
    /// Keep at most this many examples per source.
    #[arg(long)]
    per_source_cap: Option<usize>,
    /// How `--pool-limit` examples are drawn: `stratified` keeps every
    /// source's share of the pool (largest remainder), `uniform` draws
    /// without regard to source.
    #[arg(long, value_enum, default_value_t = PoolSample::Stratified)]
    pool_sample: PoolSample,
}

/// How a pool limit is drawn ([`dsel_ingest::SubsetOptions::stratify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PoolSample {
    /// Every source keeps its share of the pool.
    Stratified,
    /// A uniform draw.
    Uniform,
}

#[derive(Args, Debug)]
struct SelectArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    part: PartArgs,
}

/// One step of a sharded run (`select`, `eval`); none: the whole run.
#[derive(Args, Debug, Clone, Default)]
struct PartArgs {
    /// Only the prepare step of a sharded run: ingest, tokenize and the
    /// small shared stages the pool-wide ones need (fine-tunes, LESS warmup,
    /// target features); writes no result. Then `--shard i/N` on every
    /// worker, then `--merge`.
    #[arg(long, conflicts_with_all = ["shard", "merge"])]
    prepare: bool,
    /// Only this worker's part of a sharded run: the units u of every
    /// pool-wide stage (sweeps, gradient norms, pool embeddings, LESS
    /// datastore, evaluation) with u mod N = i, into the cache's scratch
    /// folders; needs the prepare step's artifacts; writes no result.
    #[arg(long, value_name = "i/N", conflicts_with = "merge")]
    shard: Option<dsel_store::Shard>,
    /// The merge step of a sharded run: assemble every pool-wide stage
    /// from the workers' units (a unit no worker computed is an error, not
    /// computed here) and finish the run.
    #[arg(long)]
    merge: bool,
}

impl PartArgs {
    /// What the pipeline does of the run.
    fn work(&self) -> dsel_pipeline::Work {
        match (self.prepare, self.shard, self.merge) {
            (true, _, _) => dsel_pipeline::Work::Prepare,
            (_, Some(s), _) => dsel_pipeline::Work::Shard(s),
            (_, _, true) => dsel_pipeline::Work::Merge,
            _ => dsel_pipeline::Work::All,
        }
    }
}

/// One selection: method, output folder and options (`select`, `merge`).
#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Selection method.
    #[arg(long, default_value = "tov")]
    method: Method,
    /// Output folder. Default: runs/<task>-<method>.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    opts: SelectionOptions,
}

/// What every selection takes (`select`, each `compare` row, each `quality` run).
#[derive(Args, Debug, Clone)]
struct SelectionOptions {
    /// Target: mmlu, bbh, tydiqa, or a path to a file of target examples.
    #[arg(long)]
    task: String,
    /// Model: a GGUF file, a Hugging Face folder or a llama2.c .bin.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[command(flatten)]
    pool: PoolArgs,
    /// Hyper-parameter preset.
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    #[arg(long, help = preset_default("Budget: a count (500), a fraction (0.05) or a percentage (5%)", |v| v.budget.to_string()))]
    budget: Option<Budget>,
    #[arg(long, help = preset_default("Maximum tokens per pool example", |v| v.max_len.to_string()))]
    max_len: Option<usize>,
    #[arg(long, help = preset_default("Maximum tokens per target example", |v| v.target_max_len.to_string()))]
    target_max_len: Option<usize>,
    #[arg(long, help = preset_default("ToV: size of the base-training subset U", |v| v.u_size.to_string()))]
    u_size: Option<usize>,
    #[arg(long, help = preset_default("ToV: number of rounds L", |v| v.rounds.to_string()))]
    rounds: Option<usize>,
    #[arg(long, value_parser = positive_f64, help = preset_default("ToV: base learning rate (> 0)", |v| v.lr.to_string()))]
    lr: Option<f64>,
    #[arg(long, help = preset_default("ToV: LoRA rank (α scales with it)", |v| v.lora.rank.to_string()))]
    lora_rank: Option<usize>,
    #[arg(long, value_parser = positive_f64, help = preset_default("ToV: validation fine-tune LR as a fraction of the base LR", |v| v.tov.val_lr_ratio.to_string()))]
    val_lr_ratio: Option<f64>,
    #[arg(long, value_parser = at_least_one, help = preset_default("ToV: epochs of the validation fine-tune", |v| v.tov.val_epochs.to_string()))]
    val_epochs: Option<usize>,
    #[arg(long, help = preset_default("ToV: per-token transform F", |v| value_name(&v.tov.transform)))]
    transform: Option<Transform>,
    #[arg(long, help = preset_default("ToV: selection rule", |v| value_name(&v.tov.rule)))]
    rule: Option<SelectionRule>,
    #[arg(long, value_parser = at_least_one, help = preset_default("ToV: equal-count length bins of the length-bias correction", |v| v.tov.n_bins.to_string()))]
    bins: Option<usize>,
    #[arg(long, help = preset_default("ToV: the length the bins are over", |v| value_name(&v.tov.bin_by)))]
    bin_by: Option<dsel_pipeline::methods::BinBy>,
    /// Seed of every random choice (pool sample, U, shuffles, LoRA init, random picks).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sweep batch budget in tokens (batch size × padded length).
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Examples per unit of the sweeps, gradient norms and embeddings: the
    /// resumable piece that shard workers divide (unit u goes to worker u
    /// mod N; the LESS datastore takes its own from the preset). Part of
    /// those stages' keys.
    #[arg(long, default_value_t = SweepConfig::default().shard_examples, value_parser = at_least_one)]
    unit_examples: usize,
    /// How examples longer than the max length are cut.
    #[arg(long, default_value = "keep-completion")]
    truncation: dsel_tokenize::Truncation,
    /// ToV: score by Δ − Δ_ctl, where Δ_ctl is the loss change of the same
    /// short fine-tune on a random pool sample the size of the target (a
    /// target-independent control that removes the shift every short
    /// fine-tune gives every example; doubles the validation sweeps).
    /// `--tov-control` alone means true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help = preset_default("ToV: score by Δ − Δ_ctl, the change under the same fine-tune on a random pool sample the size of the target (removes the shift every short fine-tune gives every example); `--tov-control` alone = true", |v| v.tov.control.to_string()))]
    tov_control: Option<bool>,
}

/// Help text for an option whose default comes from the preset, with both
/// presets' actual values.
fn preset_default(what: &str, value: fn(&methods::PresetValues) -> String) -> String {
    format!(
        "{what} [default: {} (cpu preset), {} (paper preset)]",
        value(&Preset::Cpu.values()),
        value(&Preset::Paper.values())
    )
}

/// The command-line spelling of an option value.
fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Help of `--pool-limit`, with the presets' values.
fn pool_limit_help() -> String {
    let show = |p: Preset| {
        p.values()
            .pool_limit
            .map_or_else(|| "the whole pool".to_string(), |n| n.to_string())
    };
    format!(
        "Keep this many pool examples (a seeded sample, stratified by source unless `--pool-sample uniform`); 0 = the whole pool. Default: select, \
         merge, compare and train-online take the preset's ({} with cpu, {} with paper); \
         ingest, tokenize and sweep keep the whole pool",
        show(Preset::Cpu),
        show(Preset::Paper)
    )
}

/// A finite number > 0 (a learning rate or ratio of 0 makes every ToV score 0).
fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a positive number, got {s}"))
    }
}

/// A whole number ≥ 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if v >= 1 {
        Ok(v)
    } else {
        Err("must be at least 1, got 0".into())
    }
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Selection file (messages JSONL), e.g. runs/mmlu-tov/selection.jsonl.
    #[arg(long)]
    selection: PathBuf,
    /// Model to fine-tune.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Preset: cpu (r 8, 2 epochs, 256 tokens) or paper (LESS's r 128, 4 epochs, 2048 tokens).
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    /// Seed of the LoRA init and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Evaluation size, over the preset's.
#[derive(Args, Debug, Clone)]
struct EvalSizeArgs {
    /// Test examples per subtask (MMLU subject, BBH task, TyDiQA language,
    /// custom subtask). Default: the preset's.
    #[arg(long)]
    eval_cap: Option<usize>,
    /// MMLU in-context shots (0 = zero-shot). Default: 5, LESS's protocol.
    #[arg(long)]
    mmlu_shots: Option<usize>,
    /// Test examples per unit of the evaluation, the piece shard workers
    /// divide (`eval --shard i/N`). Part of the evaluation's key.
    #[arg(long, default_value_t = evaluate::EvalConfig::cpu().unit_examples, value_parser = at_least_one)]
    eval_unit_examples: usize,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Target: mmlu, bbh, tydiqa, or a file (custom targets report test loss).
    #[arg(long)]
    task: String,
    /// Fine-tune on this selection first (else: the model as it is).
    #[arg(long)]
    selection: Option<PathBuf>,
    /// Model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Preset for caps and training: cpu (10 per MMLU subject, 5 per BBH task, 20 per TyDiQA language) or paper (all).
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    /// Seed of the training and of the capped test sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    size: EvalSizeArgs,
    #[command(flatten)]
    part: PartArgs,
}

#[derive(Args, Debug)]
struct TrainOnlineArgs {
    /// Target whose validation examples GREATS uses and whose test set is evaluated.
    #[arg(long)]
    task: String,
    /// Online selector.
    #[arg(long, default_value = "none")]
    selector: dsel_pipeline::online::SelectorKind,
    /// Model.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[command(flatten)]
    pool: PoolArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Candidate batch size B.
    #[arg(long, default_value_t = 8)]
    candidates: usize,
    /// Examples trained per step k (default B/2; UDS: --uds-keep).
    #[arg(long)]
    k: Option<usize>,
    /// UDS: candidates kept per step as kept/of when --k is not given (reference 1/4).
    #[arg(long, default_value = "1/4")]
    uds_keep: dsel_pipeline::online::KeepRatio,
    /// GREATS: validation examples sampled per step (reference 2).
    #[arg(long, default_value_t = 2)]
    greats_val: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, value_parser = positive_f64)]
    lr: f64,
    /// Preset of the pool sample, max lengths, LoRA and evaluation.
    #[arg(long, default_value = "cpu")]
    preset: Preset,
    #[arg(long, help = preset_default("Maximum tokens per pool example", |v| v.max_len.to_string()))]
    max_len: Option<usize>,
    #[arg(long, help = preset_default("Maximum tokens per validation example", |v| v.target_max_len.to_string()))]
    target_max_len: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    size: EvalSizeArgs,
}

#[derive(Args, Debug)]
struct QualityArgs {
    /// Comma-separated FLAN-CoT tasks held out in turn (tuning: ecqa, creak; held out: strategyqa, qasc, sensemaking; keep gsm8k and aqua out of tuning).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ecqa,creak,strategyqa,qasc"
    )]
    tasks: Vec<String>,
    /// Comma-separated methods; `+control` after tov or tov-b scores by the control-corrected Δ − Δ_ctl, `+top` selects the top scores over all candidates (`--rule score-only --bins 1`), e.g. `tov+control+top`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random,tov,tov+control,tov+control+top,tov-b,less,bm25,dsir,rds,max-uncertainty"
    )]
    methods: Vec<dsel_pipeline::quality::QualityMethod>,
    /// Seeds 1..=N (pool sample, U, LoRA init, data order, random picks).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Held-out rows of the task used as the target.
    #[arg(long, default_value_t = 64)]
    n_target: usize,
    /// Pool examples sampled from the mixture per seed.
    #[arg(long, default_value_t = 600)]
    pool_limit: usize,
    /// Further held-out rows of the task (in neither target nor pool) on
    /// which each selection is evaluated after LoRA-training on it (the
    /// preset's fine-tune); 0 skips the downstream step.
    #[arg(long, default_value_t = 64)]
    n_test: usize,
    /// Output folder.
    #[arg(long, default_value = "runs/quality")]
    out: PathBuf,
    /// Options of `dsel select` for every run (model, preset, budget, ToV
    /// knobs), after `--`: e.g. `-- --model m.gguf --val-lr-ratio 1`.
    #[arg(last = true)]
    select_args: Vec<String>,
}

/// `dsel select`'s options parsed on their own (for `quality`).
#[derive(Parser, Debug)]
struct SelectOnly {
    #[command(flatten)]
    a: SelectionOptions,
}

#[derive(Args, Debug)]
struct CompareArgs {
    #[command(flatten)]
    opts: SelectionOptions,
    /// Static methods to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "random,tov,max-uncertainty,bm25"
    )]
    methods: Vec<Method>,
    /// Online selectors to add as rows (comma-separated); none by default.
    #[arg(long, value_delimiter = ',')]
    selectors: Vec<dsel_pipeline::online::SelectorKind>,
    /// Output folder. Default: runs/<task>-compare.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps of each online row (B = the fine-tune's batch; k = B/2, UDS keeps 1 of 4).
    #[arg(long, default_value_t = 50)]
    online_steps: usize,
    /// Seeds per row (selection, LoRA initialisation and data order);
    /// the table reports mean ± standard deviation.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    seeds: usize,
    /// Also fine-tune on the whole (sub-sampled) pool as a reference.
    #[arg(long)]
    full_pool: bool,
    #[command(flatten)]
    size: EvalSizeArgs,
}

#[derive(Args, Debug)]
struct IngestArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Also ingest this target's validation examples.
    #[arg(long)]
    task: Option<String>,
    /// Seed of the pool sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    #[command(flatten)]
    ingest: IngestArgs,
    /// Model whose tokenizer and chat format to use.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Maximum tokens per example.
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// How examples longer than the max length are cut.
    #[arg(long, default_value = "keep-completion")]
    truncation: dsel_tokenize::Truncation,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    tokenize: TokenizeArgs,
    /// Sweep batch budget in tokens (batch size × padded length).
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Examples per unit of the sweeps, gradient norms and embeddings: the
    /// resumable piece that shard workers divide (unit u goes to worker u
    /// mod N; the LESS datastore takes its own from the preset). Part of
    /// those stages' keys.
    #[arg(long, default_value_t = SweepConfig::default().shard_examples, value_parser = at_least_one)]
    unit_examples: usize,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// List artifacts (stage, key, size, created, last used).
    Ls,
    /// Show an artifact's manifest (a key or a unique key prefix).
    Show {
        /// Artifact key or prefix.
        key: String,
    },
    /// Re-hash every artifact and report corrupt ones.
    Verify,
    /// Remove artifacts not used recently (dry run unless --yes).
    Gc {
        /// Remove artifacts unused for this many days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Really delete (default: only list what would go).
        #[arg(long)]
        yes: bool,
    },
}

fn subset(pool: &PoolArgs, default_limit: Option<usize>, seed: u64) -> SubsetOptions {
    let limit = match pool.pool_limit {
        Some(0) => None,
        Some(n) => Some(n),
        None => default_limit,
    };
    SubsetOptions {
        limit,
        per_source_cap: pool.per_source_cap,
        seed,
        stratify: pool.pool_sample == PoolSample::Stratified,
    }
}

/// The short name of a target (`mmlu`, or a custom file's stem) for run folders.
fn task_name(task: &str) -> Result<String> {
    Ok(match TargetSpec::parse(task)? {
        TargetSpec::Named(t) => t.name().to_string(),
        TargetSpec::File(p) => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into()),
    })
}

/// The request of one selection with `method`, writing to `out`.
fn select_request(a: SelectionOptions, method: Method, out: PathBuf) -> Result<SelectRequest> {
    let mut values = a.preset.values();
    if let Some(x) = a.max_len {
        values.max_len = x;
    }
    if let Some(x) = a.target_max_len {
        values.target_max_len = x;
    }
    if let Some(x) = a.u_size {
        values.u_size = x;
    }
    if let Some(x) = a.rounds {
        values.rounds = x;
    }
    if let Some(x) = a.lr {
        values.lr = x;
    }
    if let Some(r) = a.lora_rank {
        values.lora.alpha = values.lora.alpha / values.lora.rank as f64 * r as f64;
        values.lora.rank = r;
    }
    values.lora.seed = a.seed;
    let tov = values.tov.clone();
    let req = SelectRequest {
        task: a.task,
        method,
        model: a.model,
        pool: a.pool.pool.clone(),
        subset: subset(&a.pool, values.pool_limit, a.seed),
        budget: a.budget.unwrap_or(values.budget),
        values,
        transform: a.transform.unwrap_or(tov.transform),
        rule: a.rule.unwrap_or(tov.rule),
        n_bins: a.bins.unwrap_or(tov.n_bins),
        bin_by: a.bin_by.unwrap_or(tov.bin_by),
        sweep: SweepConfig {
            batch_tokens: a.batch_tokens,
            shard_examples: a.unit_examples,
            ..SweepConfig::default()
        },
        valtune: ValtuneConfig {
            lr_ratio: a.val_lr_ratio.unwrap_or(tov.val_lr_ratio),
            epochs: a.val_epochs.unwrap_or(tov.val_epochs),
        },
        seed: a.seed,
        out_dir: out,
        preset: a.preset,
        truncation: a.truncation,
        control: a.tov_control.unwrap_or(tov.control),
    };
    Ok(req)
}

fn run_select(g: &Global, a: RunArgs, work: dsel_pipeline::Work) -> Result<()> {
    let out = match a.out {
        Some(o) => o,
        None => PathBuf::from(format!(
            "runs/{}-{}",
            task_name(&a.opts.task)?,
            a.method.name()
        )),
    };
    let req = select_request(a.opts, a.method, out)?;
    let out = req.out_dir.clone();
    let mut p = g.pipeline()?;
    p.work = work;
    if work.is_part() {
        let t = std::time::Instant::now();
        methods::select_part(&mut p, &req)?;
        let what = match work {
            dsel_pipeline::Work::Shard(s) => format!("shard {s}"),
            _ => "prepare step".to_string(),
        };
        println!(
            "{what} of {} for {} done in {:.1}s ({} stages); cache {}",
            req.method.name(),
            req.task,
            t.elapsed().as_secs_f64(),
            p.records.len(),
            p.store.root().display()
        );
        return Ok(());
    }
    let s = methods::select(&mut p, &req)?;
    let hits = s.stages.iter().filter(|r| r.cache_hit).count();
    println!(
        "selected {} of {} pool examples with {} for {} → {}",
        s.selected,
        s.pool_size,
        s.method,
        s.task,
        out.display()
    );
    for (src, n) in &s.selected_by_source {
        println!(
            "  {src:<48} {n:>6}  (pool {})",
            s.pool_by_source.get(src).copied().unwrap_or(0)
        );
    }
    // What the cache hits would have cost: their recorded build times.
    let saved: f64 = s
        .stages
        .iter()
        .filter(|r| r.cache_hit)
        .filter_map(|r| p.store.show(&r.key).ok())
        .map(|m| m.build_seconds)
        .sum::<f64>()
        + 0.0; // an empty sum is -0.0
    println!(
        "stages: {} run, {} cache hits; wall {:.1}s; the hits saved {:.0}s of recorded build time",
        s.stages.len() - hits,
        hits,
        s.wall_seconds,
        saved
    );
    if !s.pool_skipped.is_empty() {
        let parts: Vec<String> = s
            .pool_skipped
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("pool examples dropped: {}", parts.join(", "));
    }
    Ok(())
}

fn run_ingest(
    g: &Global,
    a: &IngestArgs,
    p: &mut Pipeline,
) -> Result<Vec<(String, dsel_store::Artifact)>> {
    let _ = g;
    let mut out = vec![(
        "pool".to_string(),
        p.ingest_pool(&a.pool.pool, &subset(&a.pool, None, a.seed))?,
    )];
    if let Some(t) = &a.task {
        out.push((
            format!("target {t}"),
            p.ingest_target(&TargetSpec::parse(t)?)?,
        ));
    }
    Ok(out)
}

fn print_artifacts(p: &Pipeline, arts: &[(String, dsel_store::Artifact)]) {
    for (label, a) in arts {
        let hit = p
            .records
            .iter()
            .find(|r| r.key == a.key().as_str())
            .map(|r| r.cache_hit)
            .unwrap_or(false);
        println!(
            "{label:<16} {} {} {}",
            a.stage(),
            a.key().short(),
            if hit { "(cache hit)" } else { "(built)" }
        );
        println!("{:<16} {}", "", a.dir().display());
    }
}

fn main() {
    // Large tensors reuse mapped pages between passes (see the function).
    dsel_kernels::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DSEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let g = cli.global;
    // No silent slow path: one line when the fast GEMM library is missing.
    if let Some(w) = dsel_kernels::fast_path_warning() {
        eprintln!("{w}");
    }
    if let (PrecisionChoice::Bf16, false) = (g.precision, dsel_kernels::backend().bf16_native) {
        eprintln!(
            "warning: --precision bf16 without native bf16 products ({}): emulated in f32, slower than --precision f32",
            dsel_kernels::backend().description
        );
    }
    match cli.command {
        Command::Select(a) => run_select(&g, a.run, a.part.work()),
        Command::Ingest(a) => {
            let mut p = g.pipeline()?;
            let arts = run_ingest(&g, &a, &mut p)?;
            print_artifacts(&p, &arts);
            Ok(())
        }
        Command::Tokenize(a) => {
            let mut p = g.pipeline()?;
            p.load_model(&a.model)?;
            let ing = run_ingest(&g, &a.ingest, &mut p)?;
            let mut arts = ing.clone();
            for (label, art) in &ing {
                arts.push((
                    format!("{label} tokens"),
                    p.tokenize(art, a.max_len, a.truncation, label)?,
                ));
            }
            print_artifacts(&p, &arts);
            Ok(())
        }
        Command::Sweep(a) => {
            let mut p = g.pipeline()?;
            p.load_model(&a.tokenize.model)?;
            let ing = p.ingest_pool(
                &a.tokenize.ingest.pool.pool,
                &subset(&a.tokenize.ingest.pool, None, a.tokenize.ingest.seed),
            )?;
            let tok = p.tokenize(&ing, a.tokenize.max_len, a.tokenize.truncation, "pool")?;
            let cfg = SweepConfig {
                batch_tokens: a.batch_tokens,
                ..SweepConfig::default()
            };
            let sw = p
                .sweep("base model", &tok, None, &cfg)?
                .context("the sweep was not assembled")?;
            print_artifacts(
                &p,
                &[
                    ("pool".into(), ing),
                    ("pool tokens".into(), tok),
                    ("sweep".into(), sw),
                ],
            );
            Ok(())
        }
        Command::Train(a) => {
            let mut p = g.pipeline()?;
            p.load_model(&a.model)?;
            let cfg = a.preset.train();
            let art = evaluate::train_on_selection(&mut p, &a.selection, &cfg, a.seed)?;
            println!(
                "adapter {} {}",
                art.key().short(),
                art.path("adapter.safetensors").display()
            );
            Ok(())
        }
        Command::Eval(a) => {
            let mut p = g.pipeline()?;
            p.work = a.part.work();
            p.load_model(&a.model)?;
            let tcfg = a.preset.train();
            let adapter = match &a.selection {
                Some(sel) => Some(evaluate::train_on_selection(&mut p, sel, &tcfg, a.seed)?),
                None => None,
            };
            let mut ecfg = eval_config(a.preset, &a.size);
            ecfg.sample_seed = a.seed;
            match evaluate::evaluate_part(
                &mut p,
                &a.task,
                adapter.as_ref(),
                adapter.as_ref().map(|_| &tcfg.lora),
                &ecfg,
            )? {
                Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
                None => println!(
                    "{:?} of the evaluation of {} done; cache {}",
                    p.work,
                    a.task,
                    p.store.root().display()
                ),
            }
            Ok(())
        }
        Command::Quality(a) => {
            let mut argv = vec!["quality".to_string(), "--task".into(), "mmlu".into()];
            argv.extend(a.select_args.iter().cloned());
            let sel = SelectOnly::try_parse_from(&argv)
                .map_err(|e| anyhow::anyhow!("options after `--` (those of `dsel select`): {e}"))?;
            let base = select_request(sel.a, Method::Random, a.out.join("unused"))?;
            let opts = dsel_pipeline::quality::QualityOptions {
                tasks: a.tasks.clone(),
                methods: a.methods.clone(),
                seeds: a.seeds,
                n_target: a.n_target,
                pool_limit: a.pool_limit,
                n_test: a.n_test,
            };
            let mut p = g.pipeline()?;
            dsel_pipeline::quality::run(&mut p, &base, &opts, &a.out)?;
            print!("{}", std::fs::read_to_string(a.out.join("table.md"))?);
            println!("→ {}", a.out.join("report.html").display());
            Ok(())
        }
        Command::Compare(a) => {
            let opts = compare::CompareOptions {
                methods: a.methods,
                selectors: a.selectors,
                online_steps: a.online_steps,
                seeds: a.seeds,
                full_pool: a.full_pool,
            };
            let preset = a.opts.preset;
            let out = match a.out {
                Some(o) => o,
                None => PathBuf::from(format!("runs/{}-compare", task_name(&a.opts.task)?)),
            };
            // Each row's selection goes to its own folder under `out`.
            let req = select_request(a.opts, Method::Random, out.join("select"))?;
            let mut p = g.pipeline()?;
            let report = compare::compare(
                &mut p,
                &req,
                &opts,
                &preset.train(),
                &eval_config(preset, &a.size),
                &out,
            )?;
            print!("{}", std::fs::read_to_string(out.join("table.md"))?);
            println!("{} rows → {}", report.rows.len(), out.display());
            Ok(())
        }
        Command::TrainOnline(a) => {
            use dsel_pipeline::online::{OnlineTrainConfig, SelectorConfig};
            let mut p = g.pipeline()?;
            p.load_model(&a.model)?;
            let values = a.preset.values();
            let pool_ing =
                p.ingest_pool(&a.pool.pool, &subset(&a.pool, values.pool_limit, a.seed))?;
            let pool_tok = p.tokenize(
                &pool_ing,
                a.max_len.unwrap_or(values.max_len),
                Default::default(),
                "pool",
            )?;
            let target_ing = p.ingest_target(&TargetSpec::parse(&a.task)?)?;
            let target_max_len = a.target_max_len.unwrap_or(values.target_max_len);
            let target_tok =
                p.tokenize(&target_ing, target_max_len, Default::default(), "target")?;
            let tcfg = a.preset.train();
            let mut cfg =
                OnlineTrainConfig::new(SelectorConfig::default_for(a.selector), tcfg.lora.clone());
            cfg.steps = a.steps;
            cfg.candidates = a.candidates;
            cfg.k = a.k;
            cfg.selector.set_uds_keep(a.uds_keep);
            cfg.selector.set_greats_val_per_step(a.greats_val);
            cfg.lr = a.lr;
            cfg.seed = a.seed;
            let (adapter, report) =
                dsel_pipeline::online::train_online(&mut p, &pool_tok, &target_tok, &cfg)?;
            let r = evaluate::evaluate(
                &mut p,
                &a.task,
                Some(&adapter),
                Some(&tcfg.lora),
                &eval_config(a.preset, &a.size),
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"online": report, "eval": r}))?
            );
            Ok(())
        }
        Command::Merge(a) => run_select(&g, a, dsel_pipeline::Work::Merge),
        Command::Slurm(a) => slurm::run(&g, a),
        Command::Cache(c) => run_cache(&g, c),
        Command::Bench(a) => bench::run(&a),
    }
}

/// The preset's evaluation with the size options applied.
fn eval_config(p: Preset, size: &EvalSizeArgs) -> evaluate::EvalConfig {
    let mut c = p.eval();
    if let Some(cap) = size.eval_cap {
        c.caps.mmlu = Some(cap);
        c.caps.bbh = Some(cap);
        c.caps.tydiqa = Some(cap);
        c.caps.custom = Some(cap);
    }
    if let Some(k) = size.mmlu_shots {
        c.mmlu.shots = Some(k);
    }
    c.unit_examples = size.eval_unit_examples;
    c
}

fn run_cache(g: &Global, c: CacheCommand) -> Result<()> {
    let store = dsel_store::Store::open(&g.cache)
        .with_context(|| format!("opening cache {}", g.cache.display()))?;
    store.set_locking(g.locks);
    match c {
        CacheCommand::Ls => {
            let items = store.list()?;
            println!(
                "{:<12} {:<14} {:>12}  {:<20}  last used",
                "stage", "key", "bytes", "created"
            );
            for s in &items {
                println!(
                    "{:<12} {:<14} {:>12}  {:<20}  {}",
                    s.stage,
                    s.key.short(),
                    s.bytes,
                    s.created.as_deref().unwrap_or("-"),
                    s.last_used_unix
                        .map(dsel_store::rfc3339_utc)
                        .unwrap_or_else(|| "-".into())
                );
            }
            println!(
                "{} artifacts, {} bytes",
                items.len(),
                items.iter().map(|s| s.bytes).sum::<u64>()
            );
        }
        CacheCommand::Show { key } => {
            println!("{}", serde_json::to_string_pretty(&store.show(&key)?)?)
        }
        CacheCommand::Verify => {
            let reports = store.verify_all()?;
            let bad: Vec<_> = reports.iter().filter(|r| !r.ok()).collect();
            for r in &reports {
                if !r.ok() {
                    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
                    println!(
                        "CORRUPT {} {}: {} ({})",
                        r.stage,
                        r.key.short(),
                        problems.join("; "),
                        r.dir.display()
                    );
                }
                if !r.extra_files.is_empty() {
                    println!(
                        "note    {} {}: not in the manifest (ignored): {}",
                        r.stage,
                        r.key.short(),
                        r.extra_files.join(", ")
                    );
                }
            }
            println!(
                "{} artifacts verified, {} corrupt",
                reports.len(),
                bad.len()
            );
            if !bad.is_empty() {
                anyhow::bail!(
                    "{} corrupt artifacts (they will be rebuilt on next use)",
                    bad.len()
                );
            }
        }
        CacheCommand::Gc { days, yes } => {
            let opts = GcOptions {
                older_than: std::time::Duration::from_secs(days * 86400),
                dry_run: !yes,
            };
            let r = store.gc(&opts)?;
            let verb = if r.dry_run { "would remove" } else { "removed" };
            for item in &r.items {
                println!(
                    "{verb} {:<12} {:>12} bytes  {}",
                    item.kind.name(),
                    item.bytes,
                    item.path.display()
                );
            }
            for path in &r.skipped_locked {
                println!("kept (a build holds its lock)  {}", path.display());
            }
            for path in &r.skipped_in_use {
                println!("kept (in use by a live process)  {}", path.display());
            }
            for e in &r.errors {
                println!("error: {e}");
            }
            println!(
                "{} entries, {} bytes {}",
                r.items.len(),
                r.bytes,
                if r.dry_run {
                    "would be removed (dry run; --yes deletes)"
                } else {
                    "removed"
                }
            );
            if !r.errors.is_empty() {
                anyhow::bail!("{} entries could not be removed", r.errors.len());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, ValueEnum};

    /// Every option enum's command-line name is its serde spelling (what
    /// run configs and manifests hold), and for methods and selectors also
    /// the library's `name()`/`FromStr`, so `--help`, parsing, run folders
    /// and JSON agree.
    #[test]
    fn value_enum_names_are_the_library_names() {
        fn check<T: ValueEnum + std::fmt::Debug>(name_of: fn(&T) -> String) {
            for v in T::value_variants() {
                let cli = v.to_possible_value().unwrap().get_name().to_string();
                assert_eq!(cli, name_of(v), "{v:?}");
            }
        }
        fn serde_name<T: serde::Serialize>(v: &T) -> String {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        }
        use dsel_pipeline::online::SelectorKind;
        check::<Method>(|m| m.name().to_string());
        check::<Method>(serde_name);
        check::<Method>(|m| m.name().parse::<Method>().unwrap().name().to_string());
        check::<SelectorKind>(|k| k.name().to_string());
        check::<SelectorKind>(|k| k.name().parse::<SelectorKind>().unwrap().name().to_string());
        check::<Preset>(serde_name);
        check::<SelectionRule>(serde_name);
        check::<methods::BinBy>(serde_name);
        check::<Transform>(serde_name);
        check::<dsel_tokenize::Truncation>(serde_name);
        assert_eq!(Method::value_variants().len(), Method::ALL.len());
        assert_eq!(
            SelectorKind::value_variants().len(),
            SelectorKind::ALL.len()
        );
    }

    #[test]
    fn lists_and_shards_are_parsed_by_clap_with_usage_errors() {
        let c = Cli::try_parse_from([
            "dsel",
            "compare",
            "--task",
            "mmlu",
            "--methods",
            "tov-b,bm25",
            "--selectors",
            "greats,maxloss",
        ])
        .unwrap();
        let Command::Compare(a) = c.command else {
            panic!("compare")
        };
        assert_eq!(a.methods, [Method::TovB, Method::Bm25]);
        use dsel_pipeline::online::SelectorKind;
        assert_eq!(a.selectors, [SelectorKind::Greats, SelectorKind::MaxLoss]);
        assert!(a.out.is_none());
        let e = Cli::try_parse_from(["dsel", "compare", "--task", "mmlu", "--methods", "tov,nope"])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nope") && msg.contains("possible values: tov, tov-b"),
            "{msg}"
        );
        let sel = |extra: &[&str]| {
            let mut argv = vec!["dsel", "select", "--task", "mmlu"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let e = sel(&["--shard", "4/4"]).unwrap_err();
        assert!(e.to_string().contains("4/4"), "{e}");
        let Command::Select(a) = sel(&["--shard", "1/4"]).unwrap().command else {
            panic!("select")
        };
        assert_eq!(a.part.shard.map(|s| s.to_string()).as_deref(), Some("1/4"));
        assert!(
            sel(&["--shard", "1/4", "--prepare"]).is_err(),
            "one part at a time"
        );
    }

    #[test]
    fn tov_options_default_to_the_presets_values() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["dsel", "select", "--task", "mmlu"];
            argv.extend_from_slice(extra);
            let Command::Select(a) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("select")
            };
            select_request(a.run.opts, a.run.method, PathBuf::from("out")).unwrap()
        };
        let tov = Preset::Cpu.values().tov;
        let d = parse(&[]);
        assert_eq!(
            (d.control, d.rule, d.n_bins, d.valtune.lr_ratio),
            (tov.control, tov.rule, tov.n_bins, tov.val_lr_ratio)
        );
        let e = parse(&["--tov-control", "--rule", "score-only", "--bins", "3"]);
        assert!(e.control);
        assert_eq!((e.rule, e.n_bins), (SelectionRule::ScoreOnly, 3));
        assert!(!parse(&["--tov-control", "false"]).control);
    }

    #[test]
    fn help_lists_the_values_and_the_presets_actual_defaults() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("select")
            .unwrap()
            .render_long_help()
            .to_string();
        for needle in [
            "max-uncertainty",
            "keep-completion",
            "score-only",
            "96 (cpu preset), 4096 (paper preset)",
            "5% (cpu preset), 8192 (paper preset)",
            "800 with cpu, the whole pool with paper",
            "stratified by source",
        ] {
            assert!(help.contains(needle), "{needle} missing from:\n{help}");
        }
    }
}
