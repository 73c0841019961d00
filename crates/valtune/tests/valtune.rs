//! ToV's validation fine-tune on stories260K: every validation example is
//! trained on at exactly `lr_ratio × lr` (no warmup step at rate 0), for the
//! configured number of epochs, and θ_val differs from θ_bas — for a target
//! that fits one micro-batch (5 examples) and one that does not (9, the
//! TyDiQA shape).

use std::path::Path;

use dsel_basetrain::{finetune, FinetuneConfig};
use dsel_train::TrainConfig;
use dsel_valtune::{valtune, ValtuneConfig};

/// The cpu preset's base fine-tune shape (micro-batch 8, 3% warmup, HF schedule).
fn base_cfg() -> FinetuneConfig {
    FinetuneConfig {
        lora: dsel_testkit::attention_lora(1),
        train: TrainConfig {
            epochs: 1,
            lr: 2e-3,
            warmup_ratio: 0.03,
            micro_batch: 8,
            grad_accum: 1,
            seed: 2,
            max_grad_norm: Some(1.0),
            ..TrainConfig::default()
        },
        save_epochs: false,
        group_by_length: true,
    }
}

fn lora_values(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

fn check_target(n_target: usize, epochs: usize) {
    let (raw, mut model) = dsel_testkit::stories();
    let tmp = tempfile::tempdir().unwrap();
    let pool = dsel_testkit::toy_set(&raw, 16, "p", tmp.path());
    let target = dsel_testkit::toy_set(&raw, n_target, "t", tmp.path());
    let base = base_cfg();
    let bas_dir = tmp.path().join("bas");
    std::fs::create_dir_all(&bas_dir).unwrap();
    let all_pool: Vec<usize> = (0..pool.len()).collect();
    finetune(
        &mut model,
        None,
        &pool,
        &all_pool,
        &base,
        &tmp.path().join("s1"),
        &bas_dir,
    )
    .unwrap();

    let v = ValtuneConfig {
        lr_ratio: 0.1,
        epochs,
    };
    let val_dir = tmp.path().join("val");
    std::fs::create_dir_all(&val_dir).unwrap();
    let (_, mut model) = dsel_testkit::stories();
    let start = bas_dir.join("adapter.safetensors");
    let rep = valtune(
        &mut model,
        &start,
        &target,
        &base,
        &v,
        &tmp.path().join("s2"),
        &val_dir,
    )
    .unwrap();

    let steps_per_epoch = n_target.div_ceil(8) as u64;
    assert_eq!(rep.train.steps, steps_per_epoch * epochs as u64);
    let want_lr = 2e-3 * 0.1;
    for mb in &rep.micro_batches {
        assert_eq!(mb.lr, want_lr, "step {} must run at lr_ratio × lr", mb.step);
    }
    for e in 0..epochs as u64 {
        let mut seen: Vec<usize> = rep
            .micro_batches
            .iter()
            .filter(|m| m.step / steps_per_epoch == e)
            .flat_map(|m| m.rows.iter().copied())
            .collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..n_target).collect::<Vec<_>>(),
            "epoch {e} trains on every validation example"
        );
    }
    let (b, t) = (
        lora_values(&start),
        lora_values(&val_dir.join("adapter.safetensors")),
    );
    assert_eq!(b.len(), t.len());
    let moved = b.iter().zip(&t).filter(|(x, y)| x.1 != y.1).count();
    assert!(moved > 0, "θ_val must differ from θ_bas");
}

#[test]
fn a_five_example_target_is_trained_at_the_intended_rate() {
    check_target(5, 1);
}

#[test]
fn a_nine_example_target_trains_on_all_nine_at_a_constant_rate_over_two_epochs() {
    check_target(9, 2);
}

#[test]
fn derived_config_has_no_warmup_and_a_constant_rate() {
    let d = dsel_valtune::derive_config(&base_cfg(), &ValtuneConfig::default());
    assert_eq!(d.train.warmup_ratio, 0.0);
    assert_eq!(d.train.schedule, dsel_train::LrShape::Constant);
    assert!((d.train.lr - 2e-4).abs() < 1e-18);
    let (_, sched) = dsel_train::plan(5, &d.train).unwrap();
    assert_eq!(sched.lr(0), d.train.lr);
}

#[test]
fn zero_epochs_or_a_zero_ratio_are_rejected_by_name() {
    let (raw, mut model) = dsel_testkit::stories();
    let tmp = tempfile::tempdir().unwrap();
    let target = dsel_testkit::toy_set(&raw, 3, "t", tmp.path());
    let p = tmp.path();
    let start = p.join("none.safetensors");
    for (v, word) in [
        (
            ValtuneConfig {
                lr_ratio: 0.1,
                epochs: 0,
            },
            "epochs",
        ),
        (
            ValtuneConfig {
                lr_ratio: 0.0,
                epochs: 1,
            },
            "lr_ratio",
        ),
    ] {
        let e = valtune(&mut model, &start, &target, &base_cfg(), &v, p, p).unwrap_err();
        assert!(format!("{e:#}").contains(word), "{e:#}");
    }
}
