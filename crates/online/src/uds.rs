//! UDS: Utility-Diversity Sampling (arXiv 2510.16882).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use dsel_model::rng::hash_words;
use dsel_model::{Batch, Model};

use crate::linalg::nuclear_norm_from_gram;
use crate::{check_k, since, top_k, OnlineSelector, SelectContext, Selection};

/// A first-in first-out buffer of embeddings with a fixed capacity: pushing
/// into a full buffer drops the oldest entry.
#[derive(Debug, Clone)]
pub struct FifoBuffer {
    cap: usize,
    items: VecDeque<Vec<f32>>,
}

impl FifoBuffer {
    /// An empty buffer holding at most `cap` (≥ 1) embeddings.
    pub fn new(cap: usize) -> Result<Self> {
        if cap == 0 {
            bail!("FIFO buffer: capacity must be at least 1");
        }
        Ok(FifoBuffer {
            cap,
            items: VecDeque::with_capacity(cap),
        })
    }

    /// Appends `z`, evicting the oldest entry when full.
    pub fn push(&mut self, z: Vec<f32>) {
        if self.items.len() == self.cap {
            self.items.pop_front();
        }
        self.items.push_back(z);
    }

    /// Number of stored embeddings.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The stored embeddings, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Vec<f32>> {
        self.items.iter()
    }

    /// Mean Euclidean distance from `z` to the stored embeddings (0 when empty).
    pub fn mean_distance(&self, z: &[f32]) -> f64 {
        if self.items.is_empty() {
            return 0.0;
        }
        let total: f64 = self
            .items
            .iter()
            .map(|q| {
                q.iter()
                    .zip(z)
                    .map(|(&a, &b)| {
                        let d = a as f64 - b as f64;
                        d * d
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .sum();
        total / self.items.len() as f64
    }
}

/// Rows the reference pads every logits matrix to before projecting it (its
/// `max_seq_length`, 512 in its scripts). Its `α` was tuned for the norm its
/// projection has at this padding, so [`Uds`] scales its embedding to match.
pub const REFERENCE_PAD_ROWS: usize = 512;

/// The UDS selector.
///
/// Per candidate batch, one no-grad forward ([`Model::logits_inference`]);
/// for example `i` with logits `L_i` (its real positions × V):
/// * utility `u_i = ‖L_i‖_*`, from the eigenvalues of the smaller Gram
///   matrix (`L Lᵀ`, `T × T`, when `T ≤ V`), formed in f64;
/// * embedding `z_i = c · R₁ L_i R₂` with seeded ±1 matrices `R₁ [rows, T]`
///   (entry a function of seed, row and position, so it does not depend on
///   padding) and `R₂ [V, cols]` — a dense bilinear random projection to
///   `proj_dim = rows × cols` numbers — and the scale
///   `c = sqrt(V · 512) / (2 · sqrt(rows · cols))` ([`Uds::embedding_scale`]);
/// * diversity `v_i` = mean distance of `z_i` to the FIFO buffer of past
///   selected embeddings;
/// * score `u_i + α v_i`; the top `k` are chosen and their `z` pushed into
///   the buffer (in choice order).
///
/// **Why that scale.** `α` (reference 1.5e-3 to 2.5e-3, default 2e-3) only
/// means what the reference tuned it for if `z` has the reference's scale.
/// The reference (`FastJLProjector` of gfyddha/UDS) zero-pads `L` to
/// `T = 512` rows, multiplies the columns by random signs, takes the
/// *unnormalised* FFT along the vocabulary, keeps its real part at `r₂ = 128`
/// random frequencies and multiplies by `sqrt(V / r₂)`; then the same along
/// the 512 rows (`r₁ = 8`, `sqrt(T / r₁)`). Per row `x`, an unnormalised
/// FFT coefficient after random signs has `E|X_f|² = ‖x‖²` and its real part
/// half of that, so the right transform gives `r₂ · ‖x‖²/2 · V/r₂ =
/// (V/2)‖x‖²` and the left one another factor `T/2`:
/// `E‖z_ref‖² = (V·T/4) ‖L‖_F²`, i.e. `‖z_ref‖ ≈ sqrt(V·T)/2 · ‖L‖_F`
/// (about 2,500 ‖L‖_F for V = 49,152). Our dense ±1 projection has
/// `E‖R₁ L R₂‖² = rows · cols · ‖L‖_F²`, so `c` above gives `E‖z‖² =
/// (V·512/4) ‖L‖_F²`, the reference's, and with it distances between
/// embeddings (both projections preserve them the same way up to that
/// factor). An embedding normalised to `‖L‖_F` instead would shrink the
/// diversity term by `sqrt(V·512)/2` and leave UDS a top-k by nuclear norm.
/// The scale is applied in f32 after the projection (a half-precision model
/// would overflow otherwise).
pub struct Uds {
    alpha: f64,
    rows: usize,
    cols: usize,
    seed: u64,
    buffer: FifoBuffer,
    right: Option<(usize, Tensor)>,
}

impl Uds {
    /// A UDS selector: `alpha` weighs diversity; the embedding has
    /// `proj_dim` numbers in `proj_rows` rows (`proj_rows` must divide
    /// `proj_dim`); `buffer` is the FIFO capacity.
    pub fn new(
        alpha: f64,
        proj_rows: usize,
        proj_dim: usize,
        buffer: usize,
        seed: u64,
    ) -> Result<Self> {
        if !alpha.is_finite() {
            bail!("uds: alpha must be finite, got {alpha}");
        }
        if proj_rows == 0 || proj_dim == 0 || !proj_dim.is_multiple_of(proj_rows) {
            bail!("uds: proj_rows ({proj_rows}) must be positive and divide proj_dim ({proj_dim})");
        }
        Ok(Uds {
            alpha,
            rows: proj_rows,
            cols: proj_dim / proj_rows,
            seed,
            buffer: FifoBuffer::new(buffer)?,
            right: None,
        })
    }

    /// The scale `c` of the embedding `c · R₁ L R₂` for vocabulary `v` and a
    /// `rows × cols` projection: `sqrt(v · 512) / (2 · sqrt(rows · cols))`,
    /// which gives the embedding the reference projection's expected norm
    /// `sqrt(v · 512)/2 · ‖L‖_F` (see [`Uds`]).
    pub fn embedding_scale(v: usize, rows: usize, cols: usize) -> f64 {
        (v as f64 * REFERENCE_PAD_ROWS as f64).sqrt() / (2.0 * ((rows * cols) as f64).sqrt())
    }

    /// The FIFO buffer of past selected embeddings.
    pub fn buffer(&self) -> &FifoBuffer {
        &self.buffer
    }

    fn sign(h: u64) -> f32 {
        if h & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    fn right_matrix(&mut self, v: usize, m: &Model) -> Result<Tensor> {
        if let Some((vv, t)) = &self.right {
            if *vv == v && t.dtype() == m.dtype() && t.device().same_device(m.device()) {
                return Ok(t.clone());
            }
        }
        let cols = self.cols;
        let data: Vec<f32> = (0..v * cols)
            .map(|e| {
                Self::sign(hash_words(
                    self.seed,
                    &[0x5544_5352, (e / cols) as u64, (e % cols) as u64],
                ))
            })
            .collect();
        let t = Tensor::from_vec(data, (v, cols), m.device())?.to_dtype(m.dtype())?;
        self.right = Some((v, t.clone()));
        Ok(t)
    }

    /// Per-candidate `(u, z)`: nuclear norms and embeddings.
    pub fn features(&mut self, m: &Model, c: &Batch) -> Result<(Vec<f64>, Vec<Vec<f32>>)> {
        let (b, t) = (c.batch_size(), c.max_len());
        let logits = m.logits_inference(c)?; // [B, T, V]
        let v = logits.dim(2)?;
        let mut real = vec![0f32; b * t];
        for (i, &len) in c.lengths.iter().enumerate() {
            real[i * t..i * t + len].fill(1.0);
        }
        let real = Tensor::from_vec(real, (b, t, 1), m.device())?.to_dtype(logits.dtype())?;
        let l = logits.broadcast_mul(&real)?.contiguous()?;
        // Utility: nuclear norms via the smaller Gram matrix, formed in f64
        // so that rounding does not lift the small eigenvalues.
        let l64 = l.to_dtype(DType::F64)?;
        let (gram, n) = if t <= v {
            (l64.matmul(&l64.transpose(1, 2)?.contiguous()?)?, t)
        } else {
            (l64.transpose(1, 2)?.contiguous()?.matmul(&l64)?, v)
        };
        drop(l64);
        let gram: Vec<f64> = gram.flatten_all()?.to_vec1()?;
        let mut u = Vec::with_capacity(b);
        for (i, &len) in c.lengths.iter().enumerate() {
            let blk = &gram[i * n * n..(i + 1) * n * n];
            // With the T × T Gram, only the example's real positions are non-zero.
            let s = if t <= v { len } else { n };
            let mut a = vec![0f64; s * s];
            for r in 0..s {
                a[r * s..(r + 1) * s].copy_from_slice(&blk[r * n..r * n + s]);
            }
            u.push(nuclear_norm_from_gram(&mut a, s)?);
        }
        // Embeddings: R1 [rows, T] · L · R2 [V, cols].
        let rows = self.rows;
        let left: Vec<f32> = (0..rows * t)
            .map(|e| {
                Self::sign(hash_words(
                    self.seed,
                    &[0x5544_534C, (e / t) as u64, (e % t) as u64],
                ))
            })
            .collect();
        let left = Tensor::from_vec(left, (rows, t), m.device())?.to_dtype(l.dtype())?;
        let right = self.right_matrix(v, m)?;
        let z = left
            .broadcast_matmul(&l)? // [B, rows, V]
            .broadcast_matmul(&right)?; // [B, rows, cols]
        let scale = Self::embedding_scale(v, rows, self.cols);
        let z = (z.to_dtype(DType::F32)? * scale)?.reshape((b, rows * self.cols))?;
        let z: Vec<Vec<f32>> = z.to_vec2()?;
        Ok((u, z))
    }
}

impl OnlineSelector for Uds {
    fn name(&self) -> &str {
        "uds"
    }

    /// The buffer, oldest first, each embedding as its f32 bit patterns (exact).
    fn state(&self) -> Result<serde_json::Value> {
        let items: Vec<Vec<u32>> = self
            .buffer
            .iter()
            .map(|z| z.iter().map(|x| x.to_bits()).collect())
            .collect();
        Ok(serde_json::json!({"buffer_bits": items}))
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let items: Vec<Vec<u32>> = serde_json::from_value(state["buffer_bits"].clone())
            .context("UDS state: expected buffer_bits, a list of f32 bit-pattern lists")?;
        let mut buffer = FifoBuffer::new(self.buffer.capacity())?;
        for z in items {
            buffer.push(z.into_iter().map(f32::from_bits).collect());
        }
        self.buffer = buffer;
        Ok(())
    }

    fn select(&mut self, m: &Model, c: &Batch, k: usize, _: &SelectContext) -> Result<Selection> {
        let t0 = Instant::now();
        check_k("uds", k, c.batch_size())?;
        let (u, z) = self.features(m, c)?;
        let scores: Vec<f64> = u
            .iter()
            .zip(&z)
            .map(|(&ui, zi)| ui + self.alpha * self.buffer.mean_distance(zi))
            .collect();
        let chosen = top_k(&scores, k);
        for &i in &chosen {
            self.buffer.push(z[i].clone());
        }
        Ok(Selection {
            chosen,
            scores,
            seconds: since(t0),
            train: None,
        })
    }
}
