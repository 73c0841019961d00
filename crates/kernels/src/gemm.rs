//! The model's matrix products: [`matmul`] and [`linear`], in f32 or in
//! mixed precision, on the library [`crate::library`] opened.
//!
//! Both are candle custom ops whose backward computes only the gradients of
//! operands that are part of an autograd graph (a frozen base weight gets
//! none: a third of the backward FLOPs of every frozen projection), and
//! whose operands may be any strided view with a unit stride in one of the
//! last two dimensions (transposed views reach the library without copies).
//!
//! * [`Precision::F32`]: f32 (or f64) products through the library's
//!   `sgemm`/`dgemm`, the output rows split over the rayon pool.
//! * [`Precision::Bf16`]: operands rounded to bf16 (an operand already
//!   stored in bf16, e.g. a frozen weight converted once per process, is
//!   used as it is), products accumulated in f32 and returned in f32, with
//!   MKL's `cblas_gemm_bf16bf16f32` (AMX or AVX512-BF16 where the processor
//!   has them). Without it the same numbers are computed in f32 from the
//!   rounded operands (emulated; slower than plain f32).
//! * Without any library (or on a non-CPU device): candle's matmul, with bf16
//!   emulated the same way.

use std::ffi::c_int;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::library::{loaded, GemmFn, Loaded};
use crate::Precision;

/// Row-major, transposition codes of the CBLAS interface.
const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

/// How a 2-D strided operand maps to a CBLAS argument.
#[derive(Clone, Copy, Debug)]
struct Operand {
    rows: usize,
    cols: usize,
    trans: bool,
    ld: usize,
    offset: usize,
}

impl Operand {
    /// `None` when neither dimension has unit stride.
    fn of(dims: &[usize], stride: &[usize], offset: usize) -> Option<Operand> {
        let (&[rows, cols], &[s0, s1]) = (dims, stride) else {
            return None;
        };
        if rows == 0 || cols == 0 {
            // Empty: never dereferenced.
            return Some(Operand {
                rows,
                cols,
                trans: false,
                ld: cols.max(1),
                offset,
            });
        }
        if s1 == 1 || cols == 1 {
            let ld = if rows <= 1 { cols.max(1) } else { s0 };
            if ld >= cols.max(1) {
                return Some(Operand {
                    rows,
                    cols,
                    trans: false,
                    ld,
                    offset,
                });
            }
        }
        if s0 == 1 || rows == 1 {
            let ld = if cols <= 1 { rows.max(1) } else { s1 };
            if ld >= rows.max(1) {
                return Some(Operand {
                    rows,
                    cols,
                    trans: true,
                    ld,
                    offset,
                });
            }
        }
        None
    }

    /// Element offset of logical row `r`.
    fn row_offset(&self, r: usize) -> usize {
        self.offset + if self.trans { r } else { r * self.ld }
    }

    /// Element offset of logical column `c`.
    fn col_offset(&self, c: usize) -> usize {
        self.offset + if self.trans { c * self.ld } else { c }
    }

    fn code(&self) -> c_int {
        if self.trans {
            CBLAS_TRANS
        } else {
            CBLAS_NO_TRANS
        }
    }
}

fn usable_layout(t: &Tensor) -> bool {
    Batched::of(t.dims(), t.stride(), 0).is_some()
}

/// Output element types of the CBLAS entry points (alpha/beta are theirs).
trait Scalar: Copy + Send + Sync + Default {
    const ZERO: Self;
    const ONE: Self;
}

impl Scalar for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
}

impl Scalar for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
}

/// One CBLAS-style GEMM entry point (`cblas_sgemm`, `cblas_dgemm`,
/// `cblas_gemm_bf16bf16f32`): `C[m×n] (+)= A[m×k]·B[k×n]`, row-major.
struct Cblas<I, O>(GemmFn<I, O>);

impl<I, O: Scalar> Cblas<I, O> {
    /// # Safety
    /// Pointers valid for the extents the CBLAS conventions give.
    #[allow(clippy::too_many_arguments)]
    unsafe fn call(
        &self,
        ta: c_int,
        tb: c_int,
        m: usize,
        n: usize,
        k: usize,
        a: *const I,
        lda: usize,
        b: *const I,
        ldb: usize,
        c: *mut O,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            (self.0)(
                CBLAS_ROW_MAJOR,
                ta,
                tb,
                m as c_int,
                n as c_int,
                k as c_int,
                O::ONE,
                a,
                lda as c_int,
                b,
                ldb as c_int,
                if accumulate { O::ONE } else { O::ZERO },
                c,
                ldc as c_int,
            )
        }
    }
}

/// Minimum work (m·n·k) per rayon task.
const MIN_TASK_FLOPS: usize = 1 << 21;

/// Raw pointers handed to rayon tasks (read-only inputs, disjoint outputs).
#[derive(Clone, Copy)]
struct SendPtr<T>(*const T);
// SAFETY: only read through while the owning slices are alive (scoped).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *const T {
        self.0
    }
}

/// A (possibly batched) operand: the matrix of the last two dimensions plus
/// one uniform stride between consecutive matrices.
#[derive(Clone, Copy, Debug)]
struct Batched {
    op: Operand,
    batch: usize,
    batch_stride: usize,
}

impl Batched {
    /// `None` when the matrices have no unit stride or the leading
    /// dimensions do not collapse into one uniform stride.
    fn of(dims: &[usize], stride: &[usize], offset: usize) -> Option<Batched> {
        let r = dims.len();
        if r < 2 {
            return None;
        }
        let op = Operand::of(&dims[r - 2..], &stride[r - 2..], offset)?;
        let batch: usize = dims[..r - 2].iter().product();
        // Leading dimensions of size > 1 must collapse into one stride.
        let lead: Vec<(usize, usize)> = dims[..r - 2]
            .iter()
            .zip(&stride[..r - 2])
            .filter(|(&d, _)| d > 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        for w in lead.windows(2) {
            if w[0].1 != w[1].1 * w[1].0 {
                return None;
            }
        }
        let batch_stride = lead.last().map_or(0, |&(_, s)| s);
        Some(Batched {
            op,
            batch,
            batch_stride,
        })
    }

    /// Highest element index touched, plus one.
    fn extent(&self) -> usize {
        let o = &self.op;
        if o.rows == 0 || o.cols == 0 || self.batch == 0 {
            return o.offset;
        }
        let last = (self.batch - 1) * self.batch_stride;
        last + if o.trans {
            o.offset + (o.cols - 1) * o.ld + o.rows
        } else {
            o.offset + (o.rows - 1) * o.ld + o.cols
        }
    }
}

/// One `C[m×n] = A·B` product, optionally split over the rayon pool.
///
/// # Safety
/// `a`/`b` must be valid for the extents of `la`/`lb` and `c` for `m·n`
/// writes; the extents were checked by the caller.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one<I: Copy, O: Scalar>(
    kern: &Cblas<I, O>,
    a: SendPtr<I>,
    la: Operand,
    b: SendPtr<I>,
    lb: Operand,
    c: SendPtr<O>,
    split: bool,
    accumulate: bool,
) {
    let (m, k, n) = (la.rows, la.cols, lb.cols);
    let tasks = if split {
        rayon::current_num_threads()
            .max(1)
            .min((m * n * k / MIN_TASK_FLOPS).max(1))
    } else {
        1
    };
    // The block of C at rows `r0..r0 + mr` and columns `c0..c0 + nc`.
    // SAFETY: forwarded from the caller; the blocks the tasks below compute
    // are disjoint.
    let block = |r0: usize, mr: usize, c0: usize, nc: usize| unsafe {
        kern.call(
            la.code(),
            lb.code(),
            mr,
            nc,
            k,
            a.get().add(la.row_offset(r0)),
            la.ld,
            b.get().add(lb.col_offset(c0)),
            lb.ld,
            (c.get() as *mut O).add(r0 * n + c0),
            n,
            accumulate,
        );
    };
    if tasks <= 1 {
        block(0, m, 0, n);
    } else if m >= n || m >= 8 * tasks {
        let rows = m.div_ceil(tasks);
        (0..tasks).into_par_iter().for_each(|i| {
            let r0 = i * rows;
            if r0 < m {
                block(r0, rows.min(m - r0), 0, n);
            }
        });
    } else {
        let cols = n.div_ceil(tasks);
        (0..tasks).into_par_iter().for_each(|i| {
            let c0 = i * cols;
            if c0 < n {
                block(0, m, c0, cols.min(n - c0));
            }
        });
    }
}

fn gemm_cpu<I: Copy, O: Scalar>(
    kern: &Cblas<I, O>,
    a: &[I],
    la: Batched,
    b: &[I],
    lb: Batched,
) -> Result<Vec<O>> {
    let (m, k, n) = (la.op.rows, la.op.cols, lb.op.cols);
    let batch = la.batch;
    if la.extent() > a.len() || lb.extent() > b.len() {
        candle_core::bail!("gemm: operand layout exceeds its storage");
    }
    let len = batch * m * n;
    let mut c: Vec<O> = Vec::with_capacity(len);
    if len == 0 {
        return Ok(c);
    }
    if k == 0 {
        c.resize(len, O::ZERO);
        return Ok(c);
    }
    if m.max(n).max(k) > i32::MAX as usize / 2 {
        candle_core::bail!("gemm: dimensions {m}×{k}×{n} exceed the 32-bit BLAS interface");
    }
    let (pa, pb) = (SendPtr(a.as_ptr()), SendPtr(b.as_ptr()));
    let pc = SendPtr(c.spare_capacity_mut().as_mut_ptr() as *const O);
    let threads = rayon::current_num_threads().max(1);
    let one = |i: usize, split: bool| {
        let mut oa = la.op;
        oa.offset += i * la.batch_stride;
        let mut ob = lb.op;
        ob.offset += i * lb.batch_stride;
        // SAFETY: extents checked above; batch i writes C[i·m·n ..][..m·n].
        unsafe {
            gemm_one(
                kern,
                pa,
                oa,
                pb,
                ob,
                SendPtr((pc.get() as *mut O).add(i * m * n) as *const O),
                split,
                false,
            )
        };
    };
    if batch >= threads && batch > 1 {
        (0..batch).into_par_iter().for_each(|i| one(i, false));
    } else {
        (0..batch).for_each(|i| one(i, true));
    }
    // SAFETY: every one of the `len` elements was written (beta = 0).
    unsafe { c.set_len(len) };
    Ok(c)
}

/// The bf16 bits of an operand: its own storage when it is bf16, else the
/// covered range `[start, extent)` converted, with the layout shifted to it.
fn bf16_operand<'a>(
    s: &'a CpuStorage,
    l: Batched,
) -> Result<(std::borrow::Cow<'a, [u16]>, Batched)> {
    match s {
        CpuStorage::BF16(v) => Ok((std::borrow::Cow::Borrowed(crate::bf16::bits(v)), l)),
        CpuStorage::F32(v) => {
            let start = l.op.offset;
            let end = l.extent().max(start);
            if end > v.len() {
                candle_core::bail!("gemm: operand layout exceeds its storage");
            }
            let bits = crate::bf16::from_f32_slice(&v[start..end]);
            let mut shifted = l;
            shifted.op.offset = 0;
            Ok((std::borrow::Cow::Owned(bits), shifted))
        }
        other => candle_core::bail!(
            "gemm: bf16 products take f32 or bf16 operands, not {:?}",
            other.dtype()
        ),
    }
}

/// `C = A·B` on (batched) operands at a precision, with a backward that
/// computes only the gradients of operands that are part of an autograd
/// graph.
struct Gemm {
    precision: Precision,
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        match self.precision {
            Precision::F32 => "dsel-gemm-f32",
            Precision::Bf16 => "dsel-gemm-bf16",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(lib) = loaded() else {
            candle_core::bail!("gemm: no BLAS library is loaded");
        };
        let (Some(la), Some(lb)) = (
            Batched::of(l1.dims(), l1.stride(), l1.start_offset()),
            Batched::of(l2.dims(), l2.stride(), l2.start_offset()),
        ) else {
            candle_core::bail!(
                "gemm: unsupported layouts {:?}/{:?} and {:?}/{:?}",
                l1.dims(),
                l1.stride(),
                l2.dims(),
                l2.stride()
            );
        };
        let (d1, d2) = (l1.dims(), l2.dims());
        let r = d1.len();
        if d2.len() != r || d1[..r - 2] != d2[..r - 2] || la.op.cols != lb.op.rows {
            candle_core::bail!("gemm: shape mismatch {d1:?} · {d2:?}");
        }
        let mut out_dims = d1[..r - 2].to_vec();
        out_dims.extend([la.op.rows, lb.op.cols]);
        let shape = Shape::from(out_dims);
        let storage = match (self.precision, s1, s2) {
            (_, CpuStorage::F64(a), CpuStorage::F64(b)) if lib.dgemm.is_some() => {
                let dgemm = Cblas(lib.dgemm.expect("checked by the guard"));
                CpuStorage::F64(gemm_cpu(&dgemm, a, la, b, lb)?)
            }
            (Precision::F32, CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(gemm_cpu(&Cblas(lib.sgemm), a, la, b, lb)?)
            }
            (Precision::Bf16, _, _) if lib.bf16.is_some() => {
                let (a, la) = bf16_operand(s1, la)?;
                let (b, lb) = bf16_operand(s2, lb)?;
                let bf16 = Cblas(lib.bf16.expect("checked by the guard"));
                CpuStorage::F32(gemm_cpu(&bf16, &a, la, &b, lb)?)
            }
            _ => candle_core::bail!(
                "gemm: no {} kernel for {:?} · {:?}",
                self.precision,
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Frozen operands (plain tensors outside any graph) get no gradient:
        // this is what skips the weight gradient of the base projections.
        let ga = if a.track_op() {
            Some(matmul(grad, &b.t()?, self.precision)?.to_dtype(a.dtype())?)
        } else {
            None
        };
        let gb = if b.track_op() {
            Some(matmul(&a.t()?, grad, self.precision)?.to_dtype(b.dtype())?)
        } else {
            None
        };
        Ok((ga, gb))
    }
}

/// Rounds f32 values to bf16 (held in f32) going forward, or the gradient
/// going backward: the two halves of the emulated bf16 product.
struct RoundBf16 {
    /// `false`: forward rounds, backward passes the gradient through;
    /// `true`: forward is the identity, backward rounds the gradient.
    on_backward: bool,
}

impl candle_core::CustomOp1 for RoundBf16 {
    fn name(&self) -> &'static str {
        if self.on_backward {
            "dsel-round-bf16-grad"
        } else {
            "dsel-round-bf16"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("round to bf16: f32 input expected, got {:?}", s.dtype());
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("round to bf16: contiguous input expected");
        };
        let out = if self.on_backward {
            v[a..b].to_vec()
        } else {
            crate::bf16::round_slice(&v[a..b])
        };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.on_backward {
            Ok(Some(round_bf16(grad)?))
        } else {
            Ok(Some(grad.clone()))
        }
    }
}

/// `t` rounded to bf16 and held in f32; the backward passes the gradient.
fn round_bf16(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 => t.to_dtype(DType::F32),
        DType::F32 if t.device().is_cpu() => {
            t.contiguous()?.apply_op1(RoundBf16 { on_backward: false })
        }
        DType::F32 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// The identity whose backward rounds the incoming gradient to bf16.
fn round_grad_bf16(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 && t.device().is_cpu() && t.track_op() {
        t.contiguous()?.apply_op1(RoundBf16 { on_backward: true })
    } else {
        Ok(t.clone())
    }
}

/// `a · b` for `a [.., m, k]` and `b [.., k, n]` with identical leading
/// (batch) dimensions, at `precision` (see the module docs).
///
/// Differentiable; no gradient is computed for an operand that is not part
/// of an autograd graph. f64 operands always run in f64. A bf16 operand
/// (a frozen weight stored in bf16) is accepted at either precision and
/// gives an f32 result.
pub fn matmul(a: &Tensor, b: &Tensor, precision: Precision) -> Result<Tensor> {
    let r = a.rank();
    if r < 2 || b.rank() != r || a.dims()[..r - 2] != b.dims()[..r - 2] {
        return a.matmul(b);
    }
    if a.dims()[r - 1] != b.dims()[r - 2] {
        candle_core::bail!("matmul: shape mismatch {:?} · {:?}", a.dims(), b.dims());
    }
    let has_bf16 = a.dtype() == DType::BF16 || b.dtype() == DType::BF16;
    let precision = if has_bf16 { Precision::Bf16 } else { precision };
    let f64s = a.dtype() == DType::F64 && b.dtype() == DType::F64;
    let lib = loaded().filter(|_| a.device().is_cpu() && b.device().is_cpu());
    let native = match (lib, precision) {
        (Some(l), _) if f64s => l.dgemm.is_some(),
        (Some(_), Precision::F32) => a.dtype() == DType::F32 && b.dtype() == DType::F32,
        (Some(l), Precision::Bf16) => {
            l.bf16.is_some()
                && matches!(a.dtype(), DType::F32 | DType::BF16)
                && matches!(b.dtype(), DType::F32 | DType::BF16)
        }
        (None, _) => false,
    };
    if !native {
        if f64s || precision == Precision::F32 {
            return a.matmul(b);
        }
        // Emulated bf16, the same numbers as the native kernel up to the
        // order of the f32 sums: rounded operands multiplied in f32 (through
        // the f32 library when one loaded, else candle), and the gradient
        // coming back rounded before its products.
        let (ra, rb) = (round_bf16(a)?, round_bf16(b)?);
        let c = if lib.is_some() && ra.dtype() == DType::F32 && rb.dtype() == DType::F32 {
            matmul(&ra, &rb, Precision::F32)?
        } else {
            ra.matmul(&rb)?
        };
        return round_grad_bf16(&c);
    }
    let a = if usable_layout(a) {
        a.clone()
    } else {
        a.contiguous()?
    };
    let b = if usable_layout(b) {
        b.clone()
    } else {
        b.contiguous()?
    };
    a.apply_op2(&b, Gemm { precision })
}

/// `x · wᵀ` for `x [.., in]` and `w [out, in]` (PyTorch `nn.Linear`
/// layout), returning `[.., out]`, at `precision`; the transposed weight
/// reaches the library without a copy.
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&d_in, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input must have at least one dimension");
    };
    let (d_out, w_in) = w.dims2()?;
    if w_in != d_in {
        candle_core::bail!(
            "linear: input feature size {d_in} does not match weight [{d_out}, {w_in}]"
        );
    }
    let n: usize = lead.iter().product();
    let y = matmul(&x.reshape((n, d_in))?, &w.t()?, precision)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(d_out);
    y.reshape(out_dims)
}

/// `c += a · b` on row-major f32 slices: `a` is `m × k` with row stride
/// `lda ≥ k`, `b` is `k × n` with row stride `ldb ≥ n`, `c` is `m × n`
/// (contiguous), at `precision` (bf16: both operands rounded, f32
/// accumulation), on the loaded library split over the rayon pool, or on
/// candle's matmul when none loaded. For products outside any autograd
/// graph (LESS's projection of gradient rows).
#[allow(clippy::too_many_arguments)]
pub fn gemm_accumulate(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    precision: Precision,
) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    if lda < k
        || ldb < n
        || a.len() < (m - 1) * lda + k
        || b.len() < (k - 1) * ldb + n
        || c.len() < m * n
    {
        candle_core::bail!(
            "gemm_accumulate: buffer sizes do not match (m {m}, n {n}, k {k}, lda {lda}, ldb {ldb}, a {}, b {}, c {})",
            a.len(),
            b.len(),
            c.len()
        );
    }
    if m.max(n).max(k).max(lda).max(ldb) > i32::MAX as usize / 2 {
        candle_core::bail!("gemm_accumulate: dimensions exceed the 32-bit BLAS interface");
    }
    let op = |rows, cols, ld| Operand {
        rows,
        cols,
        trans: false,
        ld,
        offset: 0,
    };
    let (la, lb) = (op(m, k, lda), op(k, n, ldb));
    let pc = SendPtr(c.as_mut_ptr() as *const f32);
    match (loaded(), precision) {
        (
            Some(Loaded {
                bf16: Some(bf16), ..
            }),
            Precision::Bf16,
        ) => {
            let a16 = crate::bf16::from_f32_slice(&a[..(m - 1) * lda + k]);
            let b16 = crate::bf16::from_f32_slice(&b[..(k - 1) * ldb + n]);
            // SAFETY: extents checked above; c is m × n.
            unsafe {
                gemm_one(
                    &Cblas(*bf16),
                    SendPtr(a16.as_ptr()),
                    la,
                    SendPtr(b16.as_ptr()),
                    lb,
                    pc,
                    true,
                    true,
                )
            };
        }
        (Some(lib), p) => {
            let (ra, rb);
            let (pa, pb) = if p == Precision::Bf16 {
                ra = crate::bf16::round_slice(&a[..(m - 1) * lda + k]);
                rb = crate::bf16::round_slice(&b[..(k - 1) * ldb + n]);
                (ra.as_ptr(), rb.as_ptr())
            } else {
                (a.as_ptr(), b.as_ptr())
            };
            // SAFETY: extents checked above; c is m × n.
            unsafe {
                gemm_one(
                    &Cblas(lib.sgemm),
                    SendPtr(pa),
                    la,
                    SendPtr(pb),
                    lb,
                    pc,
                    true,
                    true,
                )
            };
        }
        (None, p) => {
            let dev = candle_core::Device::Cpu;
            let dense = |v: &[f32], rows: usize, cols: usize, ld: usize| -> Vec<f32> {
                let mut out = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    out.extend_from_slice(&v[r * ld..r * ld + cols]);
                }
                if p == Precision::Bf16 {
                    crate::bf16::round_slice(&out)
                } else {
                    out
                }
            };
            let ta = Tensor::from_vec(dense(a, m, k, lda), (m, k), &dev)?;
            let tb = Tensor::from_vec(dense(b, k, n, ldb), (k, n), &dev)?;
            let prod = ta.matmul(&tb)?.flatten_all()?.to_vec1::<f32>()?;
            c[..m * n].iter_mut().zip(prod).for_each(|(c, p)| *c += p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Precision::{Bf16, F32};
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = crate::fused::tests::max_diff(a, b);
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    #[test]
    fn operand_layouts() {
        eprintln!("backend: {:?}", crate::backend());
        let o = Operand::of(&[3, 4], &[4, 1], 0).unwrap();
        assert!(!o.trans && o.ld == 4);
        let o = Operand::of(&[4, 3], &[1, 4], 2).unwrap();
        assert!(o.trans && o.ld == 4 && o.offset == 2);
        assert!(Operand::of(&[3, 4], &[8, 2], 0).is_none());
        // Narrowed rows keep the parent's leading dimension.
        let o = Operand::of(&[2, 3], &[5, 1], 5).unwrap();
        assert_eq!((o.ld, o.row_offset(1)), (5, 10));
    }

    #[test]
    fn matches_candle_all_transpositions_and_splits() {
        let dev = Device::Cpu;
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (130, 64, 3),
            (2, 300, 600),
            (257, 129, 65),
        ] {
            for dtype in [DType::F32, DType::F64] {
                let a = Tensor::randn(0f32, 1.0, (m, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let b = Tensor::randn(0f32, 1.0, (k, n), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let at = a.t().unwrap().contiguous().unwrap().t().unwrap();
                let bt = b.t().unwrap().contiguous().unwrap().t().unwrap();
                let want = a.matmul(&b).unwrap();
                let tol = if dtype == DType::F32 { 1e-3 } else { 1e-10 };
                for (x, y) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt)] {
                    close(&matmul(x, y, F32).unwrap(), &want, tol);
                }
            }
        }
        // Batched, with transposed views (as attention uses them).
        let q = Tensor::randn(0f32, 1.0, (2, 3, 40, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 24, 16), &dev).unwrap();
        let want = q.matmul(&k.t().unwrap()).unwrap();
        close(&matmul(&q, &k.t().unwrap(), F32).unwrap(), &want, 1e-4);
        let p = Tensor::randn(0f32, 1.0, (2, 3, 40, 24), &dev).unwrap();
        close(&matmul(&p, &k, F32).unwrap(), &p.matmul(&k).unwrap(), 1e-4);
        let one = Tensor::randn(0f32, 1.0, (1, 3, 5), &dev).unwrap();
        let two = Tensor::randn(0f32, 1.0, (1, 5, 2), &dev).unwrap();
        close(
            &matmul(&one, &two, F32).unwrap(),
            &one.matmul(&two).unwrap(),
            1e-5,
        );
        // Zero inner dimension.
        let a = Tensor::zeros((3, 0), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((0, 2), DType::F32, &dev).unwrap();
        let c = matmul(&a, &b, F32).unwrap();
        assert_eq!(c.dims(), &[3, 2]);
    }

    #[test]
    fn backward_matches_candle_and_skips_frozen() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (6, 5), &dev).unwrap();
        let wv = Var::randn(0f64, 1.0, (4, 5), &dev).unwrap();
        let frozen = wv.as_detached_tensor();
        let r = Tensor::randn(0f64, 1.0, (6, 4), &dev).unwrap();

        let mine = (matmul(x.as_tensor(), &wv.t().unwrap(), F32).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = mine.backward().unwrap();
        let base = (x.matmul(&wv.t().unwrap()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let gb = base.backward().unwrap();
        close(g.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-12);
        close(g.get(&wv).unwrap(), gb.get(&wv).unwrap(), 1e-12);

        // Batched operands, both tracked.
        let p = Var::randn(0f64, 1.0, (2, 3, 7, 4), &dev).unwrap();
        let k = Var::randn(0f64, 1.0, (2, 3, 5, 4), &dev).unwrap();
        let r2 = Tensor::randn(0f64, 1.0, (2, 3, 7, 5), &dev).unwrap();
        let g2 = (matmul(p.as_tensor(), &k.t().unwrap(), F32).unwrap() * &r2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb2 = (p.matmul(&k.t().unwrap()).unwrap() * &r2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(g2.get(&p).unwrap(), gb2.get(&p).unwrap(), 1e-12);
        close(g2.get(&k).unwrap(), gb2.get(&k).unwrap(), 1e-12);

        let y = matmul(x.as_tensor(), &frozen.t().unwrap(), F32).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&frozen).is_none());
        close(g.get(&x).unwrap(), gb.get(&x).unwrap(), 1e-12);
    }

    /// `t` rounded to bf16, in f64 (the exact value a bf16 GEMM multiplies).
    fn rounded64(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    #[test]
    fn bf16_products_are_exact_products_of_rounded_operands() {
        let dev = Device::Cpu;
        for &(m, k, n) in &[(1, 1, 1), (5, 33, 7), (130, 64, 3), (64, 576, 192)] {
            let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = rounded64(&a).matmul(&rounded64(&w).t().unwrap()).unwrap();
            // f32 accumulation of k exact products of bf16 values.
            let tol = 1e-5 * k as f64;
            let w16 = w.to_dtype(DType::BF16).unwrap();
            let at = a.t().unwrap().contiguous().unwrap().t().unwrap();
            for (x, y) in [(&a, &w), (&at, &w), (&a, &w16), (&at, &w16)] {
                let got = matmul(x, &y.t().unwrap(), Bf16).unwrap();
                assert_eq!(got.dtype(), DType::F32);
                close(&got.to_dtype(DType::F64).unwrap(), &want, tol);
            }
            // And it differs from the f32 product by bf16 rounding only.
            let f32_prod = matmul(&a, &w.t().unwrap(), F32).unwrap();
            close(
                &f32_prod.to_dtype(DType::F64).unwrap(),
                &want,
                0.05 * (k as f64).sqrt(),
            );
        }
    }

    #[test]
    fn bf16_backward_reaches_tracked_operands_only() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (6, 40), &dev).unwrap();
        let w16 = Tensor::randn(0f32, 1.0, (9, 40), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let lora = Var::randn(0f32, 1.0, (40, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (6, 9), &dev).unwrap();
        let y = matmul(x.as_tensor(), &w16.t().unwrap(), F32).unwrap();
        let z = matmul(x.as_tensor(), lora.as_tensor(), Bf16).unwrap();
        let loss = ((y * &r).unwrap().sum_all().unwrap() + z.sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(&w16).is_none());
        // d/dx = round(r)·round(W) + 1·round(Lᵀ), accumulated in f32.
        let want_x = (rounded64(&r).matmul(&rounded64(&w16)).unwrap()
            + Tensor::ones((6, 4), DType::F64, &dev)
                .unwrap()
                .matmul(&rounded64(lora.as_tensor()).t().unwrap())
                .unwrap())
        .unwrap();
        let gx = g.get(&x).unwrap();
        assert_eq!(gx.dtype(), DType::F32);
        close(&gx.to_dtype(DType::F64).unwrap(), &want_x, 1e-3);
        let want_l = rounded64(x.as_tensor())
            .t()
            .unwrap()
            .matmul(&Tensor::ones((6, 4), DType::F64, &dev).unwrap())
            .unwrap();
        close(
            &g.get(&lora).unwrap().to_dtype(DType::F64).unwrap(),
            &want_l,
            1e-3,
        );
    }

    #[test]
    fn f64_ignores_the_precision() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (5, 3), &dev).unwrap();
        close(
            &matmul(&a, &b, Bf16).unwrap(),
            &a.matmul(&b).unwrap(),
            1e-12,
        );
    }
}
