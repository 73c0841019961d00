//! Tiny random models and data for the online-selection tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use dsel_model::rng::hash_words;
use dsel_model::{LlamaConfig, LoraConfig, Model, RawModel};
use dsel_online::SelectContext;

/// A tiny GQA config.
pub fn tiny_config(vocab: usize) -> LlamaConfig {
    dsel_testkit::tiny_llama_config(vocab, false, false)
}

/// Random HF-named weights for `cfg`.
pub fn tiny_raw(cfg: &LlamaConfig, seed: u64, dtype: DType) -> RawModel {
    dsel_model::random_weights(cfg, seed, dtype)
}

/// LoRA config on the given targets.
pub fn lora(rank: usize, dropout: f64, targets: &[&str], seed: u64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        seed,
    }
}

pub const ALL: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// A tiny model with LoRA whose B matrices are randomised (so every
/// gradient is non-zero).
pub fn tiny_model(vocab: usize, dtype: DType, rank: usize, seed: u64) -> Model {
    let raw = tiny_raw(&tiny_config(vocab), seed, dtype);
    let mut m = Model::new(&raw).unwrap();
    m.add_lora(&lora(rank, 0.0, &ALL, seed + 1)).unwrap();
    randomise_b(&m, seed + 2);
    m
}

/// Sets every LoRA B to small random values.
pub fn randomise_b(m: &Model, seed: u64) {
    for (j, (name, var)) in m.lora_params().into_iter().enumerate() {
        if name.ends_with("lora_b") {
            let t = dsel_model::random::random_tensor(
                seed,
                j as u64,
                var.dims(),
                0.0,
                0.3,
                var.dtype(),
            );
            var.set(&t).unwrap();
        }
    }
}

/// `n` random examples with lengths in `min_len..=max_len` and labels on the
/// second half.
pub fn examples(
    n: usize,
    vocab: usize,
    min_len: usize,
    max_len: usize,
    seed: u64,
) -> Vec<(Vec<u32>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let span = (max_len - min_len + 1) as u64;
            let len = min_len + (hash_words(seed, &[i as u64, 999]) % span) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|t| (hash_words(seed, &[i as u64, t as u64]) % vocab as u64) as u32)
                .collect();
            let mask: Vec<u8> = (0..len).map(|t| u8::from(t >= len / 2)).collect();
            (ids, mask)
        })
        .collect()
}

/// The context of optimizer step `step` with that step's dropout seed and
/// learning rate.
pub fn select_context(step: u64, dropout_seed: u64, lr: f64) -> SelectContext {
    SelectContext {
        step,
        dropout_seed,
        lr,
    }
}

#[allow(unused_imports)]
pub use dsel_testkit::batch;

/// Row-major host copy of a 2-D tensor as f64.
pub fn host2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

/// Short stories in the style stories260K was trained on.
pub const STORIES: [&str; 10] = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her red ball.",
    "Tom had a big dog called Max. Every morning they ran to the river and looked at the fish swimming in the water.",
    "The sun was hot and the sky was blue. A small bird sat on the tree and sang a happy song to all the children.",
    "Mom baked a cake for the party. Sue helped her put the candles on top, and then they sang and ate it together.",
    "One day, a boy found a shiny key in the grass. He wondered what it could open, so he took it home to show Dad.",
    "Anna was sad because her toy car was broken. Her brother said he could fix it, and soon the car was good again.",
    "The cat wanted the milk on the table. She jumped up, but the cup fell down and the milk went all over the floor.",
    "Ben and Sam built a tall tower with blocks. When the wind came, the tower fell, and they laughed and built it again.",
    "Lily and her mom went to the store. They bought apples and bread, and Lily carried the small bag all the way home.",
    "The little dog was lost in the big park. A kind girl found him and helped him go back to his happy family.",
];

/// The real stories260K model (Hugging Face folder under the shared data
/// root; `DSEL_DATA_ROOT` overrides), its tensors converted to `dtype`.
pub fn stories_raw(dtype: DType) -> RawModel {
    let mut raw = dsel_model::load_hf(&dsel_testkit::stories_dir(), &Device::Cpu).unwrap();
    for t in raw.tensors.values_mut() {
        *t = t.to_dtype(dtype).unwrap();
    }
    raw
}

/// [`STORIES`] tokenized by the model's tokenizer (BOS first), labels on
/// the second half of each.
pub fn stories_examples(raw: &RawModel) -> Vec<(Vec<u32>, Vec<u8>)> {
    let tok = raw.tokenizer.as_ref().expect("stories260K has a tokenizer");
    STORIES
        .iter()
        .map(|t| {
            let ids = tok.encode(*t, true).unwrap().get_ids().to_vec();
            let n = ids.len();
            (ids, (0..n).map(|i| u8::from(i >= n / 2)).collect())
        })
        .collect()
}
