//! Named pool mixtures, seeded subsetting, mixture fingerprints and the data root.
//!
//! # Mixture files
//!
//! A mixture is a TOML file (named ones live in `pipelines/pools/<name>.toml`):
//!
//! ```toml
//! description = "FLAN-CoT + T0 + AlpacaEval outputs"
//! [[entry]]
//! path = "pools/flan_v2_cot"   # file or directory, relative to the data root
//! format = "flan-cot"          # optional: detected from extension/content when omitted
//! source = "flan"              # optional: overrides every example's source
//! per_source_cap = 500         # optional: at most this many examples per source
//! max_examples = 2000          # optional: at most this many from this entry
//! ```
//!
//! A name is resolved to `$DSEL_PIPELINES_DIR/pools/<name>.toml`, else
//! `./pipelines/pools/<name>.toml`, else the copy of the repository's named mixtures
//! built into this crate. A string ending in `.toml` or containing a path separator
//! is read as a path.
//!
//! # Subsetting algorithm (deterministic)
//!
//! Examples are first put in their *original order*: entries in file order, the
//! files of a directory in sorted name order, records in file order. A cap of `k` on
//! a group of `n > k` examples keeps `k` of them chosen uniformly without replacement:
//! a ChaCha20 RNG is seeded with `blake3("dsel-ingest subset v1" ‖ seed ‖ label)`
//! (label names the step and the group, e.g. `pool-per-source\0flan_v2_cot/aqua`),
//! a partial Fisher–Yates shuffle of `0..n` draws `k` indices (each draw
//! `j = i + bounded(n - i)` with an unbiased rejection-sampled bound over the RNG's
//! raw `u64` output, so the choice depends on no library's sampling code), and the
//! chosen indices are sorted so the kept examples stay in original order. Steps, in
//! order: each entry's `per_source_cap` (groups in sorted source order), each entry's
//! `max_examples`, then [`SubsetOptions::per_source_cap`] over the whole pool, then
//! [`SubsetOptions::limit`]: a uniform draw of `limit` examples, or with
//! [`SubsetOptions::stratify`] a draw stratified by source ([`stratified_sample`]:
//! every source keeps its share of the pool, rounded by largest remainder).
//! Same mixture, data and seed → same examples, same order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Deserialize;

use crate::error::{IngestError, IngestReport, Result};
use crate::readers::{display_path, list_dir, read_file, Format, ReadOptions};
use crate::{Example, RULES_VERSION};

/// Environment variable naming the data root.
pub const DATA_ROOT_ENV: &str = "DSEL_DATA_ROOT";
/// Environment variable naming the pipelines directory (holding `pools/<name>.toml`).
pub const PIPELINES_DIR_ENV: &str = "DSEL_PIPELINES_DIR";

/// The named mixtures built into this crate (copies of `pipelines/pools/*.toml`).
const BUILTIN_MIXTURES: [(&str, &str); 4] = [
    (
        "default",
        include_str!("../../../pipelines/pools/default.toml"),
    ),
    (
        "flan-cot",
        include_str!("../../../pipelines/pools/flan-cot.toml"),
    ),
    ("t0", include_str!("../../../pipelines/pools/t0.toml")),
    ("tiny", include_str!("../../../pipelines/pools/tiny.toml")),
];

/// The data root: `$DSEL_DATA_ROOT` if set, else `../shared/data` relative to the
/// current directory if it exists, else `../../../shared/data` relative to this
/// crate's manifest directory (where the repository's checkout expects it).
pub fn default_data_root() -> PathBuf {
    if let Some(v) = std::env::var_os(DATA_ROOT_ENV) {
        if !v.is_empty() {
            return PathBuf::from(v);
        }
    }
    let local = PathBuf::from("../shared/data");
    if local.is_dir() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"))
}

/// Check that the data root is a directory; the error names the path and the env var.
pub fn check_data_root(root: &Path) -> Result<()> {
    if root.is_dir() {
        Ok(())
    } else {
        Err(IngestError::file(
            root,
            format!("data root not found (set {DATA_ROOT_ENV} to the directory holding pools/ and tasks/)"),
        ))
    }
}

/// Subsetting of a pool (see the module docs for the algorithm).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubsetOptions {
    /// Keep at most this many examples in total.
    pub limit: Option<usize>,
    /// Keep at most this many examples per source.
    pub per_source_cap: Option<usize>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Draw `limit` stratified by source (each source in proportion to its
    /// share of the pool) instead of uniformly.
    pub stratify: bool,
}

/// One entry of a mixture file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureEntry {
    /// File or directory, relative to the data root (or absolute).
    pub path: String,
    /// Format name (see [`Format::NAMES`]); detected when omitted.
    #[serde(default)]
    pub format: Option<String>,
    /// Overrides the source of every example of this entry.
    #[serde(default)]
    pub source: Option<String>,
    /// At most this many examples per source within this entry.
    #[serde(default)]
    pub per_source_cap: Option<usize>,
    /// At most this many examples from this entry.
    #[serde(default)]
    pub max_examples: Option<usize>,
}

/// A parsed mixture file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureSpec {
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The entries, read in this order.
    #[serde(rename = "entry")]
    pub entries: Vec<MixtureEntry>,
}

/// A resolved mixture: its name, where it came from, its text and its parsed spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mixture {
    /// Name (file stem) of the mixture.
    pub name: String,
    /// Where the TOML came from (a path, or `builtin:<name>`).
    pub origin: String,
    /// The TOML text.
    pub text: String,
    /// The parsed spec.
    pub spec: MixtureSpec,
}

/// Names of the mixtures built into this crate.
pub fn builtin_mixture_names() -> Vec<&'static str> {
    BUILTIN_MIXTURES.iter().map(|m| m.0).collect()
}

fn parse_mixture(name: String, origin: String, text: String) -> Result<Mixture> {
    let spec: MixtureSpec = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() as u64 + 1);
        let msg = e.message().to_string();
        match line {
            Some(l) => IngestError::at_line(&origin, l, None, msg),
            None => IngestError::file(&origin, msg),
        }
    })?;
    if spec.entries.is_empty() {
        return Err(IngestError::file(
            &origin,
            "a mixture needs at least one [[entry]]",
        ));
    }
    for (i, e) in spec.entries.iter().enumerate() {
        if let Some(f) = &e.format {
            f.parse::<Format>().map_err(|m| IngestError {
                path: origin.clone().into(),
                position: None,
                field: Some(format!("entry[{i}].format")),
                message: m,
            })?;
        }
    }
    Ok(Mixture {
        name,
        origin,
        text,
        spec,
    })
}

/// Resolve a mixture name or path to its TOML (see the module docs) and parse it.
pub fn resolve_mixture(mixture: &str) -> Result<Mixture> {
    let looks_like_path =
        mixture.ends_with(".toml") || mixture.contains('/') || mixture.contains('\\');
    if looks_like_path {
        let path = PathBuf::from(mixture);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| IngestError::file(&path, format!("cannot read mixture: {e}")))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return parse_mixture(name, path.display().to_string(), text);
    }
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(PIPELINES_DIR_ENV) {
        dirs.push(PathBuf::from(d).join("pools"));
    }
    dirs.push(PathBuf::from("pipelines/pools"));
    for dir in &dirs {
        let path = dir.join(format!("{mixture}.toml"));
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| IngestError::file(&path, format!("cannot read mixture: {e}")))?;
            return parse_mixture(mixture.to_string(), path.display().to_string(), text);
        }
    }
    if let Some((name, text)) = BUILTIN_MIXTURES.iter().find(|m| m.0 == mixture) {
        return parse_mixture(
            name.to_string(),
            format!("builtin:{name}"),
            text.to_string(),
        );
    }
    let mut names: Vec<String> = builtin_mixture_names()
        .into_iter()
        .map(String::from)
        .collect();
    for dir in &dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if let Some(stem) = e.file_name().to_string_lossy().strip_suffix(".toml") {
                    names.push(stem.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    Err(IngestError::file(
        mixture,
        format!(
            "unknown mixture: expected one of {} or a path to a .toml file",
            names.join(", ")
        ),
    ))
}

impl MixtureEntry {
    fn format(&self) -> Option<Format> {
        // Validated in parse_mixture.
        self.format.as_deref().and_then(|f| f.parse().ok())
    }

    fn full_path(&self, root: &Path) -> PathBuf {
        root.join(&self.path)
    }
}

impl Mixture {
    /// The files this mixture reads, in read order (entries in order, directory
    /// contents sorted), each with the entry index.
    pub fn files(&self, data_root: &Path) -> Result<Vec<(usize, PathBuf)>> {
        let opts = ReadOptions::with_root(data_root);
        let mut out = Vec::new();
        for (i, e) in self.spec.entries.iter().enumerate() {
            let path = e.full_path(data_root);
            if path.is_dir() {
                out.extend(
                    list_dir(&path, e.format(), &opts)?
                        .into_iter()
                        .map(|p| (i, p)),
                );
            } else if path.is_file() {
                out.push((i, path));
            } else {
                return Err(IngestError::file(
                    display_path(&path, Some(data_root)),
                    format!(
                        "mixture {} entry {}: no such file or directory under the data root {}",
                        self.origin,
                        i + 1,
                        data_root.display()
                    ),
                ));
            }
        }
        Ok(out)
    }
}

/// The content fingerprint of a mixture: blake3 (hex) of the ingest version, the TOML
/// text and, for every file it reads (in read order), its path relative to the data
/// root, its size and the blake3 hash of its contents. Key ingest artifacts on it
/// (together with the [`SubsetOptions`]).
pub fn mixture_fingerprint(mixture: &str, data_root: &Path) -> Result<String> {
    check_data_root(data_root)?;
    let m = resolve_mixture(mixture)?;
    let mut h = blake3::Hasher::new();
    h.update(format!("dsel-ingest mixture fingerprint v{RULES_VERSION}\n").as_bytes());
    h.update(&(m.text.len() as u64).to_le_bytes());
    h.update(m.text.as_bytes());
    for (_, path) in m.files(data_root)? {
        let rel = display_path(&path, Some(data_root));
        let bytes = std::fs::read(&path)
            .map_err(|e| IngestError::file(&rel, format!("cannot read: {e}")))?;
        h.update(&(rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(blake3::hash(&bytes).as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Load a pool mixture and apply its caps and `opts` (see the module docs).
///
/// Ids must be unique over the whole pool (an error names the duplicate).
pub fn load_pool(
    mixture: &str,
    data_root: &Path,
    opts: &SubsetOptions,
) -> Result<(Vec<Example>, IngestReport)> {
    check_data_root(data_root)?;
    let m = resolve_mixture(mixture)?;
    let files = m.files(data_root)?;
    let mut report = IngestReport::default();
    let mut pool = Vec::new();
    for (i, entry) in m.spec.entries.iter().enumerate() {
        let ropts = ReadOptions {
            root: Some(data_root.to_path_buf()),
            source: entry.source.clone(),
        };
        let mut examples = Vec::new();
        for (_, path) in files.iter().filter(|(e, _)| *e == i) {
            examples.extend(read_file(path, entry.format(), &ropts, &mut report)?);
        }
        let before = examples.len();
        if let Some(cap) = entry.per_source_cap {
            examples = cap_by_key(
                examples,
                cap,
                opts.seed,
                &format!("entry-per-source\0{i}\0{}", entry.path),
                |e| e.source.clone(),
            );
        }
        if let Some(max) = entry.max_examples {
            examples = sample_keep_order(
                examples,
                max,
                opts.seed,
                &format!("entry-max\0{i}\0{}", entry.path),
            );
        }
        report.dropped_by_subsetting += (before - examples.len()) as u64;
        pool.extend(examples);
    }
    let before = pool.len();
    if let Some(cap) = opts.per_source_cap {
        pool = cap_by_key(pool, cap, opts.seed, "pool-per-source", |e| {
            e.source.clone()
        });
    }
    if let Some(limit) = opts.limit {
        pool = if opts.stratify {
            stratified_sample(pool, limit, opts.seed, "pool-limit-stratified", |e| {
                e.source.clone()
            })
        } else {
            sample_keep_order(pool, limit, opts.seed, "pool-limit")
        };
    }
    report.dropped_by_subsetting += (before - pool.len()) as u64;
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(pool.len());
    for ex in &pool {
        if seen.insert(ex.id.as_str(), ()).is_some() {
            return Err(IngestError::file(
                &m.origin,
                format!("duplicate example id \"{}\" in the pool", ex.id),
            ));
        }
    }
    report.kept = pool.len() as u64;
    Ok((pool, report))
}

// ---------------------------------------------------------------- seeded sampling

fn rng_for(seed: u64, label: &str) -> ChaCha20Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"dsel-ingest subset v1\0");
    h.update(&seed.to_le_bytes());
    h.update(label.as_bytes());
    ChaCha20Rng::from_seed(*h.finalize().as_bytes())
}

/// Unbiased integer in `0..bound` (`bound > 0`) from raw `u64` draws (rejection sampling).
fn bounded(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % bound;
        }
    }
}

/// `k` distinct indices of `0..n` chosen uniformly with the RNG for `(seed, label)`,
/// sorted ascending (all of `0..n` when `k >= n`). See the module docs.
pub fn sample_indices(n: usize, k: usize, seed: u64, label: &str) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    let mut rng = rng_for(seed, label);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + bounded(&mut rng, (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Keep `k` of `items` chosen by [`sample_indices`], in their original order.
pub fn sample_keep_order<T>(items: Vec<T>, k: usize, seed: u64, label: &str) -> Vec<T> {
    if k >= items.len() {
        return items;
    }
    let keep = sample_indices(items.len(), k, seed, label);
    let mut keep_iter = keep.into_iter().peekable();
    let mut out = Vec::with_capacity(k);
    for (i, item) in items.into_iter().enumerate() {
        if keep_iter.peek() == Some(&i) {
            out.push(item);
            keep_iter.next();
        }
    }
    out
}

/// Keep `k` of `items` with every key in proportion to its share: a key with
/// `n_g` of the `n` items gets `⌊k·n_g/n⌋`, and the `k − Σ⌊·⌋` slots left go
/// one each to the keys with the largest remainders `k·n_g mod n` (ties: by
/// the first `u64` of the RNG for `(seed, "{label}\0tie\0{key}")`, then by
/// key). Each key's members are drawn by [`sample_indices`] with the label
/// `"{label}\0{key}"`; the kept items stay in original order. All of
/// `items` when `k >= n`.
pub fn stratified_sample<T>(
    items: Vec<T>,
    k: usize,
    seed: u64,
    label: &str,
    key: impl Fn(&T) -> String,
) -> Vec<T> {
    let n = items.len();
    if k >= n {
        return items;
    }
    let groups = group_by(&items, key);
    let (k128, n128) = (k as u128, n as u128);
    let mut quota: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order: Vec<(u128, u64, &str)> = Vec::with_capacity(groups.len());
    for (g, members) in &groups {
        let share = k128 * members.len() as u128;
        quota.insert(g, (share / n128) as usize);
        let tie = rng_for(seed, &format!("{label}\0tie\0{g}")).next_u64();
        order.push((share % n128, tie, g));
    }
    // Largest remainder first; ties by the seeded draw, then by key.
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)));
    let left = k - quota.values().sum::<usize>();
    for (_, _, g) in order.iter().take(left) {
        *quota.get_mut(g).expect("every key has a quota") += 1;
    }
    sample_groups(items, &groups, seed, label, |g| quota[g])
}

/// Keep at most `cap` items per key (groups sampled independently with the label
/// `"{label}\0{key}"`), in original order.
pub fn cap_by_key<T>(
    items: Vec<T>,
    cap: usize,
    seed: u64,
    label: &str,
    key: impl Fn(&T) -> String,
) -> Vec<T> {
    let groups = group_by(&items, key);
    sample_groups(items, &groups, seed, label, |_| cap)
}

/// The indices of `items` per key, in original order.
fn group_by<T>(items: &[T], key: impl Fn(&T) -> String) -> BTreeMap<String, Vec<usize>> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        groups.entry(key(item)).or_default().push(i);
    }
    groups
}

/// Keeps `quota(key)` members of each group, drawn by
/// [`sample_indices`] with the label `"{label}\0{key}"`, in original order.
fn sample_groups<T>(
    items: Vec<T>,
    groups: &BTreeMap<String, Vec<usize>>,
    seed: u64,
    label: &str,
    quota: impl Fn(&str) -> usize,
) -> Vec<T> {
    let mut keep = vec![false; items.len()];
    for (g, members) in groups {
        let k = quota(g);
        for j in sample_indices(members.len(), k, seed, &format!("{label}\0{g}")) {
            keep[members[j]] = true;
        }
    }
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, k)| k.then_some(item))
        .collect()
}
