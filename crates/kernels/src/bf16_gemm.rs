//! A bf16 × bf16 → f32 GEMM on the AVX512-BF16 dot-product instruction
//! (`vdpbf16ps`), for processors that have the instruction but no library
//! that uses it: OpenBLAS's PyPI wheel ships no bf16 GEMM, and MKL runs its
//! bf16 GEMM in emulation on non-Intel processors (measured on an AMD Zen 4
//! with AVX512-BF16: 44 GFLOP/s for one thread, below its own `sgemm`).
//!
//! The layout is the classic one of BLIS-style GEMMs: the `k` dimension is
//! cut into blocks of [`KC`], `n` into blocks of [`NC`]; each block of B is
//! packed once into column panels of [`NR`] columns in which the two bf16
//! values of consecutive `k` sit side by side (the operand layout of
//! `vdpbf16ps`), each block of A into row panels of [`MR`] rows of the same
//! pairs, and an `MR × NR` micro-kernel keeps its block of C in 16 zmm
//! registers while it runs over the pairs of the block (one broadcast of an
//! A pair and one `vdpbf16ps` per row and 16 columns). An odd `k` is padded
//! with a zero.
//!
//! Every element of C is the same sequence of operations whatever the
//! block it falls in: the sums run over `k` in order, block after block, so
//! the result does not depend on how the caller splits C over threads.
//! The entry point has the CBLAS prototype of MKL's
//! `cblas_gemm_bf16bf16f32` (row-major only), so it plugs in where that
//! function would.

use std::cell::RefCell;
use std::ffi::c_int;

/// Rows of the micro-kernel's block of C.
pub const MR: usize = 8;
/// Columns of the micro-kernel's block of C (two zmm registers of f32).
pub const NR: usize = 32;
/// Depth of one block (even: a block holds whole pairs). Large enough that
/// the model's products with k ≤ 1024 write C once (C's traffic dominates
/// the LM head's 49k-column output); the micro-kernel's panels (`KC × NR`
/// and `KC × MR` bf16, 64 + 16 KiB) stream from L2 at 160 bytes per 16
/// dot-product instructions.
pub const KC: usize = 1024;
/// Columns of one packed block of B (`KC × NC` bf16: 4 MiB, in L3).
pub const NC: usize = 2048;
/// Rows of one packed block of A (`MC × KC` bf16: 192 KiB, in L2).
/// KC and MC were chosen by `dsel bench --only shapes` over KC ∈ {256, 384,
/// 512, 1024} × MC ∈ {96, 192} on an AMD Zen 4 (2 threads).
pub const MC: usize = 96;

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_TRANS: c_int = 112;

/// Whether this processor runs the kernel (AVX-512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A read-only matrix operand: element `(r, c)` of the logical matrix is
/// `p[r·ld + c]`, or `p[c·ld + r]` when transposed.
#[derive(Clone, Copy)]
struct View {
    p: *const u16,
    ld: usize,
    trans: bool,
}

/// Two bf16 values as the 32-bit pair `vdpbf16ps` reads (low half first).
#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Packs `lines` lines of pairs into panels of `width` lines: panel after
/// panel, pair after pair, `width` pairs each (lines past `lines` and the
/// odd pad are zero; every other entry is written, so the reused buffer is
/// not cleared first). Line `l` holds the logical elements `(l, d)` for
/// `d in 0..depth`, where `(l, d)` sits at `p[l·line_step + d·depth_step]`;
/// a unit `depth_step` reads each pair as one 32-bit load.
///
/// # Safety
/// Every `(l, d)` with `l < lines`, `d < depth` inside the operand.
unsafe fn pack(
    p: *const u16,
    line_step: usize,
    depth_step: usize,
    lines: usize,
    depth: usize,
    width: usize,
    out: &mut Vec<u32>,
) {
    let pairs = depth.div_ceil(2);
    let whole = depth / 2;
    let panels = lines.div_ceil(width);
    out.resize(panels * pairs * width, 0);
    for panel in 0..panels {
        let dst = &mut out[panel * pairs * width..(panel + 1) * pairs * width];
        let n = width.min(lines - panel * width);
        if n < width {
            // The last panel's missing lines: zero, whatever an earlier call left.
            for q in 0..pairs {
                dst[q * width + n..(q + 1) * width].fill(0);
            }
        }
        let base = |l: usize| panel * width + l;
        if depth_step == 1 {
            // Pairs are adjacent in memory: one unaligned 32-bit load each.
            for l in 0..n {
                // SAFETY: (line, 0..depth) inside the operand (caller).
                let row = unsafe { p.add(base(l) * line_step) };
                for q in 0..whole {
                    // SAFETY: elements 2q and 2q + 1 < depth of this line.
                    dst[q * width + l] = unsafe { (row.add(2 * q) as *const u32).read_unaligned() };
                }
                if depth % 2 == 1 {
                    // SAFETY: the last element of this line.
                    dst[whole * width + l] = unsafe { *row.add(depth - 1) } as u32;
                }
            }
        } else {
            // Pairs are two depths apart: read line after line along depth.
            for q in 0..pairs {
                for l in 0..n {
                    let at = base(l) * line_step + 2 * q * depth_step;
                    // SAFETY: (line, 2q) and, when present, (line, 2q + 1)
                    // inside the operand (caller).
                    let (lo, hi) = unsafe {
                        (
                            *p.add(at),
                            if 2 * q + 1 < depth {
                                *p.add(at + depth_step)
                            } else {
                                0
                            },
                        )
                    };
                    dst[q * width + l] = pair(lo, hi);
                }
            }
        }
    }
}

/// Packs lines `l0..l0 + lines` over depth `d0..d0 + depth` of an operand
/// into panels of `width` lines (see [`pack`]): A's lines are its rows
/// (`rows = true`, depth along its columns), B's its columns.
///
/// # Safety
/// The lines and depths inside the operand.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block(
    v: View,
    rows: bool,
    l0: usize,
    lines: usize,
    d0: usize,
    depth: usize,
    width: usize,
    out: &mut Vec<u32>,
) {
    let (line, step) = if rows != v.trans {
        (v.ld, 1)
    } else {
        (1, v.ld)
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        pack(
            v.p.add(l0 * line + d0 * step),
            line,
            step,
            lines,
            depth,
            width,
            out,
        )
    }
}

/// How a micro-kernel's sums enter C.
#[derive(Clone, Copy)]
enum Store {
    /// `C = alpha·S` (C is not read: it may be uninitialised).
    Overwrite,
    /// `C = alpha·S + beta·C`.
    Scale(f32),
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Store, MR, NR};
    use std::arch::x86_64::*;

    /// `C[rows × cols] (block at c, row stride ldc) ← alpha·A_panel·B_panel`
    /// combined with C as `store` says, over `pairs` k-pairs.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 present; `a` holds `pairs × MR` pairs, `b`
    /// `pairs × NR`; C valid for `rows ≤ MR` rows of `cols ≤ NR` columns.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn micro(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        store: Store,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            // SAFETY: p < pairs; the panels hold `pairs` groups of pairs.
            unsafe {
                let bp = b.add(p * NR) as *const __m512i;
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
                let ap = a.add(p * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
            }
        }
        let va = _mm512_set1_ps(alpha);
        let mask = |from: usize| -> __mmask16 {
            let n = cols.saturating_sub(from).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        let masks = [mask(0), mask(16)];
        for (r, row) in acc.iter().enumerate().take(rows) {
            for (h, &m) in masks.iter().enumerate() {
                if m == 0 {
                    continue;
                }
                // SAFETY: row r < rows, the mask keeps columns < cols.
                unsafe {
                    let dst = c.add(r * ldc + 16 * h);
                    let s = _mm512_mul_ps(row[h], va);
                    let v = match store {
                        Store::Overwrite => s,
                        Store::Scale(beta) => {
                            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dst), _mm512_set1_ps(beta), s)
                        }
                    };
                    _mm512_mask_storeu_ps(dst, m, v);
                }
            }
        }
    }
}

thread_local! {
    /// Packing buffers of this thread (A block, B block), reused by every call.
    static PACKS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `C[m×n] = alpha·A[m×k]·B[k×n] + beta·C` on bf16 bits with f32 sums,
/// row-major (CBLAS conventions; `beta = 0` never reads C).
///
/// # Safety
/// The processor has AVX-512F and AVX512-BF16 ([`available`]); the
/// pointers are valid for the extents the CBLAS conventions give.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const u16,
    lda: usize,
    b: *const u16,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let (va, vb) = (
        View {
            p: a,
            ld: lda,
            trans: trans_a,
        },
        View {
            p: b,
            ld: ldb,
            trans: trans_b,
        },
    );
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: C is m × n with row stride ldc.
                unsafe {
                    let e = c.add(i * ldc + j);
                    *e = if beta == 0.0 { 0.0 } else { beta * *e };
                }
            }
        }
        return;
    }
    PACKS.with(|packs| {
        let (pa, pb) = &mut *packs.borrow_mut();
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let pairs = kc.div_ceil(2);
                let store = if k0 > 0 {
                    Store::Scale(1.0)
                } else if beta == 0.0 {
                    Store::Overwrite
                } else {
                    Store::Scale(beta)
                };
                // SAFETY: the block is inside B.
                unsafe { pack_block(vb, false, j0, nc, k0, kc, NR, pb) };
                for i0 in (0..m).step_by(MC) {
                    let mc = MC.min(m - i0);
                    // SAFETY: the block is inside A.
                    unsafe { pack_block(va, true, i0, mc, k0, kc, MR, pa) };
                    for (jp, jr) in (0..nc).step_by(NR).enumerate() {
                        for (ip, ir) in (0..mc).step_by(MR).enumerate() {
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: the features are the caller's promise;
                            // the panels were packed above with `pairs`
                            // pairs; the block of C is inside C.
                            unsafe {
                                avx512::micro(
                                    pairs,
                                    pa.as_ptr().add(ip * pairs * MR),
                                    pb.as_ptr().add(jp * pairs * NR),
                                    c.add((i0 + ir) * ldc + j0 + jr),
                                    ldc,
                                    MR.min(mc - ir),
                                    NR.min(nc - jr),
                                    alpha,
                                    store,
                                )
                            };
                        }
                    }
                }
            }
        }
    });
}

/// [`gemm`] behind the CBLAS prototype of `cblas_gemm_bf16bf16f32`
/// (`Order, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc`);
/// only row-major order is supported (the only one this crate passes).
///
/// # Safety
/// As [`gemm`]; installed only where [`available`] holds.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cblas_gemm_bf16bf16f32(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const u16,
    lda: c_int,
    b: *const u16,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) {
    assert_eq!(
        order, CBLAS_ROW_MAJOR,
        "dsel bf16 GEMM: only row-major order"
    );
    let size = |v: c_int| usize::try_from(v).expect("dsel bf16 GEMM: negative size");
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            trans_a == CBLAS_TRANS,
            trans_b == CBLAS_TRANS,
            size(m),
            size(n),
            size(k),
            alpha,
            a,
            size(lda),
            b,
            size(ldb),
            beta,
            c,
            size(ldc),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values spread over a few binades, as bf16 bits.
    fn values(n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                crate::bf16::from_f32((u - 0.5) * 4.0)
            })
            .collect()
    }

    /// The product in f64 from the same bf16 operands, and Σ|a||b| per
    /// element (the scale of its rounding error).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[u16],
        lda: usize,
        b: &[u16],
        ldb: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let f = |v: u16| crate::bf16::to_f32(v) as f64;
        let at = |i: usize, p: usize| f(if ta { a[p * lda + i] } else { a[i * lda + p] });
        let bt = |p: usize, j: usize| f(if tb { b[j * ldb + p] } else { b[p * ldb + j] });
        let (mut c, mut scale) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += at(i, p) * bt(p, j);
                    scale[i * n + j] += (at(i, p) * bt(p, j)).abs();
                }
            }
        }
        (c, scale)
    }

    #[test]
    fn matches_the_exact_product_of_the_operands_in_every_layout() {
        if !available() {
            eprintln!("skipped: this processor has no AVX512-BF16");
            return;
        }
        // Edges of every block size: odd k, partial panels, several KC and
        // NC blocks.
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (9, 33, 2),
            (17, 31, 257),
            (200, 70, 2051),
            (5, 2100, 40),
        ] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let (lda, ldb) = (if ta { m + 3 } else { k + 1 }, if tb { k + 2 } else { n });
                let a = values(if ta { k * lda } else { m * lda }, 1);
                let b = values(if tb { n * ldb } else { k * ldb }, 2);
                let (want, scale) = reference(ta, tb, m, n, k, &a, lda, &b, ldb);
                let ldc = n + 1;
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: available() checked; buffers sized for the layouts.
                unsafe {
                    gemm(
                        ta,
                        tb,
                        m,
                        n,
                        k,
                        1.0,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        ldb,
                        0.0,
                        c.as_mut_ptr(),
                        ldc,
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let (got, w, s) =
                            (c[i * ldc + j] as f64, want[i * n + j], scale[i * n + j]);
                        // f32 sums of k terms: a few ulps of Σ|a||b| per term.
                        assert!(
                            (got - w).abs() <= 1e-6 * k as f64 * s.max(1e-30),
                            "{m}×{n}×{k} ta={ta} tb={tb} at ({i},{j}): {got} vs {w}"
                        );
                    }
                    // The padding column between rows is never written.
                    if n < ldc {
                        assert!(c[i * ldc + n].is_nan());
                    }
                }
            }
        }
    }

    #[test]
    fn the_backend_takes_it_where_the_library_has_no_native_bf16() {
        let b = crate::backend();
        if available() && b.kind == crate::library::BackendKind::OpenBlas {
            assert!(b.bf16_native, "{b:?}");
            assert!(b.description.contains("AVX512-BF16 kernel"), "{b:?}");
            assert_eq!(crate::Precision::fastest(), crate::Precision::Bf16);
        }
    }

    #[test]
    fn alpha_and_beta_combine_with_c_and_the_result_ignores_the_split() {
        if !available() {
            eprintln!("skipped: this processor has no AVX512-BF16");
            return;
        }
        let (m, n, k) = (37, 45, 600);
        let a = values(m * k, 3);
        let b = values(k * n, 4);
        let run = |alpha: f32, beta: f32, init: f32| {
            let mut c = vec![init; m * n];
            // SAFETY: available() checked; contiguous row-major buffers.
            unsafe {
                gemm(
                    false,
                    false,
                    m,
                    n,
                    k,
                    alpha,
                    a.as_ptr(),
                    k,
                    b.as_ptr(),
                    n,
                    beta,
                    c.as_mut_ptr(),
                    n,
                )
            };
            c
        };
        let plain = run(1.0, 0.0, f32::NAN);
        let combined = run(2.0, 0.5, 3.0);
        for (p, q) in plain.iter().zip(&combined) {
            assert!(
                (q - (2.0 * p + 1.5)).abs() <= 1e-4 * (1.0 + p.abs()),
                "{q} vs {p}"
            );
        }
        // Rows 10..37 computed alone give the same bits as in the whole.
        let mut part = vec![0f32; (m - 10) * n];
        // SAFETY: rows 10.. of A, contiguous.
        unsafe {
            gemm(
                false,
                false,
                m - 10,
                n,
                k,
                1.0,
                a.as_ptr().add(10 * k),
                k,
                b.as_ptr(),
                n,
                0.0,
                part.as_mut_ptr(),
                n,
            )
        };
        assert_eq!(part, plain[10 * n..]);
    }
}
