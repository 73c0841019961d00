//! Right-padded token batches and forward modes.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No dropout.
    Eval,
    /// LoRA dropout on, with masks derived deterministically from
    /// `dropout_seed`, the LoRA module and the (example row, position,
    /// feature) coordinates — never from a thread RNG.
    Train {
        /// Seed of this step's dropout masks (e.g. derived from run seed and step).
        dropout_seed: u64,
    },
}

/// A right-padded batch of token sequences with per-token label masks.
///
/// Padding positions hold token id 0 and label 0; they never influence the
/// real positions (causal + key-padding attention mask) and are excluded
/// from every loss and log-probability.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` u32 token ids, right-padded with 0.
    pub input_ids: Tensor,
    /// `[B, T]` f32: 1 where token `t` is a label (predicted and scored).
    /// Position 0 and padding are always 0.
    pub label_mask: Tensor,
    /// Real (unpadded) length of every example, each ≥ 1.
    pub lengths: Vec<usize>,
    /// Token ids on the host, row-major `[B, T]` (padding = 0).
    ids_host: Vec<u32>,
    /// Padded length `T`.
    max_len: usize,
}

impl Batch {
    /// Builds a right-padded batch from `(token ids, label mask)` pairs on
    /// `device`. A label-mask byte is 1 (any non-zero) when the token is a
    /// label. `mask[0]` is ignored (the first token is never predicted).
    ///
    /// Errors on an empty batch, an empty sequence, or a mask whose length
    /// differs from its sequence.
    pub fn new(seqs: &[(&[u32], &[u8])], device: &Device) -> Result<Batch> {
        if seqs.is_empty() {
            bail!("Batch::new: empty batch");
        }
        for (i, (ids, mask)) in seqs.iter().enumerate() {
            if ids.is_empty() {
                bail!("Batch::new: sequence {i} is empty");
            }
            if ids.len() != mask.len() {
                bail!(
                    "Batch::new: sequence {i} has {} tokens but a label mask of length {}",
                    ids.len(),
                    mask.len()
                );
            }
        }
        let b = seqs.len();
        let t = seqs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1);
        let mut ids_host = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        let mut lengths = Vec::with_capacity(b);
        for (i, (ids, m)) in seqs.iter().enumerate() {
            ids_host[i * t..i * t + ids.len()].copy_from_slice(ids);
            for (j, &v) in m.iter().enumerate().skip(1) {
                mask[i * t + j] = if v != 0 { 1.0 } else { 0.0 };
            }
            lengths.push(ids.len());
        }
        let input_ids = Tensor::from_vec(ids_host.clone(), (b, t), device)
            .context("Batch::new: creating input_ids")?;
        let label_mask =
            Tensor::from_vec(mask, (b, t), device).context("Batch::new: creating label_mask")?;
        Ok(Batch {
            input_ids,
            label_mask,
            lengths,
            ids_host,
            max_len: t,
        })
    }

    /// Number of examples `B`.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Padded length `T`.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of example `i` without padding.
    pub fn ids(&self, i: usize) -> &[u32] {
        &self.ids_host[i * self.max_len..i * self.max_len + self.lengths[i]]
    }

    /// `[B, T]` host mask, 1.0 for real tokens at positions `1..len` (the
    /// positions that have a log-probability), 0 elsewhere.
    pub(crate) fn scored_positions(&self) -> Vec<f32> {
        let t = self.max_len;
        let mut v = vec![0f32; self.lengths.len() * t];
        for (i, &len) in self.lengths.iter().enumerate() {
            for j in 1..len {
                v[i * t + j] = 1.0;
            }
        }
        v
    }

    /// `[B, T]` host mask, 1.0 for real tokens (positions `0..len`).
    pub(crate) fn real_positions(&self) -> Vec<f32> {
        let t = self.max_len;
        let mut v = vec![0f32; self.lengths.len() * t];
        for (i, &len) in self.lengths.iter().enumerate() {
            for j in 0..len {
                v[i * t + j] = 1.0;
            }
        }
        v
    }
}

/// Groups `order` (example indices, usually sorted by decreasing length) into
/// consecutive batches for [`Batch::new`]: a batch grows while its padded size
/// (rows × its longest length) stays within `batch_tokens` and it holds at
/// most `max_rows` rows. Every batch has at least one row, so an example
/// longer than the budget gets a batch of its own. Every index of `order`
/// appears exactly once, in order.
pub fn plan_token_batches(
    lengths: &[usize],
    order: &[usize],
    batch_tokens: usize,
    max_rows: usize,
) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_max = 0usize;
    for &i in order {
        let m = cur_max.max(lengths[i]);
        if !cur.is_empty() && ((cur.len() + 1) * m > batch_tokens || cur.len() >= max_rows) {
            batches.push(std::mem::take(&mut cur));
            cur_max = 0;
        }
        cur_max = cur_max.max(lengths[i]);
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// `0..lengths.len()` sorted by decreasing length, ties by index: the order
/// that keeps padding smallest in [`plan_token_batches`].
pub fn longest_first(lengths: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod planner_tests {
    use super::*;

    #[test]
    fn batches_cover_every_index_within_both_budgets() {
        let lengths = [5, 9, 3, 9, 1, 7, 2, 8];
        let order = longest_first(&lengths);
        assert_eq!(order, vec![1, 3, 7, 5, 0, 2, 6, 4]);
        let batches = plan_token_batches(&lengths, &order, 20, 3);
        let flat: Vec<usize> = batches.iter().flatten().copied().collect();
        assert_eq!(flat, order);
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() <= 3);
            assert!(b.len() * longest <= 20 || b.len() == 1);
        }
        // 9,9 (18) | 8,7 (16) | 5,3,2 (15) | 1.
        assert_eq!(
            batches,
            vec![vec![1, 3], vec![7, 5], vec![0, 2, 6], vec![4]]
        );
        // An example over the budget gets a batch of its own.
        assert_eq!(
            plan_token_batches(&[30, 2], &[0, 1], 10, 8),
            vec![vec![0], vec![1]]
        );
    }
}
