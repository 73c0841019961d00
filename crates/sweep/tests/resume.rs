//! A sweep killed after some shards resumes to byte-identical outputs, and
//! its numbers equal the model's own log-probabilities.

use candle_core::Device;
use dsel_model::{Batch, Mode, Model};
use dsel_sweep::{SweepConfig, SweepResult};
use dsel_tokenize::TokenizedSet;

/// stories260K, a 23-example tokenized set in `tmp/set` and a 5-example shard config.
fn setup(tmp: &std::path::Path) -> (Model, TokenizedSet, SweepConfig) {
    let (raw, model) = dsel_testkit::stories();
    let examples = dsel_testkit::story_conversations(23, "e", "t", |i| format!("Story {i}"));
    let set = dsel_testkit::tokenized(&raw, &examples, 64, &tmp.join("set"));
    let cfg = SweepConfig {
        shard_examples: 5,
        batch_tokens: 200,
        max_batch: 4,
    };
    (model, set, cfg)
}

/// Copies shards `shards` (both files and their recorded blake3) from one scratch folder to another.
fn copy_shards(from: &std::path::Path, to: &std::path::Path, shards: std::ops::Range<usize>) {
    std::fs::create_dir_all(to).unwrap();
    for s in shards {
        for what in ["logp", "loss"] {
            for f in [
                format!("shard-{s:06}.{what}.npy"),
                format!("shard-{s:06}.{what}.npy.blake3"),
            ] {
                std::fs::copy(from.join(&f), to.join(&f)).unwrap();
            }
        }
    }
}

#[test]
fn killed_sweep_resumes_to_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set, cfg) = setup(tmp.path());

    // Uninterrupted run.
    let (s1, o1) = (tmp.path().join("s1"), tmp.path().join("o1"));
    std::fs::create_dir_all(&o1).unwrap();
    let r1 = dsel_sweep::run(&model, &set, &cfg, &s1, &o1, "full").unwrap();
    assert_eq!(r1.shards_resumed, 0);

    // "Killed" run: only the first two shards survived in its scratch folder.
    let (s2, o2) = (tmp.path().join("s2"), tmp.path().join("o2"));
    std::fs::create_dir_all(&o2).unwrap();
    copy_shards(&s1, &s2, 0..2);
    // A half-written shard (logp without its loss marker) is recomputed, not trusted.
    std::fs::write(s2.join("shard-000002.logp.npy"), b"garbage").unwrap();
    let r2 = dsel_sweep::run(&model, &set, &cfg, &s2, &o2, "resumed").unwrap();
    assert_eq!(r2.shards_resumed, 2);
    for f in ["logp.npy", "loss.npy"] {
        assert_eq!(
            std::fs::read(o1.join(f)).unwrap(),
            std::fs::read(o2.join(f)).unwrap(),
            "{f} differs"
        );
    }

    // The numbers are the model's: compare example 7 against a direct forward.
    let res = SweepResult::open(&o1).unwrap();
    let (ids, mask) = set.example(7);
    let b = Batch::new(&[(ids, mask)], &Device::Cpu).unwrap();
    let direct = model
        .token_logprobs(&b, Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let off = set.offsets()[7] as usize;
    let swept = &res.logp().unwrap()[off..off + ids.len()];
    for (a, b) in swept.iter().zip(&direct[0]) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    let loss = -swept
        .iter()
        .zip(mask)
        .skip(1)
        .filter(|(_, &m)| m == 1)
        .map(|(l, _)| *l as f64)
        .sum::<f64>()
        / mask.iter().skip(1).filter(|&&m| m == 1).count() as f64;
    assert!((res.loss().unwrap()[7] as f64 - loss).abs() < 1e-4);
}

#[test]
fn corrupted_shard_of_the_same_size_is_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, set, cfg) = setup(tmp.path());
    let (s1, o1) = (tmp.path().join("s1"), tmp.path().join("o1"));
    std::fs::create_dir_all(&o1).unwrap();
    dsel_sweep::run(&model, &set, &cfg, &s1, &o1, "full").unwrap();

    // Three finished shards survive a kill; then the bytes of two of them
    // change on disk without changing their size (the shape still checks).
    let (s2, o2) = (tmp.path().join("s2"), tmp.path().join("o2"));
    std::fs::create_dir_all(&o2).unwrap();
    copy_shards(&s1, &s2, 0..3);
    for f in ["shard-000001.logp.npy", "shard-000002.loss.npy"] {
        let p = s2.join(f);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            dsel_store::NpyArray::open(&p).unwrap().shape(),
            dsel_store::NpyArray::open(s1.join(f)).unwrap().shape()
        );
    }
    let r2 = dsel_sweep::run(&model, &set, &cfg, &s2, &o2, "resumed").unwrap();
    assert_eq!(r2.shards_resumed, 1, "only shard 0 is intact");
    // The committed arrays are the uninterrupted run's, byte for byte.
    for f in ["logp.npy", "loss.npy"] {
        let (a, b) = (
            std::fs::read(o1.join(f)).unwrap(),
            std::fs::read(o2.join(f)).unwrap(),
        );
        assert_eq!(
            blake3::hash(&a),
            blake3::hash(&b),
            "{f}: a corrupted shard was folded in"
        );
    }
    // The recomputed shards were rewritten with fresh digests.
    for f in ["shard-000001.logp.npy", "shard-000002.loss.npy"] {
        assert!(dsel_store::check_sealed(s2.join(f)).is_valid(), "{f}");
        assert_eq!(
            std::fs::read(s2.join(f)).unwrap(),
            std::fs::read(s1.join(f)).unwrap()
        );
    }
}
