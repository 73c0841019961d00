//! End-to-end runs of the `dsel` binary as a user runs it: `select` on a
//! slice of the real `tiny` pool with the tiny real model (stories260K), the
//! cache commands on what it built (a corrupted artifact is reported on one
//! line, fails `verify`, and is rebuilt to the same bytes), `compare` into
//! its own folder, and usage errors from clap.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dsel_testkit::{data_root, fixtures, stories_dir};

/// `dsel <args>` with the cache in `cache` and the real data root.
fn dsel(cache: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dsel"))
        .arg("--cache")
        .arg(cache)
        .arg("--data-root")
        .arg(data_root())
        .args(args)
        .env("DSEL_LOG", "warn")
        .output()
        .expect("running dsel");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Succeeds, or panics with the command's output.
fn ok(cache: &Path, args: &[&str]) -> String {
    let o = dsel(cache, args);
    assert!(
        o.status.success(),
        "dsel {args:?} failed ({}):\n{}\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// The ids and scores of a selection file, one per line (for messages).
fn ids(selection: &[u8]) -> String {
    text(selection)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["id"], v["score"])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The first file named `name` under `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

#[test]
fn select_caches_verifies_detects_corruption_and_rebuilds_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, out) = (tmp.path().join("cache"), tmp.path().join("run"));
    let target = fixtures("pipeline").join("toy_target.jsonl");
    let model = stories_dir();
    let args = [
        "select",
        "--task",
        &s(&target),
        "--method",
        "bm25",
        "--pool",
        "tiny",
        "--pool-limit",
        "80",
        "--model",
        &s(&model),
        "--budget",
        "5",
        "--out",
        &s(&out),
    ];
    let first = ok(&cache, &args);
    assert!(
        first.contains("selected 5 of 80 pool examples with bm25"),
        "{first}"
    );
    let selection = std::fs::read(out.join("selection.jsonl")).unwrap();
    assert_eq!(text(&selection).lines().count(), 5);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["budget"], "5", "a plain value: {summary}");
    assert_eq!(summary["method"], "bm25");

    // Same command again: everything comes from the cache.
    let second = ok(&cache, &args);
    assert!(second.contains("stages: 0 run"), "{second}");

    let verify = ok(&cache, &["cache", "verify"]);
    assert!(verify.trim_end().ends_with(", 0 corrupt"), "{verify}");
    let ls = ok(&cache, &["cache", "ls"]);
    assert!(ls.contains("tokenize") && ls.contains("artifacts,"), "{ls}");

    // One byte of the pool's tokens flipped, size unchanged.
    let tokens = find(&cache.join("tokenize"), "tokens.npy").unwrap();
    let mut bytes = std::fs::read(&tokens).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&tokens, &bytes).unwrap();
    let o = dsel(&cache, &["cache", "verify"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify fails on a corrupt artifact"
    );
    let stdout = text(&o.stdout);
    let corrupt: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("CORRUPT "))
        .collect();
    assert_eq!(corrupt.len(), 1, "{stdout}");
    assert!(
        corrupt[0].starts_with("CORRUPT tokenize ") && corrupt[0].contains("tokens.npy has blake3"),
        "one readable line: {}",
        corrupt[0]
    );
    assert!(
        text(&o.stderr).contains("1 corrupt artifacts"),
        "{}",
        text(&o.stderr)
    );

    // The next run detects it, rebuilds it, and selects the same bytes.
    let third = ok(&cache, &args);
    assert!(!third.contains("stages: 0 run"), "{third}");
    let rebuilt = std::fs::read(out.join("selection.jsonl")).unwrap();
    assert!(
        rebuilt == selection,
        "the rebuilt run selects other bytes:\n{}\nvs\n{}\n{third}",
        ids(&selection),
        ids(&rebuilt)
    );
    let verify = ok(&cache, &["cache", "verify"]);
    assert!(verify.trim_end().ends_with(", 0 corrupt"), "{verify}");

    // gc is a dry run by default: one line per entry, nothing removed.
    let gc = ok(&cache, &["cache", "gc", "--days", "0"]);
    assert!(
        gc.lines().any(|l| l.starts_with("would remove artifact")),
        "{gc}"
    );
    assert!(
        gc.trim_end()
            .ends_with("would be removed (dry run; --yes deletes)"),
        "{gc}"
    );
    assert!(tokens.exists());
}

#[test]
fn compare_writes_its_own_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, out) = (tmp.path().join("cache"), tmp.path().join("cmp"));
    let mixture = tmp.path().join("toy.toml");
    std::fs::write(
        &mixture,
        format!(
            "description = \"toy\"\n[[entry]]\npath = {:?}\nformat = \"messages\"\nsource = \"toy\"\n",
            s(&fixtures("pipeline").join("toy_pool.jsonl"))
        ),
    )
    .unwrap();
    let target = fixtures("pipeline").join("toy_target.jsonl");
    let stdout = ok(
        &cache,
        &[
            "compare",
            "--task",
            &s(&target),
            "--methods",
            "random,bm25",
            "--pool",
            &s(&mixture),
            "--model",
            &s(&stories_dir()),
            "--budget",
            "6",
            "--max-len",
            "64",
            "--target-max-len",
            "64",
            "--out",
            &s(&out),
        ],
    );
    assert!(stdout.contains("rows →"), "{stdout}");
    for f in ["table.md", "table.csv", "compare.json", "report.html"] {
        assert!(out.join(f).exists(), "{f}");
    }
    for m in ["random", "bm25"] {
        let sel = out.join("selections").join(m).join("selection.jsonl");
        assert_eq!(
            text(&std::fs::read(&sel).unwrap()).lines().count(),
            6,
            "{m}"
        );
    }
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains("no-finetune") && md.contains("bm25"), "{md}");
    // Nothing beside the comparison's folder.
    let siblings: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut siblings = siblings;
    siblings.sort();
    assert_eq!(siblings, ["cache", "cmp", "toy.toml"]);
}

#[test]
fn bad_options_are_usage_errors_that_list_the_values() {
    let tmp = tempfile::tempdir().unwrap();
    let o = dsel(
        tmp.path(),
        &["compare", "--task", "mmlu", "--methods", "tov,nope"],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = text(&o.stderr);
    assert!(
        e.contains("'nope'") && e.contains("possible values: tov, tov-b"),
        "{e}"
    );
    let o = dsel(tmp.path(), &["select", "--task", "mmlu", "--shard", "3/3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("3/3"), "{}", text(&o.stderr));
}

#[test]
fn bench_runs_a_random_init_model_from_a_shipped_config_shape() {
    // A tiny shape in the shipped configs' format (the real ones are
    // pipelines/models/*.json; a 1B model is too slow for a unit test).
    let tmp = tempfile::tempdir().unwrap();
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../pipelines/models/llama-3.2-1b.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(shipped["hidden_size"], 2048);
    let mut tiny = shipped.clone();
    for (k, v) in [
        ("vocab_size", 512),
        ("hidden_size", 64),
        ("intermediate_size", 128),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
    ] {
        tiny[k] = v.into();
    }
    let cfg = tmp.path().join("tiny.json");
    std::fs::write(&cfg, tiny.to_string()).unwrap();
    let stdout = ok(
        tmp.path(),
        &[
            "bench",
            "--config",
            &s(&cfg),
            "--only",
            "forward",
            "--reps",
            "1",
            "--batch",
            "2",
            "--seq",
            "16",
            "--precisions",
            "f32",
        ],
    );
    assert!(
        stdout.contains("random-init model") && stdout.contains("2 layers"),
        "{stdout}"
    );
    assert!(
        stdout.to_lowercase().contains("tok"),
        "a throughput line: {stdout}"
    );
}

/// A selection sharded as `dsel slurm`'s jobs run it — `select --prepare`,
/// `select --shard i/N` for every i, `merge` — on one shared cache writes
/// exactly the bytes of a single `select` (ToV's sweeps with 4 workers;
/// Grad-Norm's gradient norms and RDS's pool embeddings with 2), and a
/// merge with a worker missing fails naming the units.
#[test]
fn sharded_selection_merges_into_the_bytes_of_a_single_run() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fixtures("pipeline").join("toy_target.jsonl");
    let model = stories_dir();
    for (method, shards) in [("tov", 4), ("grad-norm", 2), ("rds", 2)] {
        let dir = tmp.path().join(method);
        let (single, shared) = (dir.join("single"), dir.join("shared"));
        let args = |out: &str| -> Vec<String> {
            [
                "--task",
                &s(&target),
                "--method",
                method,
                "--pool",
                "tiny",
                "--pool-limit",
                "80",
                "--model",
                &s(&model),
                "--budget",
                "8",
                "--u-size",
                "16",
                "--rounds",
                "1",
                "--unit-examples",
                "16",
                "--out",
                &s(&dir.join(out)),
            ]
            .map(String::from)
            .to_vec()
        };
        let run = |cache: &Path, verb: &str, out: &str, extra: &[String]| {
            let mut a = vec![verb.to_string()];
            a.extend(args(out));
            a.extend_from_slice(extra);
            dsel(cache, &a.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let must = |o: Output, what: &str| {
            assert!(
                o.status.success(),
                "{method} {what}: {}\n{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        };
        must(run(&single, "select", "single-run", &[]), "single run");
        must(
            run(&shared, "select", "x", &["--prepare".into()]),
            "prepare",
        );
        for i in 0..shards {
            if i == shards - 1 {
                let early = run(&shared, "merge", "sharded-run", &[]);
                assert!(
                    !early.status.success(),
                    "{method}: merged with a worker missing"
                );
                let err = text(&early.stderr);
                assert!(err.contains("units are not finished"), "{method}: {err}");
            }
            must(
                run(
                    &shared,
                    "select",
                    "x",
                    &["--shard".into(), format!("{i}/{shards}")],
                ),
                "shard",
            );
        }
        assert!(!dir.join("x").exists(), "a part writes no run folder");
        must(run(&shared, "merge", "sharded-run", &[]), "merge");
        for f in ["selection.jsonl", "scores.parquet"] {
            let a = std::fs::read(dir.join("single-run").join(f)).unwrap();
            let b = std::fs::read(dir.join("sharded-run").join(f)).unwrap();
            assert!(
                a == b,
                "{method}: {f} of the sharded run differs from the single run's"
            );
        }
    }
}

/// `dsel slurm` writes the prepare job, a job array of N shard workers and
/// the merge job, chained by `afterok` in `submit.sh`, each running this
/// binary on the absolute cache.
#[test]
fn slurm_writes_a_job_array_chained_by_afterok() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, jobs) = (tmp.path().join("cache"), tmp.path().join("jobs"));
    let stdout = ok(
        &cache,
        &[
            "slurm",
            "--shards",
            "4",
            "--partition",
            "gpu",
            "--gpus-per-task",
            "1",
            "--dir",
            &s(&jobs),
            "--",
            "--task",
            "mmlu",
            "--method",
            "less",
            "--out",
            "runs/my run",
        ],
    );
    assert!(stdout.contains("submit with: bash"), "{stdout}");
    let read = |f: &str| std::fs::read_to_string(jobs.join(f)).unwrap();
    let shard = read("shard.sbatch");
    for needle in [
        "#SBATCH --array=0-3",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "--shard \"${SLURM_ARRAY_TASK_ID}/4\"",
        "'runs/my run'",
        &format!("export DSEL_CACHE={}", s(&cache)),
    ] {
        assert!(shard.contains(needle), "{needle} missing from:\n{shard}");
    }
    assert!(read("prepare.sbatch")
        .contains("select --task mmlu --method less --out 'runs/my run' --prepare"));
    assert!(read("merge.sbatch").contains(" merge --task mmlu"));
    let submit = read("submit.sh");
    assert!(
        submit.contains("--dependency=afterok:$prepare")
            && submit.contains("--dependency=afterok:$shards"),
        "{submit}"
    );
    let bad = dsel(
        &cache,
        &[
            "slurm", "--shards", "2", "--", "--task", "mmlu", "--shard", "0/2",
        ],
    );
    assert!(
        !bad.status.success()
            && text(&bad.stderr).contains("leave out --prepare, --shard and --merge")
    );
}

/// `eval` sharded (`--prepare`, `--shard i/2`, `--merge`) on one cache
/// writes the test losses and the result of a single `eval`.
#[test]
fn sharded_evaluation_merges_into_the_result_of_a_single_run() {
    let tmp = tempfile::tempdir().unwrap();
    // A custom target of 36 examples, scored 8 per unit.
    let target = fixtures("pipeline").join("toy_pool.jsonl");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "--task",
            &s(&target),
            "--model",
            &s(&stories_dir()),
            "--eval-unit-examples",
            "8",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |cache: &Path, extra: &[&str]| {
        let a = args(extra);
        ok(cache, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (single, shared) = (tmp.path().join("single"), tmp.path().join("shared"));
    let one: serde_json::Value = serde_json::from_str(&run(&single, &[])).unwrap();
    run(&shared, &["--prepare"]);
    run(&shared, &["--shard", "0/2"]);
    let early = dsel(
        &shared,
        &args(&["--merge"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!early.status.success() && text(&early.stderr).contains("units are not finished"));
    run(&shared, &["--shard", "1/2"]);
    let merged: serde_json::Value = serde_json::from_str(&run(&shared, &["--merge"])).unwrap();
    for field in ["test_loss", "metric", "n", "per_subtask"] {
        assert_eq!(one[field], merged[field], "{field}");
    }
    assert!(
        one["n"].as_u64().unwrap() > 16,
        "three units or more: {one}"
    );
    let losses =
        |cache: &Path| std::fs::read(find(&cache.join("eval"), "losses.jsonl").unwrap()).unwrap();
    assert!(losses(&single) == losses(&shared), "losses.jsonl differs");
}
