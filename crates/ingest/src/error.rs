//! Error and report types shared by every reader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where in a file an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// 1-based text line (JSONL, TSV, JSON parse errors).
    Line(u64),
    /// 1-based record: element of a JSON list, CSV record, Parquet row.
    Record(u64),
}

/// An ingest error: the file, the 1-based line or record, the field and a message.
///
/// Display: `pools/x.jsonl:17: field "messages": expected an array`
/// (records print as `file.json: record 17: ...`). The path is shown relative to the
/// data root when the file lies under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestError {
    /// File (or mixture / target name) the error is about.
    pub path: PathBuf,
    /// Line or record, when the error is about one.
    pub position: Option<Position>,
    /// Field name, when the error is about one field.
    pub field: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl IngestError {
    /// An error about a whole file (I/O, missing file, bad layout).
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            position: None,
            field: None,
            message: message.into(),
        }
    }

    /// An error at a 1-based line.
    pub fn at_line(
        path: impl Into<PathBuf>,
        line: u64,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            position: Some(Position::Line(line)),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    /// An error at a 1-based record (JSON list element, CSV record, Parquet row).
    pub fn at_record(
        path: impl Into<PathBuf>,
        record: u64,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            position: Some(Position::Record(record)),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, err: &std::io::Error) -> Self {
        Self::file(path, format!("cannot read: {err}"))
    }

    /// The 1-based line or record number, if any.
    pub fn line(&self) -> Option<u64> {
        match self.position {
            Some(Position::Line(n)) | Some(Position::Record(n)) => Some(n),
            None => None,
        }
    }
}

impl fmt::Display for IngestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        match self.position {
            Some(Position::Line(n)) => write!(f, ":{n}")?,
            Some(Position::Record(n)) => write!(f, ": record {n}")?,
            None => {}
        }
        if let Some(field) = &self.field {
            write!(f, ": field \"{field}\"")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for IngestError {}

/// Result type of this crate.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// Per-file counts in an [`IngestReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCount {
    /// Path relative to the data root (or as given).
    pub path: String,
    /// Records read from the file.
    pub read: u64,
    /// Examples produced by the file (before any subsetting).
    pub produced: u64,
}

/// What an ingest call read, skipped and kept.
///
/// `read` counts records (lines, rows, list elements) seen; every record that did
/// not become an example is counted under a reason in `skipped_by_reason`
/// (e.g. `empty_completion`); `dropped_by_subsetting` counts examples removed by
/// caps and limits; `kept` is the number of examples returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// Records read.
    pub read: u64,
    /// Records skipped, by reason.
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Examples removed by caps, limits and per-subtask sampling.
    pub dropped_by_subsetting: u64,
    /// Examples returned.
    pub kept: u64,
    /// Per-file counts, in read order.
    pub files: Vec<FileCount>,
}

impl IngestReport {
    /// Count one skipped record under `reason`.
    pub fn skip(&mut self, reason: &str) {
        *self
            .skipped_by_reason
            .entry(reason.to_string())
            .or_insert(0) += 1;
    }

    /// Count one file: its `read` records into the total and a row for it
    /// with the examples it `produced`.
    pub(crate) fn count_file(&mut self, path: String, read: u64, produced: u64) {
        self.read += read;
        self.files.push(FileCount {
            path,
            read,
            produced,
        });
    }

    /// Total records skipped over all reasons.
    pub fn skipped(&self) -> u64 {
        self.skipped_by_reason.values().sum()
    }

    /// Fold another report into this one.
    pub fn merge(&mut self, other: IngestReport) {
        self.read += other.read;
        for (k, v) in other.skipped_by_reason {
            *self.skipped_by_reason.entry(k).or_insert(0) += v;
        }
        self.dropped_by_subsetting += other.dropped_by_subsetting;
        self.kept += other.kept;
        self.files.extend(other.files);
    }
}
