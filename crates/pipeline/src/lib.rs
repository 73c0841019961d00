//! `dsel-pipeline`: every stage as a content-addressed artifact.
//!
//! A [`Pipeline`] owns the artifact store, the data root and the loaded model,
//! and exposes one method per stage. Each method builds a [`StageSpec`] from
//! the stage's code version, its configuration and the keys of its inputs, and
//! asks the store for it: built once, reused by every later run and target.
//! Every call is recorded ([`StageRecord`]) so a run's summary says which
//! stages were cache hits and what each cost.

pub mod baselines;
pub mod compare;
pub mod evaluate;
pub mod less;
pub mod methods;
pub mod online;
pub mod preset;
pub mod quality;
pub mod tov;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use dsel_basetrain::FinetuneConfig;
use dsel_ingest::{Example, SubsetOptions, TargetSpec};
use dsel_model::{LoraConfig, Model, Precision, RawModel};
use dsel_select::StageRecord;
use dsel_store::{Artifact, Missing, Outcome, Shard, StageSpec, Store, UnitWork};
use dsel_sweep::SweepConfig;
use dsel_tokenize::{ChatFormat, Formatter, TokenizeConfig, TokenizedSet};
use dsel_valtune::ValtuneConfig;
use serde_json::json;

/// A loaded model and the identity used in artifact keys.
pub struct LoadedModel {
    /// Path it was loaded from.
    pub path: PathBuf,
    /// blake3 of the model's files.
    pub fingerprint: String,
    /// Loader output (weights, tokenizer, chat template).
    pub raw: RawModel,
}

/// What this process does of a run, for sharding it over workers
/// (`dsel select --prepare`, `--shard i/N`, `dsel merge`; see
/// ARCHITECTURE.md, "Sharded runs"). A **pool-wide** stage is one whose
/// work is over every pool example (the loss sweeps, gradient norms, pool
/// embeddings, the LESS datastore); it is computed in units
/// ([`dsel_store::shard`]) that workers share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Work {
    /// Build every stage (resuming whatever is found finished): a plain run.
    #[default]
    All,
    /// The prepare step: build the shared stages the pool-wide ones need
    /// (ingest, tokenize, fine-tunes, the LESS warmup, target features) and
    /// no unit of a pool-wide stage.
    Prepare,
    /// A shard worker: compute this worker's units of every pool-wide stage
    /// into the stage's scratch folder. Every other stage must be built
    /// already (by the prepare step), so no two workers ever write one
    /// artifact and no lock has to hold across machines.
    Shard(Shard),
    /// The merge step: assemble every pool-wide stage from the workers'
    /// units (a missing unit is an error naming it, never recomputed
    /// here), then run the rest of the method.
    Merge,
}

impl Work {
    /// True for the steps that do part of a run and write no run folder.
    pub fn is_part(self) -> bool {
        matches!(self, Work::Prepare | Work::Shard(_))
    }
}

/// Stage runner over an artifact store.
pub struct Pipeline {
    /// The artifact store.
    pub store: Store,
    /// Root of the shared data (`../shared/data` by default).
    pub data_root: PathBuf,
    /// Device every model runs on.
    pub device: Device,
    /// Stages run so far, in order.
    pub records: Vec<StageRecord>,
    /// What this process does of the run (see [`Work`]).
    pub work: Work,
    /// Precision of every model's matrix products (see [`Pipeline::set_precision`]).
    precision: Precision,
    model: Option<LoadedModel>,
}

/// `kind` in the config of a target's ingest ([`Pipeline::ingest_target`]).
const TARGET_INGEST_KIND: &str = "target-validation";

/// Whether `m` is the manifest of a target's ingest: the artifact every
/// target-dependent stage reaches through its inputs.
pub(crate) fn is_target_ingest(m: &dsel_store::Manifest) -> bool {
    m.stage == dsel_ingest::STAGE && m.config["kind"] == TARGET_INGEST_KIND
}

/// blake3 of a model file, or of every regular file in a model folder (sorted by name).
pub fn model_fingerprint(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)
            .with_context(|| format!("reading model folder {}", path.display()))?
        {
            let p = e?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update_mmap(&f)
            .with_context(|| format!("hashing {}", f.display()))?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of a list of example indices (keys a training subset exactly).
pub fn indices_hash(indices: &[usize]) -> String {
    let mut h = blake3::Hasher::new();
    for &i in indices {
        h.update(&(i as u64).to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

impl Pipeline {
    /// A pipeline over the store at `cache_root` reading data from `data_root`.
    /// Models run at [`Precision::fastest`] until [`Pipeline::set_precision`].
    pub fn new(cache_root: &Path, data_root: &Path) -> Result<Self> {
        let mut p = Self {
            store: Store::open(cache_root)?,
            data_root: data_root.to_path_buf(),
            device: Device::Cpu,
            records: Vec::new(),
            work: Work::All,
            precision: Precision::fastest(),
            model: None,
        };
        p.set_precision(p.precision);
        Ok(p)
    }

    /// The precision every model of this pipeline computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the precision of every model built from now on. It is part of
    /// the key of every stage that runs the model (a bf16 artifact is never
    /// taken for an f32 one); the GEMM backend is recorded in each manifest
    /// but not keyed, so machines with different libraries share artifacts.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        let b = dsel_kernels::backend();
        self.store.set_environment(json!({
            "precision": precision,
            "gemm": b.description,
            "bf16_native": b.bf16_native,
            "device": format!("{:?}", self.device),
        }));
    }

    /// The model's identity in the keys of stages that run it: the weights'
    /// fingerprint, plus the precision when it is not f32 (so f32 keys are
    /// those of artifacts built before precisions existed).
    pub fn model_key(&self) -> Result<String> {
        let fp = &self.model()?.fingerprint;
        Ok(match self.precision {
            Precision::F32 => fp.clone(),
            p => format!("{fp}+{p}"),
        })
    }

    pub(crate) fn record(&mut self, stage: &str, label: &str, o: &Outcome) {
        tracing::info!(
            "{stage} [{label}]: {} {} ({:.1}s)",
            o.artifact.key().short(),
            if o.cache_hit { "cache hit" } else { "built" },
            o.seconds
        );
        self.records.push(StageRecord {
            stage: stage.to_string(),
            label: label.to_string(),
            key: o.artifact.key().as_str().to_string(),
            cache_hit: o.cache_hit,
            seconds: o.seconds,
        });
    }

    /// Builds (or reuses) the artifact of a stage that is not pool-wide. A
    /// shard worker ([`Work::Shard`]) only reuses it: building it there
    /// would have every worker write the same artifact, so a missing one
    /// is an error that says to run the prepare step first.
    pub(crate) fn build(
        &mut self,
        spec: &StageSpec,
        build: impl FnOnce(&mut dsel_store::Builder) -> Result<()>,
    ) -> Result<Outcome> {
        if let Work::Shard(s) = self.work {
            let t = Instant::now();
            return match self.store.lookup(spec)? {
                Some(artifact) => Ok(Outcome {
                    artifact,
                    cache_hit: true,
                    seconds: t.elapsed().as_secs_f64(),
                }),
                None => anyhow::bail!(
                    "shard worker {s}: stage {} ({}) is not built in {}; a shard worker only \
                     computes its units of the pool-wide stages, so run the prepare step \
                     first (the same `dsel select` arguments with --prepare, on a cache \
                     every worker shares)",
                    spec.stage,
                    spec.key().short(),
                    self.store.root().display()
                ),
            };
        }
        self.store.get_or_build(spec, build)
    }

    /// [`Pipeline::build`] with the report `build` returns as the manifest's
    /// info, recorded under the spec's stage name and `label`.
    pub(crate) fn build_stage<R: serde::Serialize>(
        &mut self,
        spec: &StageSpec,
        label: &str,
        build: impl FnOnce(&dsel_store::Builder) -> Result<R>,
    ) -> Result<Artifact> {
        let o = self.build(spec, |b| {
            let report = build(b)?;
            b.set_info(serde_json::to_value(&report)?);
            Ok(())
        })?;
        self.record(&spec.stage, label, &o);
        Ok(o.artifact)
    }

    /// Runs a pool-wide stage as [`Work`] says. `run(scratch, out, work)`
    /// computes the units `work` asks for into `scratch` and, when given
    /// `out`, assembles the artifact's files there (every unit is finished
    /// then) and returns its manifest info. `None` when this process only
    /// did its part (prepare step, shard worker) and the artifact is not
    /// built yet.
    pub(crate) fn pool_stage(
        &mut self,
        spec: &StageSpec,
        label: &str,
        mut run: impl FnMut(&Path, Option<&Path>, UnitWork) -> Result<serde_json::Value>,
    ) -> Result<Option<Artifact>> {
        let work = match self.work {
            Work::All => UnitWork::default(),
            Work::Merge => UnitWork {
                shard: Shard::all(),
                missing: Missing::Fail,
            },
            part => {
                let t = Instant::now();
                if let Some(artifact) = self.store.lookup(spec)? {
                    let o = Outcome {
                        artifact,
                        cache_hit: true,
                        seconds: t.elapsed().as_secs_f64(),
                    };
                    self.record(&spec.stage, label, &o);
                    return Ok(Some(o.artifact));
                }
                if let Work::Shard(shard) = part {
                    let scratch = self.store.scratch_dir_of(spec)?;
                    run(
                        &scratch,
                        None,
                        UnitWork {
                            shard,
                            missing: Missing::Compute,
                        },
                    )?;
                    tracing::info!(
                        "{} [{label}]: shard {shard} done in {:.1}s ({})",
                        spec.stage,
                        t.elapsed().as_secs_f64(),
                        scratch.display()
                    );
                } else {
                    tracing::info!("{} [{label}]: left to the shard workers", spec.stage);
                }
                return Ok(None);
            }
        };
        let o = self.store.get_or_build(spec, |b| {
            let info = run(&b.scratch_dir(), Some(b.dir()), work)?;
            b.set_info(info);
            Ok(())
        })?;
        self.record(&spec.stage, label, &o);
        Ok(Some(o.artifact))
    }

    /// Load the model at `path` (once per pipeline; the same path is reused).
    pub fn load_model(&mut self, path: &Path) -> Result<&LoadedModel> {
        if self.model.as_ref().map(|m| m.path.as_path()) != Some(path) {
            let t = Instant::now();
            let fingerprint = model_fingerprint(path)?;
            let raw = dsel_model::load(path, &self.device)
                .with_context(|| format!("loading model {}", path.display()))?;
            tracing::info!(
                "model {} loaded in {:.1}s",
                path.display(),
                t.elapsed().as_secs_f64()
            );
            self.model = Some(LoadedModel {
                path: path.to_path_buf(),
                fingerprint,
                raw,
            });
        }
        Ok(self.model.as_ref().expect("just loaded"))
    }

    /// The loaded model.
    pub fn model(&self) -> Result<&LoadedModel> {
        self.model.as_ref().context("no model loaded")
    }

    /// Ingest a pool mixture (name in `pipelines/pools/` or a `.toml` path) into the canonical table.
    pub fn ingest_pool(&mut self, mixture: &str, opts: &SubsetOptions) -> Result<Artifact> {
        // A mixture file is keyed (and read) by its absolute path, so a
        // relative and an absolute spelling of one file share the artifact.
        let canonical = canonical_file_arg(mixture);
        let mixture = canonical.as_str();
        let fingerprint = dsel_ingest::mixture_fingerprint(mixture, &self.data_root)?;
        let mut config = json!({"kind": "pool", "mixture": mixture, "fingerprint": fingerprint,
                   "limit": opts.limit, "per_source_cap": opts.per_source_cap});
        // Only a stratified draw names itself: uniform draws keep their keys.
        if opts.stratify && opts.limit.is_some() {
            config["stratify"] = json!(true);
        }
        let spec = StageSpec::new(dsel_ingest::STAGE, dsel_ingest::STAGE_VERSION, config)
            .with_seed(opts.seed);
        let root = self.data_root.clone();
        self.ingest(&spec, &format!("pool {mixture}"), || {
            Ok(dsel_ingest::load_pool(mixture, &root, opts)?)
        })
    }

    /// Builds (or reuses) an `ingest` artifact: the canonical table of the
    /// examples `load` reads, with its report as the manifest's info.
    pub(crate) fn ingest(
        &mut self,
        spec: &StageSpec,
        label: &str,
        load: impl FnOnce() -> Result<(Vec<Example>, dsel_ingest::IngestReport)>,
    ) -> Result<Artifact> {
        self.build_stage(spec, label, |b| {
            let (examples, report) = load()?;
            dsel_ingest::write_examples_parquet(&b.path("examples.parquet"), &examples)?;
            Ok(report)
        })
    }

    /// Ingest a target's validation examples (LESS's D_val for named tasks),
    /// keyed on the content of every file they are read from.
    pub fn ingest_target(&mut self, target: &TargetSpec) -> Result<Artifact> {
        let name = match target {
            TargetSpec::Named(t) => t.name().to_string(),
            TargetSpec::File(p) => canonical_file_arg(&p.display().to_string()),
        };
        let fingerprint = dsel_ingest::target_fingerprint(
            target,
            &self.data_root,
            dsel_ingest::TargetSplit::Validation,
        )?;
        let spec = StageSpec::new(
            dsel_ingest::STAGE,
            dsel_ingest::STAGE_VERSION,
            json!({"kind": TARGET_INGEST_KIND, "target": name, "fingerprint": fingerprint}),
        );
        let root = self.data_root.clone();
        self.ingest(&spec, &format!("target {name}"), || {
            Ok(dsel_ingest::load_target_validation(target, &root)?)
        })
    }

    /// The chat format the loaded model uses (its template, else tulu) and the BOS to prepend.
    pub fn chat_format(&self) -> Result<(ChatFormat, Option<u32>)> {
        let m = self.model()?;
        Ok(match &m.raw.chat_template {
            Some(t) => (
                ChatFormat::Template {
                    template: t.clone(),
                    bos_token: m.raw.bos_token.clone().unwrap_or_default(),
                    eos_token: m.raw.eos_token.clone().unwrap_or_default(),
                },
                None,
            ),
            None => (
                ChatFormat::Tulu {
                    eos_token: m.raw.eos_token.clone().unwrap_or_else(|| "</s>".into()),
                },
                m.raw.config.bos_token_id,
            ),
        })
    }

    /// Tokenize an ingested table with the loaded model's tokenizer and chat
    /// format, cutting examples longer than `max_len` as `truncation` says.
    pub fn tokenize(
        &mut self,
        examples: &Artifact,
        max_len: usize,
        truncation: dsel_tokenize::Truncation,
        label: &str,
    ) -> Result<Artifact> {
        let (format, bos_id) = self.chat_format()?;
        let m = self.model()?;
        let tokenizer = m
            .raw
            .tokenizer
            .clone()
            .with_context(|| format!("model {} has no tokenizer", m.path.display()))?;
        let cfg = TokenizeConfig {
            max_len,
            bos_id,
            truncation,
        };
        let format_desc = match &format {
            ChatFormat::Template { template, .. } => {
                json!({"template": blake3::hash(template.as_bytes()).to_hex().to_string()})
            }
            ChatFormat::Tulu { eos_token } => json!({"tulu": eos_token}),
        };
        let mut config = json!({"model": m.fingerprint, "max_len": max_len, "bos_id": bos_id, "format": format_desc});
        // Keyed only when not the default, so right-truncated artifacts keep their keys.
        if cfg.truncation != dsel_tokenize::Truncation::Right {
            config["truncation"] = serde_json::to_value(cfg.truncation)?;
        }
        let spec = StageSpec::new(dsel_tokenize::STAGE, dsel_tokenize::STAGE_VERSION, config)
            .input(examples.key().clone());
        let ex_path = examples.path("examples.parquet");
        self.build_stage(&spec, label, |b| {
            let examples = dsel_ingest::read_examples_parquet(&ex_path)?;
            let fmt = Formatter::new(format)?;
            let report =
                dsel_tokenize::tokenize_to_dir(&tokenizer, &fmt, &examples, &cfg, b.dir())?;
            tracing::info!(
                "tokenized {} → {} examples, {} tokens ({:.0} tok/s), skipped {:?}",
                report.examples_in,
                report.examples_out,
                report.tokens,
                report.tokens_per_second,
                report.skipped
            );
            Ok(report)
        })
    }

    /// A fresh model from the loaded weights, at this pipeline's precision.
    pub fn fresh_model(&self) -> Result<Model> {
        let mut m = Model::new(&self.model()?.raw)?;
        m.set_precision(self.precision)?;
        Ok(m)
    }

    /// Fine-tune LoRA on `set[indices]` from `start` (stage `base-train` or `warmup`).
    pub fn finetune(
        &mut self,
        stage: &str,
        label: &str,
        set: &Artifact,
        indices: &[usize],
        start: Option<&Artifact>,
        cfg: &FinetuneConfig,
    ) -> Result<Artifact> {
        let fp = self.model_key()?;
        let mut spec = StageSpec::new(
            stage,
            dsel_basetrain::STAGE_VERSION,
            json!({"model": fp, "finetune": cfg, "indices": indices_hash(indices), "n": indices.len()}),
        )
        .input(set.key().clone())
        .with_seed(cfg.train.seed);
        if let Some(s) = start {
            spec = spec.input(s.key().clone());
        }
        let mut model = self.fresh_model()?;
        let tok = TokenizedSet::open(set.dir())?;
        let start_path = start.map(|s| s.path("adapter.safetensors"));
        self.build_stage(&spec, label, |b| {
            dsel_basetrain::finetune(
                &mut model,
                start_path.as_deref(),
                &tok,
                indices,
                cfg,
                &b.scratch_dir(),
                b.dir(),
            )
        })
    }

    /// ToV's validation fine-tune from a base adapter.
    pub fn valtune(
        &mut self,
        label: &str,
        base: &Artifact,
        target: &Artifact,
        base_cfg: &FinetuneConfig,
        v: &ValtuneConfig,
    ) -> Result<Artifact> {
        let fp = self.model_key()?;
        let spec = StageSpec::new(
            dsel_valtune::STAGE,
            dsel_valtune::STAGE_VERSION,
            json!({"model": fp, "finetune": dsel_valtune::derive_config(base_cfg, v), "valtune": v}),
        )
        .input(target.key().clone())
        .input(base.key().clone())
        .with_seed(base_cfg.train.seed);
        let mut model = self.fresh_model()?;
        let tok = TokenizedSet::open(target.dir())?;
        let start = base.path("adapter.safetensors");
        self.build_stage(&spec, label, |b| {
            dsel_valtune::valtune(
                &mut model,
                &start,
                &tok,
                base_cfg,
                v,
                &b.scratch_dir(),
                b.dir(),
            )
        })
    }

    /// Per-token loss sweep of the pool `set` under the base model plus
    /// `adapter` (if any): a pool-wide stage ([`Pipeline::pool_stage`];
    /// `None` when this process only did its part).
    pub fn sweep(
        &mut self,
        label: &str,
        set: &Artifact,
        adapter: Option<(&Artifact, &LoraConfig)>,
        cfg: &SweepConfig,
    ) -> Result<Option<Artifact>> {
        let fp = self.model_key()?;
        let mut spec = StageSpec::new(
            dsel_sweep::STAGE,
            dsel_sweep::STAGE_VERSION,
            json!({"model": fp, "sweep": cfg}),
        )
        .input(set.key().clone());
        let mut model = self.fresh_model()?;
        if let Some((a, lora)) = adapter {
            spec = spec.input(a.key().clone());
            model.add_lora(lora)?;
            model.load_lora(&a.path("adapter.safetensors"))?;
        }
        let tok = TokenizedSet::open(set.dir())?;
        self.pool_stage(&spec, label, |scratch, out, work| {
            let report = dsel_sweep::run_with(&model, &tok, cfg, scratch, out, label, work)?;
            Ok(serde_json::to_value(&report)?)
        })
    }

    /// Read the canonical examples of an ingest artifact.
    pub fn examples(&self, ingest: &Artifact) -> Result<Vec<Example>> {
        Ok(dsel_ingest::read_examples_parquet(
            &ingest.path("examples.parquet"),
        )?)
    }
}

/// `arg` made absolute when it names an existing file (so relative and
/// absolute spellings key the same artifact); unchanged otherwise (a named
/// mixture such as `default`).
pub fn canonical_file_arg(arg: &str) -> String {
    let p = Path::new(arg);
    if p.is_file() {
        if let Ok(c) = p.canonicalize() {
            return c.display().to_string();
        }
    }
    arg.to_string()
}
