//! `dsel-testkit`: what the workspace's tests share — where the real data is,
//! the tiny real model (stories260K, llama2.c's 260K-parameter Llama), and toy
//! tokenized sets built with that model's tokenizer. Test-only: no stage
//! depends on it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use dsel_ingest::{Example, Message};
use dsel_model::{Batch, LlamaConfig, LoraConfig, Model, RawModel};
use dsel_tokenize::{tokenize_to_dir, ChatFormat, Formatter, TokenizeConfig, TokenizedSet};

/// The shared data root: `DSEL_DATA_ROOT`, else `../shared/data` beside the
/// workspace.
pub fn data_root() -> PathBuf {
    std::env::var_os("DSEL_DATA_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
        })
}

/// The project's own small test fixtures (`data/fixtures/` at the top of
/// the workspace), e.g. `fixtures("pipeline")`.
pub fn fixtures(group: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/fixtures")).join(group)
}

/// The Hugging Face folder of stories260K.
pub fn stories_dir() -> PathBuf {
    data_root().join("models/stories260K/hf")
}

/// Where the SmolLM2-135M-Instruct Q4_1 GGUF file is looked for:
/// `DSEL_SMOLLM2_GGUF`, else `models/SmolLM2-135M-Instruct.Q4_1.gguf` at the
/// top of the workspace (`make model` fetches it; tests skip without it).
pub fn smollm2_gguf() -> PathBuf {
    std::env::var_os("DSEL_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            ))
        })
}

/// stories260K loaded on the CPU, as raw weights and as a model.
pub fn stories() -> (RawModel, Model) {
    let raw = dsel_model::load(&stories_dir(), &Device::Cpu).expect("loading stories260K");
    let model = Model::new(&raw).expect("building stories260K");
    (raw, model)
}

/// Rank-4 LoRA (alpha 8, no dropout) on the attention projections q, k, v
/// and o, initialised from `seed`: the adapter the fine-tuning tests train.
pub fn attention_lora(seed: u64) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
        seed,
    }
}

/// A tiny Llama config for random-weight tests: `vocab_size` tokens, 2
/// layers, hidden size 16 (MLP 24), 4 heads of dimension 4 over 2 KV heads
/// (GQA), 64 positions, BOS 1 and EOS 2, with or without attention biases
/// and tied embeddings.
pub fn tiny_llama_config(
    vocab_size: usize,
    attention_bias: bool,
    tie_word_embeddings: bool,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings,
        attention_bias,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

/// A CPU batch of `(token ids, label mask)` examples.
pub fn batch(examples: &[(Vec<u32>, Vec<u8>)]) -> Batch {
    let seqs: Vec<(&[u32], &[u8])> = examples
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    Batch::new(&seqs, &Device::Cpu).expect("building a batch")
}

/// The words of the toy conversations' answers.
const WORDS: [&str; 7] = ["cat", "dog", "ball", "tree", "sun", "park", "cake"];

/// `n` short story-like conversations; example `i`'s answer has `1 + i % 5`
/// words (so lengths differ) and its id is `e{i}`.
pub fn toy_examples(n: usize, tag: &str) -> Vec<Example> {
    story_conversations(n, tag, tag, |i| {
        format!("Tell story {i} about {}", WORDS[i % WORDS.len()])
    })
}

/// `n` conversations in which the user asks `prompt(i)` and the answer has
/// `1 + i % 5` words (as in [`toy_examples`]); ids `{tag}{i}`, source
/// `source`.
pub fn story_conversations(
    n: usize,
    tag: &str,
    source: &str,
    prompt: impl Fn(usize) -> String,
) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            id: format!("{tag}{i}"),
            source: source.to_string(),
            subtask: String::new(),
            messages: vec![
                Message {
                    role: "user".into(),
                    content: prompt(i),
                },
                Message {
                    role: "assistant".into(),
                    content: (0..=(i % 5))
                        .map(|j| WORDS[(i + j) % WORDS.len()])
                        .collect::<Vec<_>>()
                        .join(" "),
                },
            ],
            references: vec![],
        })
        .collect()
}

/// Tokenize `examples` with `raw`'s tokenizer in the tulu format (stories260K
/// has no chat template) into `dir` and open the set.
pub fn tokenized(raw: &RawModel, examples: &[Example], max_len: usize, dir: &Path) -> TokenizedSet {
    std::fs::create_dir_all(dir).expect("creating the set folder");
    let fmt = Formatter::new(ChatFormat::Tulu {
        eos_token: "</s>".into(),
    })
    .expect("tulu format");
    let tok = raw.tokenizer.clone().expect("stories260K has a tokenizer");
    tokenize_to_dir(
        &tok,
        &fmt,
        examples,
        &TokenizeConfig {
            max_len,
            bos_id: Some(1),
            truncation: Default::default(),
        },
        dir,
    )
    .expect("tokenizing");
    TokenizedSet::open(dir).expect("opening the set")
}

/// [`toy_examples`]`(n, tag)` tokenized with a 64-token window into
/// `dir/<tag>` and opened.
pub fn toy_set(raw: &RawModel, n: usize, tag: &str, dir: &Path) -> TokenizedSet {
    tokenized(raw, &toy_examples(n, tag), 64, &dir.join(tag))
}

/// A target's fingerprint as `dsel-ingest` documents it, computed here
/// independently from the files' bytes: blake3 over a version line, then for
/// each file in name order its name and size (little-endian u64 lengths) and
/// the blake3 of its bytes.
pub fn expected_target_fingerprint(root: &Path, names: &[&str]) -> String {
    let mut names = names.to_vec();
    names.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"dsel-ingest target fingerprint v1\n");
    for name in names {
        let bytes = std::fs::read(root.join(name)).expect("reading a target file");
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(blake3::hash(&bytes).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The ids of a run folder's `selection.jsonl`, best first.
pub fn selected_ids(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("selection.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
