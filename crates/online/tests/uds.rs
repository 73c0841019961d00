//! UDS: nuclear norms against an independent Jacobi SVD, the FIFO buffer,
//! projections, selection.

mod common;

use candle_core::DType;
use common::*;
use dsel_model::Mode;
use dsel_online::linalg::{nuclear_norm_from_gram, symmetric_eigenvalues};
use dsel_online::{top_k, FifoBuffer, OnlineSelector, Uds};

/// Singular values of the `r × c` matrix `a` (row-major) by one-sided
/// Jacobi rotations on the columns (Hestenes): independent of the library's
/// Householder + QL eigen-solver.
fn jacobi_singular_values(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    // Work on the wider orientation's columns: use Aᵀ when c > r.
    let (m, n, mut u) = if c <= r {
        (r, c, a.to_vec())
    } else {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        (c, r, t)
    };
    // u is m × n row-major; orthogonalise its columns.
    for _sweep in 0..100 {
        let mut off = 0.0f64;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..m {
                    let (x, y) = (u[i * n + p], u[i * n + q]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for i in 0..m {
                    let (x, y) = (u[i * n + p], u[i * n + q]);
                    u[i * n + p] = cs * x - sn * y;
                    u[i * n + q] = sn * x + cs * y;
                }
            }
        }
        if off < 1e-14 {
            break;
        }
    }
    (0..n)
        .map(|j| {
            (0..m)
                .map(|i| u[i * n + j] * u[i * n + j])
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

fn rand_mat(r: usize, c: usize, seed: u64) -> Vec<f64> {
    (0..r * c)
        .map(|e| {
            4.0 * dsel_model::rng::unit_f64(dsel_model::rng::hash_words(seed, &[e as u64])) - 2.0
        })
        .collect()
}

fn gram_rows(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut g = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            g[i * r + j] = (0..c).map(|k| a[i * c + k] * a[j * c + k]).sum();
        }
    }
    g
}

fn gram_cols(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut g = vec![0.0; c * c];
    for i in 0..c {
        for j in 0..c {
            g[i * c + j] = (0..r).map(|k| a[k * c + i] * a[k * c + j]).sum();
        }
    }
    g
}

#[test]
fn nuclear_norm_equals_sum_of_jacobi_singular_values() {
    for (seed, (r, c)) in [(3, 7), (7, 3), (1, 5), (6, 6), (12, 40), (30, 9)]
        .into_iter()
        .enumerate()
    {
        let a = rand_mat(r, c, seed as u64);
        let sv: f64 = jacobi_singular_values(&a, r, c).iter().sum();
        let mut g1 = gram_rows(&a, r, c);
        let mut g2 = gram_cols(&a, r, c);
        let n1 = nuclear_norm_from_gram(&mut g1, r).unwrap();
        let n2 = nuclear_norm_from_gram(&mut g2, c).unwrap();
        assert!((n1 - sv).abs() < 1e-8 * sv, "{r}x{c}: {n1} vs {sv}");
        assert!((n2 - sv).abs() < 1e-8 * sv, "{r}x{c}: {n2} vs {sv}");
    }
    // Rank-deficient: two equal rows.
    let mut a = rand_mat(4, 6, 99);
    let row: Vec<f64> = a[0..6].to_vec();
    a[6..12].copy_from_slice(&row);
    let sv: f64 = jacobi_singular_values(&a, 4, 6).iter().sum();
    let mut g = gram_rows(&a, 4, 6);
    assert!((nuclear_norm_from_gram(&mut g, 4).unwrap() - sv).abs() < 1e-7 * sv);
}

#[test]
fn eigenvalues_of_known_matrices() {
    // diag(3, −1, 2) rotated: eigenvalues are invariant, trace and sum agree.
    let mut a = vec![2.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 5.0];
    let mut ev = symmetric_eigenvalues(&mut a, 3).unwrap();
    ev.sort_by(|x, y| x.partial_cmp(y).unwrap());
    for (x, y) in ev.iter().zip([1.0, 3.0, 5.0]) {
        assert!((x - y).abs() < 1e-12, "{ev:?}");
    }
    let mut one = vec![-4.0];
    assert_eq!(symmetric_eigenvalues(&mut one, 1).unwrap(), vec![-4.0]);
    assert!(symmetric_eigenvalues(&mut [1.0, 2.0], 2).is_err());
    assert!(symmetric_eigenvalues(&mut [f64::NAN], 1).is_err());
}

#[test]
fn fifo_buffer_drops_the_oldest() {
    let mut b = FifoBuffer::new(3).unwrap();
    assert_eq!(b.mean_distance(&[1.0, 2.0]), 0.0);
    for i in 0..5 {
        b.push(vec![i as f32, 0.0]);
    }
    assert_eq!(b.len(), 3);
    let items: Vec<f32> = b.iter().map(|v| v[0]).collect();
    assert_eq!(items, vec![2.0, 3.0, 4.0]);
    // Distances from (0, 0): 2, 3, 4 → mean 3.
    assert!((b.mean_distance(&[0.0, 0.0]) - 3.0).abs() < 1e-12);
    b.push(vec![0.0, 4.0]);
    let items: Vec<(f32, f32)> = b.iter().map(|v| (v[0], v[1])).collect();
    assert_eq!(items, vec![(3.0, 0.0), (4.0, 0.0), (0.0, 4.0)]);
    assert!(FifoBuffer::new(0).is_err());
}

/// Utility check against the model's own logits and the Jacobi SVD, for
/// `T < V` (vocab 37) and `T > V` (vocab 5).
#[test]
fn uds_utility_is_the_nuclear_norm_of_each_logits_matrix() {
    for (vocab, lo, hi) in [(37usize, 3usize, 9usize), (5, 6, 12)] {
        let m = tiny_model(vocab, DType::F64, 2, 4);
        let ex = examples(4, vocab, lo, hi, 3);
        let b = batch(&ex);
        let mut uds = Uds::new(2e-3, 2, 8, 16, 1).unwrap();
        let (u, z) = uds.features(&m, &b).unwrap();
        assert_eq!(z.len(), 4);
        assert!(z.iter().all(|v| v.len() == 8));
        let logits = m.logits(&b, Mode::Eval).unwrap();
        for (i, (ids, _)) in ex.iter().enumerate() {
            let li = logits.get(i).unwrap().narrow(0, 0, ids.len()).unwrap();
            let a: Vec<f64> = li.flatten_all().unwrap().to_vec1().unwrap();
            let sv: f64 = jacobi_singular_values(&a, ids.len(), vocab).iter().sum();
            assert!(
                (u[i] - sv).abs() < 1e-8 * sv,
                "vocab {vocab} ex {i}: {} vs {sv}",
                u[i]
            );
        }
    }
}

#[test]
fn uds_embedding_does_not_depend_on_padding_and_selection_uses_the_buffer() {
    let m = tiny_model(37, DType::F32, 2, 6);
    let ex = examples(6, 37, 3, 12, 8);
    let mut uds = Uds::new(0.5, 4, 32, 5, 9).unwrap();
    let (u_all, z_all) = uds.features(&m, &batch(&ex)).unwrap();
    let (u_one, z_one) = uds.features(&m, &batch(&ex[2..3])).unwrap();
    assert!((u_all[2] - u_one[0]).abs() < 1e-4 * u_one[0]);
    for (a, b) in z_all[2].iter().zip(&z_one[0]) {
        assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
    }
    let ctx = select_context(0, 0, 0.0);
    // Empty buffer: top-k of the utility.
    let s = uds.select(&m, &batch(&ex), 2, &ctx).unwrap();
    assert_eq!(s.chosen, top_k(&u_all, 2));
    assert_eq!(uds.buffer().len(), 2);
    // Next step: score = u + α · mean distance to the two stored embeddings.
    let s2 = uds.select(&m, &batch(&ex), 3, &ctx).unwrap();
    for i in 0..6 {
        let d: f64 = [s.chosen[0], s.chosen[1]]
            .iter()
            .map(|&j| {
                z_all[i]
                    .iter()
                    .zip(&z_all[j])
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .sum::<f64>()
            / 2.0;
        let want = u_all[i] + 0.5 * d;
        assert!(
            (s2.scores[i] - want).abs() < 1e-4 * (1.0 + want.abs()),
            "{} vs {want}",
            s2.scores[i]
        );
    }
    assert_eq!(s2.chosen, top_k(&s2.scores, 3));
    assert_eq!(uds.buffer().len(), 5);
    uds.select(&m, &batch(&ex), 1, &ctx).unwrap();
    assert_eq!(uds.buffer().len(), 5, "capacity 5");
}
