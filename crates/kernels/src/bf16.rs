//! f32 ↔ bf16 conversion on raw bits (bf16 = the top 16 bits of an f32).
//!
//! [`from_f32`] rounds to nearest, ties to even (as the hardware's
//! `vcvtneps2bf16`, PyTorch and the `half` crate do) and keeps NaNs NaN.
//! The slice versions are branch-free so that the compiler vectorises them,
//! and split long inputs over the rayon pool.

use rayon::prelude::*;

/// One f32 to bf16 bits, round to nearest even.
#[inline(always)]
pub fn from_f32(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    // A NaN keeps its sign and becomes a quiet NaN (rounding could carry
    // its payload into infinity).
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// bf16 bits to the f32 they stand for (exact).
#[inline(always)]
pub fn to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 16;

/// `out[i] = from_f32(src[i])`.
pub fn convert_into(src: &[f32], out: &mut [u16]) {
    assert_eq!(src.len(), out.len(), "bf16 conversion: length mismatch");
    if src.len() <= CHUNK {
        out.iter_mut().zip(src).for_each(|(o, &x)| *o = from_f32(x));
        return;
    }
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, &x)| *o = from_f32(x)));
}

/// `src` rounded to bf16, as a new vector of bits.
pub fn from_f32_slice(src: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; src.len()];
    convert_into(src, &mut out);
    out
}

/// `src` rounded to bf16 and widened back to f32 (what a bf16 GEMM input
/// holds), for the emulated path and for tests.
pub fn round_slice(src: &[f32]) -> Vec<f32> {
    src.iter().map(|&x| to_f32(from_f32(x))).collect()
}

/// Reinterprets `half::bf16` values as their bits (same layout).
pub fn bits(v: &[half::bf16]) -> &[u16] {
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over `u16`.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_half_rounding_on_every_pattern_class() {
        let mut x = 0x1234_5678u32;
        for _ in 0..200_000 {
            // xorshift: random bit patterns, including NaN, inf, subnormals.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            let want = half::bf16::from_f32(f);
            let got = from_f32(f);
            if f.is_nan() {
                assert!(to_f32(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{f:e} ({x:#x})");
            }
        }
        // Ties go to even; the largest finite values round to infinity only
        // past the halfway point.
        assert_eq!(from_f32(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(from_f32(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(from_f32(f32::INFINITY), 0x7f80);
        assert_eq!(to_f32(from_f32(-2.5)), -2.5);
    }

    #[test]
    fn slices_convert_in_parallel_chunks() {
        let src: Vec<f32> = (0..(3 * CHUNK + 7))
            .map(|i| (i as f32).sin() * 3.0)
            .collect();
        let bits = from_f32_slice(&src);
        for (i, (&b, &s)) in bits.iter().zip(&src).enumerate() {
            assert_eq!(b, from_f32(s), "element {i}");
        }
        let r = round_slice(&src);
        assert!(r
            .iter()
            .zip(&src)
            .all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
    }
}
