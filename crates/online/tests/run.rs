//! End-to-end online training on a tiny model.

mod common;

use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};

use dsel_model::{Model, RawModel};
use dsel_online::{
    run_online, OnlineReport, OnlineRunConfig, SelectorConfig, SelectorKind, StepRecord,
};

fn cfg(kind: SelectorKind, steps: usize, b: usize, k: Option<usize>, seed: u64) -> OnlineRunConfig {
    let mut c = OnlineRunConfig::new(SelectorConfig::default_for(kind), lora(2, 0.0, &ALL, 5));
    if let SelectorConfig::Uds {
        proj_rows,
        proj_dim,
        buffer,
        ..
    } = &mut c.selector
    {
        *proj_rows = 2;
        *proj_dim = 16;
        *buffer = 6;
    }
    c.steps = steps;
    c.candidates = b;
    c.k = k;
    c.lr = 1e-2;
    c.seed = seed;
    c
}

/// What every run here trains on: the tiny model's weights, the pool and
/// the validation set, and scratch and output folders in a temporary
/// directory (removed when `_dir` drops).
struct Setup {
    raw: RawModel,
    pool: Vec<(Vec<u32>, Vec<u8>)>,
    val: Vec<(Vec<u32>, Vec<u8>)>,
    _dir: tempfile::TempDir,
    scratch: PathBuf,
    out: PathBuf,
}

fn setup(dtype: DType) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    Setup {
        raw: tiny_raw(&tiny_config(37), 1, dtype),
        pool: examples(40, 37, 3, 10, 100),
        val: examples(5, 37, 4, 10, 200),
        scratch: dir.path().join("scratch"),
        out: dir.path().join("out"),
        _dir: dir,
    }
}

impl Setup {
    /// Trains `c` on a fresh model from the weights, failing right after
    /// step `interrupt` when one is given (a killed run).
    fn train(&self, c: &OnlineRunConfig, interrupt: Option<u64>) -> anyhow::Result<OnlineReport> {
        let mut m = Model::new(&self.raw).unwrap();
        dsel_online::run_online_interruptible(
            &mut m,
            &self.pool,
            &self.val,
            c,
            &self.scratch,
            &self.out,
            interrupt,
        )
    }
}

/// The step log `steps.jsonl` of the run that wrote `out`.
fn read_steps(out: &Path) -> Vec<StepRecord> {
    std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(
    kind: SelectorKind,
    dtype: DType,
    c: &OnlineRunConfig,
) -> (Vec<StepRecord>, Vec<u8>, dsel_online::OnlineReport) {
    let s = setup(dtype);
    let report = s
        .train(c, None)
        .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    let steps = read_steps(&s.out);
    let adapter = std::fs::read(s.out.join("adapter.safetensors")).unwrap();
    let rep: dsel_online::OnlineReport =
        serde_json::from_slice(&std::fs::read(s.out.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep.steps, report.steps);
    (steps, adapter, report)
}

#[test]
fn every_selector_is_deterministic_and_logs_each_step() {
    for kind in SelectorKind::ALL {
        let c = cfg(kind, 6, 6, None, 3);
        let (s1, a1, r1) = run(kind, DType::F32, &c);
        let (s2, a2, _) = run(kind, DType::F32, &c);
        // UDS keeps 1 of 4 by default (⌊6/4⌋ = 1), the others half.
        let k = if kind == SelectorKind::Uds { 1 } else { 3 };
        assert_eq!(c.k(), k);
        assert_eq!(s1.len(), 6);
        assert_eq!(r1.selector, kind.name());
        assert_eq!(r1.k, k);
        assert_eq!(r1.examples_trained, 6 * k as u64);
        assert!(r1.mean_loss.is_finite() && r1.seconds > 0.0);
        for (x, y) in s1.iter().zip(&s2) {
            assert_eq!(x.step, y.step);
            assert_eq!(x.candidates, y.candidates, "{kind:?}");
            assert_eq!(x.chosen, y.chosen, "{kind:?}");
            assert_eq!(x.scores, y.scores, "{kind:?}");
            assert_eq!(x.loss, y.loss, "{kind:?}");
            assert_eq!(x.candidates.len(), 6);
            assert_eq!(x.chosen.len(), k);
            assert_eq!(x.scores.len(), 6);
            assert!(x.chosen.iter().all(|c| x.candidates.contains(c)));
        }
        assert_eq!(a1, a2, "{kind:?}: adapters differ between identical runs");
        // The first 40 / 6 steps see disjoint candidates (one seeded pass over the pool).
        let mut seen: Vec<usize> = s1.iter().flat_map(|r| r.candidates.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 36);
        if kind == SelectorKind::None {
            for r in &s1 {
                assert_eq!(r.chosen, r.candidates[..3].to_vec());
            }
        }
    }
    // Another seed draws other candidates.
    let (a, _, _) = run(
        SelectorKind::MaxLoss,
        DType::F32,
        &cfg(SelectorKind::MaxLoss, 2, 6, None, 3),
    );
    let (b, _, _) = run(
        SelectorKind::MaxLoss,
        DType::F32,
        &cfg(SelectorKind::MaxLoss, 2, 6, None, 4),
    );
    assert_ne!(a[0].candidates, b[0].candidates);
}

#[test]
fn maxloss_picks_the_highest_losses() {
    let (steps, _, _) = run(
        SelectorKind::MaxLoss,
        DType::F32,
        &cfg(SelectorKind::MaxLoss, 3, 8, Some(3), 1),
    );
    for r in steps {
        let mut order: Vec<usize> = (0..8).collect();
        order.sort_by(|&a, &b| r.scores[b].partial_cmp(&r.scores[a]).unwrap());
        let want: Vec<usize> = order[..3].iter().map(|&p| r.candidates[p]).collect();
        assert_eq!(r.chosen, want);
    }
}

/// With k = B every selector trains on the whole batch; GREATS and Grad-Norm
/// train through the surrogate loss built from their per-example gradients,
/// plain training through a second forward/backward. The adapters agree.
#[test]
fn surrogate_gradient_training_matches_plain_training() {
    let (_, plain, rp) = run(
        SelectorKind::None,
        DType::F64,
        &cfg(SelectorKind::None, 4, 5, Some(5), 2),
    );
    for kind in [SelectorKind::GradNorm, SelectorKind::Greats] {
        let (_, other, ro) = run(kind, DType::F64, &cfg(kind, 4, 5, Some(5), 2));
        let load = |bytes: &[u8]| {
            candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu).unwrap()
        };
        let (p, o) = (load(&plain), load(&other));
        assert_eq!(p.len(), o.len());
        let mut max_diff = 0.0f64;
        let mut max_abs = 0.0f64;
        for (name, t) in &p {
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = o[name].flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&b) {
                max_diff = max_diff.max((x - y).abs() as f64);
                max_abs = max_abs.max(x.abs() as f64);
            }
        }
        assert!(max_abs > 1e-3, "training moved the adapter");
        assert!(max_diff < 1e-5, "{kind:?}: adapters differ by {max_diff}");
        assert!(
            (rp.mean_loss - ro.mean_loss).abs() < 1e-9,
            "{} vs {}",
            rp.mean_loss,
            ro.mean_loss
        );
    }
}

#[test]
fn invalid_configurations_are_rejected() {
    let raw = tiny_raw(&tiny_config(37), 1, DType::F32);
    let mut m = Model::new(&raw).unwrap();
    let pool = examples(10, 37, 3, 6, 1);
    let dir = tempfile::tempdir().unwrap();
    let empty: Vec<(Vec<u32>, Vec<u8>)> = Vec::new();
    let bad_k = cfg(SelectorKind::None, 2, 4, Some(5), 0);
    assert!(run_online(&mut m, &pool, &empty, &bad_k, dir.path(), dir.path()).is_err());
    let greats = cfg(SelectorKind::Greats, 2, 4, None, 0);
    let err = run_online(&mut m, &pool, &empty, &greats, dir.path(), dir.path()).unwrap_err();
    assert!(format!("{err:#}").contains("validation"), "{err:#}");
    assert!("nope".parse::<SelectorKind>().is_err());
    assert_eq!("uds".parse::<SelectorKind>().unwrap(), SelectorKind::Uds);
}

#[test]
fn a_killed_run_resumes_to_the_same_steps_and_adapter() {
    // UDS carries its buffer across steps; GREATS and none depend on the step only.
    for kind in [SelectorKind::Uds, SelectorKind::Greats, SelectorKind::None] {
        let c = cfg(kind, 14, 4, None, 3);
        let (s_full, a_full, _) = run(kind, DType::F32, &c);
        let s = setup(DType::F32);
        let err = s.train(&c, Some(13)).unwrap_err();
        assert!(format!("{err:#}").contains("interrupted"), "{err:#}");
        let rep = s.train(&c, None).unwrap();
        assert_eq!(
            rep.train.resumed_from_step,
            Some(dsel_online::CHECKPOINT_EVERY),
            "{kind:?} resumes from its last checkpoint"
        );
        let steps = read_steps(&s.out);
        assert_eq!(steps.len(), s_full.len());
        for (x, y) in steps.iter().zip(&s_full) {
            assert_eq!(
                (x.step, &x.chosen, &x.scores),
                (y.step, &y.chosen, &y.scores),
                "{kind:?}"
            );
            assert_eq!(x.loss, y.loss, "{kind:?} step {}", x.step);
        }
        let adapter = std::fs::read(s.out.join("adapter.safetensors")).unwrap();
        assert_eq!(adapter, a_full, "{kind:?}: resumed adapter differs");
    }
}

#[test]
fn damaged_selector_state_is_not_resumed() {
    // UDS: the saved state holds its buffer and the step log so far.
    let kind = SelectorKind::Uds;
    let c = cfg(kind, 14, 4, None, 3);
    let (s_full, a_full, _) = run(kind, DType::F32, &c);
    let s = setup(DType::F32);
    s.train(&c, Some(13)).unwrap_err();
    // Same size, still valid JSON: one digit of the first logged loss.
    let state = s.scratch.join("train-checkpoints").join(format!(
        "online-state-{:08}.json",
        dsel_online::CHECKPOINT_EVERY
    ));
    let text = std::fs::read_to_string(&state).unwrap();
    let at = text.find("\"loss\":").unwrap() + "\"loss\":".len();
    let digit = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
    let mut bytes = text.clone().into_bytes();
    bytes[digit] = if bytes[digit] == b'9' {
        b'8'
    } else {
        bytes[digit] + 1
    };
    std::fs::write(&state, &bytes).unwrap();

    let rep = s.train(&c, None).unwrap();
    assert_eq!(rep.train.resumed_from_step, None, "damaged state resumed");
    // Recomputed: the same steps and adapter as an uninterrupted run.
    let steps = read_steps(&s.out);
    assert_eq!(steps.len(), s_full.len());
    for (x, y) in steps.iter().zip(&s_full) {
        assert_eq!((x.step, &x.chosen, x.loss), (y.step, &y.chosen, y.loss));
    }
    assert_eq!(
        std::fs::read(s.out.join("adapter.safetensors")).unwrap(),
        a_full
    );
}
