//! The external data the project reads (`../shared/data`, or
//! `DSEL_DATA_ROOT`) is what `data/external.tsv` lists: every file there,
//! with its size and blake3. A changed or missing file fails here, naming
//! it, before any test or run gives a silently different number.
//!
//! After a deliberate change of the data, regenerate the manifest:
//! `DSEL_WRITE_MANIFEST=1 cargo test -p dsel-cli --test data_manifest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dsel_testkit::data_root;

fn manifest_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/external.tsv"
    ))
}

/// Every file under `root`, as sorted relative paths.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

fn hash(path: &Path) -> (u64, String) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        bytes.len() as u64,
        blake3::hash(&bytes).to_hex().to_string(),
    )
}

/// `path → (bytes, blake3)` of the manifest; `#` lines are comments.
fn read_manifest(text: &str) -> BTreeMap<String, (u64, String)> {
    let mut m = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() || line.starts_with("path\t") {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            f.len(),
            3,
            "data/external.tsv line {}: expected path, bytes, blake3",
            i + 1
        );
        let bytes = f[1]
            .parse()
            .unwrap_or_else(|_| panic!("data/external.tsv line {}: bytes {:?}", i + 1, f[1]));
        m.insert(f[0].to_string(), (bytes, f[2].to_string()));
    }
    m
}

const HEADER: &str = "\
# The external data dsel reads, under its data root (`../shared/data` or
# DSEL_DATA_ROOT): path, size in bytes, blake3. Where each group comes from
# and its licence: data/README.md. Checked by tests/data_manifest.rs;
# regenerate with DSEL_WRITE_MANIFEST=1 cargo test -p dsel-cli --test data_manifest
path\tbytes\tblake3
";

#[test]
fn external_data_matches_its_manifest() {
    let root = data_root();
    let mut files = Vec::new();
    for group in ["tasks", "pools", "models"] {
        walk(&root, &root.join(group), &mut files);
    }
    if std::env::var_os("DSEL_WRITE_MANIFEST").is_some() {
        let mut text = HEADER.to_string();
        for f in &files {
            let (n, h) = hash(&root.join(f));
            text.push_str(&format!("{f}\t{n}\t{h}\n"));
        }
        std::fs::write(manifest_path(), text).unwrap();
    }
    let manifest = read_manifest(&std::fs::read_to_string(manifest_path()).unwrap());
    assert!(manifest.len() > 400, "{} files listed", manifest.len());
    let mut problems = Vec::new();
    for (f, (bytes, blake)) in &manifest {
        let p = root.join(f);
        if !p.exists() {
            problems.push(format!("{f}: missing"));
            continue;
        }
        let (n, h) = hash(&p);
        if n != *bytes || &h != blake {
            problems.push(format!(
                "{f}: {n} bytes, blake3 {h}; the manifest says {bytes}, {blake}"
            ));
        }
    }
    for f in files.iter().filter(|f| !manifest.contains_key(*f)) {
        problems.push(format!("{f}: not in data/external.tsv"));
    }
    assert!(
        problems.is_empty(),
        "the data under {} differs from data/external.tsv:\n{}",
        root.display(),
        problems.join("\n")
    );
}

#[test]
fn a_changed_byte_is_a_mismatch() {
    // The check above is only as good as the hash comparison: one byte off,
    // a different digest.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f");
    std::fs::write(&p, b"abc").unwrap();
    let a = hash(&p);
    std::fs::write(&p, b"abd").unwrap();
    assert_eq!(a.0, hash(&p).0);
    assert_ne!(a.1, hash(&p).1);
    let m = read_manifest(&format!("{HEADER}x\t3\t{}\n", a.1));
    assert_eq!(m["x"], a);
}
