//! End-to-end ToV on the real tiny model stories260K and a hand-written toy
//! pool: the sign of the score, Method A vs B, cache reuse across targets,
//! determinism.

use std::path::{Path, PathBuf};

use arrow::array::Array;
use dsel_ingest::SubsetOptions;
use dsel_pipeline::methods::{self, Method, Preset, SelectRequest, SelectionRule};
use dsel_pipeline::Pipeline;
use dsel_select::{Budget, RunSummary, Transform};
use dsel_sweep::SweepConfig;
use dsel_valtune::ValtuneConfig;

use dsel_testkit::{data_root, selected_ids};

fn fixture(name: &str) -> PathBuf {
    dsel_testkit::fixtures("pipeline").join(name)
}

/// A mixture file holding just the toy pool.
fn toy_mixture(dir: &Path) -> String {
    let path = dir.join("toy.toml");
    let text = format!(
        "description = \"toy\"\n[[entry]]\npath = \"{}\"\nformat = \"messages\"\nsource = \"toy\"\n",
        fixture("toy_pool.jsonl").display()
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn request(dir: &Path, task: &Path, method: Method, rounds: usize, out: &str) -> SelectRequest {
    let mut values = Preset::Cpu.values();
    values.max_len = 64;
    values.target_max_len = 64;
    values.u_size = 4;
    values.rounds = rounds;
    values.lr = 3e-3;
    values.micro_batch = 4;
    values.lora.rank = 4;
    values.lora.alpha = 8.0;
    SelectRequest {
        task: task.display().to_string(),
        method,
        model: data_root().join("models/stories260K/hf"),
        pool: toy_mixture(dir),
        subset: SubsetOptions {
            limit: None,
            per_source_cap: None,
            seed: 0,
            stratify: false,
        },
        budget: Budget::Count(3),
        values,
        transform: Transform::Identity,
        rule: SelectionRule::ScoreOnly,
        n_bins: 1,
        bin_by: Default::default(),
        sweep: SweepConfig {
            shard_examples: 16,
            batch_tokens: 1024,
            max_batch: 16,
        },
        valtune: ValtuneConfig {
            lr_ratio: 1.0,
            epochs: 3,
        },
        seed: 1,
        out_dir: dir.join(out),
        preset: Preset::Cpu,
        truncation: Default::default(),
        control: false,
    }
}

fn run(cache: &Path, req: &SelectRequest) -> RunSummary {
    let mut p = Pipeline::new(cache, &data_root()).unwrap();
    methods::select(&mut p, req).unwrap()
}

#[test]
fn tov_ranks_near_copies_of_the_target_first_and_reuses_the_base_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let target = fixture("toy_target.jsonl");

    // Method A on the robot target: fine-tuning on the target must lower the
    // loss of its near-copies in the pool most, so they rank first.
    let req_a = request(tmp.path(), &target, Method::Tov, 2, "robot-a");
    let s_a = run(&cache, &req_a);
    assert_eq!(s_a.selected, 3);
    let ids = selected_ids(&req_a.out_dir);
    assert!(
        ids[0].contains("near-"),
        "top pick should be a near-copy of the target, got {ids:?}"
    );
    assert!(
        ids.iter().filter(|i| i.contains("near-")).count() >= 2,
        "{ids:?}"
    );

    // A second target with Method A reuses the target-independent base
    // checkpoints and their sweeps: only valtune and its sweeps run.
    let req_a2 = request(
        tmp.path(),
        &fixture("toy_target2.jsonl"),
        Method::Tov,
        2,
        "ball-a",
    );
    let s_a2 = run(&cache, &req_a2);
    for r in &s_a2.stages {
        let target_independent =
            r.stage == "base-train" || (r.stage == "sweep" && r.label.starts_with("base"));
        if target_independent {
            assert!(
                r.cache_hit,
                "{} [{}] should be reused: {:?}",
                r.stage, r.label, s_a2.stages
            );
        }
        if r.stage == "valtune" {
            assert!(!r.cache_hit);
        }
    }
    assert_eq!(
        s_a2.stages
            .iter()
            .filter(|r| r.stage == "base-train")
            .count(),
        2
    );

    // Method B on the same target: round 1 is the same computation as A (same
    // keys, cache hits); round 2 continues from θ_val and so differs.
    let req_b = request(tmp.path(), &target, Method::TovB, 2, "robot-b");
    let s_b = run(&cache, &req_b);
    let base_b: Vec<_> = s_b
        .stages
        .iter()
        .filter(|r| r.stage == "base-train")
        .collect();
    let base_a: Vec<_> = s_a
        .stages
        .iter()
        .filter(|r| r.stage == "base-train")
        .collect();
    assert_eq!(
        base_b[0].key, base_a[0].key,
        "round 1 base checkpoint is shared"
    );
    assert!(base_b[0].cache_hit);
    assert_ne!(
        base_b[1].key, base_a[1].key,
        "round 2 of Method B starts from θ_val, not θ_bas"
    );
    let scores = |dir: &Path| -> Vec<Vec<f64>> {
        let batches = dsel_store::read_parquet(dir.join("scores.parquet")).unwrap();
        let col = batches[0].column_by_name("round_scores").unwrap();
        let list = col
            .as_any()
            .downcast_ref::<arrow::array::ListArray>()
            .unwrap();
        (0..list.len())
            .map(|i| {
                let v = list.value(i);
                let f = v
                    .as_any()
                    .downcast_ref::<arrow::array::Float64Array>()
                    .unwrap();
                f.values().to_vec()
            })
            .collect()
    };
    let (ra, rb) = (scores(&req_b.out_dir), scores(&req_a.out_dir));
    let same = |x: f64, y: f64| (x.is_nan() && y.is_nan()) || x == y;
    assert!(
        ra.iter().zip(&rb).all(|(a, b)| same(a[0], b[0])),
        "round 1 must be identical in A and B"
    );
    assert!(
        ra.iter().zip(&rb).any(|(a, b)| !same(a[1], b[1])),
        "round 2 must differ between A and B"
    );
    assert!(selected_ids(&req_b.out_dir)[0].contains("near-"));
}

#[test]
fn same_seed_same_selection_from_a_fresh_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fixture("toy_target.jsonl");
    let req1 = request(tmp.path(), &target, Method::Tov, 1, "run1");
    let req2 = request(tmp.path(), &target, Method::Tov, 1, "run2");
    let s1 = run(&tmp.path().join("cache1"), &req1);
    let s2 = run(&tmp.path().join("cache2"), &req2);
    assert!(
        s2.stages.iter().all(|r| !r.cache_hit),
        "second run must recompute"
    );
    let read = |d: &Path| std::fs::read(d.join("selection.jsonl")).unwrap();
    assert_eq!(read(&req1.out_dir), read(&req2.out_dir));
    // Every stage key is identical too.
    let keys = |s: &RunSummary| s.stages.iter().map(|r| r.key.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&s1), keys(&s2));
    // Random and max-uncertainty run from the same sweep machinery.
    let mut r = request(tmp.path(), &target, Method::MaxUncertainty, 1, "mu");
    r.budget = Budget::Fraction(0.25);
    let s = run(&tmp.path().join("cache1"), &r);
    assert_eq!(s.selected, 9);
}

#[test]
fn every_baseline_selects_the_budget_and_lexical_ones_find_the_near_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let target = fixture("toy_target.jsonl");
    for m in [
        Method::Random,
        Method::MaxLoss,
        Method::GradNorm,
        Method::Bm25,
        Method::Dsir,
        Method::Rds,
    ] {
        let req = request(tmp.path(), &target, m, 1, m.name());
        let s = run(&cache, &req);
        assert_eq!(s.selected, 3, "{}", m.name());
        let ids = selected_ids(&req.out_dir);
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 3, "{}: duplicates in {ids:?}", m.name());
        if m == Method::Bm25 {
            assert!(
                ids.iter().all(|i| i.contains("near-")),
                "bm25 should pick the near-copies: {ids:?}"
            );
        }
    }
}

#[test]
fn compare_trains_evaluates_and_reports_every_row_over_seeds() {
    use dsel_pipeline::compare::{self, CompareOptions, RowKind};
    use dsel_pipeline::evaluate::{EvalConfig, TrainOnSelection};
    use dsel_pipeline::online::SelectorKind;

    let tmp = tempfile::tempdir().unwrap();
    let target = fixture("toy_target.jsonl");
    let mut base = request(tmp.path(), &target, Method::Random, 1, "toy-random");
    base.budget = Budget::Count(6);
    let mut train = TrainOnSelection::cpu();
    train.max_len = 64;
    train.train.micro_batch = 2;
    train.train.lr = 3e-3;
    let eval = EvalConfig::cpu();
    let opts = CompareOptions {
        methods: vec![Method::Random, Method::Bm25],
        selectors: vec![SelectorKind::None, SelectorKind::MaxLoss],
        online_steps: 3,
        seeds: 2,
        full_pool: true,
    };
    let out = tmp.path().join("toy-compare");
    let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
    let rep = compare::compare(&mut p, &base, &opts, &train, &eval, &out).unwrap();

    let names: Vec<&str> = rep.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        names,
        [
            "no-finetune",
            "random",
            "bm25",
            "online:none",
            "online:max-loss",
            "full-pool"
        ]
    );
    let reference = rep.rows[0].runs[0].eval.test_loss;
    for r in &rep.rows[1..] {
        assert_eq!(r.runs.len(), 2, "{}: one run per seed", r.method);
        assert_eq!(r.runs[0].seed, 1);
        assert_eq!(r.runs[1].seed, 2);
        for run in &r.runs {
            assert!(run.eval.test_loss.is_finite());
            assert_ne!(
                run.eval.test_loss, reference,
                "{}: training must move the target loss",
                r.method
            );
            assert!(!run.step_losses.is_empty(), "{}: loss curve", r.method);
        }
        assert!(!r.selected_lengths.is_empty());
    }
    // Random selections differ across seeds, so do their fine-tunes.
    let random = &rep.rows[1];
    assert_ne!(random.runs[0].eval.test_loss, random.runs[1].eval.test_loss);
    assert_eq!(random.selected_lengths.len(), 6);
    assert!(random.extremes.is_empty(), "random has no scores");
    // BM25 scores every candidate: extremes per family, best first.
    let (_, top, bottom) = &rep.rows[2].extremes[0];
    assert!(top[0].score >= bottom.last().unwrap().score);
    assert!(rep.rows[2].selection_cpu() > 0.0, "recorded build CPU time");
    assert_eq!(rep.rows[3].kind, RowKind::Online);
    assert_eq!(rep.rows[3].runs[0].step_losses.len(), 3);
    assert_eq!(rep.rows[5].selected_lengths.len(), rep.pool_size);
    for f in ["table.md", "table.csv", "compare.json", "report.html"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // Every row's selections live inside the comparison's own folder.
    for run in ["random", "random-seed2", "bm25", "bm25-seed2"] {
        let sel = out.join("selections").join(run).join("selection.jsonl");
        assert!(sel.exists(), "{}", sel.display());
    }
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains(" ± "), "mean ± std with two seeds:\n{md}");
    assert!(
        !tmp.path().join("toy-random-seed2").exists(),
        "nothing is written beside the comparison's folder"
    );
}

#[test]
fn keep_completion_truncation_keeps_long_prompt_examples_and_has_its_own_key() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
    p.load_model(&data_root().join("models/stories260K/hf"))
        .unwrap();
    let pool = p
        .ingest_pool(
            &toy_mixture(tmp.path()),
            &SubsetOptions {
                limit: None,
                per_source_cap: None,
                seed: 0,
                stratify: false,
            },
        )
        .unwrap();
    // Keep-completion is the default; right truncation keeps the key it
    // always had (no `truncation` field).
    assert_eq!(
        dsel_tokenize::Truncation::default(),
        dsel_tokenize::Truncation::KeepCompletion
    );
    let right = dsel_tokenize::Truncation::Right;
    let full_art = p.tokenize(&pool, 4096, right, "pool").unwrap();
    assert!(
        full_art.manifest().config.get("truncation").is_none(),
        "right truncation keeps the key it always had"
    );
    let full = dsel_tokenize::TokenizedSet::open(full_art.dir()).unwrap();
    // A window as long as the (toy pool's equal) prompts: cut from the right,
    // no example keeps a label.
    let max_len = (0..full.len())
        .map(|i| full.example(i).1.iter().position(|&l| l == 1).unwrap())
        .max()
        .unwrap();
    let err = p.tokenize(&pool, max_len, right, "pool").unwrap_err();
    assert!(
        format!("{err:#}").contains("no_labels_after_truncation"),
        "{err:#}"
    );
    let keep_completion = dsel_tokenize::Truncation::KeepCompletion;
    let keep = p.tokenize(&pool, max_len, keep_completion, "pool").unwrap();
    assert_eq!(keep.manifest().config["truncation"], "keep-completion");
    let k = dsel_tokenize::TokenizedSet::open(keep.dir()).unwrap();
    assert_eq!(k.len(), full.len(), "every toy example keeps a completion");
    for i in 0..k.len() {
        let (ids, labels) = k.example(i);
        let n_full = full.example(i).1.iter().filter(|&&l| l == 1).count();
        let n = labels.iter().filter(|&&l| l == 1).count();
        assert!(ids.len() <= max_len);
        assert!(n >= n_full.min(max_len / 2) && n > 0, "{n} of {n_full}");
    }
}

#[test]
fn a_target_without_a_usable_example_fails_every_method_naming_the_file_and_the_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let empty = tmp.path().join("empty_answers.jsonl");
    std::fs::write(
        &empty,
        (0..5)
            .map(|i| {
                format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Question {i}?\"}}, {{\"role\": \"assistant\", \"content\": \"\"}}]}}\n")
            })
            .collect::<String>(),
    )
    .unwrap();
    for &m in Method::ALL {
        let req = request(tmp.path(), &empty, m, 1, m.name());
        let mut p = Pipeline::new(&cache, &data_root()).unwrap();
        let err = methods::select(&mut p, &req).expect_err(m.name());
        let msg = format!("{err:#}");
        assert!(msg.contains("empty_answers.jsonl"), "{}: {msg}", m.name());
        assert!(msg.contains("5 empty_completion"), "{}: {msg}", m.name());
        assert!(!req.out_dir.join("selection.jsonl").exists());
    }
}

#[test]
fn options_that_zero_every_score_are_rejected_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fixture("toy_target.jsonl");
    type Edit = fn(&mut SelectRequest);
    let cases: [(Edit, &str); 4] = [
        (|r| r.valtune.epochs = 0, "--val-epochs"),
        (|r| r.valtune.lr_ratio = 0.0, "--val-lr-ratio"),
        (|r| r.values.lr = 0.0, "--lr"),
        (|r| r.n_bins = 0, "--bins"),
    ];
    for (edit, option) in cases {
        let mut req = request(tmp.path(), &target, Method::Tov, 1, "bad");
        edit(&mut req);
        let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
        let err = format!("{:#}", methods::select(&mut p, &req).unwrap_err());
        assert!(err.contains(option), "{option}: {err}");
    }
}

#[test]
fn a_budget_the_pool_cannot_meet_is_recorded_as_requested_vs_selected() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let target = fixture("toy_target.jsonl");
    // 36 pool examples; ToV with |U| = 4 scores 32 and draws half from U.
    for (m, want) in [
        (Method::Random, 36),
        (Method::Bm25, 36),
        (Method::Tov, 32 + 4),
    ] {
        let mut req = request(tmp.path(), &target, m, 1, m.name());
        req.budget = Budget::Count(50);
        req.rule = SelectionRule::ScoreRandom;
        let s = run(&cache, &req);
        assert_eq!(s.requested, 50, "{}", m.name());
        assert_eq!(s.selected, want, "{}", m.name());
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(req.out_dir.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(json["requested"], 50);
        assert_eq!(json["selected"], want);
        assert_eq!(json["budget"], "50");
    }
}
