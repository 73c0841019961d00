//! Learning-rate schedule, deterministic shuffling and batching.

use anyhow::Result;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;

/// Linear warmup then linear decay to zero, exactly Hugging Face's
/// `get_linear_schedule_with_warmup` driven by `LambdaLR`.
///
/// For the optimizer step with 0-based index `s` (the `s`-th call of
/// `optimizer.step()`, which HF's `LambdaLR` serves with `last_epoch = s`):
///
/// ```text
/// lr(s) = peak · s / max(1, W)                     if s < W
/// lr(s) = peak · max(0, (T − s) / max(1, T − W))   otherwise
/// ```
///
/// with `T = total_steps`, `W = warmup_steps`. So with warmup the first step
/// has learning rate 0, the peak is reached at `s = W`, and the last step
/// (`s = T − 1`) has `peak / (T − W)`. Arithmetic is in `f64` as in Python
/// (`float(a) / float(b)`, then `base_lr * factor`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinearSchedule {
    /// Learning rate at the end of warmup.
    pub peak_lr: f64,
    /// Number of optimizer steps `T` of the whole run.
    pub total_steps: u64,
    /// Number of warmup steps `W`.
    pub warmup_steps: u64,
    /// Constant rate: every step at `peak_lr` (no warmup, no decay). ToV's
    /// validation fine-tune uses it so every validation example is applied at
    /// the intended rate.
    #[serde(default)]
    pub constant: bool,
}

impl LinearSchedule {
    /// A schedule whose warmup is `ceil(warmup_ratio · total_steps)` steps, as
    /// HF's `TrainingArguments.get_warmup_steps` computes it
    /// (`math.ceil(num_training_steps * warmup_ratio)`, the product in `f64`).
    pub fn from_ratio(peak_lr: f64, total_steps: u64, warmup_ratio: f64) -> Self {
        let w = (total_steps as f64 * warmup_ratio).ceil();
        let warmup_steps = if w.is_finite() && w > 0.0 {
            w as u64
        } else {
            0
        };
        LinearSchedule {
            peak_lr,
            total_steps,
            warmup_steps,
            constant: false,
        }
    }

    /// A constant schedule: every one of the `total_steps` steps at `lr`.
    pub fn constant(lr: f64, total_steps: u64) -> Self {
        LinearSchedule {
            peak_lr: lr,
            total_steps,
            warmup_steps: 0,
            constant: true,
        }
    }

    /// The multiplier of the peak rate at 0-based optimizer step `step` (HF's lambda).
    pub fn factor(&self, step: u64) -> f64 {
        if self.constant {
            1.0
        } else if step < self.warmup_steps {
            step as f64 / self.warmup_steps.max(1) as f64
        } else {
            // (T − s) may be negative past the end: computed in f64 like Python ints.
            let num = self.total_steps as f64 - step as f64;
            let den = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
            (num / den).max(0.0)
        }
    }

    /// Learning rate of 0-based optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.peak_lr * self.factor(step)
    }
}

/// Builds a ChaCha20 generator from two 64-bit values and a 16-byte domain tag
/// (seed bytes 0..8 = `a` little-endian, 8..16 = `b`, 16..32 = `tag`).
fn chacha(a: u64, b: u64, tag: &[u8; 16]) -> ChaCha20Rng {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&a.to_le_bytes());
    seed[8..16].copy_from_slice(&b.to_le_bytes());
    seed[16..].copy_from_slice(tag);
    ChaCha20Rng::from_seed(seed)
}

/// Uniform integer in `0..bound` (`bound ≥ 1`) by rejection sampling, so the
/// result depends only on the generator's output stream (stable across
/// `rand` releases).
fn uniform_below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    debug_assert!(bound >= 1);
    let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
    loop {
        let r = rng.next_u64();
        if r <= zone {
            return r % bound;
        }
    }
}

/// The order in which epoch `epoch` visits examples `0..n`: a Fisher–Yates
/// shuffle (from the last position down, swapping position `i` with a
/// uniform `j ≤ i`) driven by ChaCha20 seeded from `(seed, epoch)`. The
/// result is a permutation of `0..n` that depends only on `(n, seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = chacha(seed, epoch, b"dsel-train/epoch");
    for i in (1..n).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Consecutive micro-batches of `order`, each `micro_batch` long except
/// possibly the last (which holds the remainder).
pub fn batches(order: &[usize], micro_batch: usize) -> Result<std::slice::Chunks<'_, usize>> {
    if micro_batch == 0 {
        return Err(TrainError::InvalidConfig {
            field: "micro_batch",
            reason: "must be >= 1, got 0".to_string(),
        }
        .into());
    }
    Ok(order.chunks(micro_batch))
}

/// The dropout seed handed to the loss function for micro-step `micro_step`
/// (counted over the whole run): the first output of ChaCha20 seeded from
/// `(seed, micro_step)` with a domain tag distinct from [`epoch_order`]'s.
/// Identical in an interrupted-and-resumed run and an uninterrupted one.
pub fn dropout_seed(seed: u64, micro_step: u64) -> u64 {
    chacha(seed, micro_step, b"dsel-train/dropo").next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_below_small_bounds() {
        let mut rng = chacha(1, 2, b"0123456789abcdef");
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
        assert_eq!(uniform_below(&mut rng, 1), 0);
    }
}
