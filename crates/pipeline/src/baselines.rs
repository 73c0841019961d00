//! Model-based baselines as cached stages: per-example LoRA gradient norms
//! (Grad-Norm) and last-token hidden states (RDS). Both are target
//! independent for the pool, so every target reuses them.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Tensor};
use dsel_ingest::Example;
use dsel_model::{Batch, LoraConfig};
use dsel_store::shard::{concat_units, run_units, UnitFile};
use dsel_store::{Artifact, NpyArray, StageSpec, UnitWork};
use dsel_sweep::SweepConfig;
use dsel_tokenize::TokenizedSet;
use serde_json::json;

use crate::Pipeline;

/// Version of the baseline stages' outputs (2: computed in resumable,
/// shardable units of `shard_examples` examples, batched within a unit).
pub const BASELINES_VERSION: &str = "baselines-2";

/// The text of an example for lexical baselines: every message's content, one per line.
pub fn text(e: &Example) -> String {
    e.messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Per-example rows of `width` values over `set`, computed in units of
/// `cfg.shard_examples` examples (batches in storage order within the
/// sweep's budget, at most `max_batch` examples) as `work` says, and with
/// `out` assembled into `out/<file>` of shape `[n]` (`width` 1) or `[n, width]`.
#[allow(clippy::too_many_arguments)]
fn per_example_rows(
    set: &TokenizedSet,
    cfg: &SweepConfig,
    max_batch: usize,
    width: usize,
    what: &str,
    file: &str,
    scratch: &Path,
    out: Option<&Path>,
    work: UnitWork,
    mut rows: impl FnMut(&[(&[u32], &[u8])]) -> Result<Vec<Vec<f32>>>,
) -> Result<serde_json::Value> {
    anyhow::ensure!(
        cfg.shard_examples > 0,
        "{what}: shard_examples must be positive"
    );
    let n = set.len();
    let n_units = n.div_ceil(cfg.shard_examples);
    let range_of = |u: usize| u * cfg.shard_examples..((u + 1) * cfg.shard_examples).min(n);
    let files = |u: usize| {
        vec![UnitFile {
            path: scratch.join(format!("unit-{u:06}.npy")),
            len: range_of(u).len() * width,
        }]
    };
    let lengths: Vec<usize> = (0..n).map(|i| set.example(i).0.len()).collect();
    let mut progress = dsel_progress::Progress::new(what, n as u64, "ex");
    let units = run_units::<f32>(
        n_units,
        work,
        what,
        files,
        |u| {
            let range = range_of(u);
            let order: Vec<usize> = range.clone().collect();
            let mut values = vec![0f32; range.len() * width];
            for idx in dsel_model::plan_token_batches(&lengths, &order, cfg.batch_tokens, max_batch)
            {
                let seqs: Vec<(&[u32], &[u8])> = idx.iter().map(|&i| set.example(i)).collect();
                for (&i, row) in idx.iter().zip(rows(&seqs)?) {
                    anyhow::ensure!(row.len() == width, "{what}: row of {} values", row.len());
                    let at = (i - range.start) * width;
                    values[at..at + width].copy_from_slice(&row);
                }
            }
            Ok(vec![values])
        },
        |u, _| progress.inc(range_of(u).len() as u64),
    )?;
    progress.finish();
    if let (Some(out), true) = (out, units.complete()) {
        let tail: &[usize] = if width == 1 { &[] } else { &[width] };
        concat_units::<f32>(n_units, what, files, 0, &out.join(file), tail)?;
    }
    Ok(serde_json::json!({"examples": n, "units": units.total, "units_resumed": units.resumed}))
}

/// L2 norm of each pool example's LoRA gradient at a fresh adapter (cached;
/// pool-wide: `None` when this process only did its part, see [`crate::Work`]).
pub fn grad_norms(
    p: &mut Pipeline,
    pool: &Artifact,
    lora: &LoraConfig,
    cfg: &SweepConfig,
) -> Result<Option<Vec<f64>>> {
    let fp = p.model_key()?;
    let spec = StageSpec::new(
        "gradnorm",
        BASELINES_VERSION,
        json!({"model": fp, "lora": lora, "batch": cfg}),
    )
    .input(pool.key().clone());
    let mut model = p.fresh_model()?;
    model.add_lora(lora)?;
    let set = TokenizedSet::open(pool.dir())?;
    let Some(art) = p.pool_stage(&spec, "pool", |scratch, out, work| {
        per_example_rows(
            &set,
            cfg,
            cfg.max_batch.min(8),
            1,
            "gradnorm pool",
            "grad_norm.npy",
            scratch,
            out,
            work,
            |seqs| {
                let g = model.per_example_lora_grads(&Batch::new(seqs, model.device())?)?;
                let n = g.grads.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
                Ok(n.into_iter().map(|v| vec![v]).collect())
            },
        )
    })?
    else {
        return Ok(None);
    };
    let arr = NpyArray::open(art.path("grad_norm.npy"))?;
    Ok(Some(
        arr.as_slice::<f32>()?.iter().map(|&x| x as f64).collect(),
    ))
}

/// Last-token final hidden states of every example of a tokenized set
/// (cached), `[n, H]`. Of the pool (`pool_wide`) it is a pool-wide stage:
/// `None` when this process only did its part (see [`crate::Work`]).
pub fn embeddings(
    p: &mut Pipeline,
    set_art: &Artifact,
    label: &str,
    cfg: &SweepConfig,
    pool_wide: bool,
) -> Result<Option<Tensor>> {
    let fp = p.model_key()?;
    let spec = StageSpec::new(
        "embed",
        BASELINES_VERSION,
        json!({"model": fp, "batch": cfg}),
    )
    .input(set_art.key().clone());
    let model = p.fresh_model()?;
    let set = TokenizedSet::open(set_art.dir())?;
    let h = model.config().hidden_size;
    let what = format!("embed {label}");
    let run = |scratch: &Path, out: Option<&Path>, work: UnitWork| {
        per_example_rows(
            &set,
            cfg,
            cfg.max_batch,
            h,
            &what,
            "hidden.npy",
            scratch,
            out,
            work,
            |seqs| {
                let batch = Batch::new(seqs, model.device())?;
                Ok(model
                    .last_hidden(&batch)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?)
            },
        )
    };
    let art = if pool_wide {
        match p.pool_stage(&spec, label, run)? {
            Some(a) => a,
            None => return Ok(None),
        }
    } else {
        p.build_stage(&spec, label, |b| {
            run(&b.scratch_dir(), Some(b.dir()), UnitWork::default())
        })?
    };
    let arr = NpyArray::open(art.path("hidden.npy"))?;
    Ok(Some(Tensor::from_slice(
        arr.as_slice::<f32>()?,
        (set.len(), h),
        &candle_core::Device::Cpu,
    )?))
}

/// RDS: for each pool example, max over target subtasks of the mean cosine
/// similarity of its last-token hidden state with the subtask's examples.
pub fn rds_scores(
    p: &mut Pipeline,
    pool: &Artifact,
    target: &Artifact,
    cfg: &SweepConfig,
) -> Result<Option<Vec<f64>>> {
    let normalise = |t: Tensor| -> Result<Tensor> {
        Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?)?)
    };
    // The target's first: a small stage the prepare step builds.
    let et = embeddings(p, target, "target", cfg, false)?.expect("a stage that is not pool-wide");
    let Some(ep) = embeddings(p, pool, "pool", cfg, true)? else {
        return Ok(None);
    };
    let (ep, et) = (normalise(ep)?, normalise(et)?);
    let sims = ep.matmul(&et.t()?)?.to_vec2::<f32>()?; // [n_pool, n_target]
    let tset = TokenizedSet::open(target.dir())?;
    let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (j, r) in tset.index.iter().enumerate() {
        groups.entry(r.subtask.as_str()).or_default().push(j);
    }
    Ok(Some(
        sims.iter()
            .map(|row| {
                groups
                    .values()
                    .map(|g| g.iter().map(|&j| row[j] as f64).sum::<f64>() / g.len() as f64)
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect(),
    ))
}
