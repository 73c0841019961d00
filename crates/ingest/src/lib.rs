//! `dsel-ingest`: readers for every pool and target format, producing the canonical
//! example table; LESS's target sets (MMLU, BBH, TyDiQA validation + test) and custom
//! target files; named pool mixtures; deterministic seeded subsetting.
//!
//! * [`readers`]: messages JSONL, prompt/completion JSONL (T0), Alpaca JSON,
//!   AlpacaEval outputs, FLAN-CoT TSV, Parquet, and a directory reader.
//! * [`parquet_io`]: the canonical Parquet table (write with zstd, read back).
//! * [`targets`]: [`load_target_validation`], [`load_target_test`],
//!   [`target_fingerprint`] (the content of the files a target is built from).
//! * [`mixture`]: [`load_pool`], [`mixture_fingerprint`], [`default_data_root`].
//!
//! Nothing here panics on user input: errors ([`IngestError`]) name the file, the
//! 1-based line or record and the field; records with nothing to learn from are
//! skipped and counted in an [`IngestReport`].

#![warn(missing_docs)]

pub mod error;
pub mod mixture;
pub mod parquet_io;
pub mod readers;
pub mod targets;

use serde::{Deserialize, Serialize};

pub use error::{FileCount, IngestError, IngestReport, Position, Result};
pub use mixture::{
    builtin_mixture_names, check_data_root, default_data_root, load_pool, mixture_fingerprint,
    resolve_mixture, sample_indices, stratified_sample, Mixture, MixtureEntry, MixtureSpec,
    SubsetOptions, DATA_ROOT_ENV, PIPELINES_DIR_ENV,
};
pub use parquet_io::{
    examples_schema, examples_to_batch, read_examples_parquet, write_examples_parquet,
};
pub use readers::{
    detect_format, read_alpaca_eval_json, read_alpaca_json, read_dir, read_file, read_flan_cot_tsv,
    read_messages_jsonl, read_path, read_prompt_completion_jsonl, read_t0_jsonl, Format,
    ReadOptions,
};
pub use targets::{
    less_assistant_prefix, load_target_test, load_target_validation, target_files,
    target_fingerprint, TargetSpec, TargetSplit, TaskName,
};

/// Version of the ingest rules (prompt formats, parsing, skipping). Part of every
/// [`mixture_fingerprint`] and target fingerprint; bump it when a change alters
/// the examples produced.
pub const RULES_VERSION: &str = "1";

/// The ingest stage's name in the artifact store.
pub const STAGE: &str = "ingest";
/// Version of the ingest stage's output (`examples.parquet` and its report).
pub const STAGE_VERSION: &str = "ingest-1";

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Message {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// Text of the turn, untrimmed.
    pub content: String,
}

/// One canonical example.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Example {
    /// Stable id: `<path relative to the data root>:<1-based line or record>`
    /// (e.g. `pools/flan_v2_cot/aqua_train.tsv:17`); see each reader for variants.
    pub id: String,
    /// Dataset/task name (e.g. `flan_v2_cot/aqua`, `t0/ag_news_classify`,
    /// `alpaca_eval/gpt4`, `mmlu`).
    pub source: String,
    /// Target subtask (MMLU subject, BBH task, TyDiQA language); empty for pool data.
    pub subtask: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Gold answers for test sets (TyDiQA may have several); empty otherwise.
    pub references: Vec<String>,
}
