//! Integration tests of the artifact store: keys, reuse, corruption,
//! failed builds, scratch folders, concurrency and gc.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::bail;
use dsel_store::{ArtifactKey, GcKind, GcOptions, Problem, StageSpec, Store, MANIFEST_FILE};
use serde_json::json;

/// Serialises the tests that spawn child processes with the tests that
/// assert a lock is free. A child is forked with a copy of every descriptor
/// of this process and keeps it until its `exec`; since an flock belongs to
/// the open file description, a lock file another test thread had locked at
/// that instant stays locked after that thread closes it, until the child
/// execs. `gc` then sees the lock as held by a build and skips the entry
/// (`gc_dry_run_then_real` failed about one run in six that way).
static PROCESS_TESTS: Mutex<()> = Mutex::new(());

fn no_concurrent_spawns() -> MutexGuard<'static, ()> {
    // A failed test poisons the mutex; the others still run serialised.
    PROCESS_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

fn input_key() -> ArtifactKey {
    ArtifactKey::from_hex(&"0123456789abcdef".repeat(4)).unwrap()
}

fn fixed_spec() -> StageSpec {
    StageSpec {
        stage: "sweep".into(),
        version: "3".into(),
        config: json!({"model": "tiny-llama", "lr": 0.0001, "layers": [1, 2], "opts": {"b": true, "a": null}}),
        inputs: vec![input_key()],
        seed: Some(42),
    }
}

/// The key of `fixed_spec`, computed once from the documented encoding (and
/// cross-checked with the Python `blake3` package on the same byte string).
const FIXED_KEY: &str = "b53c838fcc79e6dfd98593adaa9180a073316330401156c6b5afe88833d9b155";

#[test]
fn key_matches_documented_encoding() {
    let spec = fixed_spec();
    let canonical =
        r#"{"layers":[1,2],"lr":0.0001,"model":"tiny-llama","opts":{"a":null,"b":true}}"#;
    let documented = format!(
        "dsel-artifact-key-v1\nstage=5:sweep\nversion=1:3\nconfig={}:{}\ninputs=64:{}\nseed=2:42\n",
        canonical.len(),
        canonical,
        "0123456789abcdef".repeat(4)
    );
    assert_eq!(spec.key_encoding(), documented.as_bytes());
    let independent = blake3::hash(documented.as_bytes()).to_hex().to_string();
    assert_eq!(spec.key().as_str(), independent);
    assert_eq!(spec.key().as_str(), FIXED_KEY);
    assert_eq!(spec.key().short(), &FIXED_KEY[..12]);
}

#[test]
fn key_ignores_object_key_order_but_not_content() {
    let base = fixed_spec();
    // Same config written in another key order (parsed from text so the
    // order really differs even if serde_json preserved insertion order).
    let mut reordered = base.clone();
    reordered.config = serde_json::from_str(
        r#"{"opts": {"a": null, "b": true}, "layers": [1, 2], "model": "tiny-llama", "lr": 0.0001}"#,
    )
    .unwrap();
    assert_eq!(reordered.key(), base.key());

    let mut variants = Vec::new();
    let mut s = base.clone();
    s.stage = "sweeps".into();
    variants.push(("stage", s));
    let mut s = base.clone();
    s.version = "4".into();
    variants.push(("version", s));
    let mut s = base.clone();
    s.config["lr"] = json!(0.0002);
    variants.push(("config value", s));
    let mut s = base.clone();
    s.config["layers"] = json!([2, 1]);
    variants.push(("array order", s));
    let mut s = base.clone();
    s.config["lr"] = json!("0.0001");
    variants.push(("config type", s));
    let mut s = base.clone();
    s.inputs = vec![ArtifactKey::from_hex(&"f".repeat(64)).unwrap()];
    variants.push(("input key", s));
    let mut s = base.clone();
    s.inputs.push(input_key());
    variants.push(("extra input", s));
    let mut s = base.clone();
    s.inputs.clear();
    variants.push(("no inputs", s));
    let mut s = base.clone();
    s.seed = Some(43);
    variants.push(("seed", s));
    let mut s = base.clone();
    s.seed = None;
    variants.push(("no seed", s));
    let mut keys = vec![base.key()];
    for (what, v) in &variants {
        assert_ne!(
            v.key(),
            base.key(),
            "changing the {what} must change the key"
        );
        keys.push(v.key());
    }
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        variants.len() + 1,
        "all variants have distinct keys"
    );

    // Field boundaries cannot be shifted between stage and version.
    let a = StageSpec::new("ab", "c", json!({}));
    let b = StageSpec::new("a", "bc", json!({}));
    assert_ne!(a.key(), b.key());
}

fn simple_spec(tag: &str) -> StageSpec {
    StageSpec::new("tokenize", "1", json!({"tag": tag}))
}

#[test]
fn second_call_reuses_artifact() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let spec = simple_spec("reuse");
    let calls = AtomicUsize::new(0);
    let build = |b: &mut dsel_store::Builder| {
        calls.fetch_add(1, Ordering::SeqCst);
        fs::write(b.path("a.bin"), b"hello")?;
        fs::write(b.path("sub/dir/b.txt"), b"world!")?;
        b.set_info(json!({"examples": 2}));
        Ok(())
    };
    let first = store.get_or_build(&spec, build).unwrap();
    assert!(!first.cache_hit);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let dir = root.path().join("tokenize").join(spec.key().as_str());
    assert_eq!(first.artifact.dir, dir);
    assert_eq!(
        fs::read(first.artifact.path("sub/dir/b.txt")).unwrap(),
        b"world!"
    );

    let m = first.artifact.manifest();
    assert_eq!(m.key, spec.key());
    assert_eq!(m.stage, "tokenize");
    assert_eq!(m.config, json!({"tag": "reuse"}));
    assert_eq!(m.info, json!({"examples": 2}));
    assert_eq!(m.tool_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(m.files.len(), 2);
    assert_eq!(
        m.files["a.bin"].blake3,
        blake3::hash(b"hello").to_hex().to_string()
    );
    assert_eq!(m.files["a.bin"].bytes, 5);
    assert_eq!(m.files["sub/dir/b.txt"].bytes, 6);
    assert!(
        m.created.ends_with('Z') && m.created.len() == 20,
        "{}",
        m.created
    );
    // The manifest on disk is the one returned.
    let on_disk: dsel_store::Manifest =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(&on_disk, m);
    assert!(root.path().join("used").join(spec.key().as_str()).exists());

    let second = store.get_or_build(&spec, build).unwrap();
    assert!(second.cache_hit);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "closure must not run on a hit"
    );
    assert_eq!(second.artifact.manifest, *m);

    // A fresh store (another run) also hits, after re-verifying.
    let store2 = Store::open(root.path()).unwrap();
    let third = store2.get_or_build(&spec, build).unwrap();
    assert!(third.cache_hit);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // lookup / open_artifact / show.
    assert!(store2.lookup(&spec).unwrap().is_some());
    assert!(store2.lookup(&simple_spec("other")).unwrap().is_none());
    let by_prefix = store2.open_artifact(spec.key().short()).unwrap();
    assert_eq!(by_prefix.key, spec.key());
    assert_eq!(store2.show(spec.key().as_str()).unwrap(), *m);
    assert!(store2.open_artifact("ffffffffffff").is_err());
    assert!(store2.open_artifact("xyz").is_err());
    let list = store2.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].stage, "tokenize");
    assert!(list[0].bytes > 11);
    assert!(list[0].last_used_unix.is_some());
    // No temporary folders left behind.
    assert_eq!(fs::read_dir(root.path().join("tmp")).unwrap().count(), 0);
}

fn build_counting(store: &Store, spec: &StageSpec, calls: &AtomicUsize) -> dsel_store::Outcome {
    store
        .get_or_build(spec, |b| {
            calls.fetch_add(1, Ordering::SeqCst);
            fs::write(b.path("data.bin"), vec![7u8; 1000])?;
            fs::write(b.path("meta/x.json"), b"{}")?;
            Ok(())
        })
        .unwrap()
}

fn corrupt_and_check(corrupt: impl Fn(&Path), expect: impl Fn(&Problem) -> bool) {
    let root = tempfile::tempdir().unwrap();
    let spec = simple_spec("corrupt");
    let calls = AtomicUsize::new(0);
    let out = build_counting(&Store::open(root.path()).unwrap(), &spec, &calls);
    corrupt(&out.artifact.dir);

    let store = Store::open(root.path()).unwrap();
    let reports = store.verify_all().unwrap();
    assert_eq!(reports.len(), 1);
    assert!(!reports[0].ok());
    assert!(
        reports[0].problems.iter().any(&expect),
        "unexpected problems: {:?}",
        reports[0].problems
    );
    // Lookup refuses the corrupt artifact; open_artifact errors and names it.
    assert!(store.lookup(&spec).unwrap().is_none());
    let err = format!("{:#}", store.open_artifact(spec.key().short()).unwrap_err());
    assert!(err.contains(spec.key().short()), "{err}");

    let again = build_counting(&store, &spec, &calls);
    assert!(!again.cache_hit, "a corrupt artifact must be rebuilt");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        fs::read(again.artifact.path("data.bin")).unwrap(),
        vec![7u8; 1000]
    );
    assert!(store.verify_all().unwrap().iter().all(|r| r.ok()));
    let third = build_counting(&store, &spec, &calls);
    assert!(third.cache_hit);
}

#[test]
fn flipped_byte_is_detected_and_rebuilt() {
    corrupt_and_check(
        |dir| {
            let p = dir.join("data.bin");
            let mut bytes = fs::read(&p).unwrap();
            bytes[500] ^= 0x01;
            fs::write(&p, bytes).unwrap();
        },
        |p| matches!(p, Problem::HashMismatch { file, .. } if file == "data.bin"),
    );
}

#[test]
fn truncated_file_is_detected_and_rebuilt() {
    corrupt_and_check(
        |dir| {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("data.bin"))
                .unwrap();
            f.set_len(999).unwrap();
        },
        |p| matches!(p, Problem::SizeMismatch { file, expected: 1000, actual: 999 } if file == "data.bin"),
    );
}

#[test]
fn missing_file_is_detected_and_rebuilt() {
    corrupt_and_check(
        |dir| fs::remove_file(dir.join("meta/x.json")).unwrap(),
        |p| matches!(p, Problem::MissingFile(f) if f == "meta/x.json"),
    );
}

#[test]
fn bad_manifest_is_detected_and_rebuilt() {
    corrupt_and_check(
        |dir| fs::write(dir.join(MANIFEST_FILE), b"{not json").unwrap(),
        |p| matches!(p, Problem::ManifestInvalid(_)),
    );
}

#[test]
fn edited_manifest_config_is_detected() {
    corrupt_and_check(
        |dir| {
            let p = dir.join(MANIFEST_FILE);
            let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            v["config"]["tag"] = json!("tampered");
            fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        },
        |p| matches!(p, Problem::ManifestMismatch(_)),
    );
}

#[test]
fn corruption_after_verification_in_same_store_is_caught() {
    // The in-process verification cache must not hide a file rewritten in
    // place with a different size.
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let spec = simple_spec("same-store");
    let calls = AtomicUsize::new(0);
    let out = build_counting(&store, &spec, &calls);
    assert!(build_counting(&store, &spec, &calls).cache_hit);
    fs::write(out.artifact.path("data.bin"), b"short").unwrap();
    assert!(!build_counting(&store, &spec, &calls).cache_hit);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

fn no_tmp_left(root: &Path) {
    let left: Vec<_> = fs::read_dir(root.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
}

#[test]
fn failed_or_panicking_build_leaves_no_artifact() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let spec = simple_spec("fail");
    let final_dir = store.artifact_dir("tokenize", &spec.key());

    let err = store
        .get_or_build(&spec, |b| {
            fs::write(b.path("half.bin"), b"partial")?;
            bail!("simulated failure");
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("simulated failure"));
    assert!(!final_dir.exists());
    no_tmp_left(root.path());

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.get_or_build(&spec, |b| {
            fs::write(b.path("half.bin"), b"partial")?;
            panic!("simulated panic");
        })
    }));
    assert!(panicked.is_err());
    assert!(!final_dir.exists());
    no_tmp_left(root.path());
    assert!(store.lookup(&spec).unwrap().is_none());

    // An invalid path is refused at commit, naming it.
    let err = store
        .get_or_build(&spec, |b| {
            fs::write(b.path("../escape.bin"), b"x")?;
            Ok(())
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("../escape.bin"), "{err:#}");
    assert!(!root.path().join("tokenize").join("escape.bin").exists());
    assert!(!final_dir.exists());
    assert!(store
        .get_or_build(&spec, |b| b.try_path("manifest.json").map(drop))
        .is_err());

    let ok = store
        .get_or_build(&spec, |b| {
            fs::write(b.path("whole.bin"), b"complete")?;
            Ok(())
        })
        .unwrap();
    assert!(!ok.cache_hit);
    assert!(final_dir.join("whole.bin").exists());
    assert!(!final_dir.join("half.bin").exists());
    no_tmp_left(root.path());
}

#[test]
fn scratch_dir_survives_failure_and_is_removed_after_success() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    let spec = simple_spec("scratch");
    let scratch = root
        .path()
        .join("partial")
        .join("tokenize")
        .join(spec.key().as_str());

    // First attempt writes shard 0 then dies.
    let _ = store
        .get_or_build(&spec, |b| {
            assert_eq!(b.scratch_dir(), scratch);
            fs::write(b.scratch_dir().join("shard-0"), b"zero")?;
            bail!("killed after shard 0");
        })
        .unwrap_err();
    assert_eq!(fs::read(scratch.join("shard-0")).unwrap(), b"zero");

    // Second attempt resumes: shard 0 is there, only shard 1 is computed.
    let out = store
        .get_or_build(&spec, |b| {
            let s = b.scratch_dir();
            assert!(
                s.join("shard-0").exists(),
                "scratch must survive the failed build"
            );
            fs::write(s.join("shard-1"), b"one")?;
            let mut all = fs::read(s.join("shard-0"))?;
            all.extend(fs::read(s.join("shard-1"))?);
            fs::write(b.path("all.bin"), all)?;
            Ok(())
        })
        .unwrap();
    assert_eq!(fs::read(out.artifact.path("all.bin")).unwrap(), b"zeroone");
    assert!(!scratch.exists(), "scratch must be removed after commit");
}

#[test]
fn concurrent_threads_build_once() {
    let root = tempfile::tempdir().unwrap();
    let spec = simple_spec("threads");
    let calls = Arc::new(AtomicUsize::new(0));
    let n = 4;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (root, spec, calls, barrier) = (
                root.path().to_path_buf(),
                spec.clone(),
                calls.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                // Each thread has its own store, like separate runs.
                let store = Store::open(&root).unwrap();
                barrier.wait();
                store
                    .get_or_build(&spec, |b| {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        fs::write(b.path("x.bin"), vec![1u8; 4096])?;
                        Ok(())
                    })
                    .unwrap()
                    .cache_hit
            })
        })
        .collect();
    let hits: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "closure must run exactly once"
    );
    assert_eq!(hits.iter().filter(|h| !**h).count(), 1);
    no_tmp_left(root.path());
}

const CHILD_ROOT: &str = "DSEL_STORE_TEST_CHILD_ROOT";
const CHILD_OUT: &str = "DSEL_STORE_TEST_CHILD_OUT";

/// Runs only when re-executed by `concurrent_processes_build_once`.
#[test]
fn child_process_builder() {
    let (Some(root), Some(out)) = (std::env::var_os(CHILD_ROOT), std::env::var_os(CHILD_OUT))
    else {
        return;
    };
    let root = PathBuf::from(root);
    let store = Store::open(&root).unwrap();
    let counter = root.parent().unwrap().join("calls.log");
    let outcome = store
        .get_or_build(&simple_spec("processes"), |b| {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&counter)?;
            writeln!(f, "{}", std::process::id())?;
            std::thread::sleep(Duration::from_millis(500));
            fs::write(b.path("p.bin"), b"from a process")?;
            Ok(())
        })
        .unwrap();
    fs::write(out, if outcome.cache_hit { "hit" } else { "miss" }).unwrap();
}

#[test]
fn concurrent_processes_build_once() {
    let _serial = no_concurrent_spawns();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|i| {
            std::process::Command::new(&exe)
                .args(["--exact", "child_process_builder", "--test-threads=1"])
                .env(CHILD_ROOT, &root)
                .env(CHILD_OUT, dir.path().join(format!("out-{i}")))
                // Keep the children's test-harness lines out of our output.
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let calls = fs::read_to_string(dir.path().join("calls.log")).unwrap();
    assert_eq!(calls.lines().count(), 1, "built more than once: {calls:?}");
    let outs: Vec<String> = (0..3)
        .map(|i| fs::read_to_string(dir.path().join(format!("out-{i}"))).unwrap())
        .collect();
    assert_eq!(outs.iter().filter(|o| *o == "miss").count(), 1, "{outs:?}");
    assert_eq!(outs.iter().filter(|o| *o == "hit").count(), 2, "{outs:?}");
}

fn set_mtime(path: &Path, ago: Duration) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

#[test]
fn gc_dry_run_then_real() {
    let _serial = no_concurrent_spawns();
    let root = tempfile::tempdir().unwrap();
    let old = simple_spec("old");
    let fresh = simple_spec("fresh");
    // Built by a store that is closed before gc runs (an open store keeps
    // what it handed out; see `gc_never_collects_artifacts_in_use`).
    let builder = Store::open(root.path()).unwrap();
    for spec in [&old, &fresh] {
        builder
            .get_or_build(spec, |b| {
                fs::write(b.path("d.bin"), vec![0u8; 10_000])?;
                Ok(())
            })
            .unwrap();
    }
    drop(builder);
    let store = Store::open(root.path()).unwrap();
    // `old` was last used two days ago.
    set_mtime(
        &root.path().join("used").join(old.key().as_str()),
        Duration::from_secs(2 * 86_400),
    );
    // A build that died: a temp folder, a lock and an old scratch folder.
    let dead = ArtifactKey::from_hex(&"d".repeat(64)).unwrap();
    let tmp = root.path().join("tmp").join(format!("{dead}-12345-0-0"));
    fs::create_dir_all(&tmp).unwrap();
    fs::write(tmp.join("junk"), vec![0u8; 300]).unwrap();
    fs::write(root.path().join("locks").join(format!("{dead}.lock")), b"").unwrap();
    let partial = root
        .path()
        .join("partial")
        .join("sweep")
        .join(dead.as_str());
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("shard"), b"s").unwrap();
    set_mtime(&partial.join("shard"), Duration::from_secs(3 * 86_400));
    let dir_f = fs::File::open(&partial).unwrap();
    dir_f
        .set_modified(SystemTime::now() - Duration::from_secs(3 * 86_400))
        .unwrap();

    let opts = GcOptions {
        older_than: Duration::from_secs(86_400),
        ..GcOptions::default()
    };
    assert!(opts.dry_run, "dry run is the default");
    let dry = store.gc(&opts).unwrap();
    let kinds =
        |r: &dsel_store::GcReport, k: GcKind| r.items.iter().filter(|i| i.kind == k).count();
    assert_eq!(kinds(&dry, GcKind::Artifact), 1, "{:#?}", dry.items);
    assert_eq!(kinds(&dry, GcKind::Tmp), 1);
    assert_eq!(kinds(&dry, GcKind::Partial), 1);
    assert!(kinds(&dry, GcKind::Lock) >= 2, "{:#?}", dry.items); // dead key + old artifact
    assert!(dry.bytes >= 10_000 + 300);
    let old_dir = store.artifact_dir("tokenize", &old.key());
    assert!(dry.items.iter().any(|i| i.path == old_dir));
    // Nothing was removed.
    assert!(old_dir.exists() && tmp.exists() && partial.exists());
    assert_eq!(store.list().unwrap().len(), 2);

    let real = store
        .gc(&GcOptions {
            dry_run: false,
            ..opts.clone()
        })
        .unwrap();
    assert!(real.errors.is_empty(), "{:?}", real.errors);
    assert_eq!(
        real.items.len(),
        dry.items.len(),
        "{:#?} vs {:#?}",
        real.items,
        dry.items
    );
    assert!(!old_dir.exists() && !tmp.exists() && !partial.exists());
    assert!(!root
        .path()
        .join("locks")
        .join(format!("{dead}.lock"))
        .exists());
    let left = store.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, fresh.key());
    assert!(store.verify_all().unwrap().iter().all(|r| r.ok()));

    // A held lock (a build in progress) protects its key from gc.
    let lock = fs::File::open(
        root.path()
            .join("locks")
            .join(format!("{}.lock", fresh.key())),
    )
    .unwrap();
    lock.lock().unwrap();
    let all = store
        .gc(&GcOptions {
            older_than: Duration::ZERO,
            dry_run: false,
        })
        .unwrap();
    assert!(
        all.items.iter().all(|i| i.kind != GcKind::Artifact),
        "{:#?}",
        all.items
    );
    assert!(!all.skipped_locked.is_empty());
    assert_eq!(store.list().unwrap().len(), 1);
    drop(lock);
    let all = store
        .gc(&GcOptions {
            older_than: Duration::ZERO,
            dry_run: false,
        })
        .unwrap();
    assert!(all.items.iter().any(|i| i.kind == GcKind::Artifact));
    assert!(store.list().unwrap().is_empty());
    // Orphaned lock files go in the same pass.
    assert_eq!(fs::read_dir(root.path().join("locks")).unwrap().count(), 0);
    // The old artifact can be rebuilt after gc.
    let again = store
        .get_or_build(&old, |b| {
            fs::write(b.path("d.bin"), b"again")?;
            Ok(())
        })
        .unwrap();
    assert!(!again.cache_hit);
}

fn build_d(store: &Store, spec: &StageSpec) -> PathBuf {
    store
        .get_or_build(spec, |b| {
            fs::write(b.path("d.bin"), vec![3u8; 1000])?;
            Ok(())
        })
        .unwrap()
        .artifact
        .dir
}

fn gc_all(store: &Store, dry_run: bool) -> dsel_store::GcReport {
    let r = store
        .gc(&GcOptions {
            older_than: Duration::ZERO,
            dry_run,
        })
        .unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    r
}

fn lease_files(root: &Path) -> Vec<PathBuf> {
    fs::read_dir(root.join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "lease"))
        .collect()
}

#[test]
fn gc_never_collects_artifacts_in_use() {
    let _serial = no_concurrent_spawns();
    let root = tempfile::tempdir().unwrap();
    let (used, unused) = (simple_spec("in-use"), simple_spec("unused"));
    let builder = Store::open(root.path()).unwrap();
    let (used_dir, unused_dir) = (build_d(&builder, &used), build_d(&builder, &unused));
    drop(builder);
    assert!(
        lease_files(root.path()).is_empty(),
        "a closed store ends its lease"
    );

    // Two handles on one cache, as two commands: one opened the artifact
    // (as select opens its adapter), the other collects everything.
    let user = Store::open(root.path()).unwrap();
    let art = user.open_artifact(used.key().short()).unwrap();
    let gc = Store::open(root.path()).unwrap();
    let dry = gc_all(&gc, true);
    assert_eq!(dry.skipped_in_use, vec![used_dir.clone()]);
    assert!(dry.items.iter().any(|i| i.path == unused_dir));
    assert!(
        dry.items.iter().all(|i| i.path != used_dir),
        "{:#?}",
        dry.items
    );
    let real = gc_all(&gc, false);
    assert_eq!(real.skipped_in_use, vec![used_dir.clone()]);
    assert!(!unused_dir.exists());
    assert_eq!(fs::read(art.path("d.bin")).unwrap(), vec![3u8; 1000]);
    // Its lock file stays with it; a lookup through `lookup` leases too.
    assert!(user.lookup(&used).unwrap().is_some());
    drop(user);
    let real = gc_all(&gc, false);
    assert!(real.skipped_in_use.is_empty());
    assert!(real
        .items
        .iter()
        .any(|i| i.kind == GcKind::Artifact && i.path == used_dir));
    assert!(!used_dir.exists());

    // The same store's own handouts are protected too.
    let dir = build_d(&gc, &used);
    assert_eq!(gc_all(&gc, false).skipped_in_use, vec![dir.clone()]);
    assert!(dir.exists());
}

const LEASE_ROOT: &str = "DSEL_STORE_TEST_LEASE_ROOT";

/// Runs only when re-executed by `gc_skips_artifacts_of_live_processes`:
/// opens an artifact, says so, then keeps using it until killed.
#[test]
fn child_process_holds_an_artifact() {
    let Some(root) = std::env::var_os(LEASE_ROOT) else {
        return;
    };
    let root = PathBuf::from(root);
    let store = Store::open(&root).unwrap();
    let art = store.lookup(&simple_spec("child")).unwrap().unwrap();
    fs::write(root.join("ready"), art.key.as_str()).unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        assert_eq!(fs::read(art.path("d.bin")).unwrap().len(), 1000);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gc_skips_artifacts_of_live_processes() {
    let _serial = no_concurrent_spawns();
    let root = tempfile::tempdir().unwrap();
    let spec = simple_spec("child");
    let dir = {
        let builder = Store::open(root.path()).unwrap();
        build_d(&builder, &spec)
    };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_holds_an_artifact",
            "--test-threads=1",
        ])
        .env(LEASE_ROOT, root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !root.path().join("ready").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    let gc = Store::open(root.path()).unwrap();
    let r = gc_all(&gc, false);
    assert_eq!(r.skipped_in_use, vec![dir.clone()]);
    assert!(dir.exists());
    assert_eq!(lease_files(root.path()).len(), 1, "the child's lease");

    // Killed: no destructor ran, its lease file is left but no longer held.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lease_files(root.path()).len(), 1);
    let r = gc_all(&gc, false);
    assert!(r.skipped_in_use.is_empty(), "{:?}", r.skipped_in_use);
    assert!(!dir.exists());
    assert!(
        r.items.iter().any(|i| i.kind == GcKind::Lease),
        "{:#?}",
        r.items
    );
    assert!(lease_files(root.path()).is_empty());
}

#[test]
fn invalid_stage_names_are_rejected() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    for bad in ["tmp", "../x", "Upper", ""] {
        let spec = StageSpec::new(bad, "1", json!(null));
        assert!(store.get_or_build(&spec, |_| Ok(())).is_err(), "{bad:?}");
    }
}

#[test]
fn default_cache_root_honours_env() {
    // Only reads the variable; set in a child to avoid racing other tests.
    if let Some(v) = std::env::var_os("DSEL_CACHE") {
        assert_eq!(dsel_store::default_cache_root(), PathBuf::from(v));
    } else {
        assert_eq!(
            dsel_store::default_cache_root(),
            std::env::current_dir().unwrap().join(".cache")
        );
    }
}

const DIE_ROOT: &str = "DSEL_STORE_TEST_DIE_ROOT";

/// Runs only when re-executed by `killed_build_leaves_no_artifact`: starts a
/// build, writes a file and a scratch shard, then exits abruptly (no
/// unwinding, no destructors), as a killed process would.
#[test]
fn child_process_dies_mid_build() {
    let Some(root) = std::env::var_os(DIE_ROOT) else {
        return;
    };
    let store = Store::open(PathBuf::from(root)).unwrap();
    let _ = store.get_or_build(&simple_spec("killed"), |b| {
        fs::write(b.path("half.bin"), b"half")?;
        fs::write(b.scratch_dir().join("shard-0"), b"done")?;
        std::process::exit(3);
    });
}

#[test]
fn killed_build_leaves_no_artifact() {
    let _serial = no_concurrent_spawns();
    let root = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_dies_mid_build",
            "--test-threads=1",
        ])
        .env(DIE_ROOT, root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3), "the child must die mid-build");
    let spec = simple_spec("killed");
    let store = Store::open(root.path()).unwrap();
    let final_dir = store.artifact_dir("tokenize", &spec.key());
    assert!(!final_dir.exists(), "no half artifact at the final path");
    let leftovers: Vec<_> = fs::read_dir(root.path().join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the dead build's temporary folder remains"
    );
    assert!(store.lookup(&spec).unwrap().is_none());

    // The next build resumes from the scratch shard and clears the leftover.
    let out = store
        .get_or_build(&spec, |b| {
            let shard = fs::read(b.scratch_dir().join("shard-0"))?;
            fs::write(b.path("whole.bin"), shard)?;
            Ok(())
        })
        .unwrap();
    assert!(!out.cache_hit);
    assert_eq!(fs::read(out.artifact.path("whole.bin")).unwrap(), b"done");
    assert!(!out.artifact.path("half.bin").exists());
    no_tmp_left(root.path());
}

/// A store without locks (`DSEL_LOCKS=off`: a filesystem whose locks are
/// missing or hang) builds and reuses artifacts, leaves no lock or lease
/// file, and refuses `gc`, which needs locks to see what live processes use.
#[test]
fn a_store_without_locks_builds_and_reuses_and_refuses_gc() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path()).unwrap();
    store.set_locking(false);
    let spec = simple_spec("unlocked");
    let calls = AtomicUsize::new(0);
    assert!(!build_counting(&store, &spec, &calls).cache_hit);
    assert!(build_counting(&store, &spec, &calls).cache_hit);
    assert!(store.lookup(&spec).unwrap().is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let locks: Vec<_> = fs::read_dir(root.path().join("locks"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(locks.is_empty(), "no lock or lease files: {locks:?}");
    let err = store.gc(&GcOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("needs file locks"), "{err:#}");
    store.set_locking(true);
    assert!(build_counting(&store, &spec, &calls).cache_hit);
}
