//! The artifact store: atomic, locked, verified builds under a cache root.
//!
//! Layout under the root:
//!
//! ```text
//! <root>/<stage>/<key>/          finished artifacts (files + manifest.json)
//! <root>/tmp/<key>-<nonce>/      builds in progress (and corrupt artifacts being removed)
//! <root>/partial/<stage>/<key>/  resumable scratch space of a build (Builder::scratch_dir)
//! <root>/locks/<key>.lock        per-key lock files (std flock locks: exclusive for
//!                                a build or gc, shared while a reader opens it)
//! <root>/locks/<pid>-<n>-<t>.lease  one per open store that handed out artifacts:
//!                                their keys, one a line; locked by its owner
//! <root>/used/<key>              "last used" markers (mtime = last use)
//! ```
//!
//! Artifacts in use are never collected: every artifact a [`Store`] hands
//! out ([`Store::get_or_build`], [`Store::lookup`], [`Store::open_artifact`])
//! is recorded in the store's lease file, written while the key's lock is
//! held, and the owner holds an exclusive lock on that file until the store
//! is dropped or the process ends. [`Store::gc`] takes the key's lock
//! before it reads the lease files, so it sees every use recorded before,
//! and a reader waits for a removal in progress. A lease file whose lock
//! can be taken belongs to a process that has exited and is removed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::fs::TryLockError;

use crate::fsutil::{
    atomic_write, disk_bytes, fsync_dir, mtime_secs, newest_mtime, nonce, now_unix, remove_path,
    rfc3339_utc, walk_files,
};
use crate::key::{key_encoding, normalize_prefix, validate_stage_name, ArtifactKey, StageSpec};
use crate::manifest::{hash_file, FileEntry, Manifest, MANIFEST_FILE, MANIFEST_FORMAT};

const TMP_DIR: &str = "tmp";
const LOCKS_DIR: &str = "locks";
const USED_DIR: &str = "used";
const PARTIAL_DIR: &str = "partial";

/// Temporary entries whose owner cannot be told from their name are only
/// removed by gc once they are this old.
const UNKNOWN_TMP_GRACE: Duration = Duration::from_secs(3600);

/// The cache root to use when the caller gives none: `$DSEL_CACHE` when set
/// and non-empty, else `.cache` under the current directory.
pub fn default_cache_root() -> PathBuf {
    match std::env::var_os("DSEL_CACHE") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("."))
            .join(".cache"),
    }
}

/// A finished, verified artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Its key.
    pub key: ArtifactKey,
    /// Its folder, `<root>/<stage>/<key>/`.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Artifact {
    /// Path of a file of the artifact (`rel` uses `/` separators).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The key.
    pub fn key(&self) -> &ArtifactKey {
        &self.key
    }

    /// The stage that built it.
    pub fn stage(&self) -> &str {
        &self.manifest.stage
    }

    /// The folder holding its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Result of [`Store::get_or_build`].
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The artifact, found or freshly built.
    pub artifact: Artifact,
    /// True when an existing artifact was reused and the build closure was
    /// not called.
    pub cache_hit: bool,
    /// Wall-clock seconds spent in `get_or_build` (waiting for the lock,
    /// verifying and, on a miss, building).
    pub seconds: f64,
}

/// Handed to a build closure: where to write the artifact's files.
pub struct Builder {
    key: ArtifactKey,
    stage: String,
    dir: PathBuf,
    scratch: PathBuf,
    info: Value,
    errors: Mutex<Vec<String>>,
}

impl Builder {
    /// Key of the artifact being built.
    pub fn key(&self) -> &ArtifactKey {
        &self.key
    }

    /// Stage of the artifact being built.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The temporary folder that becomes the artifact on success.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path for the artifact file `rel` (relative, `/`-separated, no `..`,
    /// not `manifest.json`); its parent folders are created. An invalid
    /// `rel` or a failure to create folders makes the build fail at commit
    /// with an error naming it (use [`Builder::try_path`] to see it at once).
    pub fn path(&self, rel: &str) -> PathBuf {
        match self.try_path(rel) {
            Ok(p) => p,
            Err(e) => {
                self.record_error(format!("{e:#}"));
                // Keep writes inside the temporary folder so nothing escapes it.
                self.dir.join("_invalid_path")
            }
        }
    }

    /// Like [`Builder::path`] but reports problems immediately.
    pub fn try_path(&self, rel: &str) -> Result<PathBuf> {
        check_rel_path(rel)?;
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("creating folder {}", parent.display()))?;
        }
        Ok(path)
    }

    /// Sets the free-form `info` recorded in the manifest.
    pub fn set_info(&mut self, info: Value) {
        self.info = info;
    }

    /// Persistent per-key scratch folder `<root>/partial/<stage>/<key>/`
    /// (created on first call). It survives a failed or killed build so a
    /// long stage can resume from shards written there, and is removed once
    /// the artifact is committed. Creation failures make the build fail at
    /// commit.
    pub fn scratch_dir(&self) -> PathBuf {
        if let Err(e) = fs::create_dir_all(&self.scratch) {
            self.record_error(format!(
                "creating scratch folder {}: {e}",
                self.scratch.display()
            ));
        }
        self.scratch.clone()
    }

    fn record_error(&self, msg: String) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(msg);
        }
    }
}

fn check_rel_path(rel: &str) -> Result<()> {
    let p = Path::new(rel);
    if rel.is_empty() || rel.contains('\\') {
        bail!("invalid artifact file path {rel:?}: empty or contains '\\'");
    }
    for c in p.components() {
        if !matches!(c, Component::Normal(_)) {
            bail!("invalid artifact file path {rel:?}: must be relative without '.' or '..'");
        }
    }
    if rel == MANIFEST_FILE {
        bail!("invalid artifact file path {rel:?}: reserved for the store");
    }
    Ok(())
}

/// What is wrong with an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `manifest.json` is missing.
    ManifestMissing,
    /// `manifest.json` cannot be read or parsed.
    ManifestInvalid(String),
    /// The manifest does not describe this folder (key, stage or spec hash).
    ManifestMismatch(String),
    /// A file listed in the manifest is missing.
    MissingFile(String),
    /// A file has the wrong size.
    SizeMismatch {
        /// Relative path.
        file: String,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's content hash differs from the manifest.
    HashMismatch {
        /// Relative path.
        file: String,
        /// blake3 in the manifest.
        expected: String,
        /// blake3 on disk.
        actual: String,
    },
    /// A file could not be read.
    Unreadable {
        /// Relative path.
        file: String,
        /// The I/O error.
        error: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ManifestMissing => write!(f, "{MANIFEST_FILE} is missing"),
            Problem::ManifestInvalid(e) => write!(f, "{MANIFEST_FILE} is invalid: {e}"),
            Problem::ManifestMismatch(e) => write!(f, "{MANIFEST_FILE} does not match: {e}"),
            Problem::MissingFile(file) => write!(f, "file {file} is missing"),
            Problem::SizeMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "file {file} has {actual} bytes, manifest says {expected}"
            ),
            Problem::HashMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "file {file} has blake3 {actual}, manifest says {expected}"
            ),
            Problem::Unreadable { file, error } => write!(f, "file {file} cannot be read: {error}"),
        }
    }
}

/// Result of verifying one artifact.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Stage folder the artifact is in.
    pub stage: String,
    /// Its key.
    pub key: ArtifactKey,
    /// Its folder.
    pub dir: PathBuf,
    /// Everything wrong with it (empty when it verifies).
    pub problems: Vec<Problem>,
    /// Files present on disk but not listed in the manifest (reported, not
    /// an error).
    pub extra_files: Vec<String>,
}

impl VerifyReport {
    /// True when the artifact verifies.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One line of [`Store::list`].
#[derive(Debug, Clone)]
pub struct ArtifactSummary {
    /// Stage folder.
    pub stage: String,
    /// Key.
    pub key: ArtifactKey,
    /// Bytes on disk (all files including the manifest).
    pub bytes: u64,
    /// Creation time (RFC 3339) from the manifest, if readable.
    pub created: Option<String>,
    /// Creation time in unix seconds from the manifest, if readable.
    pub created_unix: Option<u64>,
    /// Last use in unix seconds (the `used/` marker), if ever recorded.
    pub last_used_unix: Option<u64>,
}

/// Options of [`Store::gc`].
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Remove artifacts (and resumable scratch folders) not used within
    /// this long.
    pub older_than: Duration,
    /// Only report what would be removed.
    pub dry_run: bool,
}

impl Default for GcOptions {
    /// 30 days, dry run.
    fn default() -> Self {
        Self {
            older_than: Duration::from_secs(30 * 86_400),
            dry_run: true,
        }
    }
}

/// What a gc item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcKind {
    /// A finished artifact not used recently.
    Artifact,
    /// A leftover temporary build folder (or file) under `tmp/`.
    Tmp,
    /// A resumable scratch folder not touched recently.
    Partial,
    /// A lock file of a key with nothing else left.
    Lock,
    /// A "last used" marker of an artifact that no longer exists.
    UsedMarker,
    /// The lease file of a store whose process has exited.
    Lease,
}

impl GcKind {
    /// A short name for listings (`artifact`, `tmp`, `partial`, `lock`,
    /// `used-marker`, `lease`).
    pub fn name(self) -> &'static str {
        match self {
            GcKind::Artifact => "artifact",
            GcKind::Tmp => "tmp",
            GcKind::Partial => "partial",
            GcKind::Lock => "lock",
            GcKind::UsedMarker => "used-marker",
            GcKind::Lease => "lease",
        }
    }
}

/// One thing gc removed (or would remove).
#[derive(Debug, Clone)]
pub struct GcItem {
    /// Kind of entry.
    pub kind: GcKind,
    /// Its path.
    pub path: PathBuf,
    /// Bytes it occupies.
    pub bytes: u64,
}

/// Result of [`Store::gc`].
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Whether this was a dry run (nothing removed).
    pub dry_run: bool,
    /// Entries removed (or that would be).
    pub items: Vec<GcItem>,
    /// Sum of their bytes.
    pub bytes: u64,
    /// Entries skipped because a build holds their lock.
    pub skipped_locked: Vec<PathBuf>,
    /// Artifacts skipped because a live process (this one included) uses
    /// them: a store that handed them out is still open.
    pub skipped_in_use: Vec<PathBuf>,
    /// Removal errors (the entry stays).
    pub errors: Vec<String>,
}

/// Cheap stat-based fingerprint of a verified artifact, so one process does
/// not re-hash it: manifest hash plus (size, mtime, inode) of every file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    manifest_hash: [u8; 32],
    files: Vec<(u64, i128, u64)>,
}

/// A per-key lock (exclusive or shared), released on drop.
struct KeyLock {
    /// `None` when the store runs without locks ([`Store::set_locking`]).
    _file: Option<File>,
}

/// This store's lease file: the keys of the artifacts it handed out, one a
/// line, under an exclusive lock held until the store is dropped.
struct Leases {
    file: File,
    path: PathBuf,
    keys: HashSet<ArtifactKey>,
}

/// Suffix of lease files in the locks folder.
const LEASE_SUFFIX: &str = ".lease";
/// Suffix of a lease file being created (locked, then renamed into place).
const LEASE_NEW_SUFFIX: &str = ".lease-new";

/// A content-addressed artifact store rooted at a folder.
pub struct Store {
    root: PathBuf,
    /// Recorded in every manifest this store writes; never in keys.
    environment: Value,
    verified: Mutex<HashMap<PathBuf, Fingerprint>>,
    leases: Mutex<Option<Leases>>,
    /// Whether per-key locks and leases are taken (see [`Store::set_locking`]).
    locking: std::sync::atomic::AtomicBool,
}

impl Drop for Store {
    fn drop(&mut self) {
        let leases = match self.leases.get_mut() {
            Ok(l) => l.take(),
            Err(e) => e.into_inner().take(),
        };
        if let Some(l) = leases {
            // Removed while still locked; the lock goes with the descriptor.
            let _ = fs::remove_file(&l.path);
            drop(l.file);
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

/// Removes a temporary build folder on drop unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        fs::create_dir_all(root)
            .with_context(|| format!("creating cache root {}", root.display()))?;
        let root = std::path::absolute(root)
            .with_context(|| format!("resolving cache root {}", root.display()))?;
        for sub in [TMP_DIR, LOCKS_DIR, USED_DIR, PARTIAL_DIR] {
            let d = root.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(Self {
            root,
            environment: Value::Null,
            verified: Mutex::new(HashMap::new()),
            leases: Mutex::new(None),
            locking: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Turns per-key locks and leases off (or on again), for a cache on a
    /// filesystem whose locks are missing or hang (Lustre mounted without
    /// `flock`, NFS without a lock manager; `DSEL_LOCKS=off`). Without
    /// locks, two processes building the same artifact at once are not
    /// serialised (both build; one rename wins, the other build fails), and
    /// [`Store::gc`] refuses to run, since it cannot see what live processes
    /// use. A sharded run (prepare, shard workers, merge) needs no lock: each
    /// artifact has one writer and each unit file one worker. A lock call
    /// that fails because the filesystem does not support locks turns them
    /// off by itself, with a warning.
    pub fn set_locking(&self, on: bool) {
        self.locking.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether per-key locks and leases are taken.
    pub fn locking(&self) -> bool {
        self.locking.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True for a lock error that means the filesystem has no locks.
    fn locks_unsupported(e: &std::io::Error) -> bool {
        matches!(e.kind(), std::io::ErrorKind::Unsupported)
            || matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
            )
    }

    /// Turns locks off after `e`, when it says the filesystem has none.
    fn give_up_locks(&self, e: &std::io::Error, path: &Path) -> bool {
        if !Self::locks_unsupported(e) {
            return false;
        }
        tracing::warn!(
            "the cache's filesystem does not support file locks ({e}, locking {}): \
             continuing without them; concurrent builds of one artifact are not serialised \
             and `cache gc` is disabled (set DSEL_LOCKS=off to silence this)",
            path.display()
        );
        self.set_locking(false);
        true
    }

    /// Sets what every manifest written from now on records about the
    /// environment that built it (the compute backend, the precision, the
    /// device): provenance, never part of a key, so artifacts stay shared
    /// between machines that compute the same thing differently.
    pub fn set_environment(&mut self, environment: Value) {
        self.environment = environment;
    }

    /// The cache root (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder a finished artifact of `stage` with `key` lives in.
    pub fn artifact_dir(&self, stage: &str, key: &ArtifactKey) -> PathBuf {
        self.root.join(stage).join(key.as_str())
    }

    fn lock_path(&self, key: &ArtifactKey) -> PathBuf {
        self.root.join(LOCKS_DIR).join(format!("{key}.lock"))
    }

    fn used_path(&self, key: &ArtifactKey) -> PathBuf {
        self.root.join(USED_DIR).join(key.as_str())
    }

    fn partial_dir(&self, stage: &str, key: &ArtifactKey) -> PathBuf {
        self.root.join(PARTIAL_DIR).join(stage).join(key.as_str())
    }

    /// Takes the per-key lock exclusively; `None` when `blocking` is false
    /// and another holder has it.
    fn lock_key(&self, key: &ArtifactKey, blocking: bool) -> Result<Option<KeyLock>> {
        self.lock_key_as(key, false, blocking)
    }

    /// Takes the per-key lock, shared (readers) or exclusive (builds, gc).
    fn lock_key_as(
        &self,
        key: &ArtifactKey,
        shared: bool,
        blocking: bool,
    ) -> Result<Option<KeyLock>> {
        // std's advisory file locks (flock(2) on Unix, LockFileEx on Windows).
        let try_lock = |f: &File| {
            if shared {
                f.try_lock_shared()
            } else {
                f.try_lock()
            }
        };
        let lock = |f: &File| {
            if shared {
                f.lock_shared()
            } else {
                f.lock()
            }
        };
        let path = self.lock_path(key);
        if !self.locking() {
            return Ok(Some(KeyLock { _file: None }));
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("opening lock file {}", path.display()))?;
            match try_lock(&file) {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) if blocking => {
                    tracing::info!(
                        "waiting for another process using artifact {} (lock {})",
                        key.short(),
                        path.display()
                    );
                    if let Err(e) = lock(&file) {
                        if self.give_up_locks(&e, &path) {
                            return Ok(Some(KeyLock { _file: None }));
                        }
                        return Err(e).with_context(|| format!("locking {}", path.display()));
                    }
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => {
                    if self.give_up_locks(&e, &path) {
                        return Ok(Some(KeyLock { _file: None }));
                    }
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
            // gc may have removed the lock file between our open and lock:
            // then we hold a lock on an unlinked inode and must retry.
            if same_file(&file, &path) {
                return Ok(Some(KeyLock { _file: Some(file) }));
            }
        }
    }

    /// Records in this store's lease file that it hands out `key` (call with
    /// the key's lock held, shared or exclusive). The lease lasts as long as
    /// the store: [`Store::gc`] in any process leaves the artifact alone.
    fn lease(&self, key: &ArtifactKey) -> Result<()> {
        if !self.locking() {
            return Ok(());
        }
        let mut guard = self
            .leases
            .lock()
            .map_err(|_| anyhow::anyhow!("lease registry poisoned"))?;
        if guard.is_none() {
            *guard = Some(self.create_lease_file()?);
        }
        let leases = guard.as_mut().expect("lease file just created");
        if leases.keys.contains(key) {
            return Ok(());
        }
        // One write of a whole line: a reader sees it complete or not at all
        // (and a reader only looks while holding the key's lock).
        leases
            .file
            .write_all(format!("{key}\n").as_bytes())
            .with_context(|| {
                format!(
                    "recording the use of artifact {} in {}",
                    key.short(),
                    leases.path.display()
                )
            })?;
        leases.keys.insert(key.clone());
        Ok(())
    }

    /// Creates, locks and then names `<root>/locks/<nonce>.lease`, so gc
    /// never sees it unlocked while its owner lives.
    fn create_lease_file(&self) -> Result<Leases> {
        let dir = self.root.join(LOCKS_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = nonce();
        let tmp = dir.join(format!("{name}{LEASE_NEW_SUFFIX}"));
        let path = dir.join(format!("{name}{LEASE_SUFFIX}"));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating lease file {}", tmp.display()))?;
        file.try_lock()
            .map_err(std::io::Error::from)
            .with_context(|| format!("locking lease file {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(Leases {
            file,
            path,
            keys: HashSet::new(),
        })
    }

    /// Whether a live lease file (its owner holds its lock; this store's
    /// own included) lists `key`. Read with the key's lock held.
    fn in_use(&self, key: &ArtifactKey) -> bool {
        let Ok(rd) = fs::read_dir(self.root.join(LOCKS_DIR)) else {
            return false;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(LEASE_SUFFIX) {
                continue;
            }
            let Ok(file) = File::open(e.path()) else {
                continue; // removed meanwhile: its owner is gone
            };
            if file.try_lock().is_ok() {
                continue; // nobody holds it: the owner has exited
            }
            let Ok(text) = fs::read_to_string(e.path()) else {
                // Unreadable but held: assume the worst.
                return true;
            };
            if text.lines().any(|l| l == key.as_str()) {
                return true;
            }
        }
        false
    }

    /// Returns the artifact of `spec`, building it with `build` if it is
    /// missing or fails verification.
    ///
    /// Holds the per-key lock throughout, so concurrent callers (threads or
    /// processes) build it once: the others wait and then get a cache hit.
    /// An existing artifact is re-hashed and checked against its manifest
    /// before reuse; a corrupt one is logged (naming the artifact and file),
    /// deleted and rebuilt. Successful verifications are remembered by this
    /// `Store` (keyed on the size, mtime and inode of every file) so one run
    /// does not re-hash the same artifact twice; [`Store::verify_all`]
    /// always re-hashes.
    /// The build writes into a temporary folder via [`Builder::path`]; on
    /// success every file is hashed, `manifest.json` written and the folder
    /// renamed into place. If `build` fails or panics nothing appears at the
    /// final path (the temporary folder is removed; the scratch folder is
    /// kept for resumption).
    pub fn get_or_build<F>(&self, spec: &StageSpec, build: F) -> Result<Outcome>
    where
        F: FnOnce(&mut Builder) -> Result<()>,
    {
        let start = Instant::now();
        validate_stage_name(&spec.stage)?;
        let key = spec.key();
        let _lock = self
            .lock_key(&key, true)?
            .context("lock unexpectedly unavailable")?;
        let final_dir = self.artifact_dir(&spec.stage, &key);

        if final_dir.exists() {
            match self.check(&spec.stage, &key, false) {
                Ok(artifact) => {
                    self.lease(&key)?;
                    self.touch_used(&key);
                    return Ok(Outcome {
                        artifact,
                        cache_hit: true,
                        seconds: start.elapsed().as_secs_f64(),
                    });
                }
                Err(problems) => {
                    tracing::warn!(
                        "artifact {}/{} ({}) failed verification, rebuilding: {}",
                        spec.stage,
                        key.short(),
                        final_dir.display(),
                        join_problems(&problems)
                    );
                    self.discard(&final_dir, &key)?;
                }
            }
        }

        // Holding the lock, any temporary folder of this key is left over
        // from a build that died: clear it now rather than waiting for gc.
        self.remove_stale_tmp(&key);

        let build_start = Instant::now();
        let cpu_start = crate::fsutil::process_cpu_seconds();
        let tmp_dir = self.root.join(TMP_DIR).join(format!("{key}-{}", nonce()));
        fs::create_dir_all(&tmp_dir)
            .with_context(|| format!("creating build folder {}", tmp_dir.display()))?;
        let mut guard = TmpGuard(Some(tmp_dir.clone()));
        let mut builder = Builder {
            key: key.clone(),
            stage: spec.stage.clone(),
            dir: tmp_dir.clone(),
            scratch: self.partial_dir(&spec.stage, &key),
            info: Value::Null,
            errors: Mutex::new(Vec::new()),
        };
        build(&mut builder).with_context(|| {
            format!(
                "building artifact {}/{} (stage version {})",
                spec.stage,
                key.short(),
                spec.version
            )
        })?;
        let errors = builder.errors.lock().map(|e| e.clone()).unwrap_or_default();
        if !errors.is_empty() {
            bail!(
                "building artifact {}/{}: {}",
                spec.stage,
                key.short(),
                errors.join("; ")
            );
        }

        let files = self.seal(&tmp_dir)?;
        let created_unix = now_unix();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: key.clone(),
            stage: spec.stage.clone(),
            version: spec.version.clone(),
            config: spec.config.clone(),
            inputs: spec.inputs.clone(),
            seed: spec.seed,
            files,
            created: rfc3339_utc(created_unix),
            created_unix,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            build_seconds: build_start.elapsed().as_secs_f64(),
            build_cpu_seconds: crate::fsutil::process_cpu_seconds() - cpu_start,
            info: std::mem::take(&mut builder.info),
            environment: self.environment.clone(),
        };
        let manifest_json =
            serde_json::to_vec_pretty(&manifest).context("serialising manifest.json")?;
        atomic_write(tmp_dir.join(MANIFEST_FILE), &manifest_json)?;

        let stage_dir = self.root.join(&spec.stage);
        let stage_is_new = !stage_dir.exists();
        fs::create_dir_all(&stage_dir)
            .with_context(|| format!("creating {}", stage_dir.display()))?;
        if stage_is_new {
            fsync_dir(&self.root)?;
        }
        fs::rename(&tmp_dir, &final_dir).with_context(|| {
            format!(
                "moving built artifact {} into place at {}",
                tmp_dir.display(),
                final_dir.display()
            )
        })?;
        guard.0 = None;
        fsync_dir(&stage_dir)?;
        self.lease(&key)?;

        if let Err(e) = remove_path(&builder.scratch) {
            tracing::warn!("could not remove scratch folder: {e:#}");
        }
        self.touch_used(&key);
        if let Ok(fp) = fingerprint(&final_dir, &manifest_json, &manifest) {
            if let Ok(mut cache) = self.verified.lock() {
                cache.insert(final_dir.clone(), fp);
            }
        }
        Ok(Outcome {
            artifact: Artifact {
                key,
                dir: final_dir,
                manifest,
            },
            cache_hit: false,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Removes `<root>/tmp/<key>-*` (call only while holding the key lock).
    fn remove_stale_tmp(&self, key: &ArtifactKey) {
        let Ok(rd) = fs::read_dir(self.root.join(TMP_DIR)) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{key}-")) {
                tracing::info!("removing leftover build folder {}", e.path().display());
                if let Err(err) = remove_path(&e.path()) {
                    tracing::warn!("{err:#}");
                }
            }
        }
    }

    /// fsyncs and hashes every file of a finished build folder.
    fn seal(&self, dir: &Path) -> Result<std::collections::BTreeMap<String, FileEntry>> {
        let rels = walk_files(dir)?;
        if rels.iter().any(|r| r == MANIFEST_FILE) {
            bail!(
                "{}: the build wrote {MANIFEST_FILE}, which is reserved for the store",
                dir.display()
            );
        }
        let entries = rels
            .par_iter()
            .map(|rel| {
                let path = dir.join(rel);
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                file.sync_all()
                    .with_context(|| format!("fsync {}", path.display()))?;
                Ok((rel.clone(), hash_file(&path)?))
            })
            .collect::<Result<Vec<_>>>()?;
        // Make the folder entries durable too, deepest first.
        let mut dirs: Vec<PathBuf> = rels
            .iter()
            .filter_map(|r| Path::new(r).parent().map(|p| dir.join(p)))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs.iter().rev() {
            fsync_dir(d)?;
        }
        Ok(entries.into_iter().collect())
    }

    /// Moves a bad artifact out of its final path, then deletes it.
    fn discard(&self, final_dir: &Path, key: &ArtifactKey) -> Result<()> {
        let aside = self
            .root
            .join(TMP_DIR)
            .join(format!("{key}-corrupt-{}", nonce()));
        fs::rename(final_dir, &aside).with_context(|| {
            format!(
                "moving corrupt artifact {} aside to {}",
                final_dir.display(),
                aside.display()
            )
        })?;
        if let Ok(mut cache) = self.verified.lock() {
            cache.remove(final_dir);
        }
        if let Err(e) = remove_path(&aside) {
            tracing::warn!("could not delete corrupt artifact: {e:#} (gc will retry)");
        }
        Ok(())
    }

    /// Records that an artifact was used (best effort).
    fn touch_used(&self, key: &ArtifactKey) {
        let p = self.used_path(key);
        if let Err(e) = fs::write(&p, format!("{}\n", now_unix())) {
            tracing::debug!("could not record use in {}: {e}", p.display());
        }
    }

    /// Verifies the artifact at `<root>/<stage>/<key>`; `full` forces a
    /// re-hash even when this store verified it before.
    fn check(&self, stage: &str, key: &ArtifactKey, full: bool) -> Result<Artifact, Vec<Problem>> {
        let dir = self.artifact_dir(stage, key);
        let (manifest, problems, _extra) = self.verify_dir(&dir, stage, key, full);
        match manifest {
            Some(manifest) if problems.is_empty() => Ok(Artifact {
                key: key.clone(),
                dir,
                manifest,
            }),
            _ => Err(problems),
        }
    }

    fn verify_dir(
        &self,
        dir: &Path,
        stage: &str,
        key: &ArtifactKey,
        full: bool,
    ) -> (Option<Manifest>, Vec<Problem>, Vec<String>) {
        let mpath = dir.join(MANIFEST_FILE);
        let manifest_json = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (None, vec![Problem::ManifestMissing], Vec::new())
            }
            Err(e) => {
                return (
                    None,
                    vec![Problem::ManifestInvalid(e.to_string())],
                    Vec::new(),
                )
            }
        };
        let manifest: Manifest = match serde_json::from_slice(&manifest_json) {
            Ok(m) => m,
            Err(e) => {
                return (
                    None,
                    vec![Problem::ManifestInvalid(e.to_string())],
                    Vec::new(),
                )
            }
        };
        let mut problems = Vec::new();
        if &manifest.key != key {
            problems.push(Problem::ManifestMismatch(format!(
                "key {} but folder is {}",
                manifest.key, key
            )));
        }
        if manifest.stage != stage {
            problems.push(Problem::ManifestMismatch(format!(
                "stage {:?} but folder is under {:?}",
                manifest.stage, stage
            )));
        }
        let spec_key = blake3::hash(&key_encoding(
            &manifest.stage,
            &manifest.version,
            &manifest.config,
            &manifest.inputs,
            manifest.seed,
        ))
        .to_hex()
        .to_string();
        if spec_key != key.as_str() {
            problems.push(Problem::ManifestMismatch(format!(
                "its stage/version/config/inputs/seed hash to {spec_key}, not {key}"
            )));
        }
        for rel in manifest.files.keys() {
            if check_rel_path(rel).is_err() {
                problems.push(Problem::ManifestInvalid(format!(
                    "file path {rel:?} is not a safe relative path"
                )));
            }
        }
        if !problems.is_empty() {
            return (Some(manifest), problems, Vec::new());
        }

        let extra = match walk_files(dir) {
            Ok(files) => files
                .into_iter()
                .filter(|f| f != MANIFEST_FILE && !manifest.files.contains_key(f))
                .collect(),
            Err(_) => Vec::new(),
        };

        // Cheap path: unchanged since this store last verified it.
        if !full {
            if let (Ok(fp), Ok(cache)) = (
                fingerprint(dir, &manifest_json, &manifest),
                self.verified.lock(),
            ) {
                if cache.get(dir) == Some(&fp) {
                    return (Some(manifest), problems, extra);
                }
            }
        }

        let file_problems: Vec<Problem> = manifest
            .files
            .par_iter()
            .filter_map(|(rel, entry)| check_file(&dir.join(rel), rel, entry))
            .collect();
        problems.extend(file_problems);
        if problems.is_empty() {
            if let Ok(fp) = fingerprint(dir, &manifest_json, &manifest) {
                if let Ok(mut cache) = self.verified.lock() {
                    cache.insert(dir.to_path_buf(), fp);
                }
            }
        }
        (Some(manifest), problems, extra)
    }

    /// The persistent scratch folder a build of `spec` resumes from
    /// (`<root>/partial/<stage>/<key>/`, created here). Stages that compute
    /// in independent units (the LESS datastore's shards) can fill it from
    /// several processes or machines; the next [`Store::get_or_build`] of
    /// `spec` finds those units done.
    pub fn scratch_dir_of(&self, spec: &StageSpec) -> Result<PathBuf> {
        validate_stage_name(&spec.stage)?;
        let dir = self.partial_dir(&spec.stage, &spec.key());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// The verified artifact of `spec`, or `None` if it is not built. A
    /// corrupt artifact is reported with a warning and treated as missing
    /// (the next [`Store::get_or_build`] rebuilds it).
    pub fn lookup(&self, spec: &StageSpec) -> Result<Option<Artifact>> {
        validate_stage_name(&spec.stage)?;
        let key = spec.key();
        let dir = self.artifact_dir(&spec.stage, &key);
        if !dir.exists() {
            return Ok(None);
        }
        // Shared: concurrent readers proceed; a removal by gc (or a rebuild)
        // finishes first.
        let _lock = self
            .lock_key_as(&key, true, true)?
            .context("lock unexpectedly unavailable")?;
        match self.check(&spec.stage, &key, false) {
            Ok(a) => {
                self.lease(&key)?;
                self.touch_used(&key);
                Ok(Some(a))
            }
            Err(problems) => {
                tracing::warn!(
                    "artifact {}/{} ({}) failed verification and will be rebuilt: {}",
                    spec.stage,
                    key.short(),
                    dir.display(),
                    join_problems(&problems)
                );
                Ok(None)
            }
        }
    }

    /// Opens a verified artifact by full key or unique key prefix (at least
    /// 4 hex characters; users usually type the 12-character short key).
    pub fn open_artifact(&self, key_or_prefix: &str) -> Result<Artifact> {
        let (stage, key) = self.resolve(key_or_prefix)?;
        let _lock = self
            .lock_key_as(&key, true, true)?
            .context("lock unexpectedly unavailable")?;
        match self.check(&stage, &key, false) {
            Ok(a) => {
                self.lease(&key)?;
                self.touch_used(&key);
                Ok(a)
            }
            Err(problems) => bail!(
                "artifact {stage}/{} ({}) failed verification: {}",
                key.short(),
                self.artifact_dir(&stage, &key).display(),
                join_problems(&problems)
            ),
        }
    }

    /// The manifest of an artifact given by key or prefix (not verified, so
    /// it can be shown for a corrupt artifact too).
    pub fn show(&self, key_or_prefix: &str) -> Result<Manifest> {
        let (stage, key) = self.resolve(key_or_prefix)?;
        Manifest::read(&self.artifact_dir(&stage, &key).join(MANIFEST_FILE))
    }

    /// Finds the single artifact whose key starts with the prefix.
    fn resolve(&self, key_or_prefix: &str) -> Result<(String, ArtifactKey)> {
        let prefix = normalize_prefix(key_or_prefix)?;
        let matches: Vec<(String, ArtifactKey)> = self
            .entries()?
            .into_iter()
            .filter(|(_, k)| k.as_str().starts_with(&prefix))
            .collect();
        match matches.len() {
            0 => bail!(
                "no artifact with key {prefix:?} in cache {}",
                self.root.display()
            ),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => bail!(
                "key prefix {prefix:?} is ambiguous in cache {}: {}",
                self.root.display(),
                matches
                    .iter()
                    .map(|(s, k)| format!("{s}/{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// All `(stage, key)` folders under the root, sorted.
    fn entries(&self) -> Result<Vec<(String, ArtifactKey)>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.root)
            .with_context(|| format!("reading cache root {}", self.root.display()))?;
        for stage_entry in rd.flatten() {
            let Ok(stage) = stage_entry.file_name().into_string() else {
                continue;
            };
            if validate_stage_name(&stage).is_err() || !stage_entry.path().is_dir() {
                continue;
            }
            let Ok(keys) = fs::read_dir(stage_entry.path()) else {
                continue;
            };
            for k in keys.flatten() {
                let Some(name) = k.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if let Ok(key) = ArtifactKey::from_hex(&name) {
                    if name == key.as_str() && k.path().is_dir() {
                        out.push((stage.clone(), key));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn last_used(&self, key: &ArtifactKey) -> Option<u64> {
        fs::metadata(self.used_path(key))
            .ok()
            .and_then(|m| mtime_secs(&m))
    }

    /// Every artifact in the store with its size, creation and last use.
    pub fn list(&self) -> Result<Vec<ArtifactSummary>> {
        let mut out = Vec::new();
        for (stage, key) in self.entries()? {
            let dir = self.artifact_dir(&stage, &key);
            let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).ok();
            out.push(ArtifactSummary {
                bytes: disk_bytes(&dir),
                created: manifest.as_ref().map(|m| m.created.clone()),
                created_unix: manifest.as_ref().map(|m| m.created_unix),
                last_used_unix: self.last_used(&key),
                stage,
                key,
            });
        }
        Ok(out)
    }

    /// Re-hashes every artifact (ignoring earlier verifications in this
    /// process) and reports which are corrupt and why. Nothing is changed.
    pub fn verify_all(&self) -> Result<Vec<VerifyReport>> {
        let mut out = Vec::new();
        for (stage, key) in self.entries()? {
            let dir = self.artifact_dir(&stage, &key);
            let (_, problems, extra_files) = self.verify_dir(&dir, &stage, &key, true);
            out.push(VerifyReport {
                stage,
                key,
                dir,
                problems,
                extra_files,
            });
        }
        Ok(out)
    }

    /// Removes artifacts not used within `older_than`, scratch folders not
    /// touched within it, leftover temporary build folders, and lock files
    /// and use markers of keys with nothing left, and lease files of stores
    /// whose process has exited. Entries whose key lock is held (a running
    /// build, or a reader opening the artifact) are skipped, and so are
    /// artifacts an open store in any live process handed out (reported in
    /// [`GcReport::skipped_in_use`]). With `dry_run` only reports.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        anyhow::ensure!(
            self.locking(),
            "cache gc needs file locks to see which artifacts running processes use, \
             and this store runs without them (DSEL_LOCKS=off, or a filesystem without locks)"
        );
        let now = now_unix();
        let cutoff = now.saturating_sub(opts.older_than.as_secs());
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        // Keys with an artifact / anything at all that stays.
        let mut kept_artifacts: HashSet<ArtifactKey> = HashSet::new();
        let mut kept: HashSet<ArtifactKey> = HashSet::new();

        // Finished artifacts not used recently.
        for (stage, key) in self.entries()? {
            let dir = self.artifact_dir(&stage, &key);
            let last = self.last_used(&key).or_else(|| {
                Manifest::read(&dir.join(MANIFEST_FILE))
                    .ok()
                    .map(|m| m.created_unix)
                    .or_else(|| fs::metadata(&dir).ok().and_then(|m| mtime_secs(&m)))
            });
            let stale = last.is_none_or(|t| t <= cutoff);
            if !stale || !self.gc_remove(&mut report, GcKind::Artifact, &dir, Some(&key)) {
                kept_artifacts.insert(key.clone());
                kept.insert(key);
            } else if !opts.dry_run {
                if let Ok(mut cache) = self.verified.lock() {
                    cache.remove(&dir);
                }
            }
        }

        // Temporary build folders: stale unless their build holds the lock.
        if let Ok(rd) = fs::read_dir(self.root.join(TMP_DIR)) {
            for e in rd.flatten() {
                let path = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                match name.get(..64).and_then(|k| ArtifactKey::from_hex(k).ok()) {
                    Some(key) => {
                        if !self.gc_remove(&mut report, GcKind::Tmp, &path, Some(&key)) {
                            kept.insert(key);
                        }
                    }
                    None => {
                        let old = newest_mtime(&path)
                            .is_none_or(|t| t + UNKNOWN_TMP_GRACE.as_secs() <= now);
                        if old {
                            self.gc_remove(&mut report, GcKind::Tmp, &path, None);
                        }
                    }
                }
            }
        }

        // Scratch folders of builds that have made no progress recently.
        if let Ok(stages) = fs::read_dir(self.root.join(PARTIAL_DIR)) {
            for s in stages.flatten() {
                let Ok(keys) = fs::read_dir(s.path()) else {
                    continue;
                };
                for k in keys.flatten() {
                    let path = k.path();
                    let Some(key) = k
                        .file_name()
                        .to_str()
                        .and_then(|n| ArtifactKey::from_hex(n).ok())
                    else {
                        continue;
                    };
                    let stale = newest_mtime(&path).is_none_or(|t| t <= cutoff);
                    if !stale || !self.gc_remove(&mut report, GcKind::Partial, &path, Some(&key)) {
                        kept.insert(key);
                    }
                }
                if !opts.dry_run {
                    // Drop the stage folder once empty (fails harmlessly otherwise).
                    let _ = fs::remove_dir(s.path());
                }
            }
        }

        // Use markers of artifacts that are gone.
        if let Ok(rd) = fs::read_dir(self.root.join(USED_DIR)) {
            for e in rd.flatten() {
                let key = e
                    .file_name()
                    .to_str()
                    .and_then(|n| ArtifactKey::from_hex(n).ok());
                if let Some(key) = key {
                    if !kept_artifacts.contains(&key) {
                        self.gc_remove(&mut report, GcKind::UsedMarker, &e.path(), None);
                    }
                }
            }
        }

        // Lock files of keys with nothing left, removed while held (lockers
        // re-check the inode after locking, so this is race-free).
        if let Ok(rd) = fs::read_dir(self.root.join(LOCKS_DIR)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(LEASE_SUFFIX) || name.ends_with(LEASE_NEW_SUFFIX) {
                    self.gc_lease_file(&mut report, &e.path(), &name, now);
                    continue;
                }
                let Some(key) = name
                    .strip_suffix(".lock")
                    .and_then(|n| ArtifactKey::from_hex(n).ok())
                else {
                    continue;
                };
                if !kept.contains(&key) {
                    self.gc_remove(&mut report, GcKind::Lock, &e.path(), Some(&key));
                }
            }
        }
        Ok(report)
    }

    /// A lease file whose owner has exited (its lock is free), or a lease
    /// file left half-created by a process that died while creating it:
    /// removed (under its lock) or, in a dry run, reported.
    fn gc_lease_file(&self, report: &mut GcReport, path: &Path, name: &str, now: u64) {
        let Ok(file) = File::open(path) else {
            return;
        };
        if name.ends_with(LEASE_NEW_SUFFIX) {
            let old = newest_mtime(path).is_none_or(|t| t + UNKNOWN_TMP_GRACE.as_secs() <= now);
            if !old {
                return;
            }
        }
        if file.try_lock().is_err() {
            return; // its store is open in a live process
        }
        let bytes = disk_bytes(path);
        if !report.dry_run {
            if let Err(e) = remove_path(path) {
                report.errors.push(format!("{e:#}"));
                return;
            }
        }
        report.items.push(GcItem {
            kind: GcKind::Lease,
            path: path.to_path_buf(),
            bytes,
        });
        report.bytes += bytes;
    }

    /// Removes (or in a dry run reports) one entry, under its key lock when
    /// it has a key. Returns whether it was removed (or would be).
    fn gc_remove(
        &self,
        report: &mut GcReport,
        kind: GcKind,
        path: &Path,
        key: Option<&ArtifactKey>,
    ) -> bool {
        // A dry run must not create lock files: a missing one is not held.
        let probe = key.filter(|k| !report.dry_run || self.lock_path(k).exists());
        let _lock = match probe {
            Some(k) => match self.lock_key(k, false) {
                Ok(Some(l)) => Some(l),
                Ok(None) => {
                    report.skipped_locked.push(path.to_path_buf());
                    return false;
                }
                Err(e) => {
                    report.errors.push(format!("{e:#}"));
                    return false;
                }
            },
            None => None,
        };
        // Holding the key's lock, no new use can be recorded: any store that
        // handed the artifact out has written its lease already.
        if kind == GcKind::Artifact && key.is_some_and(|k| self.in_use(k)) {
            report.skipped_in_use.push(path.to_path_buf());
            return false;
        }
        let bytes = disk_bytes(path);
        if !report.dry_run {
            if let Err(e) = remove_path(path) {
                report.errors.push(format!("{e:#}"));
                return false;
            }
        }
        report.items.push(GcItem {
            kind,
            path: path.to_path_buf(),
            bytes,
        });
        report.bytes += bytes;
        true
    }
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn check_file(path: &Path, rel: &str, entry: &FileEntry) -> Option<Problem> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(Problem::MissingFile(rel.to_string()))
        }
        Err(e) => {
            return Some(Problem::Unreadable {
                file: rel.to_string(),
                error: e.to_string(),
            })
        }
    };
    if !meta.is_file() {
        return Some(Problem::MissingFile(rel.to_string()));
    }
    if meta.len() != entry.bytes {
        return Some(Problem::SizeMismatch {
            file: rel.to_string(),
            expected: entry.bytes,
            actual: meta.len(),
        });
    }
    match hash_file(path) {
        Ok(found) if found.blake3 == entry.blake3 && found.bytes == entry.bytes => None,
        Ok(found) => Some(Problem::HashMismatch {
            file: rel.to_string(),
            expected: entry.blake3.clone(),
            actual: found.blake3,
        }),
        Err(e) => Some(Problem::Unreadable {
            file: rel.to_string(),
            error: format!("{e:#}"),
        }),
    }
}

fn fingerprint(dir: &Path, manifest_json: &[u8], manifest: &Manifest) -> Result<Fingerprint> {
    let mut files = Vec::with_capacity(manifest.files.len());
    for rel in manifest.files.keys() {
        let p = dir.join(rel);
        let meta = fs::metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(-1, |d| d.as_nanos() as i128);
        files.push((meta.len(), mtime, inode(&meta)));
    }
    Ok(Fingerprint {
        manifest_hash: *blake3::hash(manifest_json).as_bytes(),
        files,
    })
}

#[cfg(unix)]
fn inode(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.ino()
}

#[cfg(not(unix))]
fn inode(_meta: &fs::Metadata) -> u64 {
    0
}

/// True when the open `file` is still the one at `path`.
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}
