//! Base-train on stories260K: the learning rate of every step follows Hugging
//! Face's linear schedule with warmup (computed here independently), every
//! example is trained on once per epoch, and length grouping visits the
//! longest first.

use std::path::{Path, PathBuf};

use dsel_basetrain::{finetune, FinetuneConfig, FinetuneReport};
use dsel_model::Model;
use dsel_tokenize::TokenizedSet;
use dsel_train::TrainConfig;

fn cfg(epochs: usize, group_by_length: bool) -> FinetuneConfig {
    FinetuneConfig {
        lora: dsel_testkit::attention_lora(3),
        train: TrainConfig {
            epochs,
            lr: 1e-3,
            warmup_ratio: 0.03,
            micro_batch: 4,
            grad_accum: 1,
            seed: 5,
            ..TrainConfig::default()
        },
        save_epochs: false,
        group_by_length,
    }
}

/// Fine-tunes a fresh LoRA of `model` on `set[rows]` into `tmp/out`
/// (scratch `tmp/scratch`); returns the report and the output folder.
fn finetune_fresh(
    model: &mut Model,
    set: &TokenizedSet,
    rows: &[usize],
    c: &FinetuneConfig,
    tmp: &Path,
) -> (FinetuneReport, PathBuf) {
    let out = tmp.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let rep = finetune(model, None, set, rows, c, &tmp.join("scratch"), &out).unwrap();
    (rep, out)
}

/// HF `get_linear_schedule_with_warmup` at 0-based step `s`, written out from
/// its definition: warmup `ceil(ratio · T)` steps, then linear decay to 0.
fn hf_lr(peak: f64, s: u64, total: u64, ratio: f64) -> f64 {
    let w = (total as f64 * ratio).ceil() as u64;
    if s < w {
        peak * s as f64 / w as f64
    } else {
        peak * ((total - s) as f64 / (total - w) as f64).max(0.0)
    }
}

#[test]
fn base_train_steps_follow_the_linear_warmup_schedule_and_see_every_example_once_per_epoch() {
    let (raw, mut model) = dsel_testkit::stories();
    let tmp = tempfile::tempdir().unwrap();
    let set = dsel_testkit::toy_set(&raw, 14, "u", tmp.path());
    // U = 10 of the 14 rows, 2 epochs of ceil(10/4) = 3 steps.
    let u: Vec<usize> = vec![0, 1, 2, 4, 5, 7, 8, 10, 12, 13];
    let c = cfg(2, false);
    let (rep, out) = finetune_fresh(&mut model, &set, &u, &c, tmp.path());
    assert_eq!(rep.train.steps, 6);
    assert_eq!(
        rep.micro_batches.len(),
        6,
        "grad_accum 1: one micro-batch per step"
    );
    for mb in &rep.micro_batches {
        let want = hf_lr(1e-3, mb.step, 6, 0.03);
        assert!(
            (mb.lr - want).abs() < 1e-15,
            "step {}: {} vs {want}",
            mb.step,
            mb.lr
        );
    }
    // The decision documented in the crate: step 0 is HF's warmup step at rate 0.
    assert_eq!(rep.micro_batches[0].lr, 0.0);
    assert!(rep.micro_batches[1..].iter().all(|m| m.lr > 0.0));
    for epoch in 0..2u64 {
        let mut seen: Vec<usize> = rep
            .micro_batches
            .iter()
            .filter(|m| m.step / 3 == epoch)
            .flat_map(|m| m.rows.iter().copied())
            .collect();
        seen.sort_unstable();
        assert_eq!(
            seen, u,
            "epoch {epoch} trains on every row of U exactly once"
        );
    }
    assert_eq!(rep.train.epochs.len(), 2);
    assert!(out.join("adapter.safetensors").exists());
}

#[test]
fn length_grouping_visits_the_longest_examples_first() {
    let (raw, mut model) = dsel_testkit::stories();
    let tmp = tempfile::tempdir().unwrap();
    let set = dsel_testkit::toy_set(&raw, 9, "g", tmp.path());
    let all: Vec<usize> = (0..9).collect();
    let (rep, _) = finetune_fresh(&mut model, &set, &all, &cfg(1, true), tmp.path());
    let order: Vec<usize> = rep
        .micro_batches
        .iter()
        .flat_map(|m| m.rows.clone())
        .collect();
    let mut want = all.clone();
    want.sort_by_key(|&i| (std::cmp::Reverse(set.example(i).0.len()), i));
    assert_eq!(order, want);
}
