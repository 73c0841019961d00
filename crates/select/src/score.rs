//! Per-example scores computed from per-token log-probabilities.
//!
//! All functions take flat arrays laid out as the tokenized set: token `t` of
//! example `i` lives at `offsets[i] + t`, and `mask` is 1 on label tokens.

use serde::{Deserialize, Serialize};

/// The per-token transform `F` of ToV (ALGORITHMS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Transform {
    /// `F(Δ) = Δ`: the score is the drop of the mean loss.
    #[default]
    Identity,
    /// `F(Δ) = |Δ|`.
    Abs,
    /// `F(Δ) = max(Δ, 0)`.
    Relu,
}

impl Transform {
    /// Apply the transform to one per-token change.
    pub fn apply(self, d: f64) -> f64 {
        match self {
            Transform::Identity => d,
            Transform::Abs => d.abs(),
            Transform::Relu => d.max(0.0),
        }
    }
}

fn per_example(mask: &[u8], offsets: &[u64], mut token: impl FnMut(usize) -> f64) -> Vec<f64> {
    offsets
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0] as usize, w[1] as usize);
            let mut sum = 0.0;
            let mut n = 0usize;
            for (off, &m) in mask[a..b].iter().enumerate() {
                if m == 1 {
                    sum += token(a + off);
                    n += 1;
                }
            }
            if n == 0 {
                f64::NAN
            } else {
                sum / n as f64
            }
        })
        .collect()
}

/// One ToV round: `φ(x) = (1/T) Σ_t F(log p_val(y_t) − log p_bas(y_t))` over label
/// tokens. Positive with `Identity` means the validation fine-tune lowered the
/// example's loss; larger is better.
pub fn tov_round(
    logp_val: &[f32],
    logp_bas: &[f32],
    mask: &[u8],
    offsets: &[u64],
    f: Transform,
) -> Vec<f64> {
    per_example(mask, offsets, |t| {
        f.apply(logp_val[t] as f64 - logp_bas[t] as f64)
    })
}

/// Max-Uncertainty: `ψ(x) = (1/T) Σ_t log[p_t (1 − p_t)]`, `p_t` the probability
/// of the true token. Larger means more uncertain.
pub fn max_uncertainty(logp: &[f32], mask: &[u8], offsets: &[u64]) -> Vec<f64> {
    per_example(mask, offsets, |t| {
        let lp = logp[t] as f64;
        // log(1 − p) computed stably from log p.
        let log1m = if lp > -std::f64::consts::LN_2 {
            (-lp.exp_m1()).ln()
        } else {
            (-lp.exp()).ln_1p()
        };
        lp + log1m
    })
}

/// Completion-only mean loss `−(1/T) Σ_t log p_t`.
pub fn mean_loss(logp: &[f32], mask: &[u8], offsets: &[u64]) -> Vec<f64> {
    per_example(mask, offsets, |t| -(logp[t] as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tov_round_by_hand() {
        // Two examples: [t0 t1 t2] and [t3 t4]; labels on t1, t2 and t4.
        let offsets = [0u64, 3, 5];
        let mask = [0u8, 1, 1, 0, 1];
        let bas = [-9.0f32, -2.0, -1.0, -9.0, -0.5];
        let val = [0.0f32, -1.0, -1.5, 0.0, -0.25];
        let id = tov_round(&val, &bas, &mask, &offsets, Transform::Identity);
        assert!((id[0] - 0.25).abs() < 1e-12 && (id[1] - 0.25).abs() < 1e-12);
        let abs = tov_round(&val, &bas, &mask, &offsets, Transform::Abs);
        assert!((abs[0] - 0.75).abs() < 1e-12);
        let relu = tov_round(&val, &bas, &mask, &offsets, Transform::Relu);
        assert!((relu[0] - 0.5).abs() < 1e-12);
        // Identity equals the drop of the mean loss.
        let drop: Vec<f64> = mean_loss(&bas, &mask, &offsets)
            .iter()
            .zip(mean_loss(&val, &mask, &offsets))
            .map(|(b, v)| b - v)
            .collect();
        assert!((drop[0] - id[0]).abs() < 1e-12 && (drop[1] - id[1]).abs() < 1e-12);
    }

    #[test]
    fn uncertainty_peaks_at_one_half() {
        let offsets = [0u64, 2, 4, 6];
        let mask = [0u8, 1, 0, 1, 0, 1];
        let lp = |p: f64| p.ln() as f32;
        let logp = [0.0, lp(0.5), 0.0, lp(0.99), 0.0, lp(0.01)];
        let psi = max_uncertainty(&logp, &mask, &offsets);
        let expect = |p: f64| (p * (1.0 - p)).ln();
        for (i, p) in [0.5, 0.99, 0.01].into_iter().enumerate() {
            assert!(
                (psi[i] - expect(p)).abs() < 1e-5,
                "{i}: {} vs {}",
                psi[i],
                expect(p)
            );
        }
        assert!(psi[0] > psi[1] && psi[0] > psi[2]);
    }

    #[test]
    fn example_without_labels_is_nan() {
        let s = mean_loss(&[0.0, -1.0], &[0, 0], &[0, 2]);
        assert!(s[0].is_nan());
    }
}
