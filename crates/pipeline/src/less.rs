//! LESS (Xia et al., ICML 2024) inside the pipeline, as in ALGORITHMS.md:
//!
//! 1. `warmup`: LoRA fine-tune on a seeded random `warmup_fraction` of the
//!    pool, saving adapter + AdamW state after every epoch;
//! 2. `less-datastore`: Adam-preconditioned, projected, normalised
//!    per-example gradients of the whole pool at every epoch's checkpoint
//!    (key: model, warmup, pool, datastore config, epochs — never the target,
//!    so every later target reuses it);
//! 3. `less-valfeat`: plain gradients of the target's validation examples,
//!    same projection (key: the same plus the target);
//! 4. matching (in process, streamed over the memory-mapped datastore):
//!    `score(z) = max_k mean_{v∈V_k} Σ_i w_i ⟨φ̂_i(z), φ̂_i(v)⟩`, `w_i` the
//!    epochs' mean learning rates normalised to sum to 1.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dsel_basetrain::{FinetuneConfig, FinetuneReport};
use dsel_less::{BuildOptions, Checkpoint, DatastoreConfig, GradientKind};
use dsel_model::LoraConfig;
use dsel_store::{Artifact, StageSpec, UnitWork};
use dsel_tokenize::TokenizedSet;
use dsel_train::{AdamWConfig, TrainConfig};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Pipeline;

/// Stage name of the pool datastore.
pub const DATASTORE_STAGE: &str = "less-datastore";
/// Stage name of the validation features.
pub const VALFEAT_STAGE: &str = "less-valfeat";

/// Everything that decides a LESS scoring run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LessConfig {
    /// Fraction of the pool trained on in the warmup (LESS: 0.05).
    pub warmup_fraction: f64,
    /// Warmup fine-tune (LoRA shape, epochs = number of checkpoints, LR, …);
    /// `save_epochs` is forced on.
    pub warmup: FinetuneConfig,
    /// Datastore projection and batching (also used for validation features).
    pub datastore: DatastoreConfig,
    /// Pool rows per matching chunk (memory only; does not change scores).
    pub match_chunk: usize,
    /// Seed of the warmup subset.
    pub seed: u64,
}

fn qkvo() -> Vec<String> {
    ["q", "k", "v", "o"].map(String::from).to_vec()
}

impl LessConfig {
    /// CPU preset (SmolLM2-135M, ~1000-example pool, max_len 256, 2 cores):
    /// warmup on 5% for ONE epoch (so one checkpoint), LoRA r = 8 α = 32
    /// dropout 0.1 on q,k,v,o, lr 2e-4, d = 1024. The datastore is bound by
    /// the per-example forward + backward (measured ≈ 7.5 s per 256-token
    /// example on a loaded 2-core machine, ≈ 2 s expected idle), so every
    /// extra checkpoint adds one more pass over pool and validation set
    /// (≈ 20+ min); one checkpoint is what fits a 20–30 min run. Use
    /// [`LessConfig::paper`] (4 epochs) when time allows.
    pub fn cpu() -> Self {
        Self {
            warmup_fraction: 0.05,
            warmup: FinetuneConfig {
                lora: LoraConfig {
                    rank: 8,
                    alpha: 32.0,
                    dropout: 0.1,
                    targets: qkvo(),
                    seed: 0,
                },
                train: TrainConfig {
                    epochs: 1,
                    lr: 2e-4,
                    warmup_ratio: 0.03,
                    micro_batch: 8,
                    grad_accum: 1,
                    seed: 0,
                    shuffle: true,
                    max_grad_norm: Some(1.0),
                    checkpoint_every_steps: Some(8),
                    adam: AdamWConfig::default(),
                    schedule: Default::default(),
                },
                save_epochs: true,
                group_by_length: false,
            },
            datastore: DatastoreConfig {
                d: 1024,
                seed: 0,
                shard_examples: 64,
                micro_batch: 8,
                batch_tokens: 2048,
                proj_batch: 64,
                block_rows: 512,
            },
            match_chunk: 1024,
            seed: 0,
        }
    }

    /// The paper's settings: warmup on 5% for 4 epochs, LoRA r = 128 α = 512
    /// dropout 0.1 on q,k,v,o, lr 2e-5 (effective batch 32), d = 8192.
    pub fn paper() -> Self {
        Self {
            warmup_fraction: 0.05,
            warmup: FinetuneConfig {
                lora: LoraConfig {
                    rank: 128,
                    alpha: 512.0,
                    dropout: 0.1,
                    targets: qkvo(),
                    seed: 0,
                },
                train: TrainConfig {
                    epochs: 4,
                    lr: 2e-5,
                    warmup_ratio: 0.03,
                    micro_batch: 8,
                    grad_accum: 4,
                    seed: 0,
                    shuffle: true,
                    max_grad_norm: Some(1.0),
                    checkpoint_every_steps: Some(32),
                    adam: AdamWConfig::default(),
                    schedule: Default::default(),
                },
                save_epochs: true,
                group_by_length: false,
            },
            datastore: DatastoreConfig {
                d: 8192,
                seed: 0,
                shard_examples: 256,
                micro_batch: 8,
                batch_tokens: 8192,
                proj_batch: 32,
                block_rows: 512,
            },
            match_chunk: 1024,
            seed: 0,
        }
    }
}

/// LESS scores of a pool for one target.
#[derive(Debug, Clone)]
pub struct LessScores {
    /// One score per pool example (higher = selected first).
    pub scores: Vec<f64>,
    /// Costs: `warmup_seconds`, `datastore_seconds`, `validation_seconds`,
    /// `matching_seconds`, cache hits, `datastore_bytes`, `d`, `params` (P),
    /// `epochs`, `weights`, datastore `examples_per_second`, matching `gb_per_second`.
    pub report: serde_json::Value,
}

/// The seeded warmup subset of `0..n` (sorted): `max(1, ⌊fraction·n⌋)` examples.
pub fn warmup_indices(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let k = ((fraction * n as f64).floor() as usize)
        .clamp(1, n.max(1))
        .min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u = sample(&mut rng, n, k).into_vec();
    u.sort_unstable();
    u
}

/// The artifact spec of one feature stage over `set_art`.
fn feature_spec(
    p: &mut Pipeline,
    stage: &str,
    set_art: &Artifact,
    warm: &Artifact,
    ckpts: &[Checkpoint],
    kind: GradientKind,
    cfg: &DatastoreConfig,
) -> Result<StageSpec> {
    let fp = p.model_key()?;
    let epochs: Vec<usize> = ckpts.iter().map(|c| c.epoch).collect();
    Ok(StageSpec::new(
        stage,
        dsel_less::DATASTORE_VERSION,
        json!({"model": fp, "datastore": cfg, "epochs": epochs, "gradient": kind}),
    )
    .input(warm.key().clone())
    .input(set_art.key().clone())
    .with_seed(cfg.seed))
}

/// Builds (or reuses) one feature stage over `set`: the pool datastore is
/// a pool-wide stage (`None` when this process only did its part, see
/// [`crate::Work`]), the validation features an ordinary one. Returns the
/// artifact, whether it was a cache hit and the seconds it took here.
#[allow(clippy::too_many_arguments)]
fn feature_stage(
    p: &mut Pipeline,
    stage: &str,
    label: &str,
    set_art: &Artifact,
    warm: &Artifact,
    ckpts: &[Checkpoint],
    kind: GradientKind,
    cfg: &DatastoreConfig,
) -> Result<Option<(Artifact, bool, f64)>> {
    let spec = feature_spec(p, stage, set_art, warm, ckpts, kind, cfg)?;
    let set = TokenizedSet::open(set_art.dir())?;
    let mut model = p.fresh_model()?;
    let mut run = |scratch: &Path, out: Option<&Path>, work: UnitWork| {
        let opts = BuildOptions {
            label: label.to_string(),
            shard: work.shard,
            missing: work.missing,
            ..Default::default()
        };
        let rep = dsel_less::build(&mut model, &set, ckpts, kind, cfg, scratch, out, &opts)?;
        if out.is_some() && !rep.complete {
            bail!("LESS {label}: build finished with missing shards");
        }
        Ok(serde_json::to_value(&rep)?)
    };
    if stage != DATASTORE_STAGE {
        let o = p.build(&spec, |b| {
            let info = run(&b.scratch_dir(), Some(b.dir()), UnitWork::default())?;
            b.set_info(info);
            Ok(())
        })?;
        p.record(stage, label, &o);
        return Ok(Some((o.artifact, o.cache_hit, o.seconds)));
    }
    let t = Instant::now();
    Ok(p.pool_stage(&spec, label, run)?.map(|a| {
        let hit = p.records.last().is_some_and(|r| r.cache_hit);
        (a, hit, t.elapsed().as_secs_f64())
    }))
}

/// The warmup fine-tune (cached): its artifact, the checkpoints of its
/// epochs and the epochs' mean learning rates.
fn warmup(
    p: &mut Pipeline,
    pool_tok: &Artifact,
    n: usize,
    cfg: &LessConfig,
) -> Result<(Artifact, Vec<Checkpoint>, Vec<f64>, usize)> {
    let indices = warmup_indices(n, cfg.warmup_fraction, cfg.seed);
    let mut ft = cfg.warmup.clone();
    ft.save_epochs = true;
    let warm = p.finetune("warmup", "less warmup", pool_tok, &indices, None, &ft)?;
    let train_json = warm.path("train.json");
    let report: FinetuneReport = serde_json::from_slice(
        &std::fs::read(&train_json).with_context(|| format!("reading {}", train_json.display()))?,
    )
    .with_context(|| format!("parsing {}", train_json.display()))?;
    let lrs: Vec<f64> = report.train.epochs.iter().map(|e| e.mean_lr).collect();
    anyhow::ensure!(
        !lrs.is_empty(),
        "{}: no epochs recorded",
        train_json.display()
    );
    let ckpts: Vec<Checkpoint> = (1..=lrs.len())
        .map(|k| Checkpoint {
            epoch: k,
            adapter: warm.path(&format!("epoch-{k}/adapter.safetensors")),
            optimizer: warm.path(&format!("epoch-{k}/optimizer.safetensors")),
        })
        .collect();
    Ok((warm, ckpts, lrs, indices.len()))
}

/// Runs LESS on a tokenized pool and a tokenized target (validation
/// examples, with subtasks in their index); returns one score per pool
/// example (`None` when this process only did its part of the datastore,
/// see [`crate::Work`]).
pub fn score(
    p: &mut Pipeline,
    pool_tok: &Artifact,
    target_tok: &Artifact,
    cfg: &LessConfig,
) -> Result<Option<LessScores>> {
    let pool = TokenizedSet::open(pool_tok.dir())?;
    let target = TokenizedSet::open(target_tok.dir())?;
    let n = pool.len();
    anyhow::ensure!(n >= 1, "LESS needs a non-empty pool");
    anyhow::ensure!(
        !target.is_empty(),
        "LESS needs at least one validation example"
    );
    anyhow::ensure!(
        cfg.warmup_fraction > 0.0 && cfg.warmup_fraction <= 1.0,
        "LESS warmup_fraction must be in (0, 1], got {}",
        cfg.warmup_fraction
    );

    // 1. Warmup.
    let t = Instant::now();
    let (warm, ckpts, lrs, warmup_examples) = warmup(p, pool_tok, n, cfg)?;
    let warmup_hit = p
        .records
        .iter()
        .rev()
        .find(|r| r.stage == "warmup")
        .map(|r| r.cache_hit)
        .unwrap_or(false);
    let warmup_seconds = t.elapsed().as_secs_f64();
    let weights = dsel_less::checkpoint_weights(&lrs)?;
    let epochs: Vec<usize> = ckpts.iter().map(|c| c.epoch).collect();

    // 2. Validation features (small: the prepare step of a sharded run builds them).
    let (val_art, val_hit, val_secs) = feature_stage(
        p,
        VALFEAT_STAGE,
        "validation features",
        target_tok,
        &warm,
        &ckpts,
        GradientKind::Sgd,
        &cfg.datastore,
    )?
    .expect("validation features are not pool-wide");
    // 3. Datastore (target independent, pool-wide).
    let Some((store_art, store_hit, store_secs)) = feature_stage(
        p,
        DATASTORE_STAGE,
        "pool datastore",
        pool_tok,
        &warm,
        &ckpts,
        GradientKind::Adam,
        &cfg.datastore,
    )?
    else {
        return Ok(None);
    };

    // 4. Matching.
    let d = cfg.datastore.d;
    let train = dsel_less::open_features(store_art.dir(), &epochs, n, d)?;
    let val = dsel_less::open_features(val_art.dir(), &epochs, target.len(), d)?;
    let subtasks: Vec<String> = target.index.iter().map(|r| r.subtask.clone()).collect();
    let groups: Vec<Vec<usize>> = dsel_less::subtask_groups(&subtasks)
        .into_iter()
        .map(|(_, g)| g)
        .collect();
    let (scores, mrep) =
        dsel_less::matching::score(&train, &val, &weights, &groups, cfg.match_chunk)?;
    let datastore_bytes: u64 = train.iter().map(|a| (a.len() * 2) as u64).sum();
    let info = &store_art.manifest().info;
    let params = info["params"].as_u64();
    let examples_per_second = info["examples_per_second"].as_f64();
    let report = json!({
        "warmup_examples": warmup_examples,
        "warmup_seconds": warmup_seconds,
        "warmup_cache_hit": warmup_hit,
        "datastore_seconds": store_secs,
        "datastore_cache_hit": store_hit,
        "datastore_examples_per_second": examples_per_second,
        "datastore_bytes": datastore_bytes,
        "validation_seconds": val_secs,
        "validation_cache_hit": val_hit,
        "validation_examples": target.len(),
        "matching_seconds": mrep.seconds,
        "matching_gb_per_second": mrep.gb_per_second,
        "subtasks": groups.len(),
        "d": d,
        "params": params,
        "epochs": epochs,
        "mean_lrs": lrs,
        "weights": weights,
    });
    tracing::info!("LESS: {report}");
    Ok(Some(LessScores { scores, report }))
}

/// Formats a score like the reference (`round(score, 6)` printed by Python).
fn py_round6(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let r = (x * 1e6).round() / 1e6;
    if r == r.trunc() {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

/// Writes a LESS-compatible `sorted.csv` (as the reference's
/// `write_selected_data.py`): header `file name, index, score`, one row per
/// example sorted by score descending (ties by position; NaN last). An id
/// `"<file>:<row>"` gives the file name and index; any other id is written
/// whole with the example's position as index. Written atomically.
pub fn write_sorted_csv(path: &Path, ids: &[String], scores: &[f64]) -> Result<()> {
    if ids.len() != scores.len() {
        bail!(
            "{}: {} ids but {} scores",
            path.display(),
            ids.len(),
            scores.len()
        );
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => a.cmp(&b),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y
                .partial_cmp(&x)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b)),
        }
    });
    // The reference's ", " separators are kept as a leading space in the
    // fields; the csv writer quotes any file name holding a comma or quote.
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["file name", " index", " score"])?;
    for i in order {
        let id = &ids[i];
        let (file, index) = match id.rsplit_once(':') {
            Some((f, r)) if !f.is_empty() && r.parse::<u64>().is_ok() => {
                (f.to_string(), r.to_string())
            }
            _ => (id.clone(), i.to_string()),
        };
        w.write_record([
            file,
            format!(" {index}"),
            format!(" {}", py_round6(scores[i])),
        ])?;
    }
    dsel_store::atomic_write(path, w.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_csv_matches_the_reference_format() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sorted.csv");
        let ids: Vec<String> = [
            "pools/a.jsonl:3",
            "pools/a.jsonl:7",
            "odd-id",
            "pools/b.jsonl:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        write_sorted_csv(&path, &ids, &[0.25, 0.91234567, f64::NAN, 1.0]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "file name, index, score\npools/b.jsonl, 0, 1.0\npools/a.jsonl, 7, 0.912346\npools/a.jsonl, 3, 0.25\nodd-id, 2, nan\n"
        );
        assert!(write_sorted_csv(&path, &ids, &[1.0]).is_err());
        // A file name with a comma is quoted, so the file still parses.
        let odd = vec!["pools/a,b.jsonl:4".to_string()];
        write_sorted_csv(&path, &odd, &[0.5]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "file name, index, score\n\"pools/a,b.jsonl\", 4, 0.5\n"
        );
    }

    #[test]
    fn warmup_subset_is_seeded_sized_and_sorted() {
        let a = warmup_indices(1000, 0.05, 3);
        assert_eq!(a.len(), 50);
        assert_eq!(a, warmup_indices(1000, 0.05, 3));
        assert_ne!(a, warmup_indices(1000, 0.05, 4));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(warmup_indices(10, 0.01, 0).len(), 1);
        assert_eq!(warmup_indices(3, 1.0, 0), vec![0, 1, 2]);
    }

    use dsel_testkit::data_root;

    fn fixture(name: &str) -> std::path::PathBuf {
        dsel_testkit::fixtures("pipeline").join(name)
    }

    fn toy_config() -> LessConfig {
        let mut c = LessConfig::cpu();
        c.warmup_fraction = 0.25;
        c.warmup.lora.rank = 4;
        c.warmup.lora.alpha = 8.0;
        c.warmup.lora.dropout = 0.0;
        c.warmup.train.lr = 3e-3;
        c.warmup.train.micro_batch = 4;
        c.warmup.train.epochs = 2;
        c.datastore = DatastoreConfig {
            d: 256,
            seed: 1,
            shard_examples: 16,
            micro_batch: 8,
            batch_tokens: 1024,
            proj_batch: 16,
            block_rows: 256,
        };
        c.match_chunk = 7;
        c
    }

    /// A pipeline on `cache` with stories260K loaded and the toy pool tokenized (64 tokens).
    fn toy_pool(dir: &Path, cache: &str) -> (Pipeline, Artifact) {
        let mixture = dir.join("toy.toml");
        std::fs::write(
            &mixture,
            format!(
                "description = \"toy\"\n[[entry]]\npath = \"{}\"\nformat = \"messages\"\nsource = \"toy\"\n",
                fixture("toy_pool.jsonl").display()
            ),
        )
        .unwrap();
        let mut p = Pipeline::new(&dir.join(cache), &data_root()).unwrap();
        p.load_model(&data_root().join("models/stories260K/hf"))
            .unwrap();
        let opts = dsel_ingest::SubsetOptions {
            limit: None,
            per_source_cap: None,
            seed: 0,
            stratify: false,
        };
        let pool = p
            .ingest_pool(&mixture.display().to_string(), &opts)
            .unwrap();
        let pool_tok = p.tokenize(&pool, 64, Default::default(), "pool").unwrap();
        (p, pool_tok)
    }

    /// End to end on stories260K and the toy pool: near-copies of the robot
    /// target rank first; a second target reuses warmup and datastore.
    #[test]
    fn less_ranks_near_copies_first_and_reuses_the_datastore() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut p, pool_tok) = toy_pool(tmp.path(), "cache");
        let ids: Vec<String> = TokenizedSet::open(pool_tok.dir())
            .unwrap()
            .index
            .iter()
            .map(|r| r.id.clone())
            .collect();
        let cfg = toy_config();
        let run = |p: &mut Pipeline, target: &str| {
            let spec =
                dsel_ingest::TargetSpec::parse(&fixture(target).display().to_string()).unwrap();
            let t = p.ingest_target(&spec).unwrap();
            let t = p.tokenize(&t, 64, Default::default(), "target").unwrap();
            score(p, &pool_tok, &t, &cfg).unwrap().unwrap()
        };
        let s1 = run(&mut p, "toy_target.jsonl");
        assert_eq!(s1.scores.len(), ids.len());
        assert!(s1
            .scores
            .iter()
            .all(|s| s.is_finite() && s.abs() <= 1.0 + 1e-3));
        let all: Vec<usize> = (0..ids.len()).collect();
        let top = dsel_select::top_n(&s1.scores, &all, 3);
        let top_ids: Vec<&str> = top.iter().map(|&i| ids[i].as_str()).collect();
        assert!(top_ids[0].contains("near-"), "{top_ids:?} {:?}", s1.scores);
        assert!(
            top_ids.iter().filter(|i| i.contains("near-")).count() >= 2,
            "{top_ids:?}"
        );
        assert_eq!(s1.report["datastore_cache_hit"], false);
        assert_eq!(s1.report["params"], 8960);
        assert_eq!(s1.report["epochs"], json!([1, 2]));

        let s2 = run(&mut p, "toy_target2.jsonl");
        assert_eq!(s2.report["warmup_cache_hit"], true);
        assert_eq!(s2.report["datastore_cache_hit"], true);
        assert_eq!(s2.report["validation_cache_hit"], false);
        assert_ne!(s1.scores, s2.scores);

        let csv = tmp.path().join("sorted.csv");
        write_sorted_csv(&csv, &ids, &s1.scores).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(text.lines().count(), ids.len() + 1);
    }

    /// A sharded run on one shared cache (prepare step, workers 0/2 and
    /// 1/2, merge), each step its own pipeline as on its own node: the
    /// merged datastore has the bytes of a single run's, the merge computes
    /// nothing, and a merge with a worker missing names what is missing.
    #[test]
    fn sharded_datastore_builds_merge_into_the_same_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = toy_config();
        let target = |p: &mut Pipeline| {
            let spec =
                dsel_ingest::TargetSpec::parse(&fixture("toy_target.jsonl").display().to_string())
                    .unwrap();
            let t = p.ingest_target(&spec).unwrap();
            p.tokenize(&t, 64, Default::default(), "target").unwrap()
        };
        let step = |work: crate::Work| {
            let (mut p, tok) = toy_pool(tmp.path(), "shared");
            p.work = work;
            let t = target(&mut p);
            let s = score(&mut p, &tok, &t, &cfg);
            (p, s)
        };
        let shard = |i| crate::Work::Shard(dsel_store::Shard::parse(&format!("{i}/2")).unwrap());
        assert!(step(crate::Work::Prepare).1.unwrap().is_none());
        assert!(step(shard(0)).1.unwrap().is_none());
        let Err(early) = step(crate::Work::Merge).1 else {
            panic!("merged with worker 1/2 missing")
        };
        assert!(
            format!("{early:#}").contains("units are not finished"),
            "{early:#}"
        );
        assert!(step(shard(1)).1.unwrap().is_none());
        let (pa, merged) = step(crate::Work::Merge);
        let merged = merged.unwrap().unwrap();
        let (mut pc, tok_c) = toy_pool(tmp.path(), "single");
        let t_c = target(&mut pc);
        let single = score(&mut pc, &tok_c, &t_c, &cfg).unwrap().unwrap();
        assert_eq!(merged.scores, single.scores);
        let datastore = |p: &Pipeline| {
            let r = p
                .records
                .iter()
                .find(|r| r.stage == DATASTORE_STAGE)
                .unwrap();
            p.store.open_artifact(&r.key).unwrap()
        };
        let file = dsel_less::features_file(1);
        assert_eq!(
            std::fs::read(datastore(&pa).path(&file)).unwrap(),
            std::fs::read(datastore(&pc).path(&file)).unwrap()
        );
        let info = datastore(&pa).manifest().info.clone();
        assert_eq!(
            info["units_computed"], 0,
            "assembly computes nothing: {info}"
        );
    }

    /// The real run (release, minutes): `cargo test --release -p dsel-pipeline
    /// --lib -- --ignored less_smollm2 --nocapture`. LESS cpu preset on the
    /// `tiny` pool with SmolLM2-135M (max_len 256), target mmlu then bbh (the
    /// second reuses warmup and datastore). Cache: `DSEL_CACHE` or
    /// `<workspace>/.cache`; model: `DSEL_SMOLLM2` or `models/SmolLM2-135M-Instruct.Q4_1.gguf`.
    /// Prints each run's report and the selected 5% by source.
    #[test]
    #[ignore]
    fn less_smollm2() {
        let ws = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
        let cache = std::env::var_os("DSEL_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ws.join(".cache"));
        let model = std::env::var_os("DSEL_SMOLLM2")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| ws.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        let mut p = Pipeline::new(&cache, &data_root()).unwrap();
        p.load_model(&model).unwrap();
        let opts = dsel_ingest::SubsetOptions {
            limit: None,
            per_source_cap: None,
            seed: 0,
            stratify: false,
        };
        let pool = p.ingest_pool("tiny", &opts).unwrap();
        let pool_tok = p.tokenize(&pool, 256, Default::default(), "pool").unwrap();
        let set = TokenizedSet::open(pool_tok.dir()).unwrap();
        let ids: Vec<String> = set.index.iter().map(|r| r.id.clone()).collect();
        let all: Vec<usize> = (0..ids.len()).collect();
        let tokens: u64 = set.index.iter().map(|r| r.n_tokens as u64).sum();
        let cfg = LessConfig::cpu();
        for task in ["mmlu", "bbh"] {
            let started = Instant::now();
            let spec = dsel_ingest::TargetSpec::parse(task).unwrap();
            let t = p.ingest_target(&spec).unwrap();
            let t = p.tokenize(&t, 256, Default::default(), "target").unwrap();
            let s = score(&mut p, &pool_tok, &t, &cfg).unwrap().unwrap();
            let top =
                dsel_select::top_n(&s.scores, &all, (ids.len() as f64 * 0.05).round() as usize);
            let mut by_source = std::collections::BTreeMap::<String, usize>::new();
            for &i in &top {
                *by_source.entry(set.index[i].source.clone()).or_default() += 1;
            }
            let out = std::env::temp_dir().join(format!("less-smollm2-{task}-sorted.csv"));
            write_sorted_csv(&out, &ids, &s.scores).unwrap();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "task": task, "pool": ids.len(), "pool_tokens": tokens,
                    "wall_seconds": started.elapsed().as_secs_f64(),
                    "report": s.report, "selected_by_source": by_source,
                    "sorted_csv": out.display().to_string(),
                }))
                .unwrap()
            );
        }
    }

    #[test]
    fn presets_validate() {
        for c in [LessConfig::cpu(), LessConfig::paper()] {
            c.datastore.validate().unwrap();
            c.warmup.lora.validate().unwrap();
        }
        assert_eq!(LessConfig::paper().datastore.d, 8192);
        assert_eq!(LessConfig::paper().warmup.lora.rank, 128);
    }
}
