//! Per-task evaluators over test [`Example`]s (prompts in `messages`, gold
//! answers in `references`, as `dsel_ingest::load_target_test` builds them).
//!
//! Protocols (LESS's `evaluation/eval/*/run_eval.py` with `--use_chat_format`):
//!
//! * **MMLU** ([`evaluate_mmlu`]): the user turn (header, `k` shots, the
//!   question ending in `"\nAnswer:"`) is chat-formatted with the generation
//!   prompt; LESS then appends the assistant-side text `"The answer is:"`
//!   and compares the next-token probabilities of the tokens of `" A"`,
//!   `" B"`, `" C"`, `" D"` (it takes the last token of each). Here the
//!   prefix and the candidate texts are options ([`MmluOptions::less`] is
//!   exactly that; [`MmluOptions::direct`] scores `"A"`..`"D"` as the first
//!   assistant tokens, right after the generation prompt); each candidate is
//!   tokenized on its own and scored by the sum of its tokens' log-probs (a
//!   single next-token log-prob in the usual one-token case); the prediction
//!   is the argmax (first on ties). Like LESS, shots are dropped while the
//!   prompt exceeds `max_prompt_tokens` (2048). Accuracy is the mean over
//!   questions (LESS's `average_acc`).
//! * **BBH** ([`evaluate_bbh`]): greedy generation after the generation
//!   prompt (the user turn already ends with `"A: Let's think step by
//!   step."`), stopped at end of turn, at `"\n\n"` (LESS's stop sequence), once
//!   `"So the answer is …."` has appeared (the prediction can no longer
//!   change), or after `max_new_tokens` (LESS: 512; default here 128). The
//!   prediction is [`bbh_extract_answer`]; exact match ignores case and ASCII
//!   punctuation ([`bbh_exact_match`]). The task score is the mean over
//!   tasks of per-task EM (LESS's `average_exact_match`).
//! * **TyDiQA** ([`evaluate_tydiqa`]): the language's answer label (e.g.
//!   `"Answer:"`) is appended after the generation prompt as LESS does,
//!   greedy generation of at most 50 tokens cut at the first newline and
//!   stripped; F1 and EM are SQuAD v1.1's (English articles, ASCII
//!   punctuation, for every language — what LESS's `evaluate.load("squad")`
//!   does), each the max over the gold answers; the score is the mean over
//!   languages of per-language F1.
//! * **Test loss** ([`evaluate_loss`]): each prompt plus an assistant turn
//!   holding the reference ([`loss_completion`]), encoded as training encodes
//!   it; the completion-only mean NLL (the label tokens include the format's
//!   end-of-turn text, as in training).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use dsel_ingest::{Example, Message, TaskName};
use dsel_model::Model;
use serde::{Deserialize, Serialize};

use crate::metrics::{bbh_exact_match, bbh_extract_answer, bbh_find_answer, squad_max_over_golds};
use crate::prompt::PromptEncoder;
use crate::score::{completion_losses, generate, score_choices, ChoiceItem, GenerateOptions};

/// The outcome on one test example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// Example id.
    pub id: String,
    /// Subtask (MMLU subject, BBH task, TyDiQA language).
    pub subtask: String,
    /// The prediction (MMLU letter, BBH extracted answer, TyDiQA answer;
    /// empty for a loss item).
    pub prediction: String,
    /// The item's score: MMLU / BBH 1 or 0, TyDiQA F1 in [0, 1], the
    /// completion loss for [`evaluate_loss`].
    pub score: f64,
    /// TyDiQA exact match (max over golds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Raw generated text (BBH, TyDiQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Log-probability of each MMLU candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<f64>,
    /// MMLU shots kept in the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shots: Option<usize>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (BBH, TyDiQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_tokens: Option<usize>,
}

impl ItemResult {
    fn new(ex: &Example, prompt_tokens: usize) -> Self {
        ItemResult {
            id: ex.id.clone(),
            subtask: ex.subtask.clone(),
            prediction: String::new(),
            score: 0.0,
            exact_match: None,
            output: None,
            logprobs: Vec::new(),
            shots: None,
            prompt_tokens,
            new_tokens: None,
        }
    }
}

/// Mean `score` per subtask and overall: the mean over subtasks when
/// `macro_average`, else over items. Empty input gives 0.
pub fn aggregate(items: &[ItemResult], macro_average: bool) -> (f64, BTreeMap<String, f64>) {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for it in items {
        let e = sums.entry(it.subtask.clone()).or_default();
        e.0 += it.score;
        e.1 += 1;
    }
    let per: BTreeMap<String, f64> = sums
        .iter()
        .map(|(k, (s, n))| (k.clone(), s / *n as f64))
        .collect();
    let overall = if items.is_empty() {
        0.0
    } else if macro_average {
        per.values().sum::<f64>() / per.len() as f64
    } else {
        items.iter().map(|i| i.score).sum::<f64>() / items.len() as f64
    };
    (overall, per)
}

fn last_user(ex: &Example) -> Result<usize> {
    match ex.messages.last() {
        Some(m) if m.role == "user" => Ok(ex.messages.len() - 1),
        _ => bail!("example {}: the prompt must end with a user turn", ex.id),
    }
}

// ---------------------------------------------------------------- MMLU

/// MMLU scoring options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmluOptions {
    /// Shots to keep (`None`: as given, 5 for the test set; `Some(0)`: zero-shot).
    pub shots: Option<usize>,
    /// Text appended after the generation prompt before the letter.
    pub answer_prefix: String,
    /// Candidate texts for A, B, C, D (each tokenized on its own).
    pub choices: Vec<String>,
    /// Drop shots (as LESS) while the prompt is longer than this.
    pub max_prompt_tokens: Option<usize>,
    /// Padded tokens per forward batch.
    pub batch_tokens: usize,
}

impl MmluOptions {
    /// LESS's protocol: prefix `"The answer is:"`, candidates `" A"`..`" D"`, 5 shots, 2048-token prompts.
    pub fn less() -> Self {
        MmluOptions {
            shots: None,
            answer_prefix: "The answer is:".into(),
            choices: [" A", " B", " C", " D"].map(String::from).to_vec(),
            max_prompt_tokens: Some(2048),
            batch_tokens: 2048,
        }
    }

    /// The letter as the first assistant tokens: no prefix, candidates `"A"`..`"D"`.
    pub fn direct() -> Self {
        MmluOptions {
            answer_prefix: String::new(),
            choices: ["A", "B", "C", "D"].map(String::from).to_vec(),
            ..Self::less()
        }
    }
}

const SHOT_END: [&str; 4] = [
    "\nAnswer: A\n\n",
    "\nAnswer: B\n\n",
    "\nAnswer: C\n\n",
    "\nAnswer: D\n\n",
];

/// Keeps the first `k` shots of an MMLU few-shot prompt (header, shots
/// each ending `"\nAnswer: X\n\n"`, then the question). Returns the new
/// text and the number of shots kept (`min(k, shots present)`). Errors when
/// the text does not start with the MMLU header.
pub fn mmlu_keep_shots(user: &str, k: usize) -> Result<(String, usize)> {
    const HEADER: &str = "The following are multiple choice questions (with answers) about";
    if !user.starts_with(HEADER) {
        bail!("not an MMLU prompt: expected it to start with {HEADER:?}");
    }
    let header_end = user
        .find("\n\n")
        .map(|i| i + 2)
        .ok_or_else(|| anyhow!("MMLU prompt: no blank line after the header"))?;
    let mut ends = Vec::new();
    let mut pos = header_end;
    loop {
        let next = SHOT_END
            .iter()
            .filter_map(|s| user[pos..].find(s).map(|i| pos + i + s.len()))
            .min();
        match next {
            Some(e) => {
                ends.push(e);
                pos = e;
            }
            None => break,
        }
    }
    let kept = k.min(ends.len());
    let shots_end = if kept == 0 {
        header_end
    } else {
        ends[kept - 1]
    };
    let question_start = ends.last().copied().unwrap_or(header_end);
    Ok((
        format!("{}{}", &user[..shots_end], &user[question_start..]),
        kept,
    ))
}

/// MMLU accuracy items (see the module docs for the protocol). The gold
/// letter is `references[0]` (`A`..`D`).
pub fn evaluate_mmlu(
    model: &Model,
    enc: &PromptEncoder,
    examples: &[Example],
    opts: &MmluOptions,
) -> Result<Vec<ItemResult>> {
    if opts.choices.is_empty() {
        bail!("MMLU options: no choices");
    }
    let letters = ["A", "B", "C", "D", "E", "F", "G", "H"];
    let cand: Vec<Vec<u32>> = opts
        .choices
        .iter()
        .map(|c| enc.encode_text(c))
        .collect::<Result<_>>()?;
    if cand.iter().any(|c| c.is_empty()) {
        bail!("MMLU options: a choice text encodes to no tokens");
    }
    let mut items = Vec::with_capacity(examples.len());
    let mut results = Vec::with_capacity(examples.len());
    let mut golds = Vec::with_capacity(examples.len());
    for ex in examples {
        let u = last_user(ex)?;
        let gold_letter = ex
            .references
            .first()
            .map(|s| s.trim())
            .ok_or_else(|| anyhow!("example {}: no reference answer", ex.id))?;
        let gold = letters[..opts.choices.len()]
            .iter()
            .position(|l| *l == gold_letter)
            .ok_or_else(|| {
                anyhow!(
                    "example {}: reference {gold_letter:?} is not one of the {} answer letters",
                    ex.id,
                    opts.choices.len()
                )
            })?;
        let original = &ex.messages[u].content;
        // Shots present (None: not an MMLU few-shot prompt, used as given).
        let present = mmlu_keep_shots(original, usize::MAX).ok().map(|(_, n)| n);
        if present.is_none() && opts.shots.is_some() {
            bail!(
                "example {}: cannot select shots: not an MMLU few-shot prompt",
                ex.id
            );
        }
        let mut k = opts.shots.unwrap_or(usize::MAX);
        let (prompt, kept) = loop {
            let (text, kept) = match present {
                Some(_) => mmlu_keep_shots(original, k)?,
                None => (original.clone(), 0),
            };
            let mut msgs: Vec<Message> = ex.messages.clone();
            msgs[u].content = text;
            let p = enc.prompt(&msgs, &opts.answer_prefix)?;
            match opts.max_prompt_tokens {
                Some(max) if p.len() > max && kept > 0 => k = kept - 1,
                _ => break (p, kept),
            }
        };
        let mut r = ItemResult::new(ex, prompt.len());
        r.shots = Some(kept);
        results.push(r);
        golds.push(gold);
        items.push(ChoiceItem {
            prompt,
            candidates: cand.clone(),
        });
    }
    let scores = score_choices(model, &items, opts.batch_tokens)?;
    for ((r, lp), gold) in results.iter_mut().zip(scores).zip(golds) {
        let mut best = 0;
        for (j, v) in lp.iter().enumerate() {
            if *v > lp[best] {
                best = j;
            }
        }
        r.prediction = letters[best].to_string();
        r.score = f64::from(u8::from(best == gold));
        r.logprobs = lp;
    }
    Ok(results)
}

// ---------------------------------------------------------------- BBH

/// BBH generation options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BbhOptions {
    /// Cap on generated tokens (LESS: 512).
    pub max_new_tokens: usize,
    /// Text stops (LESS: `"\n\n"`).
    pub stop_strings: Vec<String>,
    /// Text appended after the generation prompt (empty: the user turn
    /// already ends with `"A: Let's think step by step."`).
    pub assistant_prefix: String,
    /// Tokens per generation call between text checks.
    pub chunk: usize,
}

impl Default for BbhOptions {
    fn default() -> Self {
        BbhOptions {
            max_new_tokens: 128,
            stop_strings: vec!["\n\n".into()],
            assistant_prefix: String::new(),
            chunk: 8,
        }
    }
}

/// BBH exact-match items (see the module docs); the target is `references[0]`.
pub fn evaluate_bbh(
    model: &Model,
    enc: &PromptEncoder,
    examples: &[Example],
    opts: &BbhOptions,
) -> Result<Vec<ItemResult>> {
    let gen = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop_strings: opts.stop_strings.clone(),
        chunk: opts.chunk,
    };
    let mut out = Vec::with_capacity(examples.len());
    let mut progress = dsel_progress::Progress::new("eval: bbh", examples.len() as u64, "ex");
    for (i, ex) in examples.iter().enumerate() {
        progress.set_position(i as u64);
        last_user(ex)?;
        let target = ex
            .references
            .first()
            .ok_or_else(|| anyhow!("example {}: no reference answer", ex.id))?;
        let prompt = enc.prompt(&ex.messages, &opts.assistant_prefix)?;
        let (text, n) = generate(model, enc, &prompt, &gen, &|t| bbh_find_answer(t).is_some())?;
        let pred = bbh_extract_answer(&text);
        let mut r = ItemResult::new(ex, prompt.len());
        r.score = f64::from(u8::from(bbh_exact_match(&pred, target)));
        r.prediction = pred;
        r.output = Some(text);
        r.new_tokens = Some(n);
        tracing::debug!(
            "bbh {}/{}: {} → {:?}",
            i + 1,
            examples.len(),
            ex.id,
            r.prediction
        );
        out.push(r);
    }
    progress.finish();
    Ok(out)
}

// ---------------------------------------------------------------- TyDiQA

/// TyDiQA generation options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TydiqaOptions {
    /// Cap on generated tokens (LESS: 50).
    pub max_new_tokens: usize,
    /// Append the language's answer label (e.g. `"Answer:"`) after the
    /// generation prompt, as LESS does.
    pub answer_label: bool,
    /// Tokens per generation call between text checks.
    pub chunk: usize,
}

impl Default for TydiqaOptions {
    fn default() -> Self {
        TydiqaOptions {
            max_new_tokens: 50,
            answer_label: true,
            chunk: 8,
        }
    }
}

/// TyDiQA F1 items (EM in `exact_match`); golds are all `references`.
pub fn evaluate_tydiqa(
    model: &Model,
    enc: &PromptEncoder,
    examples: &[Example],
    opts: &TydiqaOptions,
) -> Result<Vec<ItemResult>> {
    let gen = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        stop_strings: vec!["\n".into()],
        chunk: opts.chunk,
    };
    let mut out = Vec::with_capacity(examples.len());
    let mut progress = dsel_progress::Progress::new("eval: tydiqa", examples.len() as u64, "ex");
    for (i, ex) in examples.iter().enumerate() {
        progress.set_position(i as u64);
        last_user(ex)?;
        if ex.references.is_empty() {
            bail!("example {}: no reference answer", ex.id);
        }
        let prefix = if opts.answer_label {
            dsel_ingest::less_assistant_prefix(TaskName::Tydiqa, &ex.subtask).ok_or_else(|| {
                anyhow!(
                    "example {}: unknown TyDiQA language {:?} (no answer label)",
                    ex.id,
                    ex.subtask
                )
            })?
        } else {
            ""
        };
        let prompt = enc.prompt(&ex.messages, prefix)?;
        let (text, n) = generate(model, enc, &prompt, &gen, &|_| false)?;
        let pred = text.trim().to_string();
        let (f1, em) = squad_max_over_golds(&pred, &ex.references);
        let mut r = ItemResult::new(ex, prompt.len());
        r.prediction = pred;
        r.score = f1;
        r.exact_match = Some(em);
        r.output = Some(text);
        r.new_tokens = Some(n);
        out.push(r);
    }
    progress.finish();
    Ok(out)
}

// ---------------------------------------------------------------- loss

/// The completion scored by the test loss: `references[0]`, with a leading
/// space added when `leading_space` and it does not start with whitespace
/// (the named tasks' validation completions are `" " + answer`).
pub fn loss_completion(ex: &Example, leading_space: bool) -> Option<String> {
    let r = ex.references.first()?;
    Some(if leading_space && !r.starts_with(char::is_whitespace) {
        format!(" {r}")
    } else {
        r.clone()
    })
}

/// Completion-only test loss items (`score` = the example's mean NLL over
/// its label tokens). Examples without a reference, or whose completion is
/// cut away by `max_len`, are left out (the caller sees fewer items).
pub fn evaluate_loss(
    model: &Model,
    enc: &PromptEncoder,
    examples: &[Example],
    leading_space: bool,
    max_len: usize,
    batch_tokens: usize,
) -> Result<Vec<ItemResult>> {
    let mut seqs = Vec::with_capacity(examples.len());
    let mut kept = Vec::with_capacity(examples.len());
    for ex in examples {
        let Some(c) = loss_completion(ex, leading_space) else {
            tracing::warn!("example {}: no reference, left out of the test loss", ex.id);
            continue;
        };
        match enc.completion(&ex.messages, &c, max_len) {
            Ok(s) => {
                kept.push(ItemResult::new(ex, s.0.len()));
                seqs.push(s);
            }
            Err(e) => tracing::warn!("example {}: left out of the test loss: {e:#}", ex.id),
        }
    }
    let losses = completion_losses(model, &seqs, batch_tokens)?;
    for (r, l) in kept.iter_mut().zip(losses) {
        r.score = l;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt3() -> String {
        "The following are multiple choice questions (with answers) about  x.\n\n\
         Q1\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n\
         Q2\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n\
         Q3\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n\
         QT\nA. a\nB. b\nC. c\nD. d\nAnswer:"
            .to_string()
    }

    #[test]
    fn shots_are_kept_or_stripped() {
        let p = prompt3();
        let (t, k) = mmlu_keep_shots(&p, 0).unwrap();
        assert_eq!(k, 0);
        assert_eq!(
            t,
            "The following are multiple choice questions (with answers) about  x.\n\nQT\nA. a\nB. b\nC. c\nD. d\nAnswer:"
        );
        let (t, k) = mmlu_keep_shots(&p, 1).unwrap();
        assert_eq!(k, 1);
        assert!(t.contains("Q1\n") && !t.contains("Q2\n") && !t.contains("Q3\n"));
        assert!(t.ends_with("QT\nA. a\nB. b\nC. c\nD. d\nAnswer:"));
        let (t, k) = mmlu_keep_shots(&p, 9).unwrap();
        assert_eq!((t.as_str(), k), (p.as_str(), 3));
        assert!(mmlu_keep_shots("Hello", 0).is_err());
    }

    #[test]
    fn aggregate_micro_and_macro() {
        let mk = |s: &str, v: f64| ItemResult {
            score: v,
            ..ItemResult::new(
                &Example {
                    subtask: s.into(),
                    ..Default::default()
                },
                1,
            )
        };
        let items = vec![mk("a", 1.0), mk("a", 0.0), mk("a", 1.0), mk("b", 0.0)];
        let (micro, per) = aggregate(&items, false);
        assert!((micro - 0.5).abs() < 1e-12);
        assert!((per["a"] - 2.0 / 3.0).abs() < 1e-12);
        let (mac, _) = aggregate(&items, true);
        assert!((mac - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(aggregate(&[], true).0, 0.0);
    }

    #[test]
    fn loss_completion_spacing() {
        let ex = Example {
            references: vec!["B".into()],
            ..Default::default()
        };
        assert_eq!(loss_completion(&ex, true).unwrap(), " B");
        assert_eq!(loss_completion(&ex, false).unwrap(), "B");
        assert!(loss_completion(&Example::default(), true).is_none());
    }
}
