//! Model-based baselines as cached stages: per-example LoRA gradient norms
//! (Grad-Norm) and last-token hidden states (RDS). Both are target
//! independent for the pool, so every target reuses them.

use anyhow::Result;
use candle_core::{DType, Tensor};
use dsel_ingest::Example;
use dsel_model::{Batch, LoraConfig, Model};
use dsel_store::{Artifact, NpyArray, StageSpec};
use dsel_sweep::SweepConfig;
use dsel_tokenize::TokenizedSet;
use serde_json::json;

use crate::Pipeline;

/// Version of the baseline stages' outputs.
pub const BASELINES_VERSION: &str = "baselines-1";

/// The text of an example for lexical baselines: every message's content, one per line.
pub fn text(e: &Example) -> String {
    e.messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Consecutive batches of the set in storage order, within the sweep's budget.
fn batches(set: &TokenizedSet, cfg: &SweepConfig) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = (0..set.len()).map(|i| set.example(i).0.len()).collect();
    let order: Vec<usize> = (0..set.len()).collect();
    dsel_model::plan_token_batches(&lengths, &order, cfg.batch_tokens, cfg.max_batch)
}

fn batch_of(set: &TokenizedSet, idx: &[usize], model: &Model) -> Result<Batch> {
    let seqs: Vec<(&[u32], &[u8])> = idx.iter().map(|&i| set.example(i)).collect();
    Batch::new(&seqs, model.device())
}

/// L2 norm of each pool example's LoRA gradient at a fresh adapter (cached).
pub fn grad_norms(
    p: &mut Pipeline,
    pool: &Artifact,
    lora: &LoraConfig,
    cfg: &SweepConfig,
) -> Result<Vec<f64>> {
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
    let o = p.store.get_or_build(&spec, |b| {
        let mut norms = vec![0f32; set.len()];
        for idx in batches(
            &set,
            &SweepConfig {
                max_batch: cfg.max_batch.min(8),
                ..cfg.clone()
            },
        ) {
            let g = model.per_example_lora_grads(&batch_of(&set, &idx, &model)?)?;
            let n = g.grads.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
            for (&i, v) in idx.iter().zip(n) {
                norms[i] = v;
            }
        }
        dsel_store::write_npy(b.path("grad_norm.npy"), &[norms.len()], &norms)?;
        Ok(())
    })?;
    p.record("gradnorm", "pool", &o);
    let arr = NpyArray::open(o.artifact.path("grad_norm.npy"))?;
    Ok(arr.as_slice::<f32>()?.iter().map(|&x| x as f64).collect())
}

/// Last-token final hidden states of every example of a tokenized set (cached), `[n, H]`.
pub fn embeddings(
    p: &mut Pipeline,
    set_art: &Artifact,
    label: &str,
    cfg: &SweepConfig,
) -> Result<Tensor> {
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
    let o = p.store.get_or_build(&spec, |b| {
        let mut out = vec![0f32; set.len() * h];
        for idx in batches(&set, cfg) {
            let e = model
                .last_hidden(&batch_of(&set, &idx, &model)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (&i, row) in idx.iter().zip(e) {
                out[i * h..(i + 1) * h].copy_from_slice(&row);
            }
        }
        dsel_store::write_npy(b.path("hidden.npy"), &[set.len(), h], &out)?;
        Ok(())
    })?;
    p.record("embed", label, &o);
    let arr = NpyArray::open(o.artifact.path("hidden.npy"))?;
    Ok(Tensor::from_slice(
        arr.as_slice::<f32>()?,
        (set.len(), h),
        &candle_core::Device::Cpu,
    )?)
}

/// RDS: for each pool example, max over target subtasks of the mean cosine
/// similarity of its last-token hidden state with the subtask's examples.
pub fn rds_scores(
    p: &mut Pipeline,
    pool: &Artifact,
    target: &Artifact,
    cfg: &SweepConfig,
) -> Result<Vec<f64>> {
    let normalise = |t: Tensor| -> Result<Tensor> {
        Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?)?)
    };
    let ep = normalise(embeddings(p, pool, "pool", cfg)?)?;
    let et = normalise(embeddings(p, target, "target", cfg)?)?;
    let sims = ep.matmul(&et.t()?)?.to_vec2::<f32>()?; // [n_pool, n_target]
    let tset = TokenizedSet::open(target.dir())?;
    let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (j, r) in tset.index.iter().enumerate() {
        groups.entry(r.subtask.as_str()).or_default().push(j);
    }
    Ok(sims
        .iter()
        .map(|row| {
            groups
                .values()
                .map(|g| g.iter().map(|&j| row[j] as f64).sum::<f64>() / g.len() as f64)
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect())
}
