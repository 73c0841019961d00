//! Model-side scoring: candidate continuations, completion losses, greedy
//! generation with text stops.

use anyhow::{bail, Context, Result};
use candle_core::{DType, IndexOp};
use dsel_model::{Batch, Model};

use crate::prompt::PromptEncoder;

/// One multiple-choice question: a prompt and the token ids of each
/// candidate continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChoiceItem {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Candidate continuations (each non-empty).
    pub candidates: Vec<Vec<u32>>,
}

/// Row indices longest first, in batches of at most `batch_tokens` padded
/// tokens (at least one row each).
fn plan_batches(lengths: &[usize], batch_tokens: usize) -> Vec<Vec<usize>> {
    dsel_model::plan_token_batches(
        lengths,
        &dsel_model::longest_first(lengths),
        batch_tokens,
        usize::MAX,
    )
}

fn log_softmax_at(logits: &[f32], ids: &[u32]) -> Result<Vec<f64>> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    ids.iter()
        .map(|&id| {
            logits
                .get(id as usize)
                .map(|&x| x as f64 - lse)
                .with_context(|| format!("candidate token {id} outside the vocabulary"))
        })
        .collect()
}

/// Log-probability of every candidate of every item:
/// `Σ_t log p(cand[t] | prompt, cand[<t])`, in Eval mode.
///
/// When every candidate of every item is a single token, each question is
/// one row and all its candidates are read from the next-token distribution
/// at the prompt's last position (one forward for several questions).
/// Otherwise each (question, candidate) pair is a row and the candidate's
/// token log-probs are summed. Rows are batched by padded token count
/// (`batch_tokens`).
pub fn score_choices(
    model: &Model,
    items: &[ChoiceItem],
    batch_tokens: usize,
) -> Result<Vec<Vec<f64>>> {
    for (i, it) in items.iter().enumerate() {
        if it.prompt.is_empty() {
            bail!("score_choices: item {i} has an empty prompt");
        }
        if it.candidates.is_empty() || it.candidates.iter().any(|c| c.is_empty()) {
            bail!("score_choices: item {i} has no candidates or an empty candidate");
        }
    }
    let single = items
        .iter()
        .all(|it| it.candidates.iter().all(|c| c.len() == 1));
    let dev = model.device();
    let mut out: Vec<Vec<f64>> = items
        .iter()
        .map(|it| vec![0.0; it.candidates.len()])
        .collect();
    if single {
        let lengths: Vec<usize> = items.iter().map(|it| it.prompt.len()).collect();
        let mut progress =
            dsel_progress::Progress::new("eval: choice scores", items.len() as u64, "questions");
        for rows in plan_batches(&lengths, batch_tokens) {
            let masks: Vec<Vec<u8>> = rows.iter().map(|&r| vec![0u8; lengths[r]]).collect();
            let seqs: Vec<(&[u32], &[u8])> = rows
                .iter()
                .zip(&masks)
                .map(|(&r, m)| (items[r].prompt.as_slice(), m.as_slice()))
                .collect();
            let batch = Batch::new(&seqs, dev)?;
            let logits = model.logits_inference(&batch)?;
            for (b, &r) in rows.iter().enumerate() {
                let last = logits
                    .i((b, lengths[r] - 1))?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let ids: Vec<u32> = items[r].candidates.iter().map(|c| c[0]).collect();
                out[r] = log_softmax_at(&last, &ids)?;
            }
            progress.inc(rows.len() as u64);
        }
        progress.finish();
    } else {
        let mut rows_seq: Vec<(usize, usize, Vec<u32>, Vec<u8>)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            for (j, c) in it.candidates.iter().enumerate() {
                let mut ids = it.prompt.clone();
                ids.extend_from_slice(c);
                let mut mask = vec![0u8; it.prompt.len()];
                mask.extend(std::iter::repeat_n(1u8, c.len()));
                rows_seq.push((i, j, ids, mask));
            }
        }
        let lengths: Vec<usize> = rows_seq.iter().map(|r| r.2.len()).collect();
        let mut progress =
            dsel_progress::Progress::new("eval: choice scores", rows_seq.len() as u64, "choices");
        for rows in plan_batches(&lengths, batch_tokens) {
            let seqs: Vec<(&[u32], &[u8])> = rows
                .iter()
                .map(|&r| (rows_seq[r].2.as_slice(), rows_seq[r].3.as_slice()))
                .collect();
            let batch = Batch::new(&seqs, dev)?;
            let lp = model
                .token_logprobs_inference(&batch)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            for (b, &r) in rows.iter().enumerate() {
                let (i, j, _, mask) = &rows_seq[r];
                out[*i][*j] = lp[b]
                    .iter()
                    .zip(mask)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&v, _)| v)
                    .sum();
            }
            progress.inc(rows.len() as u64);
        }
        progress.finish();
    }
    Ok(out)
}

/// Completion-only mean NLL of each `(ids, label mask)` sequence (label
/// byte 1 = scored; position 0 never counts; a sequence without labels gets
/// 0), in Eval mode without autograd; the same values as
/// [`Model::example_losses`].
pub fn completion_losses(
    model: &Model,
    seqs: &[(Vec<u32>, Vec<u8>)],
    batch_tokens: usize,
) -> Result<Vec<f64>> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.0.len()).collect();
    let mut out = vec![0.0; seqs.len()];
    let mut progress = dsel_progress::Progress::new("eval: losses", seqs.len() as u64, "ex");
    for rows in plan_batches(&lengths, batch_tokens) {
        let refs: Vec<(&[u32], &[u8])> = rows
            .iter()
            .map(|&r| (seqs[r].0.as_slice(), seqs[r].1.as_slice()))
            .collect();
        let batch = Batch::new(&refs, model.device())?;
        let lp = model
            .token_logprobs_inference(&batch)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        for (b, &r) in rows.iter().enumerate() {
            let mask = &seqs[r].1;
            let (mut num, mut den) = (0.0, 0.0);
            for (t, &m) in mask.iter().enumerate().skip(1) {
                if m != 0 {
                    num += lp[b][t];
                    den += 1.0;
                }
            }
            out[r] = if den > 0.0 { -num / den } else { 0.0 };
        }
        progress.inc(rows.len() as u64);
    }
    progress.finish();
    Ok(out)
}

/// How a greedy generation stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Cap on new tokens.
    pub max_new_tokens: usize,
    /// The text is cut at the first occurrence of any of these (e.g. `"\n"`).
    pub stop_strings: Vec<String>,
    /// Tokens generated per call of [`Model::generate_greedy`] between text
    /// checks (it recomputes the prefix anyway, so this only bounds the
    /// tokens wasted after a text stop).
    pub chunk: usize,
}

/// Greedy generation after `prompt`: stops at the encoder's stop ids
/// (not included in the text), at the first stop string (the text is cut
/// there), when `done(text)` says the answer is settled, or after
/// `max_new_tokens`. Returns the generated text and the number of tokens
/// generated.
pub fn generate(
    model: &Model,
    enc: &PromptEncoder,
    prompt: &[u32],
    opts: &GenerateOptions,
    done: &dyn Fn(&str) -> bool,
) -> Result<(String, usize)> {
    let mut ids = prompt.to_vec();
    let mut new: Vec<u32> = Vec::new();
    let chunk = opts.chunk.max(1);
    let mut text = String::new();
    while new.len() < opts.max_new_tokens {
        let n = chunk.min(opts.max_new_tokens - new.len());
        let got = model.generate_greedy(&ids, n, enc.stop_ids())?;
        if got.is_empty() {
            break;
        }
        ids.extend_from_slice(&got);
        new.extend_from_slice(&got);
        let stopped = new.last().is_some_and(|t| enc.stop_ids().contains(t));
        let body = if stopped {
            &new[..new.len() - 1]
        } else {
            &new[..]
        };
        text = enc.decode(body)?;
        if let Some(cut) = opts
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            break;
        }
        if stopped || done(&text) {
            break;
        }
    }
    Ok((text, new.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_token_budget_and_cover_every_row() {
        let lengths = [5, 1, 9, 3, 3, 7];
        let b = plan_batches(&lengths, 12);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
        for rows in &b {
            let m = rows.iter().map(|&r| lengths[r]).max().unwrap();
            assert!(rows.len() == 1 || m * rows.len() <= 12, "{rows:?}");
        }
        // A row longer than the budget still gets its own batch.
        assert_eq!(plan_batches(&[20], 4), vec![vec![0]]);
    }
}
