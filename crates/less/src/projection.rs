//! The Rademacher random projection Π (`P × d`, entries ±1), generated
//! block-wise on the fly from a counter-based hash so it is never held in
//! memory and every shard on every machine draws the same matrix.
//!
//! Entry `(p, j)` is `−1` when bit `j mod 64` of
//! `mix64(hash_words(seed, [TAG, p]) ^ (j / 64))` is set and `+1` otherwise
//! (`mix64`, `hash_words`: [`dsel_model::rng`]). Row `p` of Π is the row of
//! LoRA parameter `p` in [`dsel_model::Model::lora_params`] order.
//!
//! [`Projector::project_accumulate`] computes `out += G · Π[p0..p0+k, :]` for
//! a batch of gradient rows: it generates `block_rows` rows of Π at a time
//! (in parallel, 64 signs per hash, expanded through a byte lookup table) and
//! multiplies each block with the whole batch of rows in one product on the
//! compute core's GEMM (strided, accumulating; f32 or bf16). The
//! generation cost is shared by every row of the batch, so large batches run
//! close to the GEMM's speed.

use anyhow::{bail, Result};
use dsel_kernels::Precision;
use dsel_model::rng::{hash_words, mix64};
use rayon::prelude::*;

/// Domain tag of the projection stream (keeps it apart from other uses of the seed).
const TAG: u64 = 0x4C45_5353_5052_4A31; // "LESSPRJ1"

/// Default rows of Π generated per GEMM call.
pub const DEFAULT_BLOCK_ROWS: usize = 512;

/// Byte → the 8 signs of its bits (bit `i` set → `-1.0` at position `i`).
fn sign_table() -> Box<[[f32; 8]; 256]> {
    let mut t = Box::new([[0f32; 8]; 256]);
    for (byte, row) in t.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = if (byte >> i) & 1 == 1 { -1.0 } else { 1.0 };
        }
    }
    t
}

/// A seeded `P × d` Rademacher projection (any `P`: rows are addressed by index).
pub struct Projector {
    seed: u64,
    d: usize,
    block_rows: usize,
    table: Box<[[f32; 8]; 256]>,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("seed", &self.seed)
            .field("d", &self.d)
            .field("block_rows", &self.block_rows)
            .finish()
    }
}

impl Projector {
    /// A projection to `d` dimensions (a positive multiple of 64) from `seed`.
    pub fn new(seed: u64, d: usize) -> Result<Self> {
        if d == 0 || !d.is_multiple_of(64) {
            bail!("LESS projection: dimension d = {d} must be a positive multiple of 64");
        }
        Ok(Self {
            seed,
            d,
            block_rows: DEFAULT_BLOCK_ROWS,
            table: sign_table(),
        })
    }

    /// Sets how many rows of Π are generated per GEMM call (≥ 1); does not
    /// change Π, only (in the last bits) the floating-point summation order.
    pub fn with_block_rows(mut self, rows: usize) -> Self {
        self.block_rows = rows.max(1);
        self
    }

    /// Output dimension `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Rows of Π per block.
    pub fn block_rows(&self) -> usize {
        self.block_rows
    }

    /// Entry `Π[p, j]` (±1), computed independently of any block (reference
    /// for tests and documentation of the layout).
    pub fn entry(&self, p: u64, j: usize) -> f32 {
        let word = mix64(hash_words(self.seed, &[TAG, p]) ^ (j / 64) as u64);
        if (word >> (j % 64)) & 1 == 1 {
            -1.0
        } else {
            1.0
        }
    }

    /// Writes rows `p0 .. p0 + rows` of Π into `out` (`rows × d`, row-major).
    pub fn fill_rows(&self, p0: u64, rows: usize, out: &mut [f32]) {
        let d = self.d;
        let table = &*self.table;
        out[..rows * d]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(r, row)| {
                let base = hash_words(self.seed, &[TAG, p0 + r as u64]);
                for (w, chunk) in row.chunks_exact_mut(64).enumerate() {
                    let bits = mix64(base ^ w as u64).to_le_bytes();
                    for (byte, dst) in bits.iter().zip(chunk.chunks_exact_mut(8)) {
                        dst.copy_from_slice(&table[*byte as usize]);
                    }
                }
            });
    }

    /// `out[b, :] += Σ_{c<k} g[b·stride + c] · Π[p0 + c, :]` for `b < rows`:
    /// the projection of columns `p0 .. p0+k` of a batch of gradient rows
    /// (`g` row-major with row stride `stride ≥ k`), accumulated into `out`
    /// (`rows × d`), at `precision`. Π is generated `block_rows` rows at a
    /// time; each block (±1, exact in bf16) meets the whole batch of rows in
    /// one product on the compute core's GEMM
    /// ([`dsel_kernels::gemm_accumulate`]).
    #[allow(clippy::too_many_arguments)]
    pub fn project_accumulate(
        &self,
        g: &[f32],
        rows: usize,
        stride: usize,
        k: usize,
        p0: u64,
        out: &mut [f32],
        precision: Precision,
    ) -> Result<()> {
        let d = self.d;
        if rows == 0 || k == 0 {
            return Ok(());
        }
        if stride < k || g.len() < (rows - 1) * stride + k || out.len() < rows * d {
            bail!(
                "LESS projection: buffer sizes do not match (rows {rows}, stride {stride}, k {k}, g {}, out {})",
                g.len(),
                out.len()
            );
        }
        let block = self.block_rows.min(k);
        let mut r = vec![0f32; block * d];
        let mut c0 = 0usize;
        while c0 < k {
            let kb = block.min(k - c0);
            self.fill_rows(p0 + c0 as u64, kb, &mut r);
            // Columns c0 .. c0+kb of every row: a strided view of g.
            let a = &g[c0..(rows - 1) * stride + c0 + kb];
            dsel_kernels::gemm_accumulate(rows, d, kb, a, stride, &r, d, out, precision)?;
            c0 += kb;
        }
        Ok(())
    }
}

/// Scales each `d`-long row of `x` to unit L2 norm (rows of norm 0 stay 0).
pub fn normalize_rows(x: &mut [f32], d: usize) {
    x.par_chunks_mut(d).for_each(|row| {
        let n = row
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_match_entries_and_signs_are_balanced() {
        let p = Projector::new(42, 128).unwrap();
        let mut rows = vec![0f32; 3 * 128];
        p.fill_rows(1000, 3, &mut rows);
        let mut plus = 0;
        for r in 0..3 {
            for j in 0..128 {
                let e = p.entry(1000 + r as u64, j);
                assert_eq!(rows[r * 128 + j], e, "row {r} col {j}");
                plus += (e > 0.0) as usize;
            }
        }
        assert!((150..235).contains(&plus), "{plus} of 384 positive");
        assert_ne!(Projector::new(43, 128).unwrap().entry(1000, 5), 0.0);
        assert!(Projector::new(1, 100).is_err());
    }

    #[test]
    fn projection_equals_naive_product_for_any_block_size() {
        let (rows, k, d) = (5usize, 300usize, 64usize);
        let g: Vec<f32> = (0..rows * (k + 7))
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let naive = {
            let p = Projector::new(9, d).unwrap();
            let mut o = vec![0f64; rows * d];
            for b in 0..rows {
                for c in 0..k {
                    let x = g[b * (k + 7) + c] as f64;
                    for j in 0..d {
                        o[b * d + j] += x * p.entry(20 + c as u64, j) as f64;
                    }
                }
            }
            o
        };
        for block in [1, 64, 77, 512] {
            let p = Projector::new(9, d).unwrap().with_block_rows(block);
            let mut out = vec![0f32; rows * d];
            p.project_accumulate(&g, rows, k + 7, k, 20, &mut out, Precision::F32)
                .unwrap();
            for (a, b) in out.iter().zip(&naive) {
                assert!((*a as f64 - b).abs() < 1e-3, "block {block}: {a} vs {b}");
            }
        }
    }
}

#[cfg(test)]
mod jl_tests {
    use super::*;

    /// Johnson–Lindenstrauss: `⟨Πx, Πy⟩ / d ≈ ⟨x, y⟩` up to `O(‖x‖‖y‖/√d)`,
    /// and norms are preserved within a few percent at d = 2048.
    #[test]
    fn projection_approximately_preserves_inner_products() {
        let (k, d) = (3000usize, 2048usize);
        let gen = |tag: u64| -> Vec<f32> {
            (0..k)
                .map(|i| (dsel_model::rng::unit_f64(hash_words(tag, &[i as u64])) - 0.5) as f32)
                .collect()
        };
        let (x, mut y) = (gen(1), gen(2));
        // Make y correlated with x (cosine ≈ 0.6).
        for (yi, xi) in y.iter_mut().zip(&x) {
            *yi = 0.8 * *yi + 0.6 * xi;
        }
        let mut g = x.clone();
        g.extend_from_slice(&y);
        let p = Projector::new(5, d).unwrap();
        let mut out = vec![0f32; 2 * d];
        p.project_accumulate(&g, 2, k, k, 0, &mut out, Precision::F32)
            .unwrap();
        let dot = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(u, v)| *u as f64 * *v as f64)
                .sum::<f64>()
        };
        let (nx, ny) = (dot(&x, &x).sqrt(), dot(&y, &y).sqrt());
        let true_cos = dot(&x, &y) / (nx * ny);
        let (px, py) = (&out[..d], &out[d..]);
        let est_cos = dot(px, py) / (dot(px, px).sqrt() * dot(py, py).sqrt());
        assert!(
            (est_cos - true_cos).abs() < 4.0 / (d as f64).sqrt(),
            "{est_cos} vs {true_cos}"
        );
        let norm_ratio = (dot(px, px) / d as f64).sqrt() / nx;
        assert!((norm_ratio - 1.0).abs() < 0.08, "norm ratio {norm_ratio}");
        assert!(true_cos > 0.5);
    }
}
