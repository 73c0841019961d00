//! Pool-wide work in fixed units, shared among workers.
//!
//! A stage whose work is over every example of a pool (a loss sweep,
//! gradient norms, embeddings, the LESS datastore) splits the examples into
//! fixed units. Each finished unit is written into the stage's scratch
//! folder as sealed `.npy` files ([`crate::write_npy_sealed`]): written
//! under a temporary name, renamed into place, its blake3 recorded beside
//! it. A unit's result depends only on its own examples, so:
//!
//! * a killed build resumes at the first unit not found finished;
//! * workers `i/N` ([`Shard`]: unit `u` belongs to worker `u mod N`) compute
//!   disjoint units into the same scratch folder (one writer per file, no
//!   lock needed), and whoever assembles afterwards finds every unit done
//!   and writes exactly the bytes of a single-process build;
//! * a merge that must not silently redo the workers' job asks for
//!   [`Missing::Fail`] and gets an error naming the units that are missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::npy::{NpyArray, NpyElement, NpyWriter};

/// One worker's part of the units: unit `u` belongs to worker `u mod count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This worker, `0..count`.
    pub index: usize,
    /// Number of workers.
    pub count: usize,
}

impl std::fmt::Display for Shard {
    /// `i/N`, as parsed by [`Shard::parse`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl Default for Shard {
    /// [`Shard::all`].
    fn default() -> Self {
        Self::all()
    }
}

impl Shard {
    /// Every unit (one worker).
    pub fn all() -> Self {
        Self { index: 0, count: 1 }
    }

    /// Parses `"i/N"` (0-based `i < N`).
    pub fn parse(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("shard {s:?}: expected i/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("shard {s:?}: bad index {i:?}"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("shard {s:?}: bad count {n:?}"))?;
        if count == 0 || index >= count {
            bail!("shard {s:?}: need 0 <= i < N");
        }
        Ok(Self { index, count })
    }

    /// True when unit `unit` is this worker's.
    pub fn owns(&self, unit: usize) -> bool {
        unit % self.count == self.index
    }
}

/// What to do with a unit that is not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missing {
    /// Compute every missing unit this worker owns (a build, a resume, a
    /// shard worker).
    #[default]
    Compute,
    /// Compute nothing: a missing unit is an error naming it (the merge
    /// step after sharded workers).
    Fail,
}

/// Which units a call computes, and whether it may compute a missing one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitWork {
    /// The units this call owns.
    pub shard: Shard,
    /// Whether an unfinished unit is computed or an error.
    pub missing: Missing,
}

/// One sealed output file of a unit and the number of elements it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFile {
    /// Where the unit's values are kept (in the stage's scratch folder).
    pub path: PathBuf,
    /// Elements it holds when finished.
    pub len: usize,
}

/// What [`run_units`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitsDone {
    /// Units of the whole stage.
    pub total: usize,
    /// Units found finished.
    pub resumed: usize,
    /// Units computed by this call.
    pub computed: usize,
    /// Units neither finished nor this worker's (left for other workers).
    pub others: usize,
}

impl UnitsDone {
    /// True when every unit is finished (assembling can proceed).
    pub fn complete(&self) -> bool {
        self.others == 0
    }
}

/// The values of a finished unit file: `None` unless it matches its
/// recorded blake3 and holds `file.len` elements (a mismatch is logged as a
/// warning naming `what`).
pub fn read_unit<T: NpyElement>(file: &UnitFile, what: &str) -> Option<Vec<T>> {
    if !crate::trust_sealed(&file.path, what) {
        return None;
    }
    let arr = NpyArray::open(&file.path).ok()?;
    let v = arr.as_slice::<T>().ok()?;
    (v.len() == file.len).then(|| v.to_vec())
}

/// Runs units `0..n_units` as `work` says, whatever a unit's files are: a
/// unit is finished when `finished(u)`; an unfinished unit `work.shard`
/// owns is computed and written by `compute(u)` (atomically, sealed),
/// unless `work.missing` is [`Missing::Fail`], which stops with an error
/// naming every missing unit (and `scratch`, where they are looked for).
/// `done(u, resumed)` is called after each finished unit (for progress).
pub fn run_units_with(
    n_units: usize,
    work: UnitWork,
    what: &str,
    scratch: &Path,
    finished: impl Fn(usize) -> bool,
    mut compute: impl FnMut(usize) -> Result<()>,
    mut done: impl FnMut(usize, bool),
) -> Result<UnitsDone> {
    let mut report = UnitsDone {
        total: n_units,
        ..Default::default()
    };
    if work.missing == Missing::Fail {
        let absent: Vec<usize> = (0..n_units).filter(|&u| !finished(u)).collect();
        if !absent.is_empty() {
            bail!(
                "{what}: {} of {n_units} units are not finished in {} (units {}); \
                 run the shard workers that own them (unit u belongs to worker u mod N) \
                 or run without merging to compute them here",
                absent.len(),
                scratch.display(),
                list_units(&absent)
            );
        }
    }
    for u in 0..n_units {
        if finished(u) {
            report.resumed += 1;
            done(u, true);
            continue;
        }
        if !work.shard.owns(u) {
            report.others += 1;
            continue;
        }
        compute(u).with_context(|| format!("{what}: unit {u}"))?;
        report.computed += 1;
        done(u, false);
    }
    Ok(report)
}

/// [`run_units_with`] for units of sealed `.npy` files: a unit is finished
/// when every one of its `files(u)` can be read back ([`read_unit`]);
/// `compute(u)` returns one vector per file, in order, each of the file's
/// length, and they are written sealed.
pub fn run_units<T: NpyElement>(
    n_units: usize,
    work: UnitWork,
    what: &str,
    files: impl Fn(usize) -> Vec<UnitFile>,
    mut compute: impl FnMut(usize) -> Result<Vec<Vec<T>>>,
    done: impl FnMut(usize, bool),
) -> Result<UnitsDone> {
    let scratch = files(0)
        .first()
        .and_then(|f| f.path.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let finished = |u: usize| files(u).iter().all(|f| read_unit::<T>(f, what).is_some());
    let write = |u: usize| {
        let unit_files = files(u);
        let values = compute(u)?;
        anyhow::ensure!(
            values.len() == unit_files.len(),
            "computed {} outputs for {} files",
            values.len(),
            unit_files.len()
        );
        for (f, v) in unit_files.iter().zip(&values) {
            anyhow::ensure!(
                v.len() == f.len,
                "computed {} values for {} (expected {})",
                v.len(),
                f.path.display(),
                f.len
            );
            crate::write_npy_sealed(&f.path, &[v.len()], v)?;
        }
        Ok(())
    };
    run_units_with(n_units, work, what, &scratch, finished, write, done)
}

/// Concatenates file `which` of every unit into one `.npy` at `out` of
/// shape `[?, shape_tail…]`, streaming one unit at a time (memory stays at
/// one unit). Every unit must be finished.
pub fn concat_units<T: NpyElement>(
    n_units: usize,
    what: &str,
    files: impl Fn(usize) -> Vec<UnitFile>,
    which: usize,
    out: &Path,
    shape_tail: &[usize],
) -> Result<()> {
    let mut w = NpyWriter::<T>::create(out, shape_tail)?;
    for u in 0..n_units {
        let f = files(u)
            .into_iter()
            .nth(which)
            .with_context(|| format!("{what}: unit {u} has no output {which}"))?;
        let v = read_unit::<T>(&f, what).with_context(|| {
            format!(
                "{what}: unit {u} ({}) vanished or is corrupt",
                f.path.display()
            )
        })?;
        w.write(&v)?;
    }
    w.finish()?;
    Ok(())
}

/// `0-3, 7, 9-10`: unit numbers as ranges.
fn list_units(units: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < units.len() {
        let mut j = i;
        while j + 1 < units.len() && units[j + 1] == units[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            units[i].to_string()
        } else {
            format!("{}-{}", units[i], units[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> impl Fn(usize) -> Vec<UnitFile> + '_ {
        move |u| {
            vec![UnitFile {
                path: dir.join(format!("unit-{u:06}.a.npy")),
                len: u + 1,
            }]
        }
    }

    /// Unit u holds `u + 1` values `10u, 10u + 1, …`.
    fn values(u: usize) -> Result<Vec<Vec<f32>>> {
        Ok(vec![(0..=u).map(|i| (u * 10 + i) as f32).collect()])
    }

    /// `n` units of [`values`] in `dir` as worker `shard` (`i/N`) would run them.
    fn run(dir: &Path, n: usize, shard: &str, missing: Missing) -> Result<UnitsDone> {
        let work = UnitWork {
            shard: Shard::parse(shard).unwrap(),
            missing,
        };
        run_units(n, work, "t", files(dir), values, |_, _| {})
    }

    /// The units of `dir` concatenated, as bytes of one `.npy`.
    fn assembled(dir: &Path, n: usize) -> Vec<u8> {
        let out = dir.join("out.npy");
        concat_units::<f32>(n, "t", files(dir), 0, &out, &[]).unwrap();
        std::fs::read(out).unwrap()
    }

    #[test]
    fn shard_parses_and_owns_every_nth_unit() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!(s.to_string(), "1/3");
        assert!(s.owns(1) && s.owns(4) && !s.owns(0) && !s.owns(2));
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert!(Shard::all().owns(7));
    }

    #[test]
    fn workers_split_the_units_and_the_merge_writes_one_processs_bytes() {
        let single = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        let (one, two) = (single.path(), shared.path());
        let n = 5;
        let r = run(one, n, "0/1", Missing::Compute).unwrap();
        assert_eq!((r.computed, r.resumed, r.others), (5, 0, 0));

        // A merge before the workers ran names what is missing.
        let err = run(two, n, "0/1", Missing::Fail).unwrap_err();
        assert!(format!("{err:#}").contains("5 of 5 units"), "{err:#}");
        let w0 = run(two, n, "0/2", Missing::Compute).unwrap();
        assert_eq!((w0.computed, w0.others), (3, 2));
        assert!(!w0.complete());
        let err = run(two, n, "0/1", Missing::Fail).unwrap_err();
        assert!(format!("{err:#}").contains("units 1, 3"), "{err:#}");
        let w1 = run(two, n, "1/2", Missing::Compute).unwrap();
        assert_eq!((w1.computed, w1.resumed), (2, 3));
        let work = UnitWork {
            shard: Shard::all(),
            missing: Missing::Fail,
        };
        let nothing = |_| -> Result<Vec<Vec<f32>>> { panic!("nothing to compute") };
        let merged = run_units(n, work, "t", files(two), nothing, |_, _| {}).unwrap();
        assert_eq!((merged.resumed, merged.computed), (5, 0));
        assert_eq!(assembled(one, n), assembled(two, n));
    }

    #[test]
    fn a_corrupt_unit_is_recomputed_and_a_wrong_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), 3, "0/1", Missing::Compute).unwrap();
        let p = dir.path().join("unit-000001.a.npy");
        let mut bytes = std::fs::read(&p).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&p, bytes).unwrap();
        let r = run(dir.path(), 3, "0/1", Missing::Compute).unwrap();
        assert_eq!((r.computed, r.resumed), (1, 2));
        let short = |_| Ok(vec![vec![0f32; 2]]);
        let err = run_units(
            4,
            UnitWork::default(),
            "t",
            files(dir.path()),
            short,
            |_, _| {},
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("expected 4"), "{err:#}");
    }

    #[test]
    fn unit_lists_read_as_ranges() {
        assert_eq!(list_units(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
    }
}
