//! A sweep killed after some shards resumes to byte-identical outputs, and
//! its numbers equal the model's own log-probabilities.

use std::path::PathBuf;

use candle_core::Device;
use dsel_ingest::{Example, Message};
use dsel_model::{Batch, Mode, Model};
use dsel_sweep::{SweepConfig, SweepResult};
use dsel_tokenize::{tokenize_to_dir, ChatFormat, Formatter, TokenizeConfig, TokenizedSet};

fn data_root() -> PathBuf {
    std::env::var_os("DSEL_DATA_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
        })
}

#[test]
fn killed_sweep_resumes_to_identical_bytes() {
    let raw = dsel_model::load(&data_root().join("models/stories260K/hf"), &Device::Cpu).unwrap();
    let model = Model::new(&raw).unwrap();
    let tok = raw.tokenizer.clone().unwrap();
    let fmt = Formatter::new(ChatFormat::Tulu {
        eos_token: "</s>".into(),
    })
    .unwrap();
    let words = ["cat", "dog", "ball", "tree", "sun", "park", "cake"];
    let examples: Vec<Example> = (0..23)
        .map(|i| Example {
            id: format!("e{i}"),
            source: "t".into(),
            subtask: String::new(),
            messages: vec![
                Message {
                    role: "user".into(),
                    content: format!("Story {i}"),
                },
                Message {
                    role: "assistant".into(),
                    content: (0..=(i % 5))
                        .map(|j| words[(i + j) % words.len()])
                        .collect::<Vec<_>>()
                        .join(" "),
                },
            ],
            references: vec![],
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let set_dir = tmp.path().join("set");
    std::fs::create_dir_all(&set_dir).unwrap();
    tokenize_to_dir(
        &tok,
        &fmt,
        &examples,
        &TokenizeConfig {
            max_len: 64,
            bos_id: Some(1),
            truncation: Default::default(),
        },
        &set_dir,
    )
    .unwrap();
    let set = TokenizedSet::open(&set_dir).unwrap();
    let cfg = SweepConfig {
        shard_examples: 5,
        batch_tokens: 200,
        max_batch: 4,
    };

    // Uninterrupted run.
    let (s1, o1) = (tmp.path().join("s1"), tmp.path().join("o1"));
    std::fs::create_dir_all(&o1).unwrap();
    let r1 = dsel_sweep::run(&model, &set, &cfg, &s1, &o1, "full").unwrap();
    assert_eq!(r1.shards_resumed, 0);

    // "Killed" run: only the first two shards survived in its scratch folder.
    let (s2, o2) = (tmp.path().join("s2"), tmp.path().join("o2"));
    std::fs::create_dir_all(&s2).unwrap();
    std::fs::create_dir_all(&o2).unwrap();
    for s in 0..2 {
        for what in ["logp", "loss"] {
            let f = format!("shard-{s:06}.{what}.npy");
            std::fs::copy(s1.join(&f), s2.join(&f)).unwrap();
        }
    }
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
