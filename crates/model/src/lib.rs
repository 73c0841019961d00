//! `dsel-model`: the model core every method stands on.
//!
//! Weights are always held in Hugging Face naming and layout (see
//! [`RawModel`]), whatever format they were read from.
//!
//! * Loaders: [`load`] dispatches to [`load_hf`] (folders), [`gguf::load`]
//!   and [`llama2c::load`].
//! * [`Model`]: a Llama-family decoder written from differentiable candle
//!   compositions (see [`ops`]): per-token log-probs for whole sequences,
//!   LoRA with seeded init and seeded dropout, per-example LoRA gradients
//!   from one batched backward, and LoRA-branch captures for ghost inner
//!   products.

pub mod batch;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod llama2c;
pub mod lora;
pub mod model;
pub mod ops;
pub mod random;
pub mod rng;

pub use batch::{longest_first, plan_token_batches, Batch, Mode};
pub use config::LlamaConfig;
pub use dsel_kernels::Precision;
pub use hf::load_hf;
pub use lora::{LoraConfig, LORA_TARGETS};
pub use model::{LoraCapture, Model, PerExampleGrads, LORA_META_KEY};
pub use random::random_weights;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Loads a model from `path` onto `device`: a directory is read as a Hugging
/// Face folder ([`load_hf`]), a `*.gguf` file with [`gguf::load`] and a
/// `*.bin` file (llama2.c checkpoint) with [`llama2c::load`].
pub fn load(path: &Path, device: &Device) -> anyhow::Result<RawModel> {
    if path.is_dir() {
        return load_hf(path, device);
    }
    if !path.exists() {
        anyhow::bail!("model path {} does not exist", path.display());
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("gguf") => gguf::load(path, device),
        Some("bin") => llama2c::load(path, device),
        _ => anyhow::bail!(
            "model path {}: expected a Hugging Face folder, a .gguf file or a llama2.c .bin file",
            path.display()
        ),
    }
}

/// What every loader produces: a config, HF-named f32 weights on the target
/// device, and (where the source has them) the tokenizer and chat template.
pub struct RawModel {
    /// Architecture hyper-parameters.
    pub config: LlamaConfig,
    /// HF names: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`
    /// (+ `.bias` for q,k,v when `attention_bias`), `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
    /// `model.layers.{i}.input_layernorm.weight`, `model.layers.{i}.post_attention_layernorm.weight`,
    /// `model.norm.weight`, and `lm_head.weight` unless `tie_word_embeddings`.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer, when the source ships one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Jinja chat template (HF `tokenizer_config.json` or GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// Special token strings used by the template (e.g. `<|im_start|>`), when known:
    /// beginning-of-sequence token string.
    pub bos_token: Option<String>,
    /// End-of-sequence token string, when known.
    pub eos_token: Option<String>,
}
