//! The quality benchmark's quick variant (what `make quality QUICK=1` runs)
//! on stories260K: one held-out FLAN-CoT task, a 120-example pool from the
//! real default mixture. Its counts are checked against the run folders it
//! wrote, and BM25 (model-free) must find the held-out task.

use dsel_pipeline::methods::{Method, Preset, SelectRequest};
use dsel_pipeline::quality::{self, QualityOptions};
use dsel_pipeline::Pipeline;
use dsel_testkit::data_root;

#[test]
fn quick_quality_run_counts_the_held_out_source_and_bm25_finds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut values = Preset::Cpu.values();
    values.u_size = 24;
    let base = SelectRequest {
        task: "mmlu".into(),
        method: Method::Random,
        model: dsel_testkit::stories_dir(),
        pool: "default".into(),
        subset: Default::default(),
        budget: dsel_select::Budget::Count(12),
        values,
        transform: Default::default(),
        rule: Default::default(),
        n_bins: 10,
        bin_by: Default::default(),
        sweep: Default::default(),
        valtune: Default::default(),
        seed: 0,
        out_dir: tmp.path().join("unused"),
        preset: Preset::Cpu,
        truncation: Default::default(),
        control: false,
    };
    let opts = QualityOptions {
        tasks: vec!["creak".into()],
        methods: ["random", "bm25", "tov", "tov+control"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect(),
        seeds: 1,
        n_target: 8,
        pool_limit: 120,
        n_test: 8,
    };
    let out = tmp.path().join("quality");
    let mut p = Pipeline::new(&tmp.path().join("cache"), &data_root()).unwrap();
    let runs = quality::run(&mut p, &base, &opts, &out).unwrap();
    assert_eq!(runs.len(), 4);
    for r in &runs {
        // Recount the held-out source in the selection the run wrote.
        let dir = out.join("runs").join(format!("creak-{}-seed1", r.method));
        let sel = std::fs::read_to_string(dir.join("selection.jsonl")).unwrap();
        let matching = sel
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["source"]
                    == "flan_v2_cot/creak"
            })
            .count();
        assert_eq!(r.selected_matching, matching, "{}", r.method);
        assert_eq!(r.selected, sel.lines().count());
        assert!(
            r.pool_matching > 0,
            "the pool holds the task's remaining rows"
        );
        assert_eq!(r.percentile.is_none(), r.method == "random");
    }
    let bm25 = &runs[1];
    assert!(bm25.lift() > 2.0, "bm25 finds the held-out task: {bm25:?}");
    assert!(bm25.percentile.unwrap() < 0.3, "{bm25:?}");
    for f in ["table.md", "table.csv", "runs.json", "report.html"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(
        md.contains("| creak | tov+control |") && md.contains("| all | bm25 |"),
        "{md}"
    );
    // ToV's diagnosis: the default variant is the stored score, recomputed
    // from the sweeps; the control run also has the control-corrected ones.
    let tov = &runs[2];
    assert_eq!(tov.variants[0].0, "mean");
    assert!(
        (tov.variants[0].1 - tov.percentile.unwrap()).abs() < 1e-9,
        "{tov:?}"
    );
    let ctl = &runs[3];
    let corrected = ctl
        .variants
        .iter()
        .find(|(n, _)| n == "mean − ctl")
        .unwrap();
    assert!(
        (corrected.1 - ctl.percentile.unwrap()).abs() < 1e-9,
        "the control run's score is mean − ctl: {ctl:?}"
    );
    // The run's own rule on its own score reproduces its selection's lift.
    for (run, score) in [(tov, "mean"), (ctl, "mean − ctl")] {
        let own = run
            .rule_lifts
            .iter()
            .find(|(n, _)| n == &format!("{score}: score+random, bins"))
            .unwrap();
        assert!((own.1 - run.lift()).abs() < 1e-9, "{run:?}");
        assert_eq!(run.rule_lifts.len(), if score == "mean" { 4 } else { 8 });
    }
    // Downstream: every selection was trained on and tested on rows of the
    // task that are in neither the target nor the pool.
    let data = out.join("data").join("creak");
    let rows = |f: &str| -> Vec<String> {
        std::fs::read_to_string(data.join(f))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let (target, test, rest) = (
        rows("creak_heldout.tsv"),
        rows("creak_test.tsv"),
        rows("creak_train.tsv"),
    );
    assert_eq!((target.len(), test.len()), (8, 8));
    assert!(test
        .iter()
        .all(|t| !target.contains(t) && !rest.contains(t)));
    let no_ft = runs[0].no_finetune_loss.unwrap();
    assert!(no_ft.is_finite() && no_ft > 0.0);
    for r in &runs {
        let loss = r.test_loss.unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{r:?}");
        assert_eq!(r.no_finetune_loss, Some(no_ft));
        assert!(loss != no_ft, "the fine-tune moved the model: {r:?}");
    }
    assert!(
        md.contains("| creak | bm25 |") && md.contains("gap to random"),
        "{md}"
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("test loss − random") && html.contains("<td>tov+control</td>"),
        "the report has the downstream chart and the cost table"
    );
    // Cost: the warm part is what depends on the target. For ToV, recount it
    // from the run's stage records by name: the target's ingest and
    // tokenize, the validation fine-tune and the sweep with it.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("runs/creak-tov-seed1/summary.json")).unwrap(),
    )
    .unwrap();
    let store = dsel_store::Store::open(tmp.path().join("cache")).unwrap();
    let (mut cold, mut warm) = (0.0, 0.0);
    for st in summary["stages"].as_array().unwrap() {
        let m = store
            .open_artifact(st["key"].as_str().unwrap())
            .unwrap()
            .manifest()
            .clone();
        let label = st["label"].as_str().unwrap();
        cold += m.build_seconds;
        if label.starts_with("target")
            || (label == "round 1" && st["stage"] == "valtune")
            || label.starts_with("val ")
        {
            warm += m.build_seconds;
        }
    }
    assert!((tov.cold_seconds - cold).abs() < 1e-9, "{tov:?}");
    assert!((tov.target_seconds - warm).abs() < 1e-9, "{tov:?}");
    assert!(tov.target_seconds > 0.0 && tov.target_seconds < tov.cold_seconds);
    assert!(tov.artifact_bytes > 0 && tov.peak_mib > 0.0);
    let diag = std::fs::read_to_string(out.join("diagnosis.md")).unwrap();
    assert!(diag.contains("mean − ctl: score only, no bins"), "{diag}");
}

/// A relative output folder (what `make quality` passes) still gives a
/// mixture whose derived files resolve: every entry path is absolute.
#[test]
fn a_relative_output_folder_gives_a_mixture_of_absolute_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = std::path::PathBuf::from(format!(
        "{up}{}",
        tmp.path().strip_prefix("/").unwrap().display()
    ));
    assert!(relative.is_relative());
    let files =
        quality::prepare_task(&data_root(), "creak", 8, 4, &relative.join("creak")).unwrap();
    let (target, mixture, source) = (files.target, files.mixture, files.source);
    assert!(target.is_absolute() && target.exists(), "{target:?}");
    assert_eq!(source, "flan_v2_cot/creak");
    let toml = std::fs::read_to_string(&mixture).unwrap();
    let paths: Vec<&str> = toml
        .lines()
        .filter_map(|l| l.strip_prefix("path = "))
        .collect();
    assert!(paths.len() > 3, "{toml}");
    for p in paths {
        let p = std::path::Path::new(p.trim_matches('"'));
        assert!(p.is_absolute() && p.exists(), "{}", p.display());
    }
}
