//! The gradient datastore (and validation features): per example and
//! checkpoint, the LoRA gradient of the completion-mean loss from one
//! batched backward pass, optionally Adam-preconditioned, projected to `d`
//! dimensions by the seeded Rademacher matrix and L2-normalised; stored as
//! f16 `.npy` `[N, d]`, one file per checkpoint.
//!
//! Work is cut into units (checkpoint, shard of `shard_examples` examples).
//! A finished unit is written atomically to the scratch folder with its
//! blake3 beside it ([`dsel_store::write_npy_sealed`]), so a killed build
//! resumes at the first missing unit; a unit whose bytes no longer match its
//! recorded blake3 is recomputed (with a warning), never assembled. Each unit's computation depends
//! only on its own examples and the fixed configuration (batches are planned
//! inside the shard), so a resumed build, or shards computed by several
//! workers ([`Shard`], `i/N`: shard `s` belongs to worker `s mod N`) whose
//! scratch folders are merged, end byte-identical to one uninterrupted run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dsel_model::{Batch, Model};
use dsel_store::{Missing, NpyArray, NpyWriter, Shard};
use dsel_tokenize::TokenizedSet;
use half::f16;
use serde::{Deserialize, Serialize};

use crate::adam::{load_moments, precondition, Moments};
use crate::projection::{normalize_rows, Projector};

/// Version of the datastore computation and layout (part of artifact keys).
pub const DATASTORE_VERSION: &str = "less-datastore-1";

/// Everything that decides the bytes of a datastore besides its inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreConfig {
    /// Projection dimension `d` (multiple of 64; LESS: 8192, or 1024/2048/4096).
    pub d: usize,
    /// Seed of the projection matrix Π.
    pub seed: u64,
    /// Examples per resumable shard.
    pub shard_examples: usize,
    /// Examples per batched forward + backward.
    pub micro_batch: usize,
    /// Upper bound on examples × padded length of a forward + backward.
    pub batch_tokens: usize,
    /// Gradient rows projected together (Π generation is shared by them;
    /// memory `proj_batch · P · 4` bytes).
    pub proj_batch: usize,
    /// Rows of Π generated per GEMM call.
    pub block_rows: usize,
}

impl DatastoreConfig {
    /// Checks every size.
    pub fn validate(&self) -> Result<()> {
        if self.d == 0 || !self.d.is_multiple_of(64) {
            bail!(
                "LESS datastore config: d = {} must be a positive multiple of 64",
                self.d
            );
        }
        for (name, v) in [
            ("shard_examples", self.shard_examples),
            ("micro_batch", self.micro_batch),
            ("batch_tokens", self.batch_tokens),
            ("proj_batch", self.proj_batch),
            ("block_rows", self.block_rows),
        ] {
            if v == 0 {
                bail!("LESS datastore config: {name} must be positive");
            }
        }
        Ok(())
    }
}

/// Token sequences with label masks, addressed by index.
pub trait Examples: Sync {
    /// Number of examples.
    fn count(&self) -> usize;
    /// Token ids and label mask (1 = label) of example `i`.
    fn get(&self, i: usize) -> (&[u32], &[u8]);
}

impl Examples for TokenizedSet {
    fn count(&self) -> usize {
        self.len()
    }
    fn get(&self, i: usize) -> (&[u32], &[u8]) {
        self.example(i)
    }
}

impl Examples for Vec<(Vec<u32>, Vec<u8>)> {
    fn count(&self) -> usize {
        self.len()
    }
    fn get(&self, i: usize) -> (&[u32], &[u8]) {
        (&self[i].0, &self[i].1)
    }
}

/// One warmup checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Epoch number (1-based); names the output file.
    pub epoch: usize,
    /// LoRA adapter (safetensors written by `Model::save_lora`).
    pub adapter: PathBuf,
    /// AdamW state of the same epoch (used for [`GradientKind::Adam`]).
    pub optimizer: PathBuf,
}

/// Which gradient feature is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GradientKind {
    /// Adam-preconditioned (pool datastore).
    Adam,
    /// Plain gradient (validation features).
    Sgd,
}

/// Options of one [`build`] call that do not change the result.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Shards this call computes.
    pub shard: Shard,
    /// Whether a missing unit is computed or an error (the merge after
    /// sharded workers).
    pub missing: Missing,
    /// Stop after computing this many units (simulates an interruption; tests).
    pub stop_after_units: Option<usize>,
    /// Label for logs and the progress bar.
    pub label: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            shard: Shard::all(),
            missing: Missing::Compute,
            stop_after_units: None,
            label: "datastore".into(),
        }
    }
}

/// What a [`build`] call did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildReport {
    /// Examples per checkpoint.
    pub examples: usize,
    /// Checkpoints (epochs).
    pub epochs: Vec<usize>,
    /// Projection dimension.
    pub d: usize,
    /// Number of LoRA parameters `P` (rows of Π).
    pub params: usize,
    /// Units (checkpoint × shard) in the whole build.
    pub units_total: usize,
    /// Units found finished in the scratch folder.
    pub units_resumed: usize,
    /// Units computed by this call.
    pub units_computed: usize,
    /// True when every unit is finished and the output files were written.
    pub complete: bool,
    /// Bytes of the output `.npy` files (0 unless complete).
    pub bytes: u64,
    /// Wall seconds of this call.
    pub seconds: f64,
    /// Seconds in forward + backward + preconditioning.
    pub grad_seconds: f64,
    /// Seconds in projection + normalisation.
    pub project_seconds: f64,
    /// (example, checkpoint) features computed per second by this call.
    pub examples_per_second: f64,
}

/// Name of the feature file of `epoch` inside the output folder.
pub fn features_file(epoch: usize) -> String {
    format!("features-epoch-{epoch}.npy")
}

fn shard_path(scratch: &Path, epoch: usize, s: usize) -> PathBuf {
    scratch
        .join(format!("epoch-{epoch}"))
        .join(format!("shard-{s:06}.npy"))
}

/// The unit at `path` when it matches its recorded blake3 and is f16 `[rows, d]`.
fn read_shard(path: &Path, rows: usize, d: usize, label: &str) -> Option<NpyArray> {
    if !dsel_store::trust_sealed(path, &format!("LESS {label}")) {
        return None;
    }
    let a = NpyArray::open(path).ok()?;
    (a.shape() == [rows, d] && a.dtype() == dsel_store::DType::F16).then_some(a)
}

/// Accumulates gradient rows and projects them in batches.
struct Projecting<'a> {
    proj: &'a Projector,
    /// Precision of the projection products (the model's).
    precision: dsel_kernels::Precision,
    p: usize,
    buf: Vec<f32>,
    rows: Vec<usize>,
}

impl Projecting<'_> {
    fn flush(&mut self, out: &mut [f16], project_secs: &mut f64) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let d = self.proj.dim();
        let n = self.rows.len();
        let mut feats = vec![0f32; n * d];
        self.proj.project_accumulate(
            &self.buf,
            n,
            self.p,
            self.p,
            0,
            &mut feats,
            self.precision,
        )?;
        normalize_rows(&mut feats, d);
        for (r, &pos) in self.rows.iter().enumerate() {
            for (dst, src) in out[pos * d..(pos + 1) * d]
                .iter_mut()
                .zip(&feats[r * d..(r + 1) * d])
            {
                *dst = f16::from_f32(*src);
            }
        }
        self.buf.clear();
        self.rows.clear();
        *project_secs += t.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Computes the features of examples `range` under the model's current
/// adapter: `[range.len(), d]` f16, normalised rows, in example order.
#[allow(clippy::too_many_arguments)]
fn compute_shard(
    model: &Model,
    set: &dyn Examples,
    range: std::ops::Range<usize>,
    moments: Option<&Moments>,
    proj: &Projector,
    cfg: &DatastoreConfig,
    grad_secs: &mut f64,
    project_secs: &mut f64,
) -> Result<Vec<f16>> {
    let d = proj.dim();
    let p = model.lora_num_params();
    // Local indices (0..len) sorted by decreasing length, ties by position.
    let lengths: Vec<usize> = range.clone().map(|i| set.get(i).0.len()).collect();
    let mut order: Vec<usize> = (0..range.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut out = vec![f16::ZERO; range.len() * d];
    let mut acc = Projecting {
        proj,
        precision: model.precision(),
        p,
        buf: Vec::new(),
        rows: Vec::with_capacity(cfg.proj_batch),
    };
    for batch_idx in
        dsel_model::plan_token_batches(&lengths, &order, cfg.batch_tokens, cfg.micro_batch)
    {
        if !acc.rows.is_empty() && acc.rows.len() + batch_idx.len() > cfg.proj_batch {
            acc.flush(&mut out, project_secs)?;
        }
        let t = Instant::now();
        let seqs: Vec<(&[u32], &[u8])> = batch_idx
            .iter()
            .map(|&i| set.get(range.start + i))
            .collect();
        let batch = Batch::new(&seqs, model.device())?;
        let g = model
            .per_example_lora_grads(&batch)?
            .grads
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if g.len() != batch_idx.len() * p {
            bail!(
                "per-example gradients: {} values for {} examples of {p} parameters",
                g.len(),
                batch_idx.len()
            );
        }
        let start = acc.buf.len();
        acc.buf.extend_from_slice(&g);
        drop(g);
        if let Some(mom) = moments {
            for row in acc.buf[start..].chunks_mut(p) {
                precondition(row, mom)?;
            }
        }
        acc.rows.extend_from_slice(&batch_idx);
        *grad_secs += t.elapsed().as_secs_f64();
    }
    acc.flush(&mut out, project_secs)?;
    Ok(out)
}

/// LoRA parameter names and shapes of `model`, in parameter order.
fn param_layout(model: &Model) -> Vec<(String, Vec<usize>)> {
    model
        .lora_params()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect()
}

/// Builds (or resumes) the features of every example of `set` at every
/// checkpoint: units are computed into `scratch`; when all are present and
/// `out` is given, `out/features-epoch-<k>.npy` (f16 `[N, d]`) are written.
/// `model` is the base model; each checkpoint's adapter is loaded into it.
#[allow(clippy::too_many_arguments)]
pub fn build(
    model: &mut Model,
    set: &dyn Examples,
    ckpts: &[Checkpoint],
    kind: GradientKind,
    cfg: &DatastoreConfig,
    scratch: &Path,
    out: Option<&Path>,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    cfg.validate()?;
    if ckpts.is_empty() {
        bail!("LESS {}: no checkpoints given", opts.label);
    }
    let n = set.count();
    if n == 0 {
        bail!("LESS {}: no examples", opts.label);
    }
    let started = Instant::now();
    let proj = Projector::new(cfg.seed, cfg.d)?.with_block_rows(cfg.block_rows);
    let n_shards = n.div_ceil(cfg.shard_examples);
    let range_of = |s: usize| s * cfg.shard_examples..((s + 1) * cfg.shard_examples).min(n);
    let mut report = BuildReport {
        examples: n,
        epochs: ckpts.iter().map(|c| c.epoch).collect(),
        d: cfg.d,
        units_total: n_shards * ckpts.len(),
        ..Default::default()
    };
    // This worker's share: its shards, once per checkpoint.
    let owned: u64 = (0..n_shards)
        .filter(|&s| opts.shard.owns(s))
        .map(|s| range_of(s).len() as u64)
        .sum();
    let mut progress = dsel_progress::Progress::new(
        format!("LESS {}", opts.label),
        owned * ckpts.len() as u64,
        "ex×ckpt",
    );
    if opts.missing == Missing::Fail {
        let absent: Vec<String> = ckpts
            .iter()
            .flat_map(|ck| {
                (0..n_shards)
                    .filter(|&s| {
                        read_shard(
                            &shard_path(scratch, ck.epoch, s),
                            range_of(s).len(),
                            cfg.d,
                            &opts.label,
                        )
                        .is_none()
                    })
                    .map(move |s| format!("epoch {} shard {s}", ck.epoch))
            })
            .collect();
        if !absent.is_empty() {
            bail!(
                "LESS {}: {} of {} units are not finished in {} ({}); run the shard workers \
                 that own them (shard s belongs to worker s mod N) or run without merging",
                opts.label,
                absent.len(),
                report.units_total,
                scratch.display(),
                absent.join(", ")
            );
        }
    }
    let mut progress_pos = 0u64;
    let mut computed_examples = 0usize;
    // Per checkpoint (in order, as far as this call got), which units are finished.
    let mut present: Vec<Vec<bool>> = Vec::with_capacity(ckpts.len());
    'outer: for ck in ckpts {
        let ci = present.len();
        present.push(
            (0..n_shards)
                .map(|s| {
                    let path = shard_path(scratch, ck.epoch, s);
                    read_shard(&path, range_of(s).len(), cfg.d, &opts.label).is_some()
                })
                .collect(),
        );
        let todo: Vec<usize> = (0..n_shards)
            .filter(|&s| opts.shard.owns(s) && !present[ci][s])
            .collect();
        report.units_resumed += present[ci].iter().filter(|&&p| p).count();
        progress_pos += (0..n_shards)
            .filter(|s| !todo.contains(s) && opts.shard.owns(*s))
            .map(|s| range_of(s).len() as u64)
            .sum::<u64>();
        if computed_examples == 0 {
            // Found done before any work here: not part of the rate.
            progress.resume_at(progress_pos);
        } else {
            progress.set_position(progress_pos);
        }
        progress.set_message(format!("epoch {}", ck.epoch));
        if todo.is_empty() {
            continue;
        }
        model.load_lora(&ck.adapter).with_context(|| {
            format!(
                "LESS {}: loading checkpoint of epoch {}",
                opts.label, ck.epoch
            )
        })?;
        report.params = model.lora_num_params();
        let moments = match kind {
            GradientKind::Adam => Some(load_moments(&ck.optimizer, &param_layout(model))?),
            GradientKind::Sgd => None,
        };
        let dir = scratch.join(format!("epoch-{}", ck.epoch));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for s in todo {
            if opts.stop_after_units == Some(report.units_computed) {
                break 'outer;
            }
            let range = range_of(s);
            let feats = compute_shard(
                model,
                set,
                range.clone(),
                moments.as_ref(),
                &proj,
                cfg,
                &mut report.grad_seconds,
                &mut report.project_seconds,
            )
            .with_context(|| {
                format!(
                    "LESS {}: epoch {} shard {s} (examples {}..{})",
                    opts.label, ck.epoch, range.start, range.end
                )
            })?;
            dsel_store::write_npy_sealed(
                shard_path(scratch, ck.epoch, s),
                &[range.len(), cfg.d],
                &feats,
            )?;
            present[ci][s] = true;
            report.units_computed += 1;
            computed_examples += range.len();
            progress_pos += range.len() as u64;
            progress.set_position(progress_pos);
        }
    }
    progress.finish();
    if report.params == 0 {
        // Every unit was resumed: read P from the first adapter's layout.
        model.load_lora(&ckpts[0].adapter)?;
        report.params = model.lora_num_params();
    }
    let all_present =
        present.len() == ckpts.len() && present.iter().all(|units| units.iter().all(|&p| p));
    if all_present {
        if let Some(out) = out {
            for ck in ckpts {
                let path = out.join(features_file(ck.epoch));
                let mut w = NpyWriter::<f16>::create(&path, &[cfg.d])?;
                for s in 0..n_shards {
                    // Verified again as it is assembled.
                    let path = shard_path(scratch, ck.epoch, s);
                    let a = read_shard(&path, range_of(s).len(), cfg.d, &opts.label).with_context(
                        || {
                            format!(
                                "LESS {}: shard {s} of epoch {} vanished or is corrupt",
                                opts.label, ck.epoch
                            )
                        },
                    )?;
                    w.write(a.as_slice::<f16>()?)?;
                }
                w.finish()?;
                report.bytes += std::fs::metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .len();
            }
            report.complete = true;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.examples_per_second =
        computed_examples as f64 / (report.grad_seconds + report.project_seconds).max(1e-9);
    tracing::info!(
        "LESS {}: {} units computed, {} resumed of {}; {:.3} ex×ckpt/s (grad {:.1}s, projection {:.1}s)",
        opts.label,
        report.units_computed,
        report.units_resumed,
        report.units_total,
        report.examples_per_second,
        report.grad_seconds,
        report.project_seconds
    );
    Ok(report)
}

/// Opens the feature files of `epochs` in `dir` (memory-mapped), checking
/// that each is f16 `[n, d]`.
pub fn open_features(dir: &Path, epochs: &[usize], n: usize, d: usize) -> Result<Vec<NpyArray>> {
    epochs
        .iter()
        .map(|&e| {
            let path = dir.join(features_file(e));
            let a = NpyArray::open(&path)?;
            if a.shape() != [n, d] || a.dtype() != dsel_store::DType::F16 {
                bail!(
                    "{}: expected f16 [{n}, {d}], found {} {:?}",
                    path.display(),
                    a.dtype(),
                    a.shape()
                );
            }
            Ok(a)
        })
        .collect()
}
