//! Seeded random weights of any Llama-family shape.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::rng::{hash_words, unit_f64};
use crate::{LlamaConfig, RawModel};

/// A seeded tensor of `shape`, uniform in `center ± scale`; `tag` tells
/// tensors of one seed apart.
pub fn random_tensor(
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

/// The spreads of [`random_weights_with`]'s draws: projections (and the
/// untied head) uniform in `0 ± scale`, norms in `1 ± norm`, biases in
/// `0 ± bias`. Embeddings are always `0 ± 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightScales {
    /// Spread of the attention and MLP projections.
    pub projection: f64,
    /// Spread of the RMSNorm weights around 1.
    pub norm: f64,
    /// Spread of the attention biases (when the config has them).
    pub bias: f64,
    /// Spread of the untied LM head (when the config has one).
    pub head: f64,
}

impl Default for WeightScales {
    /// The spreads of [`random_weights`].
    fn default() -> Self {
        Self {
            projection: 0.4,
            norm: 0.3,
            bias: 0.3,
            head: 0.5,
        }
    }
}

/// Random weights for `cfg` in Hugging Face naming, from `seed`: embeddings
/// and projections uniform around 0, norms around 1 (biases and an untied
/// head when the config has them). Throughput does not depend on the
/// weights, so benchmarks of any Llama shape need no download; tests use
/// tiny ones.
pub fn random_weights(cfg: &LlamaConfig, seed: u64, dtype: DType) -> RawModel {
    random_weights_with(cfg, seed, dtype, WeightScales::default())
}

/// [`random_weights`] with other spreads.
pub fn random_weights_with(
    cfg: &LlamaConfig,
    seed: u64,
    dtype: DType,
    sc: WeightScales,
) -> RawModel {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let qd = cfg.num_attention_heads * cfg.head_dim;
    let kvd = cfg.num_key_value_heads * cfg.head_dim;
    let mut t = HashMap::new();
    let mut tag = 0u64;
    let mut add = |name: String, shape: &[usize], center: f64, scale: f64| {
        tag += 1;
        t.insert(name, random_tensor(seed, tag, shape, center, scale, dtype));
    };
    add("model.embed_tokens.weight".into(), &[v, h], 0.0, 1.0);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.self_attn.q_proj.weight"),
            &[qd, h],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            &[kvd, h],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            &[kvd, h],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, qd],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[i, h],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            &[i, h],
            0.0,
            sc.projection,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            0.0,
            sc.projection,
        );
        add(format!("{p}.input_layernorm.weight"), &[h], 1.0, sc.norm);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            sc.norm,
        );
        if cfg.attention_bias {
            add(format!("{p}.self_attn.q_proj.bias"), &[qd], 0.0, sc.bias);
            add(format!("{p}.self_attn.k_proj.bias"), &[kvd], 0.0, sc.bias);
            add(format!("{p}.self_attn.v_proj.bias"), &[kvd], 0.0, sc.bias);
        }
    }
    add("model.norm.weight".into(), &[h], 1.0, sc.norm);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), &[v, h], 0.0, sc.head);
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
