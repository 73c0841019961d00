//! Fused, multi-threaded CPU kernels (with exact backward passes) for the
//! row-wise reductions that candle runs as chains of single-threaded
//! element-wise passes:
//!
//! * [`gather_log_softmax`]: `x[.., idx] − logsumexp(x)` over the 49k-entry
//!   vocabulary rows of the LM head, in two reads of each row; the backward
//!   writes `g·(onehot(idx) − softmax(x))` in one pass.
//! * [`rope`]: rotary embeddings in one pass each way.
//! * [`rms_norm`]: RMSNorm in one pass forward and one backward.
//! * [`masked_softmax`]: the attention softmax with its additive mask folded
//!   in; backward `y·(g − Σ g·y)`.
//!
//! Rows are spread over the rayon pool; f32 rows use a vectorised
//! exponential (AVX-512 or AVX2 chosen at run time, ~1e-7 relative error).
//! f64 uses the standard library's `exp` (the finite-difference tests run in
//! f64). Other dtypes and non-CPU devices are not handled here: the callers
//! in `dsel_model::ops` fall back to differentiable candle compositions (as they
//! do with the environment variable `DSEL_FUSED=off`).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Floats the kernels run on.
trait Real: Copy + Send + Sync + PartialOrd + 'static {
    const NEG_INF: Self;
    const ZERO: Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn ln(self) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// `Σ exp(row[i] + bias[i] − m)` (bias optional) for a row maximum `m`.
    fn sum_exp(row: &[Self], bias: Option<&[Self]>, m: Self) -> Self;
    /// `out[i] = exp(row[i] + bias[i] − m)`; returns the sum.
    fn exp_into(row: &[Self], bias: Option<&[Self]>, m: Self, out: &mut [Self]) -> Self;
    /// `out[i] = −g·exp(row[i] − lse)`.
    fn neg_scaled_exp(row: &[Self], lse: Self, g: Self, out: &mut [Self]);
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

fn row_max<T: Real>(row: &[T], bias: Option<&[T]>) -> T {
    let mut m = T::NEG_INF;
    match bias {
        Some(b) => {
            for (&x, &y) in row.iter().zip(b) {
                let v = x.add(y);
                if v > m {
                    m = v;
                }
            }
        }
        None => {
            for &x in row {
                if x > m {
                    m = x;
                }
            }
        }
    }
    m
}

/// The [`Real`] items that are the same for every float: constants,
/// arithmetic and the conversions through f64 (`as` is exact for f64 and
/// rounds to nearest for f32).
macro_rules! real_arith {
    ($t:ident) => {
        const NEG_INF: $t = $t::NEG_INFINITY;
        const ZERO: $t = 0.0;
        fn add(self, o: $t) -> $t {
            self + o
        }
        fn sub(self, o: $t) -> $t {
            self - o
        }
        fn mul(self, o: $t) -> $t {
            self * o
        }
        fn div(self, o: $t) -> $t {
            self / o
        }
        fn ln(self) -> $t {
            $t::ln(self)
        }
        fn to_f64(self) -> f64 {
            self as f64
        }
        fn from_f64(v: f64) -> $t {
            v as $t
        }
    };
}

/// The [`Real`] items that move a `Vec<$t>` in and out of its
/// `CpuStorage::$variant`.
macro_rules! real_storage {
    ($t:ident, $variant:ident) => {
        fn wrap(v: Vec<$t>) -> CpuStorage {
            CpuStorage::$variant(v)
        }
        fn slice(s: &CpuStorage) -> Option<&[$t]> {
            match s {
                CpuStorage::$variant(v) => Some(v),
                _ => None,
            }
        }
    };
}

/// Runs `$body` with the type alias `$T` set to the float type of storage
/// `$s` (f32 or f64) and wraps the `Vec<$T>` it returns back into a
/// `CpuStorage`; any other dtype is an error naming `$what`.
macro_rules! by_float {
    ($s:expr, $what:expr, $T:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $T = f32;
                <$T as Real>::wrap($body)
            }
            CpuStorage::F64(_) => {
                type $T = f64;
                <$T as Real>::wrap($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $what),
        }
    };
}

impl Real for f64 {
    real_arith!(f64);
    fn sum_exp(row: &[f64], bias: Option<&[f64]>, m: f64) -> f64 {
        match bias {
            Some(b) => row.iter().zip(b).map(|(&x, &y)| (x + y - m).exp()).sum(),
            None => row.iter().map(|&x| (x - m).exp()).sum(),
        }
    }
    fn exp_into(row: &[f64], bias: Option<&[f64]>, m: f64, out: &mut [f64]) -> f64 {
        let mut s = 0.0;
        for (i, o) in out.iter_mut().enumerate() {
            let v = (row[i] + bias.map_or(0.0, |b| b[i]) - m).exp();
            *o = v;
            s += v;
        }
        s
    }
    fn neg_scaled_exp(row: &[f64], lse: f64, g: f64, out: &mut [f64]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = -g * (x - lse).exp();
        }
    }
    real_storage!(f64, F64);
}

/// Branch-free `exp` for f32 that the compiler vectorises: `2ⁿ·p(r)` with
/// `x = n·ln2 + r`, `|r| ≤ ln2/2`, a degree-6 polynomial (relative error
/// ~2e-7), exactly 0 below −87.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn sum_exp_f32_body(row: &[f32], bias: Option<&[f32]>, m: f32) -> f32 {
    // Eight partial sums so the reduction vectorises without reordering
    // rules getting in the way.
    let mut acc = [0f32; 16];
    match bias {
        Some(b) => {
            let (rc, rr) = row.split_at(row.len() / 16 * 16);
            let (bc, br) = b.split_at(rc.len());
            for (x, y) in rc.chunks_exact(16).zip(bc.chunks_exact(16)) {
                for j in 0..16 {
                    acc[j] += exp_f32(x[j] + y[j] - m);
                }
            }
            for (&x, &y) in rr.iter().zip(br) {
                acc[0] += exp_f32(x + y - m);
            }
        }
        None => {
            let (rc, rr) = row.split_at(row.len() / 16 * 16);
            for x in rc.chunks_exact(16) {
                for j in 0..16 {
                    acc[j] += exp_f32(x[j] - m);
                }
            }
            for &x in rr {
                acc[0] += exp_f32(x - m);
            }
        }
    }
    acc.iter().sum()
}

#[inline(always)]
fn exp_into_f32_body(row: &[f32], bias: Option<&[f32]>, m: f32, out: &mut [f32]) -> f32 {
    match bias {
        Some(b) => {
            for ((o, &x), &y) in out.iter_mut().zip(row).zip(b) {
                *o = exp_f32(x + y - m);
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = exp_f32(x - m);
            }
        }
    }
    let mut acc = [0f32; 16];
    let (oc, or) = out.split_at(out.len() / 16 * 16);
    for c in oc.chunks_exact(16) {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + or.iter().sum::<f32>()
}

#[inline(always)]
fn neg_scaled_exp_f32_body(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = -g * exp_f32(x - lse);
    }
}

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has it.
macro_rules! dispatch {
    ($name:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty, $body:ident) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the enabled features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(sum_exp_f32, (row: &[f32], bias: Option<&[f32]>, m: f32) -> f32, sum_exp_f32_body);
dispatch!(exp_into_f32, (row: &[f32], bias: Option<&[f32]>, m: f32, out: &mut [f32]) -> f32, exp_into_f32_body);
dispatch!(neg_scaled_exp_f32, (row: &[f32], lse: f32, g: f32, out: &mut [f32]) -> (), neg_scaled_exp_f32_body);

impl Real for f32 {
    real_arith!(f32);
    fn sum_exp(row: &[f32], bias: Option<&[f32]>, m: f32) -> f32 {
        sum_exp_f32(row, bias, m)
    }
    fn exp_into(row: &[f32], bias: Option<&[f32]>, m: f32, out: &mut [f32]) -> f32 {
        exp_into_f32(row, bias, m, out)
    }
    fn neg_scaled_exp(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
        neg_scaled_exp_f32(row, lse, g, out)
    }
    real_storage!(f32, F32);
}

/// The contiguous data of a storage/layout pair, or an error.
fn contiguous<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some(v) = T::slice(s) else {
        candle_core::bail!("{what}: operands must share one float dtype");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: operand must be contiguous"),
    }
}

fn u32_contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{what}: indices must be u32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: indices must be contiguous"),
    }
}

/// `DSEL_FUSED=off` turns the fused kernels off (A/B benchmarking).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("DSEL_FUSED").ok().as_deref(),
            Some("off" | "0" | "false" | "no")
        )
    })
}

fn is_fast(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && enabled()
}

// ---------------------------------------------------------------------------
// gather + log-softmax

/// Minimum elements per rayon task for row-wise kernels.
const MIN_TASK_ELEMS: usize = 1 << 15;

fn rows_per_task(rows: usize, width: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_size = (MIN_TASK_ELEMS / width.max(1)).max(1);
    rows.div_ceil(threads * 4).max(by_size).max(1)
}

/// A zeroed `rows × width` output filled in parallel by `f(r, out_row)`
/// for each row `r`; tasks are sized for rows that read `cost` elements
/// each. Empty when `rows` or `width` is 0.
fn par_rows<T: Real>(
    rows: usize,
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::ZERO; rows * width];
    if rows == 0 || width == 0 {
        return out;
    }
    let rpt = rows_per_task(rows, cost);
    out.par_chunks_mut(rpt * width)
        .enumerate()
        .for_each(|(c, o)| {
            for (j, orow) in o.chunks_mut(width).enumerate() {
                f(c * rpt + j, orow);
            }
        });
    out
}

struct GatherLogSoftmax;

fn gls_fwd<T: Real>(x: &[T], idx: &[u32], v: usize) -> Result<Vec<T>> {
    if let Some(bad) = idx.iter().find(|&&i| i as usize >= v) {
        candle_core::bail!("gather_log_softmax: index {bad} out of range for {v} classes");
    }
    Ok(par_rows(idx.len(), 1, v, |r, o| {
        let row = &x[r * v..(r + 1) * v];
        let m = row_max(row, None);
        let lse = if m == T::NEG_INF {
            m
        } else {
            T::sum_exp(row, None, m).ln().add(m)
        };
        o[0] = row[idx[r] as usize].sub(lse);
    }))
}

impl CustomOp2 for GatherLogSoftmax {
    fn name(&self) -> &'static str {
        "dsel-gather-log-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let idx = u32_contiguous(s2, l2, "gather_log_softmax")?;
        if idx.len() != n {
            candle_core::bail!("gather_log_softmax: {} indices for {n} rows", idx.len());
        }
        let out = by_float!(s1, "gather_log_softmax", T => gls_fwd(
            contiguous::<T>(s1, l1, "gather_log_softmax")?,
            idx,
            v,
        )?);
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        idx: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let gr = Tensor::stack(&[grad, res], 1)?.contiguous()?;
        let gx = x.apply_op3_no_bwd(idx, &gr, &GatherLogSoftmaxBwd)?;
        Ok((Some(gx), None))
    }
}

/// `grad_x[r, :] = g_r·(onehot(idx_r) − exp(x[r, :] − lse_r))` with
/// `lse_r = x[r, idx_r] − res_r`; third operand `[N, 2]` = (g, res).
struct GatherLogSoftmaxBwd;

fn gls_bwd<T: Real>(x: &[T], idx: &[u32], gr: &[T], v: usize) -> Vec<T> {
    par_rows(idx.len(), v, v, |r, orow| {
        let row = &x[r * v..(r + 1) * v];
        let (g, res) = (gr[2 * r], gr[2 * r + 1]);
        let k = idx[r] as usize;
        let lse = row[k].sub(res);
        T::neg_scaled_exp(row, lse, g, orow);
        orow[k] = orow[k].add(g);
    })
}

impl CustomOp3 for GatherLogSoftmaxBwd {
    fn name(&self) -> &'static str {
        "dsel-gather-log-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let idx = u32_contiguous(s2, l2, "gather_log_softmax bwd")?;
        if idx.len() != n || l3.shape().dims2()? != (n, 2) {
            candle_core::bail!("gather_log_softmax bwd: inconsistent shapes");
        }
        let what = "gather_log_softmax bwd";
        let out = by_float!(s1, what, T => gls_bwd(
            contiguous::<T>(s1, l1, what)?,
            idx,
            contiguous::<T>(s3, l3, what)?,
            v,
        ));
        Ok((out, Shape::from((n, v))))
    }
}

/// `x[r, idx[r]] − logsumexp(x[r, :])` for `x [N, V]` (f32/f64, CPU) and
/// `idx [N]` (u32), as one fused parallel op with an exact backward.
/// Returns `None` when the fast path does not apply (other dtype/device), so
/// the caller can use a composition.
pub fn gather_log_softmax(x: &Tensor, idx: &Tensor) -> Result<Option<Tensor>> {
    if !is_fast(x) || x.rank() != 2 || idx.dtype() != DType::U32 || idx.rank() != 1 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let idx = idx.contiguous()?;
    Ok(Some(x.apply_op2(&idx, GatherLogSoftmax)?))
}

// ---------------------------------------------------------------------------
// masked softmax

/// Softmax over the last dimension of `x [B, H, T, S]` plus an additive mask
/// `[B, 1, T, S]` (broadcast over heads); gradient to `x` only.
struct MaskedSoftmax {
    heads: usize,
}

fn msm_fwd<T: Real>(x: &[T], mask: Option<&[T]>, heads: usize, t: usize, s: usize) -> Vec<T> {
    let rows = x.len() / s.max(1);
    par_rows(rows, s, s, |r, orow| {
        let row = &x[r * s..(r + 1) * s];
        // Row r = ((b·H + h)·T + q): its mask row is (b·T + q).
        let bias = mask.map(|m| {
            let (b, q) = (r / (heads * t), r % t);
            &m[(b * t + q) * s..(b * t + q + 1) * s]
        });
        let mx = row_max(row, bias);
        if mx == T::NEG_INF {
            // Every entry −∞: leave zeros rather than NaNs.
            return;
        }
        let sum = T::exp_into(row, bias, mx, orow);
        for v in orow.iter_mut() {
            *v = v.div(sum);
        }
    })
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "dsel-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, s) = l1.shape().dims4()?;
        if h != self.heads || l2.shape().dims4()? != (b, 1, t, s) {
            candle_core::bail!("masked_softmax: mask must be [B, 1, T, S]");
        }
        let what = "masked_softmax";
        let out = by_float!(s1, what, T => msm_fwd(
            contiguous::<T>(s1, l1, what)?,
            Some(contiguous::<T>(s2, l2, what)?),
            h,
            t,
            s,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let g = grad.contiguous()?;
        Ok((Some(res.apply_op2_no_bwd(&g, &SoftmaxBwd)?), None))
    }
}

/// Plain softmax over the last dimension (any rank), gradient to `x`.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "dsel-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = *l1.dims().last().unwrap_or(&1);
        let n = l1.shape().elem_count();
        let what = "softmax";
        let out = by_float!(s1, what, T => msm_fwd(
            contiguous::<T>(s1, l1, what)?,
            None,
            1,
            1,
            s,
        ));
        debug_assert_eq!(n, l1.shape().elem_count());
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &SoftmaxBwd)?))
    }
}

/// `grad_x = y·(g − Σ g·y)` row-wise over the last dimension.
struct SoftmaxBwd;

fn sm_bwd<T: Real>(y: &[T], g: &[T], s: usize) -> Vec<T> {
    let rows = y.len() / s.max(1);
    par_rows(rows, s, s, |r, orow| {
        let yr = &y[r * s..(r + 1) * s];
        let gr = &g[r * s..(r + 1) * s];
        let mut dot = T::ZERO;
        for (&a, &b) in yr.iter().zip(gr) {
            dot = dot.add(a.mul(b));
        }
        for ((o, &a), &b) in orow.iter_mut().zip(yr).zip(gr) {
            *o = a.mul(b.sub(dot));
        }
    })
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "dsel-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("softmax bwd: shape mismatch");
        }
        let s = *l1.dims().last().unwrap_or(&1);
        let what = "softmax bwd";
        let out = by_float!(s1, what, T => sm_bwd(
            contiguous::<T>(s1, l1, what)?,
            contiguous::<T>(s2, l2, what)?,
            s,
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension of `x [B, H, T, S] + mask [B, 1, T, S]`
/// (fused, parallel, exact backward to `x`). `None` when the fast path does
/// not apply (dtype, device or shapes).
pub fn masked_softmax(x: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
    if !is_fast(x) || mask.dtype() != x.dtype() || !mask.device().is_cpu() {
        return Ok(None);
    }
    let (Ok((b, h, t, s)), Ok(md)) = (x.dims4(), mask.dims4()) else {
        return Ok(None);
    };
    if md != (b, 1, t, s) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mask = mask.contiguous()?;
    Ok(Some(x.apply_op2(&mask, MaskedSoftmax { heads: h })?))
}

/// Softmax over the last dimension (fused, parallel, exact backward).
/// `None` when the fast path does not apply.
pub fn softmax_last(x: &Tensor) -> Result<Option<Tensor>> {
    if !is_fast(x) || x.rank() == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(Some(x.apply_op1(Softmax)?))
}

// ---------------------------------------------------------------------------
// RMSNorm

/// `y = x · w / sqrt(mean(x²) + eps)` over the last dimension.
struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Real>(row: &[T], eps: f64) -> f64 {
    let mut ss = 0f64;
    for &x in row {
        let v = x.to_f64();
        ss += v * v;
    }
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    par_rows(x.len() / h.max(1), h, h, |r, orow| {
        let row = &x[r * h..(r + 1) * h];
        let inv = T::from_f64(inv_rms(row, eps));
        for ((o, &xv), &wv) in orow.iter_mut().zip(row).zip(w) {
            *o = xv.mul(inv).mul(wv);
        }
    })
}

/// `grad_x = r·(g⊙w − x·r²·mean(g⊙w⊙x))`, `r = 1/sqrt(mean(x²) + eps)`.
fn rms_bwd<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    par_rows(x.len() / h.max(1), h, h, |r, orow| {
        let row = &x[r * h..(r + 1) * h];
        let gr = &g[r * h..(r + 1) * h];
        let inv = inv_rms(row, eps);
        let mut dot = 0f64;
        for ((&xv, &gv), &wv) in row.iter().zip(gr).zip(w) {
            dot += gv.to_f64() * wv.to_f64() * xv.to_f64();
        }
        let coef = T::from_f64(inv * inv * inv * dot / h as f64);
        let inv = T::from_f64(inv);
        for (((o, &xv), &gv), &wv) in orow.iter_mut().zip(row).zip(gr).zip(w) {
            *o = inv.mul(gv.mul(wv)).sub(xv.mul(coef));
        }
    })
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "dsel-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rms_norm";
        if l1.dims().last() != Some(&l2.shape().elem_count()) || l2.dims().len() != 1 {
            candle_core::bail!("{what}: weight must be [H] for input [.., H]");
        }
        let out = by_float!(s1, what, T => rms_fwd(
            contiguous::<T>(s1, l1, what)?,
            contiguous::<T>(s2, l2, what)?,
            self.eps,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &g, &RmsNormBwd { eps: self.eps })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            // Rare (norm weights are frozen here): a plain composition.
            let h = w.elem_count();
            let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let xhat = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
            Some((g * xhat)?.reshape(((), h))?.sum(0)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "dsel-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rms_norm bwd";
        if l1.shape() != l3.shape() {
            candle_core::bail!("{what}: shape mismatch");
        }
        let out = by_float!(s1, what, T => rms_bwd(
            contiguous::<T>(s1, l1, what)?,
            contiguous::<T>(s2, l2, what)?,
            contiguous::<T>(s3, l3, what)?,
            self.eps,
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension, `x [.., H]`, `w [H]` (fused, parallel,
/// exact backward to both). `None` when the fast path does not apply.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !is_fast(x) || w.dtype() != x.dtype() || w.rank() != 1 || x.rank() == 0 {
        return Ok(None);
    }
    if x.dims().last() != Some(&w.elem_count()) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    Ok(Some(x.apply_op2(&w, RmsNorm { eps })?))
}

// ---------------------------------------------------------------------------
// Rotary embeddings

/// `y = x·cos + rotate_half(x)·sin` for `x [B, H, T, D]`, tables `[T, D]`;
/// with `inverse` the transposed map (the backward):
/// `g1·cos1 + g2·sin2` and `g2·cos2 − g1·sin1` on the two halves.
struct Rope {
    inverse: bool,
}

fn rope_kernel<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    d: usize,
    inverse: bool,
) -> Vec<T> {
    let half = d / 2;
    let rows = if t == 0 { 0 } else { x.len() / d.max(1) };
    par_rows(rows, d, d, |r, orow| {
        let pos = r % t;
        let xr = &x[r * d..(r + 1) * d];
        let (cr, sr) = (&cos[pos * d..(pos + 1) * d], &sin[pos * d..(pos + 1) * d]);
        let (o1, o2) = orow.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (xr[i], xr[i + half]);
            if inverse {
                o1[i] = x1.mul(cr[i]).add(x2.mul(sr[i + half]));
                o2[i] = x2.mul(cr[i + half]).sub(x1.mul(sr[i]));
            } else {
                o1[i] = x1.mul(cr[i]).sub(x2.mul(sr[i]));
                o2[i] = x2.mul(cr[i + half]).add(x1.mul(sr[i + half]));
            }
        }
    })
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "dsel-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "rope";
        let (_, _, t, d) = l1.shape().dims4()?;
        if l2.shape().dims2()? != (t, d) || l3.shape().dims2()? != (t, d) || d % 2 == 1 {
            candle_core::bail!("{what}: tables must be [T, D] with D even");
        }
        let out = by_float!(s1, what, T => rope_kernel(
            contiguous::<T>(s1, l1, what)?,
            contiguous::<T>(s2, l2, what)?,
            contiguous::<T>(s3, l3, what)?,
            t,
            d,
            self.inverse,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if cos.track_op() || sin.track_op() {
            candle_core::bail!("rope: gradients of the rotary tables are not supported");
        }
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let g = grad.contiguous()?;
        let op = Rope {
            inverse: !self.inverse,
        };
        Ok((Some(g.apply_op3(cos, sin, op)?), None, None))
    }
}

/// Rotary embeddings ("rotate_half") on `x [B, H, T, D]` with frozen tables
/// `[T, D]` (fused, parallel, exact backward to `x`). `None` when the fast
/// path does not apply (dtype, device, shapes or trainable tables).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !is_fast(x) || cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
        return Ok(None);
    }
    if cos.track_op() || sin.track_op() {
        return Ok(None);
    }
    let (Ok((_, _, t, d)), Ok(cd), Ok(sd)) = (x.dims4(), cos.dims2(), sin.dims2()) else {
        return Ok(None);
    };
    if cd != (t, d) || sd != (t, d) || d % 2 == 1 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    Ok(Some(x.apply_op3(&cos, &sin, Rope { inverse: false })?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Rotary tables `[t, hd]` in the rotate-half layout.
    fn rope_tables(t: usize, hd: usize, dtype: DType, dev: &Device) -> (Tensor, Tensor) {
        let angle = |pos: usize, j: usize| pos as f64 * 0.3 / (1 + j % (hd / 2)) as f64;
        let cos: Vec<f64> = (0..t * hd).map(|i| angle(i / hd, i % hd).cos()).collect();
        let sin: Vec<f64> = (0..t * hd).map(|i| angle(i / hd, i % hd).sin()).collect();
        let mk = |v: Vec<f64>| {
            Tensor::from_vec(v, (t, hd), dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (mk(cos), mk(sin))
    }

    /// Additive causal + key-padding mask `[B, 1, T, T]`.
    fn causal_mask(lengths: &[usize], t: usize, dtype: DType, dev: &Device) -> Tensor {
        let mut m = vec![0f32; lengths.len() * t * t];
        for (b, &len) in lengths.iter().enumerate() {
            for q in 0..t {
                for k in 0..t {
                    if k > q || k >= len {
                        m[(b * t + q) * t + k] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(m, (lengths.len(), 1, t, t), dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Largest absolute element-wise difference (also the GEMM tests').
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn exp_f32_accuracy() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1e9), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        // The dispatched kernels agree with the scalar body.
        let row: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let a = sum_exp_f32(&row, None, 20.0) as f64;
        let b: f64 = row.iter().map(|&v| ((v - 20.0) as f64).exp()).sum();
        assert!(((a - b) / b).abs() < 1e-6);
    }

    fn composition_lse(x: &Tensor, idx: &Tensor) -> Tensor {
        let m = x.max_keepdim(D::Minus1).unwrap().detach();
        let lse = x
            .broadcast_sub(&m)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap()
            .broadcast_add(&m)
            .unwrap();
        let picked = x.gather(&idx.unsqueeze(1).unwrap(), 1).unwrap();
        (picked - lse).unwrap().squeeze(1).unwrap()
    }

    #[test]
    fn gather_log_softmax_matches_composition_with_grads() {
        if !enabled() {
            return; // DSEL_FUSED=off: the callers use compositions
        }
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let (n, v) = (37, 1031);
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 3.0, (n, v), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()),
            )
            .unwrap();
            let idx: Vec<u32> = (0..n as u32).map(|i| (i * 97) % v as u32).collect();
            let idx = Tensor::new(idx, &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = gather_log_softmax(x.as_tensor(), &idx).unwrap().unwrap();
            let want = composition_lse(x.as_tensor(), &idx);
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert!(d < tol, "{dtype:?}: grad diff {d}");
        }
    }

    #[test]
    fn rms_norm_matches_composition_with_grads() {
        if !enabled() {
            return; // DSEL_FUSED=off: the callers use compositions
        }
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let w = Var::from_tensor(
                &Tensor::randn(1f32, 0.5, 24, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let r = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5)
                .unwrap()
                .unwrap();
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let inv = (ms + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
            let want = x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol);
            assert!(max_diff(g1.get(&w).unwrap(), g2.get(&w).unwrap()) < tol * 10.0);
        }
    }

    #[test]
    fn rope_matches_composition_with_grads() {
        if !enabled() {
            return; // DSEL_FUSED=off: the callers use compositions
        }
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let (cos, sin) = rope_tables(7, 8, dtype, &dev);
            let r = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = rope(x.as_tensor(), &cos, &sin).unwrap().unwrap();
            let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
            let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            let want = (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol);
        }
    }

    #[test]
    fn masked_softmax_matches_composition_with_grads() {
        if !enabled() {
            return; // DSEL_FUSED=off: the callers use compositions
        }
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let (b, h, t) = (2, 3, 19);
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 2.0, (b, h, t, t), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mask = causal_mask(&[19, 11], t, dtype, &dev);
            let r = Tensor::randn(0f32, 1.0, (b, h, t, t), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = masked_softmax(x.as_tensor(), &mask).unwrap().unwrap();
            let z = x.broadcast_add(&mask).unwrap();
            let m = z.max_keepdim(D::Minus1).unwrap().detach();
            let e = z.broadcast_sub(&m).unwrap().exp().unwrap();
            let want = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol * 10.0);
            // Plain softmax too.
            let got = softmax_last(x.as_tensor()).unwrap().unwrap();
            let e = x
                .broadcast_sub(&x.max_keepdim(D::Minus1).unwrap().detach())
                .unwrap()
                .exp()
                .unwrap();
            let want = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            assert!(max_diff(&got, &want) < tol);
            let g1 = (got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < tol * 10.0);
        }
    }
}
