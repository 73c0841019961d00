//! UDS on a real model (stories260K) with the shipped defaults: the
//! embedding has the scale of the reference's FFT projection (checked
//! against an independent implementation of it), the diversity term is of
//! the order of the utility, a duplicate of a buffered example is not kept
//! again, and the keep ratio.

mod common;

use candle_core::DType;
use dsel_model::rng::{hash_words, unit_f64};
use dsel_model::{Mode, Model};
use dsel_online::{
    KeepRatio, OnlineRunConfig, OnlineSelector, SelectorConfig, SelectorKind, Uds,
    REFERENCE_PAD_ROWS,
};

/// `(token ids, label mask)` examples.
type Examples = Vec<(Vec<u32>, Vec<u8>)>;

/// stories260K (f32, as shipped) and the first eight stories.
fn stories() -> (Model, Examples) {
    let raw = common::stories_raw(DType::F32);
    let mut ex = common::stories_examples(&raw);
    ex.truncate(8);
    (Model::new(&raw).unwrap(), ex)
}

fn pick(ex: &[(Vec<u32>, Vec<u8>)], rows: &[usize]) -> Vec<(Vec<u32>, Vec<u8>)> {
    rows.iter().map(|&i| ex[i].clone()).collect()
}

/// The shipped UDS configuration, as a `Uds` (its `features` are public).
fn default_uds(seed: u64) -> (Uds, f64, KeepRatio) {
    let SelectorConfig::Uds {
        alpha,
        proj_rows,
        proj_dim,
        buffer,
        keep,
    } = SelectorConfig::default_for(SelectorKind::Uds)
    else {
        unreachable!()
    };
    (
        Uds::new(alpha, proj_rows, proj_dim, buffer, seed).unwrap(),
        alpha,
        keep,
    )
}

/// `k` of a default UDS run with `b` candidates.
fn default_k(b: usize) -> usize {
    let mut c = OnlineRunConfig::new(
        SelectorConfig::default_for(SelectorKind::Uds),
        common::lora(2, 0.0, &["q"], 0),
    );
    c.candidates = b;
    c.k()
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The reference's `FastJLProjector.project` (gfyddha/UDS), written out
/// with explicit cosine sums in f64: `l` (`rows × v`, row-major) zero-padded
/// to `t_pad` rows; random signs `d2 [v]`, real part of the unnormalised
/// DFT along the vocabulary at `r2` random frequencies, `× sqrt(v / r2)`;
/// then signs `d1 [t_pad]`, real DFT along the rows at `r1` random
/// frequencies, `× sqrt(t_pad / r1)`. Returns `r1 · r2` numbers.
fn reference_projection(
    l: &[f64],
    rows: usize,
    v: usize,
    t_pad: usize,
    r1: usize,
    r2: usize,
    seed: u64,
) -> Vec<f64> {
    let sign = |tag: u64, i: usize| {
        if hash_words(seed, &[tag, i as u64]) & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    };
    let idx = |tag: u64, j: usize, n: usize| {
        ((unit_f64(hash_words(seed, &[tag, j as u64])) * n as f64) as usize).min(n - 1)
    };
    let d2: Vec<f64> = (0..v).map(|i| sign(1, i)).collect();
    let d1: Vec<f64> = (0..t_pad).map(|i| sign(2, i)).collect();
    let idx2: Vec<usize> = (0..r2).map(|j| idx(3, j, v)).collect();
    let idx1: Vec<usize> = (0..r1).map(|j| idx(4, j, t_pad)).collect();
    let tau = 2.0 * std::f64::consts::PI;
    // Right: y[t][j] = sqrt(v/r2) Σ_c l[t][c] d2[c] cos(2π idx2[j] c / v); padded rows give 0.
    let mut y = vec![0.0f64; rows * r2];
    for (j, &f) in idx2.iter().enumerate() {
        let cs: Vec<f64> = (0..v)
            .map(|c| d2[c] * (tau * ((f * c) % v) as f64 / v as f64).cos())
            .collect();
        for t in 0..rows {
            y[t * r2 + j] =
                (v as f64 / r2 as f64).sqrt() * (0..v).map(|c| l[t * v + c] * cs[c]).sum::<f64>();
        }
    }
    // Left: z[a][j] = sqrt(t_pad/r1) Σ_t d1[t] y[t][j] cos(2π idx1[a] t / t_pad).
    let mut z = vec![0.0f64; r1 * r2];
    for (a, &f) in idx1.iter().enumerate() {
        for j in 0..r2 {
            let s: f64 = (0..rows)
                .map(|t| {
                    d1[t] * y[t * r2 + j] * (tau * ((f * t) % t_pad) as f64 / t_pad as f64).cos()
                })
                .sum();
            z[a * r2 + j] = (t_pad as f64 / r1 as f64).sqrt() * s;
        }
    }
    z
}

/// The squared distances between the stories' embeddings average what the
/// reference projection gives (both over 4 seeds of each projection), and
/// the norms are `sqrt(V·512)/2 · ‖L‖_F` on average. The embedding
/// normalised to `‖L‖_F` (the old scale) is 256× too small here (V = 512).
#[test]
fn uds_embedding_has_the_reference_projection_scale() {
    let (m, ex) = stories();
    let b = common::batch(&ex);
    let logits = m
        .logits(&b, Mode::Eval)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let v = logits.dim(2).unwrap();
    assert_eq!(v, 512);
    let ls: Vec<Vec<f64>> = ex
        .iter()
        .enumerate()
        .map(|(i, (ids, _))| {
            let li = logits.get(i).unwrap().narrow(0, 0, ids.len()).unwrap();
            li.flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect();
    let n = ex.len();
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    let (mut ours_d2, mut ref_d2, mut ours_n2, mut want_n2) = (0.0, 0.0, 0.0, 0.0);
    for seed in 0..4u64 {
        let (mut uds, _, _) = default_uds(seed);
        let (_, z) = uds.features(&m, &b).unwrap();
        assert_eq!(z[0].len(), 1024);
        let zr: Vec<Vec<f64>> = ex
            .iter()
            .zip(&ls)
            .map(|((ids, _), l)| {
                reference_projection(l, ids.len(), v, REFERENCE_PAD_ROWS, 8, 128, 100 + seed)
            })
            .collect();
        for &(i, j) in &pairs {
            ours_d2 += dist(&z[i], &z[j]).powi(2);
            ref_d2 += zr[i]
                .iter()
                .zip(&zr[j])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>();
        }
        for (zi, l) in z.iter().zip(&ls) {
            ours_n2 += zi.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            want_n2 += (v * REFERENCE_PAD_ROWS) as f64 / 4.0 * l.iter().map(|x| x * x).sum::<f64>();
        }
    }
    let dist_ratio = (ours_d2 / ref_d2).sqrt();
    let norm_ratio = (ours_n2 / want_n2).sqrt();
    eprintln!("distance ratio ours/reference {dist_ratio:.3}, norm ratio ours/(sqrt(V·512)/2·‖L‖_F) {norm_ratio:.3}");
    assert!(
        (0.8..1.25).contains(&dist_ratio),
        "embedding distances are {dist_ratio}× the reference projection's"
    );
    assert!(
        (0.8..1.25).contains(&norm_ratio),
        "embedding norms are {norm_ratio}× sqrt(V·512)/2·‖L‖_F"
    );
}

/// On a real batch the weighted diversity `α v` is of the order of the
/// utility `u`, in size and in its spread over the candidates (which is
/// what reorders them); it was ~0.05% of it with the embedding normalised
/// to ‖L‖_F.
#[test]
fn uds_utility_and_diversity_terms_are_of_the_same_order() {
    let (m, ex) = stories();
    let (mut uds, alpha, _) = default_uds(0);
    let ctx = common::select_context(0, 0, 0.0);
    let k = default_k(4);
    assert_eq!(k, 1);
    // Two steps of four candidates fill the buffer with two embeddings.
    uds.select(&m, &common::batch(&pick(&ex, &[0, 1, 2, 3])), k, &ctx)
        .unwrap();
    uds.select(&m, &common::batch(&pick(&ex, &[4, 5, 6, 7])), k, &ctx)
        .unwrap();
    assert_eq!(uds.buffer().len(), 2);
    let b = common::batch(&ex);
    let (u, z) = uds.features(&m, &b).unwrap();
    let s = uds.select(&m, &b, 2, &ctx).unwrap();
    let div: Vec<f64> = s.scores.iter().zip(&u).map(|(s, u)| s - u).collect();
    assert!(div.iter().all(|&d| d >= 0.0), "{div:?}");
    let mean_u = u.iter().sum::<f64>() / u.len() as f64;
    let mean_div = div.iter().sum::<f64>() / div.len() as f64;
    let nonzero = div.iter().filter(|&&d| d > 0.0).count();
    assert!(nonzero >= ex.len() - 2, "{div:?}");
    let ratio = mean_div / mean_u;
    let spread = |x: &[f64]| {
        x.iter().cloned().fold(f64::MIN, f64::max) - x.iter().cloned().fold(f64::MAX, f64::min)
    };
    let spread_ratio = spread(&div) / spread(&u);
    eprintln!(
        "utility: mean {mean_u:.1}, range {:.1}; α·diversity: mean {mean_div:.1}, range {:.1} (α = {alpha}); mean ratio {ratio:.3}, range ratio {spread_ratio:.3}; |z| ≈ {:.0}",
        spread(&u),
        spread(&div),
        z.iter()
            .map(|v| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt())
            .sum::<f64>()
            / z.len() as f64
    );
    // Measured: mean 0.11, range 0.22 (V = 512; both grow as sqrt(V)).
    // With the embedding normalised to ‖L‖_F both were 256× smaller.
    assert!(
        (0.05..20.0).contains(&ratio),
        "α·diversity is {ratio}× the utility"
    );
    assert!(
        (0.1..10.0).contains(&spread_ratio),
        "α·diversity varies {spread_ratio}× as much as the utility"
    );
}

/// The buffer holds example X (kept at the first step as the highest
/// utility); a later batch of eight holding X twice keeps 2 (1 of 4) and
/// keeps no copy of X: its distance to the buffer is 0, the others' is not.
/// With the old scale both copies were kept (top utility).
#[test]
fn uds_does_not_keep_a_duplicate_of_a_buffered_example() {
    let (m, ex) = stories();
    let (mut uds, alpha, _) = default_uds(3);
    let ctx = common::select_context(0, 0, 0.0);
    let first = pick(&ex, &[0, 1, 2, 7]);
    let (u1, _) = uds.features(&m, &common::batch(&first)).unwrap();
    let s1 = uds
        .select(&m, &common::batch(&first), default_k(4), &ctx)
        .unwrap();
    assert_eq!(s1.chosen, vec![3], "the highest utility {u1:?}");
    assert_eq!(uds.buffer().len(), 1);
    let rows = [7, 3, 4, 7, 5, 6, 1, 2];
    let second = pick(&ex, &rows);
    let b2 = common::batch(&second);
    let (u2, z2) = uds.features(&m, &b2).unwrap();
    // X still has the highest utility of the batch: only diversity can drop it.
    let best_u = dsel_online::top_k(&u2, 1)[0];
    assert_eq!(rows[best_u], 7, "{u2:?}");
    let k = default_k(8);
    assert_eq!(k, 2);
    let s2 = uds.select(&m, &b2, k, &ctx).unwrap();
    // Independent scores: u + α · distance to the one buffered embedding (X's).
    let zx = &z2[0];
    for i in 0..rows.len() {
        let want = u2[i] + alpha * dist(&z2[i], zx);
        assert!(
            (s2.scores[i] - want).abs() <= 1e-6 * want,
            "{i}: {} vs {want}",
            s2.scores[i]
        );
    }
    let copies = s2.chosen.iter().filter(|&&c| rows[c] == 7).count();
    assert!(
        copies < 2,
        "both copies of the buffered example kept: {s2:?}"
    );
    assert_eq!(copies, 0, "{:?} scores {:?}", s2.chosen, s2.scores);
}

#[test]
fn uds_keep_ratio_is_an_option_with_the_reference_default() {
    assert_eq!(KeepRatio::REFERENCE, KeepRatio { kept: 1, of: 4 });
    assert_eq!(default_k(4), 1);
    assert_eq!(default_k(8), 2);
    assert_eq!(default_k(6), 1);
    assert_eq!(default_k(2), 1);
    let r: KeepRatio = "1/8".parse().unwrap();
    assert_eq!(r, KeepRatio { kept: 1, of: 8 });
    assert_eq!(r.to_string(), "1/8");
    assert_eq!(r.k(16), 2);
    for bad in ["0/4", "5/4", "1/0", "1", "a/4", "1/4/2"] {
        assert!(bad.parse::<KeepRatio>().is_err(), "{bad}");
    }
    let mut sel = SelectorConfig::default_for(SelectorKind::Uds);
    sel.set_uds_keep("1/2".parse().unwrap());
    let mut c = OnlineRunConfig::new(sel, common::lora(2, 0.0, &["q"], 0));
    c.candidates = 8;
    assert_eq!(c.k(), 4);
    c.k = Some(3);
    assert_eq!(c.k(), 3, "an explicit k wins");
    // Other selectors keep half and ignore the setter.
    let mut g = SelectorConfig::default_for(SelectorKind::Greats);
    g.set_uds_keep(KeepRatio::REFERENCE);
    assert_eq!(g, SelectorConfig::default_for(SelectorKind::Greats));
    assert_eq!(g.default_k(8), 4);
    // An invalid ratio in a config is rejected before the run.
    let mut bad = SelectorConfig::default_for(SelectorKind::Uds);
    if let SelectorConfig::Uds { keep, .. } = &mut bad {
        *keep = KeepRatio { kept: 0, of: 4 };
    }
    let c = OnlineRunConfig::new(bad.clone(), common::lora(2, 0.0, &["q"], 0));
    assert!(c.validate().is_err());
    assert!(bad.build(0, Vec::new()).is_err());
}
