//! GGUF loader on a GGUF written the way llama.cpp lays out a `llama` model:
//! stories260K's llama2.c weights (Meta's interleaved rotary layout, which is
//! what llama.cpp's converter produces from HF weights) with its
//! SentencePiece vocabulary (`tok512.bin`) as a `llama` tokenizer. Checked
//! against the independently converted HF copy (safetensors + tokenizer.json).

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use dsel_model::gguf;

use dsel_testkit::data_root;

mod common;

fn stories_dir() -> PathBuf {
    data_root().join("models/stories260K")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// llama2.c's tokenizer.bin: i32 max_len, then per token f32 score, i32 len, bytes.
/// The exporter replaced "▁" by " " and wrote BOS/EOS as "\n<s>\n", "\n</s>\n".
fn read_tok_bin(n: usize) -> (Vec<String>, Vec<f32>) {
    let b = std::fs::read(stories_dir().join("tok512.bin")).unwrap();
    let mut at = 4;
    let (mut toks, mut scores) = (Vec::new(), Vec::new());
    for i in 0..n {
        let score = f32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let len = i32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        let s = String::from_utf8(b[at + 8..at + 8 + len].to_vec()).unwrap();
        at += 8 + len;
        let s = match i {
            1 => "<s>".to_string(),
            2 => "</s>".to_string(),
            _ => s.replace(' ', "\u{2581}"),
        };
        toks.push(s);
        scores.push(score);
    }
    assert_eq!(at, b.len());
    (toks, scores)
}

/// Write stories260K as a GGUF (F32 tensors, raw llama2.c = interleaved Q/K rows).
fn write_stories_gguf(path: &std::path::Path, with_tokenizer: bool) {
    let bin = std::fs::read(stories_dir().join("stories260K.bin")).unwrap();
    let hdr: Vec<i32> = (0..7)
        .map(|i| i32::from_le_bytes(bin[4 * i..4 * i + 4].try_into().unwrap()))
        .collect();
    let (d, h, l, nh, nkv, v, seq) = (
        hdr[0] as usize,
        hdr[1] as usize,
        hdr[2] as usize,
        hdr[3] as usize,
        hdr[4] as usize,
        hdr[5] as usize,
        hdr[6] as usize,
    );
    let kv = nkv * d / nh;
    let mut at = 28;
    let mut take = |n: usize| {
        let out = f32s(&bin[at..at + 4 * n]);
        at += 4 * n;
        out
    };
    let emb = take(v * d);
    let rms_att = take(l * d);
    let wq = take(l * d * d);
    let wk = take(l * kv * d);
    let wv = take(l * kv * d);
    let wo = take(l * d * d);
    let rms_ffn = take(l * d);
    let w1 = take(l * h * d);
    let w2 = take(l * d * h);
    let w3 = take(l * h * d);
    let rms_final = take(d);
    let dev = Device::Cpu;
    let q = |data: &[f32], shape: &[usize]| {
        QTensor::quantize(
            &Tensor::from_slice(data, shape, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(&emb, &[v, d])),
        ("output_norm.weight".into(), q(&rms_final, &[d])),
    ];
    let sl = |x: &[f32], i: usize| {
        let per = x.len() / l;
        x[i * per..(i + 1) * per].to_vec()
    };
    for i in 0..l {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), q(&sl(&rms_att, i), &[d])));
        tensors.push((format!("{p}.attn_q.weight"), q(&sl(&wq, i), &[d, d])));
        tensors.push((format!("{p}.attn_k.weight"), q(&sl(&wk, i), &[kv, d])));
        tensors.push((format!("{p}.attn_v.weight"), q(&sl(&wv, i), &[kv, d])));
        tensors.push((format!("{p}.attn_output.weight"), q(&sl(&wo, i), &[d, d])));
        tensors.push((format!("{p}.ffn_norm.weight"), q(&sl(&rms_ffn, i), &[d])));
        tensors.push((format!("{p}.ffn_gate.weight"), q(&sl(&w1, i), &[h, d])));
        tensors.push((format!("{p}.ffn_down.weight"), q(&sl(&w2, i), &[d, h])));
        tensors.push((format!("{p}.ffn_up.weight"), q(&sl(&w3, i), &[h, d])));
    }
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(l as u32)),
        ("llama.context_length", Value::U32(seq as u32)),
        ("llama.embedding_length", Value::U32(d as u32)),
        ("llama.feed_forward_length", Value::U32(h as u32)),
        ("llama.attention.head_count", Value::U32(nh as u32)),
        ("llama.attention.head_count_kv", Value::U32(nkv as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32((d / nh) as u32)),
    ];
    if with_tokenizer {
        let (toks, scores) = read_tok_bin(v);
        let types: Vec<Value> = (0..v)
            .map(|i| {
                Value::I32(match i {
                    0 => 2,
                    1 | 2 => 3,
                    3..=258 => 6,
                    _ => 1,
                })
            })
            .collect();
        md.extend([
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(toks.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]);
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn gguf_llama_layout_unpermutes_to_hf_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stories260K.gguf");
    write_stories_gguf(&p, false);
    let raw = gguf::load(&p, &Device::Cpu).unwrap();
    let c = &raw.config;
    common::assert_stories260k_shape(c);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    assert_eq!(c.rope_theta, 10000.0);
    assert!(raw.tokenizer.is_none() && raw.chat_template.is_none());

    let hf = common::stories_hf_tensors();
    let mut n = 0;
    for (name, (shape, want)) in &hf {
        if name == "lm_head.weight" {
            continue;
        }
        let t = raw
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(got == *want, "{name} differs from the HF copy");
        n += 1;
    }
    assert_eq!(n, raw.tensors.len());
}

#[test]
fn gguf_llama_tokenizer_matches_hf_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stories260K.gguf");
    write_stories_gguf(&p, true);
    let raw = gguf::load(&p, &Device::Cpu).unwrap();
    assert_eq!(raw.bos_token.as_deref(), Some("<s>"));
    assert_eq!(raw.eos_token.as_deref(), Some("</s>"));
    assert_eq!(
        (raw.config.bos_token_id, raw.config.eos_token_id),
        (Some(1), Some(2))
    );
    let ours = raw.tokenizer.expect("tokenizer from metadata");
    let theirs = tokenizers::Tokenizer::from_file(stories_dir().join("hf/tokenizer.json")).unwrap();

    // Same merges, in the same order.
    let ours_json: serde_json::Value =
        serde_json::from_str(&ours.to_string(false).unwrap()).unwrap();
    let theirs_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stories_dir().join("hf/tokenizer.json")).unwrap())
            .unwrap();
    assert_eq!(ours_json["model"]["merges"], theirs_json["model"]["merges"]);
    assert_eq!(ours_json["model"]["vocab"], theirs_json["model"]["vocab"]);

    let texts = [
        "Once upon a time, there was a little girl named Lily.",
        "  two leading spaces and trailing  ",
        "Numbers 12345 and 3.14, café, naïve — 😀 日本",
        "Line one\nLine two\n\n",
        "<s>Lily</s> said hi",
        "",
    ];
    for t in texts {
        for add_special in [true, false] {
            let a = ours.encode(t, add_special).unwrap();
            let b = theirs.encode(t, add_special).unwrap();
            assert_eq!(
                a.get_ids(),
                b.get_ids(),
                "{t:?} (add_special={add_special})"
            );
            assert_eq!(
                ours.decode(a.get_ids(), true).unwrap(),
                theirs.decode(b.get_ids(), true).unwrap(),
                "{t:?}"
            );
        }
    }
    // Byte fallback really happened for the emoji (no such piece in 512 tokens).
    let e = ours.encode("😀", false).unwrap();
    assert!(
        e.get_tokens().iter().any(|t| t.starts_with("<0x")),
        "{:?}",
        e.get_tokens()
    );
}

#[test]
fn broken_gguf_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stories260K.gguf");
    write_stories_gguf(&p, true);
    let bytes = std::fs::read(&p).unwrap();

    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = format!(
        "{:#}",
        gguf::load(&cut, &Device::Cpu)
            .err()
            .expect("truncated must fail")
    );
    assert!(msg.contains("cut.gguf"), "{msg}");

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a gguf file").unwrap();
    let msg = format!(
        "{:#}",
        gguf::load(&junk, &Device::Cpu)
            .err()
            .expect("junk must fail")
    );
    assert!(msg.contains("junk.gguf") && msg.contains("GGUF"), "{msg}");

    let missing = dir.path().join("missing.gguf");
    assert!(gguf::load(&missing, &Device::Cpu).is_err());
}
