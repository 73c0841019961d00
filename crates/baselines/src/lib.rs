//! `dsel-baselines`: text-only selection baselines.
//!
//! * [`Bm25`]: Okapi BM25 (k1 = 1.2, b = 0.75, Lucene's non-negative IDF) of
//!   each pool document against each target example used as a query; a pool
//!   example's score is its best match over the target examples.
//! * [`Dsir`]: DSIR (Xie et al. 2023): hashed unigram + bigram features
//!   (10k buckets by default), a bag-of-n-grams model fitted on the target and
//!   one on the pool (add-one smoothing), importance weight
//!   `log p_target(x) − log p_pool(x)`, and importance resampling without
//!   replacement via the Gumbel-top-k trick (seeded).
//!
//! Text is lower-cased and split into runs of alphanumeric characters.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;

/// Lower-cased alphanumeric words of `text`.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// A BM25 index over pool documents.
pub struct Bm25 {
    docs: Vec<HashMap<String, u32>>,
    lengths: Vec<f64>,
    avg_len: f64,
    df: HashMap<String, u32>,
    k1: f64,
    b: f64,
}

impl Bm25 {
    /// Index `docs` with the standard parameters (k1 = 1.2, b = 0.75).
    pub fn new<S: AsRef<str> + Sync>(docs: &[S]) -> Self {
        let docs: Vec<HashMap<String, u32>> = docs
            .par_iter()
            .map(|d| {
                let mut tf = HashMap::new();
                for w in words(d.as_ref()) {
                    *tf.entry(w).or_insert(0) += 1;
                }
                tf
            })
            .collect();
        let lengths: Vec<f64> = docs
            .iter()
            .map(|d| d.values().sum::<u32>() as f64)
            .collect();
        let avg_len = lengths.iter().sum::<f64>() / lengths.len().max(1) as f64;
        let mut df = HashMap::new();
        for d in &docs {
            for w in d.keys() {
                *df.entry(w.clone()).or_insert(0) += 1;
            }
        }
        Self {
            docs,
            lengths,
            avg_len: avg_len.max(1e-9),
            df,
            k1: 1.2,
            b: 0.75,
        }
    }

    fn idf(&self, w: &str) -> f64 {
        let n = self.docs.len() as f64;
        let df = *self.df.get(w).unwrap_or(&0) as f64;
        ((n - df + 0.5) / (df + 0.5) + 1.0).ln()
    }

    /// BM25 score of every document for one query.
    pub fn scores(&self, query: &str) -> Vec<f64> {
        let q = words(query);
        // Query terms in sorted order, so every call sums a document's terms
        // in the same order: a HashMap's order differs between maps and
        // processes, and with it the last bits of the score.
        let terms: Vec<(String, f64)> = {
            let mut seen = std::collections::BTreeMap::new();
            for w in q {
                *seen.entry(w).or_insert(0u32) += 1;
            }
            seen.into_iter()
                .map(|(w, c)| (w.clone(), self.idf(&w) * c as f64))
                .collect()
        };
        self.docs
            .par_iter()
            .zip(&self.lengths)
            .map(|(d, &len)| {
                terms
                    .iter()
                    .map(|(w, idf)| {
                        let tf = *d.get(w).unwrap_or(&0) as f64;
                        if tf == 0.0 {
                            0.0
                        } else {
                            idf * tf * (self.k1 + 1.0)
                                / (tf + self.k1 * (1.0 - self.b + self.b * len / self.avg_len))
                        }
                    })
                    .sum()
            })
            .collect()
    }

    /// Each document's best score over `queries`.
    pub fn max_scores<S: AsRef<str>>(&self, queries: &[S]) -> Vec<f64> {
        let mut best = vec![f64::NEG_INFINITY; self.docs.len()];
        for q in queries {
            for (b, s) in best.iter_mut().zip(self.scores(q.as_ref())) {
                *b = b.max(s);
            }
        }
        best
    }
}

/// Hashed unigram + bigram features of `text` into `buckets` buckets.
pub fn hashed_ngrams(text: &str, buckets: usize) -> Vec<u32> {
    let w = words(text);
    let h = |s: &str| -> u32 {
        let d = blake3::hash(s.as_bytes());
        (u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes")) % buckets as u64) as u32
    };
    let mut out: Vec<u32> = w.iter().map(|x| h(x)).collect();
    out.extend(w.windows(2).map(|p| h(&format!("{} {}", p[0], p[1]))));
    out
}

/// DSIR importance weights and resampling.
pub struct Dsir {
    log_target: Vec<f64>,
    log_pool: Vec<f64>,
    buckets: usize,
}

fn fit(features: &[Vec<u32>], buckets: usize) -> Vec<f64> {
    let mut counts = vec![1.0f64; buckets]; // add-one smoothing
    for f in features {
        for &b in f {
            counts[b as usize] += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    counts.iter().map(|c| (c / total).ln()).collect()
}

impl Dsir {
    /// Fit the target and pool n-gram models.
    pub fn fit<S: AsRef<str> + Sync>(target: &[S], pool: &[S], buckets: usize) -> Self {
        let ft: Vec<Vec<u32>> = target
            .par_iter()
            .map(|t| hashed_ngrams(t.as_ref(), buckets))
            .collect();
        let fp: Vec<Vec<u32>> = pool
            .par_iter()
            .map(|t| hashed_ngrams(t.as_ref(), buckets))
            .collect();
        Self {
            log_target: fit(&ft, buckets),
            log_pool: fit(&fp, buckets),
            buckets,
        }
    }

    /// `log p_target(x) − log p_pool(x)` for each text.
    pub fn log_weights<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<f64> {
        texts
            .par_iter()
            .map(|t| {
                hashed_ngrams(t.as_ref(), self.buckets)
                    .iter()
                    .map(|&b| self.log_target[b as usize] - self.log_pool[b as usize])
                    .sum()
            })
            .collect()
    }
}

/// Importance resampling without replacement: `n` indices drawn with
/// probability ∝ exp(log_w) by the Gumbel-top-k trick (seeded); returned in
/// draw order (largest perturbed weight first).
pub fn importance_resample(log_w: &[f64], n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut keyed: Vec<(f64, usize)> = log_w
        .iter()
        .enumerate()
        .map(|(i, &lw)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (lw - (-u.ln()).ln(), i)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().take(n).map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bm25_scores_are_the_same_bits_on_every_call() {
        let docs: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    "the cat {i} sat on a mat near a dog and a bird number {}",
                    i * 7
                )
            })
            .collect();
        let index = Bm25::new(&docs);
        let query = "a cat and a dog sat near the bird on the mat by number 14 and 21 and 35";
        let first = index.scores(query);
        for _ in 0..20 {
            let again = index.scores(query);
            let same = first
                .iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{first:?}\nvs\n{again:?}");
        }
    }

    #[test]
    fn bm25_ranks_the_exact_lexical_match_first() {
        let pool = [
            "the cat sat on the mat",
            "photosynthesis converts light into chemical energy in plants",
            "a dog barked at the mailman",
            "plants need water",
        ];
        let bm = Bm25::new(&pool);
        let s = bm.max_scores(&["How do plants turn light into chemical energy? photosynthesis"]);
        let best = (0..pool.len())
            .max_by(|&a, &b| s[a].total_cmp(&s[b]))
            .unwrap();
        assert_eq!(best, 1);
        assert!(s[0] == 0.0 && s[2] == 0.0 && s[3] > 0.0);
        // Hand check of one term: idf(photosynthesis) with N=4, df=1.
        let idf = ((4.0 - 1.0 + 0.5) / (1.0 + 0.5) + 1.0f64).ln();
        let len = 8.0;
        let avg = (6.0 + 8.0 + 6.0 + 3.0) / 4.0;
        let expect = idf * 1.0 * 2.2 / (1.0 + 1.2 * (1.0 - 0.75 + 0.75 * len / avg));
        let only = bm.scores("photosynthesis");
        assert!((only[1] - expect).abs() < 1e-12, "{} vs {expect}", only[1]);
    }

    #[test]
    fn dsir_prefers_target_like_ngrams() {
        let target = [
            "solve the equation for x",
            "solve for x in the equation",
            "the equation has one solution x",
        ];
        let pool = [
            "the movie was great and the actors were fun",
            "solve the equation 2x + 3 = 7 for x",
            "i liked the food at the restaurant",
            "the weather today is sunny",
        ];
        let d = Dsir::fit(&target, &pool, 10_000);
        let w = d.log_weights(&pool);
        let best = (0..pool.len())
            .max_by(|&a, &b| w[a].total_cmp(&w[b]))
            .unwrap();
        assert_eq!(best, 1, "{w:?}");
        // Resampling concentrates on high weights and is seeded.
        let mut hits = 0;
        for seed in 0..200 {
            if importance_resample(&w, 1, seed)[0] == 1 {
                hits += 1;
            }
        }
        assert!(hits > 150, "{hits}");
        assert_eq!(importance_resample(&w, 3, 5), importance_resample(&w, 3, 5));
        let all = importance_resample(&w, 4, 9);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
    }
}
