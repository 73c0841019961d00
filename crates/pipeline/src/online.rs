//! Stage `train-online`: LoRA training with online batch selection (GREATS,
//! UDS, Max-Loss, Grad-Norm, or none) — see [`dsel_online`].

use anyhow::{Context, Result};
use dsel_store::{Artifact, StageSpec};
use dsel_tokenize::TokenizedSet;
use serde_json::json;

pub use dsel_online::{
    KeepRatio, OnlineReport, OnlineRunConfig as OnlineTrainConfig, SelectorConfig, SelectorKind,
};

use crate::Pipeline;

/// Trains LoRA adapters of the loaded model for `cfg.steps` steps, each on
/// `k` of `B` pool candidates chosen by `cfg.selector`; GREATS samples its
/// validation examples from `target_tok` (the target's tokenized validation
/// set). The artifact (stage `train-online`) holds `adapter.safetensors`,
/// `steps.jsonl` (chosen indices, scores, select and step seconds per step)
/// and `report.json` ([`OnlineReport`]). Key: model fingerprint, the whole
/// configuration (selector and its hyper-parameters, LoRA, schedule, seed),
/// the pool and target keys.
pub fn train_online(
    p: &mut Pipeline,
    pool_tok: &Artifact,
    target_tok: &Artifact,
    cfg: &OnlineTrainConfig,
) -> Result<(Artifact, OnlineReport)> {
    cfg.validate()?;
    let fp = p.model_key()?;
    let spec = StageSpec::new(
        "train-online",
        dsel_online::STAGE_VERSION,
        json!({"model": fp, "online": cfg}),
    )
    .input(pool_tok.key().clone())
    .input(target_tok.key().clone())
    .with_seed(cfg.seed);
    let mut model = p.fresh_model()?;
    let pool = TokenizedSet::open(pool_tok.dir())?;
    let target = TokenizedSet::open(target_tok.dir())?;
    let o = p.store.get_or_build(&spec, |b| {
        let report =
            dsel_online::run_online(&mut model, &pool, &target, cfg, &b.scratch_dir(), b.dir())?;
        b.set_info(serde_json::to_value(&report)?);
        Ok(())
    })?;
    let label = cfg.selector.kind().name();
    p.record("train-online", label, &o);
    let path = o.artifact.path("report.json");
    let report: OnlineReport = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a valid online-training report", path.display()))?;
    Ok((o.artifact, report))
}
