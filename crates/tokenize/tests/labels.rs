//! The label mask decodes back to exactly the assistant text, with real
//! tokenizers (stories260K's byte-fallback BPE with the tulu format, and
//! SmolLM2's GGUF tokenizer with its ChatML template when the model file is
//! present), and the flat arrays round-trip through disk.

use dsel_ingest::{Example, Message};
use dsel_tokenize::{
    encode, tokenize_to_dir, ChatFormat, Formatter, Skip, TokenizeConfig, TokenizedSet,
};
use tokenizers::Tokenizer;

fn ex(id: &str, turns: &[(&str, &str)]) -> Example {
    Example {
        id: id.into(),
        source: "test".into(),
        subtask: String::new(),
        messages: turns
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect(),
        references: vec![],
    }
}

/// stories260K's tokenizer and the tulu format with its EOS `</s>`.
fn stories_tulu() -> (Tokenizer, Formatter) {
    let tok = Tokenizer::from_file(dsel_testkit::stories_dir().join("tokenizer.json")).unwrap();
    let fmt = Formatter::new(ChatFormat::Tulu {
        eos_token: "</s>".into(),
    })
    .unwrap();
    (tok, fmt)
}

fn label_text(tok: &Tokenizer, ids: &[u32], labels: &[u8]) -> Vec<String> {
    // Contiguous label runs, decoded.
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (&id, &l) in ids.iter().zip(labels) {
        if l == 1 {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut cur), false).unwrap());
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    runs
}

#[test]
fn tulu_labels_decode_to_the_completion_with_stories260k() {
    let (tok, fmt) = stories_tulu();
    let cfg = TokenizeConfig {
        max_len: 512,
        bos_id: Some(1),
        truncation: Default::default(),
    };
    let e = ex(
        "a",
        &[
            ("user", "Tell me a story."),
            ("assistant", "Once upon a time, a cat sat."),
        ],
    );
    let enc = encode(&tok, &fmt, &e, &cfg).unwrap();
    assert_eq!(enc.ids[0], 1, "BOS first");
    assert_eq!(enc.labels[0], 0);
    // The label tokens are exactly the assistant content + eos + newline.
    let ids: Vec<u32> = enc
        .ids
        .iter()
        .zip(&enc.labels)
        .filter(|(_, &l)| l == 1)
        .map(|(&i, _)| i)
        .collect();
    let expect = tok
        .encode_fast("Once upon a time, a cat sat.</s>\n", false)
        .unwrap();
    assert_eq!(ids, expect.get_ids());
    // Everything before is context: the prompt tokens carry no label.
    let n_ctx = enc.labels.iter().take_while(|&&l| l == 0).count();
    let ctx = tok.decode(&enc.ids[1..n_ctx], false).unwrap();
    assert!(
        ctx.contains("Tell me a story.") && ctx.contains("<|assistant|>"),
        "{ctx}"
    );
}

#[test]
fn truncation_is_counted_and_label_free_examples_are_skipped() {
    let (tok, fmt) = stories_tulu();
    let cfg = TokenizeConfig {
        max_len: 40,
        bos_id: Some(1),
        truncation: dsel_tokenize::Truncation::Right,
    };
    assert_eq!(
        dsel_tokenize::Truncation::default(),
        dsel_tokenize::Truncation::KeepCompletion
    );
    let long_prompt = ex("p", &[("user", "a very long prompt that does not fit at all in forty tokens, not even close, because it goes on and on"), ("assistant", "x")]);
    assert_eq!(
        encode(&tok, &fmt, &long_prompt, &cfg).unwrap_err(),
        Skip::NoLabelsAfterTruncation
    );
    // Keeping the completion: the prompt loses its start instead, BOS stays,
    // the answer is whole, and the example fills the window exactly.
    let keep = TokenizeConfig {
        truncation: dsel_tokenize::Truncation::KeepCompletion,
        ..cfg.clone()
    };
    let kept = encode(&tok, &fmt, &long_prompt, &keep).unwrap();
    assert!(kept.truncated);
    assert_eq!(kept.ids.len(), 40);
    assert_eq!(kept.ids[0], 1, "BOS kept");
    let full = encode(
        &tok,
        &fmt,
        &long_prompt,
        &TokenizeConfig {
            max_len: 4096,
            ..cfg.clone()
        },
    )
    .unwrap();
    let n_labels = full.labels.iter().filter(|&&l| l == 1).count();
    assert_eq!(kept.labels.iter().filter(|&&l| l == 1).count(), n_labels);
    assert_eq!(
        kept.ids[40 - n_labels..],
        full.ids[full.ids.len() - n_labels..],
        "the completion (and its end) is intact"
    );
    assert_eq!(kept.ids[1..], full.ids[full.ids.len() - 39..]);
    let no_answer = ex("n", &[("user", "hello")]);
    assert_eq!(
        encode(&tok, &fmt, &no_answer, &cfg).unwrap_err(),
        Skip::NoLabels
    );
    let fits = ex(
        "f",
        &[
            ("user", "hi"),
            (
                "assistant",
                "a long answer that will be cut somewhere in the middle of all these many words",
            ),
        ],
    );
    let enc = encode(&tok, &fmt, &fits, &cfg).unwrap();
    assert!(enc.truncated && enc.ids.len() == 40);

    let dir = tempfile::tempdir().unwrap();
    let report = tokenize_to_dir(
        &tok,
        &fmt,
        &[long_prompt, fits.clone(), no_answer],
        &cfg,
        dir.path(),
    )
    .unwrap();
    assert_eq!(
        (report.examples_in, report.examples_out, report.truncated),
        (3, 1, 1)
    );
    assert_eq!(report.skipped.get("no_labels"), Some(&1));
    assert_eq!(report.skipped.get("no_labels_after_truncation"), Some(&1));
    let set = TokenizedSet::open(dir.path()).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.index[0].id, "f");
    assert_eq!(set.index[0].row, 1);
    let (ids, labels) = set.example(0);
    assert_eq!(ids, enc.ids.as_slice());
    assert_eq!(labels, enc.labels.as_slice());
}

#[test]
fn chatml_labels_decode_exactly_with_the_smollm2_tokenizer() {
    let gguf = dsel_testkit::smollm2_gguf();
    if !gguf.exists() {
        eprintln!(
            "SKIP: {} not present (make model fetches it)",
            gguf.display()
        );
        return;
    }
    let raw = dsel_model::load(&gguf, &candle_core::Device::Cpu).unwrap();
    let tok = raw.tokenizer.clone().unwrap();
    let fmt = Formatter::new(ChatFormat::Template {
        template: raw.chat_template.clone().unwrap(),
        bos_token: raw.bos_token.clone().unwrap_or_default(),
        eos_token: raw.eos_token.clone().unwrap_or_default(),
    })
    .unwrap();
    let cfg = TokenizeConfig {
        max_len: 4096,
        bos_id: None,
        truncation: Default::default(),
    };
    let e = ex(
        "c",
        &[
            ("user", "What is 2+2?"),
            ("assistant", "It is 4."),
            ("user", "And 3+3?"),
            ("assistant", "It is 6, déjà vu."),
        ],
    );
    let enc = encode(&tok, &fmt, &e, &cfg).unwrap();
    assert_eq!(
        label_text(&tok, &enc.ids, &enc.labels),
        vec!["It is 4.<|im_end|>\n", "It is 6, déjà vu.<|im_end|>\n"]
    );
    let all = tok.decode(&enc.ids, false).unwrap();
    assert!(all.starts_with("<|im_start|>system\n"), "{all}");
}
