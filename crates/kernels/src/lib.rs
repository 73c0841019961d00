//! `dsel-kernels`: the compute core under the model.
//!
//! * [`matmul`] / [`linear`]: every large matrix product of the model, in
//!   f32 or in mixed precision ([`Precision::Bf16`]: bf16 inputs, f32
//!   accumulation and output), on the fastest GEMM library that loads at run
//!   time (see [`library`]): Intel MKL (its `cblas_gemm_bf16bf16f32` runs on
//!   the AMX tiles of recent Xeons), then OpenBLAS (f32 only), then candle's
//!   own matmul. Their backward passes compute only the gradients of
//!   operands that belong to an autograd graph, so frozen base weights cost
//!   no weight-gradient GEMM.
//! * [`fused`]: multi-threaded row-wise kernels (gather + log-softmax over
//!   the vocabulary, RMSNorm, rotary embeddings, the masked attention
//!   softmax) with exact backward passes.
//! * [`bf16`]: f32 ↔ bf16 conversion (round to nearest even).
//! * [`alloc`]: keeps freed large blocks mapped (glibc), so the model's
//!   large tensors stop costing page faults at every pass.
//! * [`bf16_gemm`]: this crate's own bf16 GEMM on AVX512-BF16, used for
//!   bf16 products where the library has none that runs on the hardware
//!   (OpenBLAS's wheel; MKL on non-Intel processors).
//!
//! Nothing here knows about models: the crate works on candle tensors and
//! raw slices only.

pub mod alloc;
pub mod bf16;
pub mod bf16_gemm;
pub mod fused;
pub mod gemm;
pub mod library;

pub use gemm::{gemm_accumulate, linear, matmul};
pub use library::{backend, fast_path_warning, Backend};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The precision of the model's matrix products.
///
/// `Bf16` is mixed precision: GEMM inputs (frozen weights, activations,
/// LoRA weights, gradients flowing back) are rounded to bf16, products are
/// accumulated and returned in f32; everything else — RMSNorm, softmax,
/// log-softmax, residual sums, LoRA weights, gradients and optimizer state —
/// stays f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (or the weights' own dtype, e.g. f64 in tests).
    #[default]
    F32,
    /// bf16 GEMM inputs, f32 accumulation and output.
    Bf16,
}

impl Precision {
    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The fastest precision this process can run: `Bf16` when bf16
    /// products run on bf16 hardware (MKL on AMX/AVX512-BF16, or
    /// [`bf16_gemm`] on AVX512-BF16), else `F32` (emulating bf16 without
    /// hardware support would be slower than f32).
    pub fn fastest() -> Precision {
        if backend().bf16_native {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Precision, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision {other:?}: expected `bf16` or `f32`"
            )),
        }
    }
}
