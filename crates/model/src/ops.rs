//! Differentiable building blocks of the decoder.
//!
//! Everything here is a composition of candle primitives that have a
//! backward pass (matmul, element-wise arithmetic, reductions, narrow/cat,
//! gather). candle's fused CPU kernels (`candle_nn::ops::rms_norm`,
//! `softmax_last_dim`, `rotary_emb::*`, flash attention) are deliberately NOT
//! used: they silently cut gradients. Nothing here assumes a CPU device.

use candle_core::{DType, Device, Result, Tensor, D};
use dsel_kernels::Precision;

/// The single entry point for every large matrix product of the model
/// (q/k/v/o, gate/up/down, the LoRA A and B products and the LM head):
/// `x · wᵀ` for `x [.., in]` and `w [out, in]` (PyTorch `nn.Linear`
/// layout) at `precision`; see [`dsel_kernels::linear`]. A weight stored in
/// bf16 (the frozen base weights at [`Precision::Bf16`]) gives an f32
/// result; no gradient is computed for a weight outside the autograd graph.
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    dsel_kernels::linear(x, w, precision)
}

/// `a · b` for `a [.., m, k]` and `b [.., k, n]` (same leading dimensions)
/// at `precision`: the model's GEMM (see [`dsel_kernels::matmul`]).
/// Differentiable; no gradient is computed for an operand that is not part
/// of an autograd graph.
pub fn matmul(a: &Tensor, b: &Tensor, precision: Precision) -> Result<Tensor> {
    dsel_kernels::matmul(a, b, precision)
}

/// RMSNorm as a differentiable composition: `x / sqrt(mean(x²) + eps) · w`
/// over the last dimension. On CPU in f32/f64 a fused, parallel kernel with
/// an exact backward (statistics accumulated in f64).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = dsel_kernels::fused::rms_norm(x, w, eps)? {
        return Ok(y);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Softmax over the last dimension. On CPU in f32/f64 a fused, parallel
/// kernel with an exact backward; elsewhere a differentiable composition
/// whose row maximum is detached (softmax is shift invariant, so the
/// gradient is exact and the backward avoids the max-selection mask).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = dsel_kernels::fused::softmax_last(x)? {
        return Ok(y);
    }
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `softmax_last(x + mask)` for attention scores `x [B, H, T, S]` and an
/// additive mask `[B, 1, T, S]` (see [`attention_mask`]) broadcast over the
/// heads. The mask receives no gradient. On CPU in f32/f64 the add is fused
/// into the softmax kernel.
pub fn masked_softmax_last(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if let Some(y) = dsel_kernels::fused::masked_softmax(x, &mask.detach())? {
        return Ok(y);
    }
    softmax_last(&x.broadcast_add(&mask.detach())?)
}

/// `log Σ exp(x)` over the last dimension (keepdim), with a detached shift
/// by the row maximum (exact gradient: softmax(x)).
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
    s.log()?.broadcast_add(&m)
}

/// Log-probabilities of chosen entries: `x[.., idx] − logsumexp(x)` over the
/// last dimension. `x` is `[.., V]`, `idx` is `[..]` (u32); returns `[..]`.
/// Only the chosen logits are gathered, so no full-size log-softmax tensor
/// is materialised. On CPU in f32/f64 this is one fused parallel kernel
/// (two reads of each row) whose backward writes `g·(onehot − softmax)` in a
/// single pass.
pub fn gather_log_softmax(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if let Some((&v, lead)) = dims.split_last() {
        if idx.dims() == lead {
            let n: usize = lead.iter().product();
            let x2 = x.reshape((n, v))?;
            let i1 = idx.reshape(n)?;
            if let Some(lp) = dsel_kernels::fused::gather_log_softmax(&x2, &i1)? {
                return lp.reshape(lead);
            }
        }
    }
    let idx = idx.unsqueeze(D::Minus1)?.contiguous()?;
    let picked = x.gather(&idx, D::Minus1)?;
    let lse = logsumexp_last(x)?;
    (picked - lse)?.squeeze(D::Minus1)
}

/// Rotary tables `(cos, sin)` of shape `[t, head_dim]` for positions
/// `0..t`, in the Hugging Face "rotate_half" layout (frequencies repeated
/// twice along the head dimension). Computed in f64 on the host, then cast.
pub fn rope_tables(
    t: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * head_dim);
    let mut sin = Vec::with_capacity(t * head_dim);
    for pos in 0..t {
        for _copy in 0..2 {
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let a = pos as f64 * inv_freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (t, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Applies rotary position embeddings ("rotate_half" convention) to `x` of
/// shape `[B, heads, T, head_dim]` with tables of shape `[T, head_dim]`:
/// `x·cos + rotate_half(x)·sin`, `rotate_half([x1, x2]) = [−x2, x1]`.
///
/// On CPU in f32/f64 with frozen tables this is one fused parallel kernel
/// with an exact backward.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = dsel_kernels::fused::rope(x, cos, sin)? {
        return Ok(y);
    }
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// Additive attention mask `[B, 1, T, T]`: 0 where key `k ≤` query `q` and
/// `k < lengths[b]` (causal + key padding), a large negative value elsewhere.
pub fn attention_mask(
    lengths: &[usize],
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    const NEG: f32 = -1e9;
    let b = lengths.len();
    let mut m = vec![0f32; b * t * t];
    for (bi, &len) in lengths.iter().enumerate() {
        for q in 0..t {
            for k in 0..t {
                if k > q || k >= len {
                    m[(bi * t + q) * t + k] = NEG;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, t), device)?.to_dtype(dtype)
}
