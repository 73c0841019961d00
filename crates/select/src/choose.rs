//! Turning scores into a selection: budgets, top-n, equal-count length bins,
//! Score+Random. Every choice is deterministic: ties break by candidate
//! position, randomness comes from an explicit seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How many examples to select.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// An absolute number of examples.
    Count(usize),
    /// A fraction of the pool in (0, 1].
    Fraction(f64),
}

impl Budget {
    /// The number of examples asked for from a pool of `pool` candidates,
    /// before any cap: a count as given, a fraction rounded to the nearest
    /// example (at least 1 for a non-empty pool).
    pub fn requested(self, pool: usize) -> usize {
        match self {
            Budget::Count(n) => n,
            Budget::Fraction(f) => ((f * pool as f64).round() as usize).max(1.min(pool)),
        }
    }

    /// The number of examples for a pool of `pool` candidates (at least 1, at
    /// most `pool`). A method that can select fewer (ToV scores only the
    /// candidates outside U) caps it further; callers compare the selection's
    /// size with [`Budget::requested`] and warn.
    pub fn resolve(self, pool: usize) -> usize {
        self.requested(pool).clamp(1.min(pool), pool)
    }
}

impl std::fmt::Display for Budget {
    /// `500` for a count, `5%` for a fraction (the spelling the CLI takes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Fraction(x) => {
                let pct = x * 100.0;
                // Shortest spelling that reads back as the same fraction.
                let short = format!("{}", (pct * 1e6).round() / 1e6);
                write!(f, "{short}%")
            }
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = String;
    /// `"500"` → 500 examples; `"0.05"` or `"5%"` → 5% of the pool.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!("invalid budget {s:?}: expected a count (500), a fraction (0.05) or a percentage (5%)")
        };
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if v > 100.0 && v.is_finite() {
                return Err(format!(
                    "budget {s:?} is over 100% of the pool: a percentage must be in (0, 100]"
                ));
            }
            if !(v > 0.0 && v <= 100.0) {
                return Err(bad());
            }
            return Ok(Budget::Fraction(v / 100.0));
        }
        if let Ok(n) = s.parse::<usize>() {
            return if n > 0 {
                Ok(Budget::Count(n))
            } else {
                Err(bad())
            };
        }
        let v: f64 = s.parse().map_err(|_| bad())?;
        if v > 0.0 && v <= 1.0 {
            Ok(Budget::Fraction(v))
        } else if v > 1.0 && v.is_finite() {
            Err(format!(
                "budget {s:?} is a fraction over 1: a fraction must be in (0, 1]; write a count as a whole number (500) or a percentage as 5%"
            ))
        } else {
            Err(bad())
        }
    }
}

/// Descending score order of `candidates`; NaN scores sort last and ties keep
/// candidate order.
pub fn rank(scores: &[f64], candidates: &[usize]) -> Vec<usize> {
    let key = |i: usize| {
        if scores[i].is_nan() {
            f64::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    let mut order = candidates.to_vec();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order
}

/// The `n` best candidates, best first.
pub fn top_n(scores: &[f64], candidates: &[usize], n: usize) -> Vec<usize> {
    let mut r = rank(scores, candidates);
    r.truncate(n);
    r
}

/// `n` candidates uniformly at random (seeded), in sampled order.
pub fn random_n(candidates: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut c = candidates.to_vec();
    c.shuffle(&mut rng);
    c.truncate(n);
    c
}

/// Split `candidates` into `n_bins` equal-count bins by length (quantiles):
/// candidates are sorted by (length, position) and cut into consecutive runs
/// whose sizes differ by at most one. Returns the bins, shortest first.
pub fn length_bins(lengths: &[u32], candidates: &[usize], n_bins: usize) -> Vec<Vec<usize>> {
    let n_bins = n_bins.max(1).min(candidates.len().max(1));
    let mut sorted = candidates.to_vec();
    sorted.sort_by_key(|&i| (lengths[i], i));
    let (base, extra) = (sorted.len() / n_bins, sorted.len() % n_bins);
    let mut bins = Vec::with_capacity(n_bins);
    let mut start = 0;
    for b in 0..n_bins {
        let size = base + usize::from(b < extra);
        bins.push(sorted[start..start + size].to_vec());
        start += size;
    }
    bins
}

/// Length-bias-corrected top-n: the same number of top scores from each of
/// `n_bins` equal-count length bins (the remainder goes to the first bins;
/// a bin too small to fill its share passes the rest to the best leftover
/// scores overall). Returned best first by score.
pub fn binned_top(
    scores: &[f64],
    lengths: &[u32],
    candidates: &[usize],
    n: usize,
    n_bins: usize,
) -> Vec<usize> {
    let n = n.min(candidates.len());
    let bins = length_bins(lengths, candidates, n_bins);
    let (base, extra) = (n / bins.len(), n % bins.len());
    let mut chosen = Vec::with_capacity(n);
    let mut leftovers = Vec::new();
    for (b, bin) in bins.iter().enumerate() {
        let quota = base + usize::from(b < extra);
        let ranked = rank(scores, bin);
        let take = quota.min(ranked.len());
        chosen.extend_from_slice(&ranked[..take]);
        leftovers.extend_from_slice(&ranked[take..]);
    }
    let missing = n - chosen.len();
    chosen.extend(top_n(scores, &leftovers, missing));
    rank(scores, &chosen)
}

/// ToV's "Score+Random" (paper default): half of `n` from [`binned_top`] over
/// `scored`, the other half uniformly at random from `random_pool` (ToV: the
/// base-training subset U). When `random_pool` is smaller than its half, all
/// of it is taken and the scored half grows to fill `n`. Scored picks come
/// first (best first), then the random ones.
pub fn score_plus_random(
    scores: &[f64],
    lengths: &[u32],
    scored: &[usize],
    random_pool: &[usize],
    n: usize,
    n_bins: usize,
    seed: u64,
) -> Vec<usize> {
    let n_random = (n / 2).min(random_pool.len());
    let n_scored = (n - n_random).min(scored.len());
    let mut out = binned_top(scores, lengths, scored, n_scored, n_bins);
    out.extend(random_n(random_pool, n_random, seed));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parsing_and_resolution() {
        assert_eq!("500".parse::<Budget>().unwrap(), Budget::Count(500));
        assert_eq!("5%".parse::<Budget>().unwrap(), Budget::Fraction(0.05));
        assert_eq!("0.1".parse::<Budget>().unwrap(), Budget::Fraction(0.1));
        assert!(
            "0".parse::<Budget>().is_err()
                && "1.5".parse::<Budget>().is_err()
                && "x".parse::<Budget>().is_err()
        );
        assert_eq!(Budget::Fraction(0.05).resolve(1000), 50);
        assert_eq!(Budget::Count(5000).resolve(1000), 1000);
    }

    #[test]
    fn quantile_bins_have_equal_counts() {
        let lengths: Vec<u32> = (0..103).map(|i| ((i * 37) % 50) as u32).collect();
        let cands: Vec<usize> = (0..103).collect();
        let bins = length_bins(&lengths, &cands, 10);
        assert_eq!(bins.len(), 10);
        let sizes: Vec<usize> = bins.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), 103);
        // Bins are ordered by length: every length in bin b ≤ every length in bin b+1.
        for w in bins.windows(2) {
            let max_a = w[0].iter().map(|&i| lengths[i]).max().unwrap();
            let min_b = w[1].iter().map(|&i| lengths[i]).min().unwrap();
            assert!(max_a <= min_b);
        }
    }

    #[test]
    fn binned_top_corrects_length_bias() {
        // Scores grow with length: plain top-n takes only long examples,
        // the binned version takes from every bin.
        let lengths: Vec<u32> = (0..100).map(|i| i as u32).collect();
        let scores: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let cands: Vec<usize> = (0..100).collect();
        let plain = top_n(&scores, &cands, 10);
        assert!(plain.iter().all(|&i| i >= 90));
        let binned = binned_top(&scores, &lengths, &cands, 10, 10);
        let mut bins_hit: Vec<usize> = binned.iter().map(|&i| i / 10).collect();
        bins_hit.sort();
        assert_eq!(bins_hit, (0..10).collect::<Vec<_>>());
        // Within a bin the best score wins.
        assert!(binned.contains(&9) && binned.contains(&99));
    }

    #[test]
    fn ties_and_nans_are_deterministic() {
        let scores = [1.0, f64::NAN, 1.0, 2.0];
        assert_eq!(rank(&scores, &[0, 1, 2, 3]), vec![3, 0, 2, 1]);
    }

    #[test]
    fn score_plus_random_halves_and_seed() {
        let lengths = vec![1u32; 40];
        let scores: Vec<f64> = (0..40).map(|i| i as f64).collect();
        let scored: Vec<usize> = (0..30).collect();
        let pool: Vec<usize> = (30..40).collect();
        let a = score_plus_random(&scores, &lengths, &scored, &pool, 10, 1, 7);
        assert_eq!(&a[..5], &[29, 28, 27, 26, 25]);
        assert!(a[5..].iter().all(|i| pool.contains(i)));
        assert_eq!(
            a,
            score_plus_random(&scores, &lengths, &scored, &pool, 10, 1, 7)
        );
        let b = score_plus_random(&scores, &lengths, &scored, &pool, 10, 1, 8);
        assert_ne!(a[5..], b[5..]);
        // Random pool smaller than its half: the scored half grows.
        let c = score_plus_random(&scores, &lengths, &scored, &pool[..2], 10, 1, 7);
        assert_eq!(c.len(), 10);
        assert_eq!(&c[..8], &[29, 28, 27, 26, 25, 24, 23, 22]);
        let mut tail = c[8..].to_vec();
        tail.sort();
        assert_eq!(tail, vec![30, 31], "all of the small random pool is taken");
    }

    #[test]
    fn score_plus_random_takes_the_binned_top_then_the_seeded_draw() {
        // 60 scored candidates in 3 length bins (lengths 0..20, 20..40, 40..60)
        // with scores unrelated to length; U = 60..80.
        let n = 80;
        let lengths: Vec<u32> = (0..n).map(|i| (i % 60) as u32).collect();
        let scores: Vec<f64> = (0..n).map(|i| ((i * 37) % 61) as f64).collect();
        let scored: Vec<usize> = (0..60).collect();
        let u: Vec<usize> = (60..80).collect();
        let got = score_plus_random(&scores, &lengths, &scored, &u, 12, 3, 5);
        assert_eq!(got.len(), 12);
        // First half, computed independently: the 2 best of each bin, then
        // the whole half sorted by score (best first).
        let mut expect: Vec<usize> = Vec::new();
        for b in 0..3 {
            let mut bin: Vec<usize> = (b * 20..(b + 1) * 20).collect();
            bin.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
            expect.extend_from_slice(&bin[..2]);
        }
        expect.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        assert_eq!(&got[..6], &expect[..]);
        // Second half: exactly the seeded uniform draw of 6 from U.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut draw = u.clone();
        draw.shuffle(&mut rng);
        assert_eq!(&got[6..], &draw[..6]);
        assert!(got[6..].iter().all(|i| u.contains(i)));
        assert!(got[..6].iter().all(|i| !u.contains(i)));
    }

    #[test]
    fn budget_display_reads_back_and_over_range_budgets_explain_themselves() {
        for b in ["5%", "500", "12.5%", "100%"] {
            let parsed: Budget = b.parse().unwrap();
            assert_eq!(parsed.to_string(), b);
            assert_eq!(parsed.to_string().parse::<Budget>().unwrap(), parsed);
        }
        assert_eq!(Budget::Fraction(0.05).to_string(), "5%");
        let e = "150%".parse::<Budget>().unwrap_err();
        assert!(e.contains("over 100%"), "{e}");
        let e = "1.5".parse::<Budget>().unwrap_err();
        assert!(e.contains("fraction over 1"), "{e}");
        assert_eq!(Budget::Count(50).requested(10), 50);
        assert_eq!(Budget::Count(50).resolve(10), 10);
        assert_eq!(Budget::Fraction(0.001).requested(10), 1);
    }
}
