//! llama2.c loader against the independently converted HF copy of stories260K.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use dsel_model::llama2c;

use dsel_testkit::data_root;

mod common;

fn stories_dir() -> PathBuf {
    data_root().join("models/stories260K")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn stories260k_matches_hf_copy_exactly() {
    let raw = llama2c::load(&stories_dir().join("stories260K.bin"), &Device::Cpu).unwrap();
    let c = &raw.config;
    common::assert_stories260k_shape(c);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (10000.0, 1e-5));
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));

    // Config agrees with the HF config.json.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stories_dir().join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["hidden_size"].as_u64(), Some(c.hidden_size as u64));
    assert_eq!(
        cfg["intermediate_size"].as_u64(),
        Some(c.intermediate_size as u64)
    );
    assert_eq!(
        cfg["num_key_value_heads"].as_u64(),
        Some(c.num_key_value_heads as u64)
    );
    assert_eq!(
        cfg["tie_word_embeddings"].as_bool(),
        Some(c.tie_word_embeddings)
    );

    let hf = common::stories_hf_tensors();
    let mut ours: Vec<&String> = raw.tensors.keys().collect();
    let mut theirs: Vec<&String> = hf.keys().filter(|k| *k != "lm_head.weight").collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "tensor name sets differ");
    assert_eq!(ours.len(), 1 + 5 * 9 + 1);
    for (name, (shape, want)) in &hf {
        if name == "lm_head.weight" {
            // Tied: the HF file may store a copy; it must equal the embedding.
            let emb = flat(&raw.tensors["model.embed_tokens.weight"]);
            assert_eq!(&emb, want, "lm_head vs embedding");
            continue;
        }
        let t = &raw.tensors[name];
        assert_eq!(t.dims(), shape.as_slice(), "{name} shape");
        let got = flat(t);
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{name}: {bad} of {} elements differ", got.len());
    }
    // Q/K really were permuted (the raw interleaved rows differ from HF's).
    let q = flat(&raw.tensors["model.layers.0.self_attn.q_proj.weight"]);
    let raw_q =
        dsel_model::gguf::permute_qk(&raw.tensors["model.layers.0.self_attn.q_proj.weight"], 8)
            .unwrap();
    assert_ne!(flat(&raw_q), q);

    // Tokenizer from hf/tokenizer.json beside the checkpoint.
    let tok = raw
        .tokenizer
        .as_ref()
        .expect("hf/tokenizer.json is next to the .bin");
    assert_eq!(raw.bos_token.as_deref(), Some("<s>"));
    assert_eq!(raw.eos_token.as_deref(), Some("</s>"));
    assert!(raw.chat_template.is_none());
    let enc = tok.encode("Once upon a time", true).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "BOS first");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "Once upon a time");
}

#[test]
fn truncated_file_reports_expected_and_actual_bytes() {
    let bytes = std::fs::read(stories_dir().join("stories260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = llama2c::load(&cut, &Device::Cpu).err().expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(msg.contains(&bytes.len().to_string()), "{msg}");
    assert!(msg.contains(&(bytes.len() - 100).to_string()), "{msg}");
    assert!(msg.contains("cut.bin"), "{msg}");

    // Header only partially present.
    std::fs::write(&cut, &bytes[..10]).unwrap();
    let msg = format!("{:#}", llama2c::load(&cut, &Device::Cpu).err().unwrap());
    assert!(msg.contains("28") && msg.contains("10"), "{msg}");

    // A nonsense header.
    let mut bad = bytes.clone();
    bad[8..12].copy_from_slice(&0i32.to_le_bytes());
    std::fs::write(&cut, &bad).unwrap();
    let msg = format!("{:#}", llama2c::load(&cut, &Device::Cpu).err().unwrap());
    assert!(msg.contains("n_layers"), "{msg}");

    // No tokenizer next to a copied checkpoint.
    let copy = dir.path().join("stories.bin");
    std::fs::write(&copy, &bytes).unwrap();
    let raw = llama2c::load(&copy, &Device::Cpu).unwrap();
    assert!(raw.tokenizer.is_none() && raw.bos_token.is_none());
}

#[test]
fn untied_classifier_is_read() {
    // Build an untied checkpoint: negative vocab_size and a trailing wcls.
    let bytes = std::fs::read(stories_dir().join("stories260K.bin")).unwrap();
    let mut v = bytes.clone();
    v[20..24].copy_from_slice(&(-512i32).to_le_bytes());
    let wcls: Vec<u8> = (0..512 * 64)
        .flat_map(|i| ((i % 97) as f32 * 0.01).to_le_bytes())
        .collect();
    v.extend_from_slice(&wcls);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("untied.bin");
    std::fs::write(&p, &v).unwrap();
    let raw = llama2c::load(&p, &Device::Cpu).unwrap();
    assert!(!raw.config.tie_word_embeddings);
    let lm = flat(&raw.tensors["lm_head.weight"]);
    assert_eq!(raw.tensors["lm_head.weight"].dims(), &[512, 64]);
    assert_eq!(lm[97 + 3], 3.0 * 0.01);
}

/// Through the project's model code: the llama2.c copy and the HF copy give
/// the same logits, and greedy decoding from BOS reproduces the text in
/// stories260K.md (`./run stories260K.bin -z tok512.bin -t 0.0`).
#[test]
fn stories260k_logits_and_greedy_text() {
    use dsel_model::{Batch, Mode, Model, RawModel};
    let raw = llama2c::load(&stories_dir().join("stories260K.bin"), &Device::Cpu).unwrap();
    let hf_raw = RawModel {
        config: raw.config.clone(),
        tensors: common::stories_hf_tensors()
            .into_iter()
            .filter(|(n, _)| n != "lm_head.weight")
            .map(|(n, (shape, v))| (n, Tensor::from_vec(v, shape, &Device::Cpu).unwrap()))
            .collect(),
        tokenizer: None,
        chat_template: None,
        bos_token: None,
        eos_token: None,
    };
    let ours = Model::new(&raw).unwrap();
    let theirs = Model::new(&hf_raw).unwrap();
    let ids: Vec<u32> = vec![1, 403, 407, 261, 378, 60, 270, 300, 290, 261];
    let mask = vec![1u8; ids.len()];
    let batch = Batch::new(&[(&ids, &mask)], &Device::Cpu).unwrap();
    let a = flat(&ours.logits(&batch, Mode::Eval).unwrap());
    let b = flat(&theirs.logits(&batch, Mode::Eval).unwrap());
    assert_eq!(a.len(), ids.len() * 512);
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "max |logit difference| = {max}");

    let tok = raw.tokenizer.as_ref().unwrap();
    let out = ours.generate_greedy(&[1], 40, &[]).unwrap();
    let text = tok.decode(&out, true).unwrap();
    let want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";
    assert!(text.starts_with(want), "greedy text was {text:?}");

    // Negative control: leaving Q/K in llama2.c's interleaved layout breaks it.
    let mut wrong = RawModel {
        config: raw.config.clone(),
        tensors: raw.tensors.clone(),
        tokenizer: None,
        chat_template: None,
        bos_token: None,
        eos_token: None,
    };
    for i in 0..raw.config.num_hidden_layers {
        for (proj, heads) in [("q_proj", 8), ("k_proj", 4)] {
            let name = format!("model.layers.{i}.self_attn.{proj}.weight");
            let t = dsel_model::gguf::permute_qk(&wrong.tensors[&name], heads).unwrap();
            wrong.tensors.insert(name, t);
        }
    }
    let out = Model::new(&wrong)
        .unwrap()
        .generate_greedy(&[1], 40, &[])
        .unwrap();
    let text = tok.decode(&out, true).unwrap();
    assert!(!text.starts_with(want), "the rotary layout should matter");
}
