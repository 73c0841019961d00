//! File-system helpers shared by the store: atomic writes, temp names,
//! directory fsync and recursive walks.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// A string unique within this machine for the life of the process:
/// `<pid>-<counter>-<nanos>` (hex nanos of the wall clock at the call).
pub(crate) fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{nanos:08x}", std::process::id())
}

/// A temporary file next to its final path, removed on drop unless
/// [`TempFile::persist`] renamed it into place.
pub(crate) struct TempFile {
    tmp: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates `.<name>.tmp-<nonce>` in the directory of `target`.
    pub(crate) fn create(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("{}: path has no file name", target.display()))?;
        let dir = parent_dir(target);
        let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), nonce()));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating temporary file {}", tmp.display()))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            file: Some(file),
        })
    }

    /// The open temporary file.
    pub(crate) fn file(&mut self) -> &mut File {
        // `file` is only taken by `persist`, which consumes `self`.
        self.file.as_mut().expect("TempFile used after persist")
    }

    /// Path of the temporary file.
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the file, renames it onto the target and fsyncs the directory.
    pub(crate) fn persist(mut self) -> Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()
                .with_context(|| format!("fsync {}", self.tmp.display()))?;
        }
        fs::rename(&self.tmp, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.tmp.display(),
                self.target.display()
            )
        })?;
        // Renamed: nothing to remove on drop.
        self.tmp = PathBuf::new();
        fsync_dir(parent_dir(&self.target))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory is written, fsynced and renamed over `path`, then the directory
/// is fsynced. Readers see either the old content or the new, never a mix.
/// The parent directory must exist.
pub fn atomic_write(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    atomic_write_with(path, |file| {
        file.write_all(bytes.as_ref())?;
        Ok(())
    })
}

/// Writes `path` atomically through `write`, which streams the content into
/// a temporary file in the same directory (for writers that want a `File`,
/// such as Parquet's); the file is then fsynced and renamed over `path`, and
/// the directory fsynced, as [`atomic_write`] does. On error the temporary
/// file is removed and `path` is untouched. The parent directory must exist.
pub fn atomic_write_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let mut tmp = TempFile::create(path)?;
    let tmp_path = tmp.tmp_path().to_path_buf();
    write(tmp.file()).with_context(|| format!("writing {}", tmp_path.display()))?;
    tmp.persist()
        .with_context(|| format!("atomically writing {}", path.display()))
}

/// Whether `file_name` is a temporary file that [`atomic_write`] or
/// [`atomic_write_with`] creates next to its target
/// (`.<name>.tmp-<nonce>`), returning the target's name. A crash between
/// creating and renaming such a file leaves it behind; cleaners use this to
/// recognise it.
pub fn temp_file_target(file_name: &str) -> Option<&str> {
    file_name
        .strip_prefix('.')
        .and_then(|n| n.split_once(".tmp-"))
        .map(|(target, _)| target)
}

/// fsyncs a directory so a rename inside it is durable (no-op where
/// directories cannot be opened, e.g. Windows).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).with_context(|| format!("opening directory {}", dir.display()))?;
        d.sync_all()
            .with_context(|| format!("fsync directory {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// All regular files under `dir`, as paths relative to `dir` with `/`
/// separators, sorted. Symlinks and other special files are an error.
pub(crate) fn walk_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    walk_inner(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

fn walk_inner(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let rd = fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in rd {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let name = entry.file_name();
        let name = name
            .to_str()
            .with_context(|| format!("{}: file name is not UTF-8", entry.path().display()))?
            .to_string();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ft = entry
            .file_type()
            .with_context(|| format!("stat {}", entry.path().display()))?;
        if ft.is_dir() {
            walk_inner(&entry.path(), &rel, out)?;
        } else if ft.is_file() {
            out.push(rel);
        } else {
            anyhow::bail!(
                "{}: not a regular file or directory (symlinks are not allowed in artifacts)",
                entry.path().display()
            );
        }
    }
    Ok(())
}

/// Total size in bytes of regular files under `path` (0 when missing);
/// unreadable entries are skipped.
pub(crate) fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    let Ok(rd) = fs::read_dir(path) else {
        return 0;
    };
    rd.flatten().map(|e| disk_bytes(&e.path())).sum()
}

/// Newest modification time (unix seconds) of `path` or anything under it.
pub(crate) fn newest_mtime(path: &Path) -> Option<u64> {
    let meta = fs::symlink_metadata(path).ok()?;
    let mut best = mtime_secs(&meta);
    if meta.is_dir() {
        if let Ok(rd) = fs::read_dir(path) {
            for e in rd.flatten() {
                best = best.max(newest_mtime(&e.path()));
            }
        }
    }
    best
}

/// Modification time in unix seconds.
pub(crate) fn mtime_secs(meta: &fs::Metadata) -> Option<u64> {
    meta.modified()
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// Current unix time in seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats unix seconds as an RFC 3339 UTC timestamp (`2023-11-14T22:13:20Z`).
pub fn rfc3339_utc(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let rem = unix_seconds % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's date algorithms.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Removes a file or directory tree; missing is not an error.
pub(crate) fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    let res = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// CPU time (user + system) this process has used so far, in seconds, over
/// all its threads; 0 where the platform does not report it.
pub fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes into the zero-initialised struct we pass.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } == 0 {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            return secs(u.ru_utime) + secs(u.ru_stime);
        }
    }
    0.0
}

/// Resets this process's peak resident memory (`VmHWM`) to its current
/// resident size (Linux ≥ 4.0: `5` written to `/proc/self/clear_refs`), so
/// [`process_peak_rss_mib`] then measures the peak from here on; false
/// where the platform does not allow it (the peak then stays a running
/// maximum).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Peak resident memory of this process (`VmHWM` of `/proc/self/status`),
/// in MiB; NaN where the platform does not report it.
pub fn process_peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn atomic_write_with_failure_leaves_target_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bin");
        atomic_write(&p, b"old").unwrap();
        let err = atomic_write_with(&p, |f| {
            f.write_all(b"partial")?;
            anyhow::bail!("writer failed")
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn temp_file_names_are_recognised() {
        let tmp = TempFile::create(Path::new("/nonexistent-dir/x.json"));
        assert!(tmp.is_err());
        assert_eq!(temp_file_target(".x.json.tmp-12-0-00ab"), Some("x.json"));
        assert_eq!(temp_file_target("x.json"), None);
        assert_eq!(temp_file_target(".hidden"), None);
    }
}
