//! `dsel-less`: LESS (Xia et al., ICML 2024) data selection — the gradient
//! datastore and matching (ALGORITHMS.md, "LESS").
//!
//! * [`projection`]: the seeded Rademacher projection Π, generated
//!   block-wise from a counter-based hash (never held as a `P × d` matrix)
//!   and applied with a GEMM to a whole batch of gradient rows;
//! * [`adam`]: the reference's Adam preconditioning `Γ = m'/sqrt(v' + ε)`;
//! * [`datastore`]: per-example LoRA gradients from one batched backward,
//!   preconditioned (pool) or plain (validation), projected, normalised,
//!   stored as f16 `.npy` per checkpoint — sharded, resumable, and
//!   byte-identical whatever the interruption or worker split;
//! * [`matching`]: the checkpoint-weighted, subtask-averaged, max-over-
//!   subtasks cosine score, streamed over the memory-mapped datastore.
//!
//! The pipeline glue (warmup, artifact keys, run outputs) lives in
//! `dsel_pipeline::less`.

#![warn(missing_docs)]

pub mod adam;
pub mod datastore;
pub mod matching;
pub mod projection;

pub use adam::{load_moments, precondition, Moments};
pub use datastore::{
    build, features_file, open_features, BuildOptions, BuildReport, Checkpoint, DatastoreConfig,
    Examples, GradientKind, DATASTORE_VERSION,
};
pub use matching::{checkpoint_weights, subtask_groups, MatchReport};
pub use projection::{normalize_rows, Projector};
