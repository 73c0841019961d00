//! `dsel-store`: the content-addressed artifact store every `dsel` stage
//! reads and writes, so expensive artifacts (checkpoints, loss sweeps,
//! gradient datastores) are computed once and reused.
//!
//! * [`StageSpec`] → [`ArtifactKey`]: a blake3 hash of stage, code version,
//!   canonical config, input keys and seed (encoding documented in [`key`]).
//! * [`Store::get_or_build`]: locked, verified, atomic builds under a cache
//!   root ([`default_cache_root`]); [`Store::list`], [`Store::show`],
//!   [`Store::verify_all`], [`Store::gc`] back the `dsel cache` commands.
//! * `.npy` arrays ([`NpyWriter`], [`write_npy`], [`NpyArray`]) and Parquet
//!   tables ([`write_parquet`], [`read_parquet`]); [`atomic_write`].
//! * Sealed scratch files ([`write_sealed`], [`write_npy_sealed`],
//!   [`check_sealed`]): resumable partial state with a blake3 beside each
//!   file, checked before a resumed build trusts it.
//! * Pool-wide work in fixed units ([`shard`]): resumable, split among
//!   workers `i/N` ([`Shard`]), merged into a single process's bytes.
//!
//! ```no_run
//! use dsel_store::{Store, StageSpec, write_npy};
//! # fn main() -> anyhow::Result<()> {
//! let store = Store::open(dsel_store::default_cache_root())?;
//! let spec = StageSpec::new("sweep", "1", serde_json::json!({"model": "tiny"})).with_seed(0);
//! let out = store.get_or_build(&spec, |b| {
//!     write_npy(b.path("logp.npy"), &[3], &[0.1f32, 0.2, 0.3])?;
//!     b.set_info(serde_json::json!({"examples": 3}));
//!     Ok(())
//! })?;
//! println!("{} (cache hit: {})", out.artifact.path("logp.npy").display(), out.cache_hit);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod fsutil;
pub mod key;
mod manifest;
mod npy;
mod sealed;
pub mod shard;
mod store;
mod table;

pub use fsutil::{
    atomic_write, atomic_write_with, process_cpu_seconds, process_peak_rss_mib, reset_peak_rss,
    rfc3339_utc, temp_file_target,
};
pub use key::{canonical_json, validate_stage_name, ArtifactKey, StageSpec};
pub use manifest::{hash_file, FileEntry, Manifest, MANIFEST_FILE, MANIFEST_FORMAT};
pub use npy::{read_npy, write_npy, DType, NpyArray, NpyElement, NpyWriter};
pub use sealed::{
    check_sealed, digest_path, is_digest_file, remove_sealed, seal_file, trust_sealed,
    write_npy_sealed, write_sealed, Seal, DIGEST_SUFFIX,
};
pub use shard::{Missing, Shard, UnitWork};
pub use store::{
    default_cache_root, Artifact, ArtifactSummary, Builder, GcItem, GcKind, GcOptions, GcReport,
    Outcome, Problem, Store, VerifyReport,
};
pub use table::{parquet_schema, read_parquet, write_parquet, write_parquet_with_schema};

/// Re-export so callers build record batches with the same arrow version.
pub use arrow;
