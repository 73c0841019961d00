//! The datastore path on the real tiny model stories260K: batched features
//! equal single-example backward + naive projection (plain and Adam),
//! shard splits and interruptions give identical bytes, matching equals a
//! brute-force computation.

use std::path::Path;

use candle_core::Device;
use dsel_less::{
    build, features_file, matching, open_features, BuildOptions, BuildReport, Checkpoint,
    DatastoreConfig, GradientKind, Projector,
};
use dsel_model::{Batch, Mode, Model};
use dsel_train::{AdamW, AdamWConfig};
use half::f16;

use dsel_testkit::data_root;

fn base_model() -> Model {
    let raw = dsel_model::load(&data_root().join("models/stories260K/hf"), &Device::Cpu).unwrap();
    Model::new(&raw).unwrap()
}

/// Token ids and label masks of toy examples.
type Toy = Vec<(Vec<u32>, Vec<u8>)>;

/// Seeded toy examples: varied lengths, labels on the second half.
fn examples(n: usize, seed: u64) -> Toy {
    (0..n)
        .map(|i| {
            let len = 6 + (dsel_model::rng::hash_words(seed, &[i as u64]) % 30) as usize;
            let ids = (0..len)
                .map(|t| {
                    3 + (dsel_model::rng::hash_words(seed, &[i as u64, t as u64]) % 500) as u32
                })
                .collect();
            let mask = (0..len).map(|t| u8::from(t >= len / 2)).collect();
            (ids, mask)
        })
        .collect()
}

/// Trains LoRA a few AdamW steps (so B ≠ 0 and the moments are non-trivial)
/// and saves two checkpoints (adapter + optimizer) into `dir`.
fn checkpoints(dir: &Path) -> Vec<Checkpoint> {
    let mut model = base_model();
    model.add_lora(&dsel_testkit::attention_lora(3)).unwrap();
    let mut opt = AdamW::new(model.lora_params(), AdamWConfig::default()).unwrap();
    let train = examples(8, 99);
    let mut out = Vec::new();
    for epoch in 1..=2 {
        for chunk in train.chunks(4) {
            let batch = dsel_testkit::batch(chunk);
            let loss = model
                .example_losses(&batch, Mode::Eval)
                .unwrap()
                .mean_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 5e-3).unwrap();
        }
        let d = dir.join(format!("epoch-{epoch}"));
        std::fs::create_dir_all(&d).unwrap();
        model.save_lora(&d.join("adapter.safetensors")).unwrap();
        opt.save(&d.join("optimizer.safetensors")).unwrap();
        out.push(Checkpoint {
            epoch,
            adapter: d.join("adapter.safetensors"),
            optimizer: d.join("optimizer.safetensors"),
        });
    }
    out
}

fn cfg(d: usize) -> DatastoreConfig {
    DatastoreConfig {
        d,
        seed: 11,
        shard_examples: 5,
        micro_batch: 3,
        batch_tokens: 4096,
        proj_batch: 4,
        block_rows: 1000,
    }
}

/// A temporary folder holding the two [`checkpoints`], `n` seeded
/// [`examples`] and the [`cfg`] for projection dimension `d`.
fn fixture(
    n: usize,
    seed: u64,
    d: usize,
) -> (tempfile::TempDir, Vec<Checkpoint>, Toy, DatastoreConfig) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpts = checkpoints(tmp.path());
    (tmp, ckpts, examples(n, seed), cfg(d))
}

/// Builds the Adam features of `set` on a fresh base model with scratch
/// folder `scratch`, assembling into `out`.
fn build_adam(
    set: &Toy,
    ckpts: &[Checkpoint],
    c: &DatastoreConfig,
    scratch: &Path,
    out: &Path,
    opts: &BuildOptions,
) -> BuildReport {
    build(
        &mut base_model(),
        set,
        ckpts,
        GradientKind::Adam,
        c,
        scratch,
        Some(out),
        opts,
    )
    .unwrap()
}

/// Independent reference: example alone, standard backward, flattened Var
/// gradients, optional hand-written Adam, naive f64 projection, normalise.
fn reference_feature(
    model: &Model,
    ex: &(Vec<u32>, Vec<u8>),
    adam: Option<&Path>,
    d: usize,
    seed: u64,
) -> Vec<f64> {
    let batch = Batch::new(&[(&ex.0[..], &ex.1[..])], &Device::Cpu).unwrap();
    let grads = model
        .example_losses(&batch, Mode::Eval)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let state = adam.map(|p| dsel_train::read_adamw_state(p, &Device::Cpu).unwrap());
    let mut g = Vec::new();
    for (name, var) in model.lora_params() {
        let gv: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        match &state {
            None => g.extend(gv),
            Some(st) => {
                let (_, m, v, _) = st.moments.iter().find(|(n, ..)| *n == name).unwrap();
                let m: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
                let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                for ((x, m), v) in gv.iter().zip(m).zip(v) {
                    let m2 = 0.9 * m as f64 + 0.1 * x;
                    let v2 = 0.999 * v as f64 + 0.001 * x * x;
                    g.push(m2 / (v2 + 1e-8).sqrt());
                }
            }
        }
    }
    let proj = Projector::new(seed, d).unwrap();
    let mut out = vec![0f64; d];
    for (p, x) in g.iter().enumerate() {
        if *x != 0.0 {
            for (j, o) in out.iter_mut().enumerate() {
                *o += x * proj.entry(p as u64, j) as f64;
            }
        }
    }
    let n = out.iter().map(|v| v * v).sum::<f64>().sqrt();
    out.iter().map(|v| v / n).collect()
}

#[test]
fn batched_features_equal_single_example_reference_plain_and_adam() {
    let (tmp, ckpts, set, c) = fixture(7, 5, 128);
    for (kind, name) in [(GradientKind::Sgd, "sgd"), (GradientKind::Adam, "adam")] {
        let out = tmp.path().join(format!("out-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut model = base_model();
        let rep = build(
            &mut model,
            &set,
            &ckpts,
            kind,
            &c,
            &tmp.path().join(format!("scratch-{name}")),
            Some(&out),
            &BuildOptions::default(),
        )
        .unwrap();
        assert!(
            rep.complete && rep.units_computed == 4 && rep.params == 8960,
            "{rep:?}"
        );
        let feats = open_features(&out, &[1, 2], 7, 128).unwrap();
        for (ck, arr) in ckpts.iter().zip(&feats) {
            model.load_lora(&ck.adapter).unwrap();
            let got = arr.as_slice::<f16>().unwrap();
            for (i, ex) in set.iter().enumerate() {
                let adam = (kind == GradientKind::Adam).then_some(ck.optimizer.as_path());
                let want = reference_feature(&model, ex, adam, 128, 11);
                let row = &got[i * 128..(i + 1) * 128];
                let err = row
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a.to_f64() - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err < 2e-3,
                    "{name} epoch {} example {i}: max error {err}",
                    ck.epoch
                );
            }
        }
    }
}

#[test]
fn shard_splits_and_interruptions_give_identical_bytes() {
    let (tmp, ckpts, set, c) = fixture(12, 6, 64);
    let read = |dir: &Path| -> Vec<Vec<u8>> {
        [1, 2]
            .iter()
            .map(|e| std::fs::read(dir.join(features_file(*e))).unwrap())
            .collect()
    };
    // One uninterrupted run.
    let one = tmp.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    let r = build_adam(
        &set,
        &ckpts,
        &c,
        &tmp.path().join("s-one"),
        &one,
        &BuildOptions::default(),
    );
    assert!(r.complete && r.units_total == 6);

    // Killed after 2 units, then resumed.
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    let scratch = tmp.path().join("s-two");
    let opts = BuildOptions {
        stop_after_units: Some(2),
        ..Default::default()
    };
    let r = build_adam(&set, &ckpts, &c, &scratch, &two, &opts);
    assert!(!r.complete && r.units_computed == 2);
    assert!(!two.join(features_file(1)).exists());
    let r = build_adam(&set, &ckpts, &c, &scratch, &two, &BuildOptions::default());
    assert!(
        r.complete && r.units_computed == 4 && r.units_resumed == 2,
        "{r:?}"
    );
    assert_eq!(read(&one), read(&two));

    // Two workers (0/2 and 1/2) in separate scratch folders, merged.
    let three = tmp.path().join("three");
    std::fs::create_dir_all(&three).unwrap();
    let (sa, sb) = (tmp.path().join("s-a"), tmp.path().join("s-b"));
    for (dir, sel) in [(&sa, "0/2"), (&sb, "1/2")] {
        let opts = BuildOptions {
            shard: dsel_store::Shard::parse(sel).unwrap(),
            ..Default::default()
        };
        let r = build_adam(&set, &ckpts, &c, dir, &three, &opts);
        assert!(!r.complete);
    }
    for e in [1, 2] {
        for f in std::fs::read_dir(sb.join(format!("epoch-{e}"))).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), sa.join(format!("epoch-{e}")).join(f.file_name())).unwrap();
        }
    }
    let r = build_adam(&set, &ckpts, &c, &sa, &three, &BuildOptions::default());
    assert!(r.complete && r.units_computed == 0 && r.units_resumed == 6);
    assert_eq!(read(&one), read(&three));
    assert!(dsel_store::Shard::parse("2/2").is_err() && dsel_store::Shard::parse("x").is_err());
}

#[test]
fn matching_equals_brute_force() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, nv, d) = (37usize, 7usize, 64usize);
    let val_sub: Vec<String> = ["a", "b", "a", "c", "b", "a", "c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lrs = [3e-5, 1e-5];
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut tv = Vec::new();
    let mut vv = Vec::new();
    for k in 0..2 {
        let gen = |rows: usize, tag: u64| -> Vec<f16> {
            (0..rows * d)
                .map(|i| {
                    f16::from_f64(
                        dsel_model::rng::unit_f64(dsel_model::rng::hash_words(tag, &[k, i as u64]))
                            - 0.5,
                    )
                })
                .collect()
        };
        let t = gen(n, 1);
        let v = gen(nv, 2);
        let (pt, pv) = (
            tmp.path().join(format!("t{k}.npy")),
            tmp.path().join(format!("v{k}.npy")),
        );
        dsel_store::write_npy(&pt, &[n, d], &t).unwrap();
        dsel_store::write_npy(&pv, &[nv, d], &v).unwrap();
        train.push(dsel_store::NpyArray::open(&pt).unwrap());
        val.push(dsel_store::NpyArray::open(&pv).unwrap());
        tv.push(t);
        vv.push(v);
    }
    let w = matching::checkpoint_weights(&lrs).unwrap();
    assert!((w[0] - 0.75).abs() < 1e-12 && (w[1] - 0.25).abs() < 1e-12);
    let groups: Vec<Vec<usize>> = matching::subtask_groups(&val_sub)
        .into_iter()
        .map(|(_, g)| g)
        .collect();
    assert_eq!(groups, vec![vec![0, 2, 5], vec![1, 4], vec![3, 6]]);
    for chunk in [1, 5, 100] {
        let (s, rep) = matching::score(&train, &val, &w, &groups, chunk).unwrap();
        assert_eq!(rep.bytes_read, (2 * n * d * 2) as u64);
        for z in 0..n {
            let mut best = f64::NEG_INFINITY;
            for g in &groups {
                let mut m = 0.0;
                for &v in g {
                    for k in 0..2 {
                        let dot: f64 = (0..d)
                            .map(|j| tv[k][z * d + j].to_f64() * vv[k][v * d + j].to_f64())
                            .sum();
                        m += w[k] * dot;
                    }
                }
                best = best.max(m / g.len() as f64);
            }
            assert!(
                (s[z] - best).abs() < 1e-4,
                "chunk {chunk} example {z}: {} vs {best}",
                s[z]
            );
        }
    }
    assert!(matching::checkpoint_weights(&[0.0, 0.0]).is_err());
}

#[test]
fn corrupted_unit_of_the_same_size_is_recomputed() {
    let (tmp, ckpts, set, c) = fixture(12, 6, 64);
    let run = |scratch: &Path, out: &Path| {
        std::fs::create_dir_all(out).unwrap();
        build_adam(&set, &ckpts, &c, scratch, out, &BuildOptions::default())
    };
    let (s_one, one) = (tmp.path().join("s-one"), tmp.path().join("one"));
    assert_eq!(run(&s_one, &one).units_computed, 6);

    // A copy of the finished units (files and recorded blake3), one of which
    // then changes on disk at the same size: still f16 [5, 64].
    let s_bad = tmp.path().join("s-bad");
    for e in [1, 2] {
        let (from, to) = (
            s_one.join(format!("epoch-{e}")),
            s_bad.join(format!("epoch-{e}")),
        );
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    let unit = s_bad.join("epoch-2").join("shard-000001.npy");
    let mut bytes = std::fs::read(&unit).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x01; // the low byte of the last f16
    std::fs::write(&unit, &bytes).unwrap();
    assert_eq!(
        dsel_store::NpyArray::open(&unit).unwrap().shape(),
        [5usize, 64]
    );

    let bad = tmp.path().join("bad");
    let r = run(&s_bad, &bad);
    assert_eq!((r.units_resumed, r.units_computed), (5, 1), "{r:?}");
    assert!(r.complete);
    for e in [1, 2] {
        let (a, b) = (
            std::fs::read(one.join(features_file(e))).unwrap(),
            std::fs::read(bad.join(features_file(e))).unwrap(),
        );
        assert!(a == b, "epoch {e}: a corrupted unit was assembled");
    }
    assert!(dsel_store::check_sealed(&unit).is_valid());
}
