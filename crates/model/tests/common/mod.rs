//! Shared helpers for the model tests: data paths, tiny random models.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use dsel_model::rng::hash_words;
use dsel_model::{LlamaConfig, LoraConfig, Model, RawModel};

pub use dsel_testkit::stories_dir;

/// The tensors of stories260K's HF safetensors (all f32), read directly
/// with the `safetensors` crate: name → (shape, values).
pub fn stories_hf_tensors() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(stories_dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// Asserts stories260K's shape: hidden 64, MLP 172, 5 layers, 8 heads of
/// dimension 8 over 4 KV heads, 512 tokens and positions, tied embeddings,
/// no attention biases.
pub fn assert_stories260k_shape(c: &LlamaConfig) {
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (64, 172, 5)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 8)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (512, 512));
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
}

/// A tiny config: GQA (4 heads, 2 KV heads), optional biases and tying.
pub fn tiny_config(bias: bool, tied: bool) -> LlamaConfig {
    dsel_testkit::tiny_llama_config(37, bias, tied)
}

/// Random weights for `cfg` in HF naming, seeded.
pub fn tiny_raw(cfg: &LlamaConfig, seed: u64, dtype: DType) -> RawModel {
    dsel_model::random_weights(cfg, seed, dtype)
}

/// LoRA on every target.
pub fn lora_all(rank: usize, dropout: f64, seed: u64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout,
        targets: ["q", "k", "v", "o", "gate", "up", "down"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        seed,
    }
}

/// Sets every LoRA B (and perturbs nothing else) to seeded random values so
/// that gradients of A are non-zero.
pub fn randomize_lora_b(model: &Model, seed: u64, scale: f64) {
    for (k, (name, var)) in model.lora_params().into_iter().enumerate() {
        if name.ends_with("lora_b") {
            let t = dsel_model::random::random_tensor(
                seed,
                1000 + k as u64,
                var.dims(),
                0.0,
                scale,
                var.dtype(),
            );
            var.set(&t).unwrap();
        }
    }
}

/// A tiny model with LoRA on every target and random non-zero B.
pub fn tiny_lora_model(dtype: DType, bias: bool, tied: bool, dropout: f64) -> Model {
    let raw = tiny_raw(&tiny_config(bias, tied), 11, dtype);
    let mut m = Model::new(&raw).unwrap();
    m.add_lora(&lora_all(3, dropout, 5)).unwrap();
    randomize_lora_b(&m, 99, 0.3);
    m
}

/// Seeded token sequence of length `n` over `vocab`.
pub fn seq(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (hash_words(seed, &[i as u64]) % vocab as u64) as u32)
        .collect()
}

/// Label mask: prompt of `prompt` tokens (0) then labels (1).
pub fn completion_mask(n: usize, prompt: usize) -> Vec<u8> {
    (0..n).map(|i| u8::from(i >= prompt)).collect()
}

#[allow(unused_imports)]
pub use dsel_testkit::batch;

/// Flattened f64 copy of a tensor.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}
