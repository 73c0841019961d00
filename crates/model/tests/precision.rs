//! Mixed precision against f32 on a real model (stories260K) and real text:
//! the bounds the `bf16` precision is held to (see the README's fidelity
//! figures for SmolLM2).

mod common;

use candle_core::{DType, Device, Tensor};
use dsel_model::{Batch, LoraConfig, Mode, Model, Precision};

/// Per-token log-prob error bound, in nats (bf16 keeps 8 bits of mantissa:
/// each GEMM input carries a relative error up to 2⁻⁹).
const MAX_LOGPROB_ERR: f64 = 0.08;
/// Mean absolute per-token log-prob error bound, in nats.
const MEAN_LOGPROB_ERR: f64 = 0.01;
/// Minimum cosine of the LoRA gradients (bf16 vs f32).
const MIN_GRAD_COSINE: f64 = 0.999;

fn models() -> (Model, Model, Batch) {
    let raw = dsel_model::load(&common::stories_dir(), &Device::Cpu).unwrap();
    let tok = raw.tokenizer.clone().expect("stories260K has a tokenizer");
    let texts = [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
        "Tom had a big red ball. He liked to kick it to his friend Sam in the park every day after school.",
        "The cat sat on the mat and looked at the bird in the tree.",
    ];
    let seqs: Vec<(Vec<u32>, Vec<u8>)> = texts
        .iter()
        .map(|t| {
            let ids = tok.encode(*t, true).unwrap().get_ids().to_vec();
            let n = ids.len();
            (ids, (0..n).map(|i| u8::from(i >= n / 3)).collect())
        })
        .collect();
    let refs: Vec<(&[u32], &[u8])> = seqs.iter().map(|(i, m)| (&i[..], &m[..])).collect();
    let batch = Batch::new(&refs, &Device::Cpu).unwrap();
    let f32m = Model::new(&raw).unwrap();
    let mut bf16m = Model::new(&raw).unwrap();
    bf16m.set_precision(Precision::Bf16).unwrap();
    assert_eq!(bf16m.precision(), Precision::Bf16);
    (f32m, bf16m, batch)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bf16_logprobs_stay_within_the_stated_bound() {
    let (f32m, bf16m, batch) = models();
    let a = flat(&f32m.token_logprobs_inference(&batch).unwrap());
    let b = flat(&bf16m.token_logprobs_inference(&batch).unwrap());
    let scored: Vec<(f64, f64)> = a
        .iter()
        .zip(&b)
        .filter(|(x, _)| **x != 0.0)
        .map(|(x, y)| (*x, *y))
        .collect();
    assert!(scored.len() > 40);
    let max = scored
        .iter()
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let mean = scored.iter().map(|(x, y)| (x - y).abs()).sum::<f64>() / scored.len() as f64;
    eprintln!(
        "bf16 vs f32 log-probs: max |Δ| {max:.4} nats, mean |Δ| {mean:.5} over {} tokens",
        scored.len()
    );
    assert!(max <= MAX_LOGPROB_ERR, "max |Δ| {max}");
    assert!(mean <= MEAN_LOGPROB_ERR, "mean |Δ| {mean}");
    // Not identical: the bf16 path really ran.
    assert!(max > 0.0);
    // Padding and position 0 stay exactly 0.
    assert!(a.iter().zip(&b).all(|(x, y)| (*x == 0.0) == (*y == 0.0)));
}

#[test]
fn bf16_lora_gradients_keep_their_direction() {
    let (mut f32m, mut bf16m, batch) = models();
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: ["q", "k", "v", "o", "gate", "up", "down"]
            .map(String::from)
            .to_vec(),
        seed: 3,
    };
    for m in [&mut f32m, &mut bf16m] {
        m.add_lora(&lora).unwrap();
        // Non-zero B, the same in both, so that every gradient is non-trivial.
        for (name, var) in m.lora_params() {
            if name.ends_with("lora_b") {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 101) as f32 - 50.0) * 1e-3)
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }
    let grads = |m: &Model| -> Vec<f64> {
        let loss = m
            .example_losses(&batch, Mode::Eval)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        m.lora_params()
            .iter()
            .flat_map(|(_, v)| {
                flat(
                    g.get(v.as_tensor())
                        .expect("every LoRA weight gets a gradient"),
                )
            })
            .collect()
    };
    let (a, b) = (grads(&f32m), grads(&bf16m));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos = dot / (na * nb);
    eprintln!("bf16 vs f32 LoRA gradient cosine {cos:.6}, norms {na:.4e} / {nb:.4e}");
    assert!(cos >= MIN_GRAD_COSINE, "cosine {cos}");
    // Per-example gradients (LESS) too.
    let pa = flat(&f32m.per_example_lora_grads(&batch).unwrap().grads);
    let pb = flat(&bf16m.per_example_lora_grads(&batch).unwrap().grads);
    let n = pa.len() / 3;
    for i in 0..3 {
        let (x, y) = (&pa[i * n..(i + 1) * n], &pb[i * n..(i + 1) * n]);
        let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let c = dot
            / (x.iter().map(|p| p * p).sum::<f64>().sqrt()
                * y.iter().map(|q| q * q).sum::<f64>().sqrt());
        eprintln!("example {i}: per-example gradient cosine {c:.6}");
        assert!(c >= MIN_GRAD_COSINE, "example {i}: cosine {c}");
    }
}

#[test]
fn precision_cannot_go_back_and_f64_ignores_it() {
    let (_, mut bf16m, _) = models();
    assert!(bf16m.set_precision(Precision::F32).is_err());
    let mut m = Model::new(&common::tiny_raw(
        &common::tiny_config(false, false),
        1,
        DType::F64,
    ))
    .unwrap();
    m.set_precision(Precision::Bf16).unwrap();
    assert_eq!(m.precision(), Precision::F32);
}
