//! `dsel-train`: the training core shared by every stage that trains
//! (LoRA fine-tuning, LESS warmup, ToV base-train and valtune, online batch
//! selection).
//!
//! It is generic over a list of named [`candle_core::Var`]s and a loss
//! closure, and provides:
//!
//! * [`AdamW`], PyTorch's AdamW reproduced operation by operation, with its
//!   moments readable and saved to / loaded from safetensors
//!   ([`read_adamw_state`] reads a saved state without the variables);
//!   [`GradAccumulator`] and [`clip_grad_norm`];
//! * [`LinearSchedule`] (HF `get_linear_schedule_with_warmup`),
//!   [`epoch_order`] (seeded shuffles), [`batches`], [`dropout_seed`];
//! * [`train`], the epoch loop with gradient accumulation, progress display,
//!   atomic checkpoints and bit-identical resume.

#![warn(missing_docs)]

mod adamw;
mod error;
mod io;
mod schedule;
mod trainer;

pub use adamw::{
    clip_grad_norm, read_adamw_state, AdamW, AdamWConfig, AdamWState, GradAccumulator, ADAMW_FORMAT,
};
pub use error::TrainError;
pub use schedule::{batches, dropout_seed, epoch_order, LinearSchedule};
pub use trainer::{
    plan, train, EpochSummary, LrShape, NoHooks, StepContext, TrainConfig, TrainHooks, TrainPlan,
    TrainReport, CHECKPOINT_FILE, CHECKPOINT_FORMAT,
};
