//! Shared helpers for the model tests: data paths, tiny random models.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dsel_model::rng::{hash_words, unit_f64};
use dsel_model::{Batch, LlamaConfig, LoraConfig, Model, RawModel};

pub use dsel_testkit::data_root;

/// The stories260K Hugging Face folder.
pub fn stories_dir() -> PathBuf {
    data_root().join("models/stories260K/hf")
}

/// A tiny config: GQA (4 heads, 2 KV heads), optional biases and tying.
pub fn tiny_config(bias: bool, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 37,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        attention_bias: bias,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn rand_tensor(
    seed: u64,
    tag: u64,
    shape: &[usize],
    center: f64,
    scale: f64,
    dtype: DType,
) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| center + scale * (2.0 * unit_f64(hash_words(seed, &[tag, i as u64])) - 1.0))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Random weights for `cfg` in HF naming, seeded.
pub fn tiny_raw(cfg: &LlamaConfig, seed: u64, dtype: DType) -> RawModel {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kvd = cfg.num_key_value_heads * cfg.head_dim;
    let mut t = HashMap::new();
    let mut tag = 0u64;
    let mut add = |name: String, shape: &[usize], center: f64, scale: f64| {
        tag += 1;
        t.insert(name, rand_tensor(seed, tag, shape, center, scale, dtype));
    };
    add("model.embed_tokens.weight".into(), &[v, h], 0.0, 1.0);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), &[qd, h], 0.0, 0.4);
        add(format!("{p}.self_attn.k_proj.weight"), &[kvd, h], 0.0, 0.4);
        add(format!("{p}.self_attn.v_proj.weight"), &[kvd, h], 0.0, 0.4);
        add(format!("{p}.self_attn.o_proj.weight"), &[h, qd], 0.0, 0.4);
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.0, 0.4);
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.0, 0.4);
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.0, 0.4);
        add(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.3);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.3,
        );
        if cfg.attention_bias {
            add(format!("{p}.self_attn.q_proj.bias"), &[qd], 0.0, 0.3);
            add(format!("{p}.self_attn.k_proj.bias"), &[kvd], 0.0, 0.3);
            add(format!("{p}.self_attn.v_proj.bias"), &[kvd], 0.0, 0.3);
        }
    }
    add("model.norm.weight".into(), &[h], 1.0, 0.3);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, h], 0.0, 0.5);
    }
    RawModel {
        config: cfg.clone(),
        tensors: t,
        tokenizer: None,
        chat_template: None,
        bos_token: None,
        eos_token: None,
    }
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
            let t = rand_tensor(seed, 1000 + k as u64, var.dims(), 0.0, scale, var.dtype());
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

/// A batch of the given (ids, mask) pairs on the CPU.
pub fn batch(seqs: &[(Vec<u32>, Vec<u8>)]) -> Batch {
    let refs: Vec<(&[u32], &[u8])> = seqs
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    Batch::new(&refs, &Device::Cpu).unwrap()
}

/// Flattened f64 copy of a tensor.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}
