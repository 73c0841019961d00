//! `manifest.json`: what an artifact is, how it was made and what it holds.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::key::{ArtifactKey, StageSpec};

/// File name of the manifest inside an artifact folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest layout written by this crate.
pub const MANIFEST_FORMAT: u32 = 1;

/// Size and content hash of one artifact file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// blake3 of the file content, 64 lowercase hex characters.
    pub blake3: String,
    /// File size in bytes.
    pub bytes: u64,
}

/// Contents of an artifact's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest layout version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// The artifact key (equal to the folder name and to the key of the
    /// spec below).
    pub key: ArtifactKey,
    /// Stage that built the artifact.
    pub stage: String,
    /// Stage code version.
    pub version: String,
    /// Stage configuration as given (key order as written).
    pub config: Value,
    /// Keys of the input artifacts, in order.
    pub inputs: Vec<ArtifactKey>,
    /// Seed, when the stage is seeded.
    pub seed: Option<u64>,
    /// Every file of the artifact except `manifest.json`, by relative path
    /// with `/` separators.
    pub files: BTreeMap<String, FileEntry>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Creation time, unix seconds.
    pub created_unix: u64,
    /// Version of `dsel-store` that wrote the manifest.
    pub tool_version: String,
    /// Wall-clock seconds the build took (closure + hashing + commit).
    pub build_seconds: f64,
    /// CPU seconds (user + system, all threads of the process) the build took;
    /// 0 in manifests written before this field existed.
    #[serde(default)]
    pub build_cpu_seconds: f64,
    /// Free-form information the stage recorded (counts, skipped examples…).
    #[serde(default)]
    pub info: Value,
    /// How the artifact was computed (GEMM backend, precision, device), as
    /// set by [`crate::Store::set_environment`]; not part of the key.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub environment: Value,
}

impl Manifest {
    /// The spec the artifact was built from.
    pub fn spec(&self) -> StageSpec {
        StageSpec {
            stage: self.stage.clone(),
            version: self.version.clone(),
            config: self.config.clone(),
            inputs: self.inputs.clone(),
            seed: self.seed,
        }
    }

    /// Total size of the artifact's files (without the manifest).
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }

    /// Reads and parses a manifest file; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }
}

/// blake3 (hex) and size of a file, hashed memory-mapped with rayon for
/// large files (plain reads for small ones).
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("hashing {}", path.display()))?;
    Ok(FileEntry {
        blake3: hasher.finalize().to_hex().to_string(),
        bytes: hasher.count(),
    })
}
