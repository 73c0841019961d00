//! Evaluators against hand computations on a tiny random Llama with the real
//! stories260K tokenizer and real MMLU / BBH / TyDiQA test prompts.

use candle_core::{DType, Device, IndexOp};
use dsel_eval::*;
use dsel_ingest::{load_target_test, Example, Message, TargetSpec, TaskName};
use dsel_model::{Batch, LlamaConfig, Mode, Model};
use dsel_tokenize::ChatFormat;
use tokenizers::Tokenizer;

use dsel_testkit::data_root;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(data_root().join("models/stories260K/hf/tokenizer.json")).unwrap()
}

/// A tiny random Llama over the stories260K vocabulary (512), seeded.
fn tiny_model(seed: u64) -> Model {
    let cfg = LlamaConfig {
        vocab_size: 512,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    };
    let scales = dsel_model::random::WeightScales {
        projection: 0.3,
        norm: 0.1,
        ..Default::default()
    };
    let raw = dsel_model::random::random_weights_with(&cfg, seed, DType::F32, scales);
    Model::new(&raw).unwrap()
}

fn tulu_encoder() -> PromptEncoder {
    PromptEncoder::new(
        tokenizer(),
        ChatFormat::Tulu {
            eos_token: "</s>".into(),
        },
        Some(1),
        vec![2],
    )
    .unwrap()
}

fn tok(text: &str) -> Vec<u32> {
    tokenizer()
        .encode_fast(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn test_examples(task: TaskName, cap: usize) -> Vec<Example> {
    load_target_test(&TargetSpec::Named(task), &data_root(), Some(cap), 7)
        .unwrap()
        .0
}

/// log p(cand | prompt) by hand: logits of the whole row, log-softmax in f64.
fn hand_logprob(model: &Model, prompt: &[u32], cand: &[u32]) -> f64 {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(cand);
    let mask = vec![0u8; ids.len()];
    let batch = Batch::new(&[(&ids, &mask)], &Device::Cpu).unwrap();
    let logits = model.logits(&batch, Mode::Eval).unwrap();
    let mut total = 0.0;
    for (t, &c) in cand.iter().enumerate() {
        let row: Vec<f32> = logits
            .i((0, prompt.len() - 1 + t))
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += row[c as usize] as f64 - lse;
    }
    total
}

#[test]
fn prompt_ids_are_the_tulu_generation_prompt_plus_prefix() {
    let enc = tulu_encoder();
    let msgs = vec![Message {
        role: "user".into(),
        content: "  What is 2+2?\n".into(),
    }];
    let got = enc.prompt(&msgs, "The answer is:").unwrap();
    let mut want = vec![1];
    want.extend(tok("<|user|>\nWhat is 2+2?\n<|assistant|>\n"));
    want.extend(tok("The answer is:"));
    assert_eq!(got, want);
    assert_eq!(
        enc.prompt(&msgs, "").unwrap(),
        want[..want.len() - tok("The answer is:").len()]
    );
    // A conversation that already ends with the assistant is refused.
    let mut done = msgs.clone();
    done.push(Message {
        role: "assistant".into(),
        content: "4".into(),
    });
    assert!(enc.prompt(&done, "").is_err());
}

#[test]
fn prompt_ids_follow_a_chat_template() {
    let chatml = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let enc = PromptEncoder::new(
        tokenizer(),
        ChatFormat::Template {
            template: chatml.into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        },
        None,
        vec![2],
    )
    .unwrap();
    let msgs = vec![Message {
        role: "user".into(),
        content: "Hi there".into(),
    }];
    let got = enc.prompt(&msgs, "").unwrap();
    assert_eq!(
        got,
        tok("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[test]
fn mmlu_letter_scores_match_a_hand_computation() {
    let model = tiny_model(3);
    let enc = tulu_encoder();
    // Two questions from each of the first subjects' real test sets.
    let exs: Vec<Example> = test_examples(TaskName::Mmlu, 2)
        .into_iter()
        .take(6)
        .collect();
    assert_eq!(exs.len(), 6);
    for opts in [
        MmluOptions {
            shots: Some(1),
            batch_tokens: 700,
            ..MmluOptions::less()
        },
        MmluOptions {
            shots: Some(0),
            batch_tokens: 700,
            ..MmluOptions::direct()
        },
    ] {
        let cands: Vec<Vec<u32>> = opts.choices.iter().map(|c| tok(c)).collect();
        let items = evaluate_mmlu(&model, &enc, &exs, &opts).unwrap();
        assert_eq!(items.len(), exs.len());
        for (ex, it) in exs.iter().zip(&items) {
            // The prompt by hand: the kept shots, tulu wrapping, prefix.
            let (user, kept) =
                mmlu_keep_shots(&ex.messages[0].content, opts.shots.unwrap()).unwrap();
            assert_eq!(it.shots, Some(kept));
            let mut prompt = vec![1];
            prompt.extend(tok(&format!("<|user|>\n{}\n<|assistant|>\n", user.trim())));
            if !opts.answer_prefix.is_empty() {
                prompt.extend(tok(&opts.answer_prefix));
            }
            assert_eq!(it.prompt_tokens, prompt.len());
            let hand: Vec<f64> = cands
                .iter()
                .map(|c| hand_logprob(&model, &prompt, c))
                .collect();
            for (a, b) in hand.iter().zip(&it.logprobs) {
                assert!((a - b).abs() < 1e-4, "{hand:?} vs {:?}", it.logprobs);
            }
            let best = (0..4).fold(0, |b, j| if hand[j] > hand[b] { j } else { b });
            assert_eq!(it.prediction, ["A", "B", "C", "D"][best]);
            assert_eq!(
                it.score,
                if ex.references[0] == it.prediction {
                    1.0
                } else {
                    0.0
                }
            );
        }
    }
}

#[test]
fn single_token_candidates_use_the_last_position_and_agree_with_full_rows() {
    let model = tiny_model(5);
    // Single-token candidates (fast path) for prompts of different lengths in one batch.
    let items: Vec<ChoiceItem> = [vec![1u32, 40, 41], vec![1, 7], vec![1, 9, 9, 9, 9, 30]]
        .into_iter()
        .map(|p| ChoiceItem {
            prompt: p,
            candidates: vec![vec![65], vec![66], vec![300]],
        })
        .collect();
    let fast = score_choices(&model, &items, 64).unwrap();
    // Same items with a two-token candidate force per-candidate rows.
    let mut slow_items = items.clone();
    for it in &mut slow_items {
        it.candidates.push(vec![70, 71]);
    }
    let slow = score_choices(&model, &slow_items, 10).unwrap();
    for ((it, f), s) in slow_items.iter().zip(&fast).zip(&slow) {
        for (j, c) in it.candidates.iter().enumerate() {
            let h = hand_logprob(&model, &it.prompt, c);
            assert!((s[j] - h).abs() < 1e-4);
            if j < 3 {
                assert!((f[j] - h).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn test_loss_matches_example_losses() {
    let model = tiny_model(11);
    let enc = tulu_encoder();
    let mut exs: Vec<Example> = test_examples(TaskName::Mmlu, 1)
        .into_iter()
        .take(2)
        .collect();
    exs.extend(test_examples(TaskName::Tydiqa, 1));
    let items = evaluate_loss(&model, &enc, &exs, true, 4096, 900).unwrap();
    assert_eq!(items.len(), exs.len());
    for (ex, it) in exs.iter().zip(&items) {
        // Independent encoding: tulu text by hand, label = completion + eos + "\n".
        let ctx = format!(
            "<|user|>\n{}\n<|assistant|>\n",
            ex.messages[0].content.trim()
        );
        let lab = format!("{}</s>\n", ex.references[0].trim());
        let mut ids = vec![1];
        ids.extend(tok(&ctx));
        let n_ctx = ids.len();
        ids.extend(tok(&lab));
        let mut mask = vec![0u8; n_ctx];
        mask.resize(ids.len(), 1);
        let batch = Batch::new(&[(&ids, &mask)], &Device::Cpu).unwrap();
        let want: Vec<f32> = model
            .example_losses(&batch, Mode::Eval)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (want[0] as f64 - it.score).abs() < 1e-4,
            "{} vs {}",
            want[0],
            it.score
        );
        assert!(it.score > 0.0);
    }
}

#[test]
fn generation_matches_generate_greedy_and_cuts_at_stop_strings() {
    let model = tiny_model(13);
    let enc = PromptEncoder::new(
        tokenizer(),
        ChatFormat::Tulu {
            eos_token: "</s>".into(),
        },
        Some(1),
        vec![], // no stop ids: run to the cap
    )
    .unwrap();
    let prompt = enc
        .prompt(
            &[Message {
                role: "user".into(),
                content: "Once upon a time".into(),
            }],
            "",
        )
        .unwrap();
    let greedy = model.generate_greedy(&prompt, 12, &[]).unwrap();
    let full = enc.decode(&greedy).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_strings: vec![],
        chunk: 5,
    };
    let (text, n) = generate(&model, &enc, &prompt, &opts, &|_| false).unwrap();
    assert_eq!((text.as_str(), n), (full.as_str(), 12));
    // A stop string taken from the middle of the text cuts there.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 4, "{full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.find(&stop).unwrap();
    let (text, _) = generate(
        &model,
        &enc,
        &prompt,
        &GenerateOptions {
            stop_strings: vec![stop.clone()],
            ..opts.clone()
        },
        &|_| false,
    )
    .unwrap();
    assert_eq!(text, full[..cut]);
    // `done` stops early at a chunk boundary.
    let (_, n) = generate(&model, &enc, &prompt, &opts, &|_| true).unwrap();
    assert_eq!(n, 5);
}

#[test]
fn bbh_and_tydiqa_items_are_scored_from_their_own_generations() {
    let model = tiny_model(17);
    let enc = tulu_encoder();
    let bbh: Vec<Example> = test_examples(TaskName::Bbh, 1)
        .into_iter()
        .take(2)
        .collect();
    let opts = BbhOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let items = evaluate_bbh(&model, &enc, &bbh, &opts).unwrap();
    for (ex, it) in bbh.iter().zip(&items) {
        let out = it.output.as_deref().unwrap();
        assert!(!out.contains("\n\n"));
        assert!(it.new_tokens.unwrap() <= 6);
        assert_eq!(it.prediction, bbh_extract_answer(out));
        assert_eq!(
            it.score,
            f64::from(u8::from(bbh_exact_match(&it.prediction, &ex.references[0])))
        );
    }
    let ty: Vec<Example> = test_examples(TaskName::Tydiqa, 1);
    assert_eq!(ty.len(), 3); // en, ko, sw gold files
    let items = evaluate_tydiqa(
        &model,
        &enc,
        &ty,
        &TydiqaOptions {
            max_new_tokens: 5,
            ..Default::default()
        },
    )
    .unwrap();
    for (ex, it) in ty.iter().zip(&items) {
        let out = it.output.as_deref().unwrap();
        assert!(!out.contains('\n'));
        assert_eq!(it.prediction, out.trim());
        let (f1, em) = squad_max_over_golds(&it.prediction, &ex.references);
        assert_eq!((it.score, it.exact_match), (f1, Some(em)));
        // The prompt ends with the language's answer label.
        let label = dsel_ingest::less_assistant_prefix(TaskName::Tydiqa, &ex.subtask).unwrap();
        let mut want = vec![1];
        want.extend(tok(&format!(
            "<|user|>\n{}\n<|assistant|>\n",
            ex.messages[0].content.trim()
        )));
        want.extend(tok(label));
        assert_eq!(it.prompt_tokens, want.len());
    }
}
