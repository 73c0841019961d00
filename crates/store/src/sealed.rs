//! Sealed scratch files: resumable partial state (sweep shards, training
//! checkpoints, LESS datastore shards, online-selector state) with a blake3
//! digest recorded beside each file when it is written, so a resumed build
//! trusts a file only while its bytes are the ones written.
//!
//! `<file>` is written atomically, then `<file>.blake3` (also atomically)
//! holds `"<64 hex blake3> <size in bytes>\n"` of the bytes written. A file
//! without its digest (a crash between the two writes, or state from
//! before digests) or whose digest does not match is not trusted: the
//! caller recomputes it, with a warning for a mismatch.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::fsutil::{atomic_write, remove_path};
use crate::manifest::hash_file;
use crate::npy::{write_npy_hashed, NpyElement};

/// Suffix of the digest file written beside a sealed file.
pub const DIGEST_SUFFIX: &str = ".blake3";

/// The digest file of `path`: `path` with [`DIGEST_SUFFIX`] appended.
pub fn digest_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(DIGEST_SUFFIX);
    PathBuf::from(s)
}

/// True when `name` is the name of a digest file.
pub fn is_digest_file(name: &str) -> bool {
    name.ends_with(DIGEST_SUFFIX)
}

fn write_digest(path: &Path, hash: &blake3::Hash, bytes: u64) -> Result<()> {
    atomic_write(digest_path(path), format!("{} {bytes}\n", hash.to_hex()))
        .with_context(|| format!("recording the blake3 of {}", path.display()))
}

/// Writes `bytes` to `path` atomically, then records their digest beside it.
pub fn write_sealed(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> Result<()> {
    let (path, bytes) = (path.as_ref(), bytes.as_ref());
    atomic_write(path, bytes)?;
    write_digest(path, &blake3::hash(bytes), bytes.len() as u64)
}

/// [`crate::write_npy`], then records the digest of the bytes written.
pub fn write_npy_sealed<T: NpyElement>(
    path: impl AsRef<Path>,
    shape: &[usize],
    data: &[T],
) -> Result<()> {
    let path = path.as_ref();
    let (hash, bytes) = write_npy_hashed(path, shape, data)?;
    write_digest(path, &hash, bytes)
}

/// Records the digest of the file at `path` as it is now (for files written
/// by code that does not hand over its bytes; call right after writing).
pub fn seal_file(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let entry = hash_file(path)?;
    let hash = blake3::Hash::from_hex(&entry.blake3)
        .with_context(|| format!("hashing {}", path.display()))?;
    write_digest(path, &hash, entry.bytes)
}

/// Removes a sealed file and its digest (missing ones are not an error).
pub fn remove_sealed(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    remove_path(path)?;
    remove_path(&digest_path(path))
}

/// What [`check_sealed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    /// The file's bytes are the ones its digest records.
    Valid,
    /// There is no file.
    Missing,
    /// The file has no (readable) digest beside it.
    Unsealed,
    /// The file differs from its digest (or the digest file is damaged).
    Mismatch {
        /// What the digest file records.
        expected: String,
        /// The file's blake3 and size now.
        actual: String,
    },
}

impl Seal {
    /// True for [`Seal::Valid`].
    pub fn is_valid(&self) -> bool {
        *self == Seal::Valid
    }
}

impl fmt::Display for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seal::Valid => f.write_str("matches its recorded blake3"),
            Seal::Missing => f.write_str("is missing"),
            Seal::Unsealed => f.write_str("has no recorded blake3"),
            Seal::Mismatch { expected, actual } => {
                write!(f, "is {actual} but was written as {expected}")
            }
        }
    }
}

/// Checks `path` against the digest recorded beside it (re-hashes it).
pub fn check_sealed(path: impl AsRef<Path>) -> Seal {
    let path = path.as_ref();
    if !path.is_file() {
        return Seal::Missing;
    }
    let Ok(recorded) = std::fs::read_to_string(digest_path(path)) else {
        return Seal::Unsealed;
    };
    let expected = recorded.trim_end_matches('\n').to_string();
    match hash_file(path) {
        Ok(e) => {
            let actual = format!("{} {}", e.blake3, e.bytes);
            if actual == expected {
                Seal::Valid
            } else {
                Seal::Mismatch { expected, actual }
            }
        }
        Err(e) => Seal::Mismatch {
            expected,
            actual: format!("unreadable ({e:#})"),
        },
    }
}

/// [`check_sealed`] for resumable state: true when `path` can be trusted.
/// A mismatch is logged as a warning naming `what` (the caller recomputes).
pub fn trust_sealed(path: impl AsRef<Path>, what: &str) -> bool {
    let path = path.as_ref();
    match check_sealed(path) {
        Seal::Valid => true,
        Seal::Missing => false,
        s @ Seal::Unsealed => {
            tracing::info!("{what}: {} {s}; recomputing it", path.display());
            false
        }
        s @ Seal::Mismatch { .. } => {
            tracing::warn!("{what}: {} {s}; recomputing it", path.display());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_check_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shard-000001.npy");
        assert_eq!(check_sealed(&p), Seal::Missing);
        write_npy_sealed(&p, &[3], &[1.0f32, 2.0, 3.0]).unwrap();
        // The digest is blake3 of the file's bytes, computed independently.
        let bytes = std::fs::read(&p).unwrap();
        let recorded = std::fs::read_to_string(dir.path().join("shard-000001.npy.blake3")).unwrap();
        assert_eq!(
            recorded,
            format!("{} {}\n", blake3::hash(&bytes).to_hex(), bytes.len())
        );
        assert!(check_sealed(&p).is_valid());
        // Same size, one byte changed.
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 0x40;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(check_sealed(&p), Seal::Mismatch { .. }));
        assert!(!trust_sealed(&p, "test"));
        // Rewritten: valid again; without its digest: not trusted.
        write_sealed(&p, &bytes).unwrap();
        assert!(check_sealed(&p).is_valid());
        seal_file(&p).unwrap();
        assert!(check_sealed(&p).is_valid());
        std::fs::remove_file(digest_path(&p)).unwrap();
        assert_eq!(check_sealed(&p), Seal::Unsealed);
        remove_sealed(&p).unwrap();
        assert_eq!(check_sealed(&p), Seal::Missing);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
