//! Mixtures, seeded subsetting, fingerprints and Parquet round-trips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{data_root, fixtures};
use dsel_ingest::*;

fn sources(ex: &[Example]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in ex {
        *m.entry(e.source.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn sample_indices_properties() {
    let a = sample_indices(1000, 100, 5, "x");
    assert_eq!(a.len(), 100);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    assert!(a.iter().all(|&i| i < 1000));
    assert_eq!(
        a,
        sample_indices(1000, 100, 5, "x"),
        "same seed, same sample"
    );
    assert_ne!(
        a,
        sample_indices(1000, 100, 6, "x"),
        "different seed, different sample"
    );
    assert_ne!(
        a,
        sample_indices(1000, 100, 5, "y"),
        "different label, different sample"
    );
    assert_eq!(sample_indices(5, 9, 1, "x"), vec![0, 1, 2, 3, 4]);
    assert!(sample_indices(5, 0, 1, "x").is_empty());
}

#[test]
fn sample_indices_is_uniform() {
    // 3 of 10, over 3000 seeds: each index is expected 900 times (sd ~25).
    let mut counts = [0u32; 10];
    for seed in 0..3000 {
        for i in sample_indices(10, 3, seed, "uniformity") {
            counts[i] += 1;
        }
    }
    for (i, &c) in counts.iter().enumerate() {
        assert!((800..=1000).contains(&c), "index {i} drawn {c} times");
    }
}

#[test]
fn tiny_mixture_is_deterministic_and_seeded() {
    let root = data_root();
    let opts = SubsetOptions {
        limit: None,
        per_source_cap: None,
        seed: 1,
        stratify: false,
    };
    let (a, report) = load_pool("tiny", &root, &opts).unwrap();
    let by_source = sources(&a);
    // 7 FLAN tasks x 50, 276 T0 templates x 1 (18 of the 294 TREC templates have only
    // empty completions), 4 AlpacaEval files x 75.
    assert_eq!(a.len(), 350 + 276 + 300);
    assert_eq!(report.kept, 926);
    assert_eq!(by_source.len(), 7 + 276 + 4);
    assert!(!by_source.contains_key("t0/trec_trec1"));
    assert_eq!(by_source["flan_v2_cot/gsm8k"], 50);
    assert_eq!(by_source["t0/ag_news_classify"], 1);
    assert_eq!(by_source["alpaca_eval/gpt4"], 75);
    assert_eq!(
        report.dropped_by_subsetting,
        report.read - report.skipped() - 926
    );

    let (b, _) = load_pool("tiny", &root, &opts).unwrap();
    assert_eq!(a, b, "same seed, same examples in the same order");
    let (c, _) = load_pool(
        "tiny",
        &root,
        &SubsetOptions {
            seed: 2,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(c.len(), a.len());
    assert_ne!(
        a.iter().map(|e| &e.id).collect::<Vec<_>>(),
        c.iter().map(|e| &e.id).collect::<Vec<_>>(),
        "different seed, different subset"
    );

    // Kept examples stay in original order: entry order, sorted files, file order.
    let pos = |e: &Example| {
        let (file, n) = e.id.rsplit_once(':').unwrap();
        (file.to_string(), n.parse::<u64>().unwrap())
    };
    let flan: Vec<_> = a
        .iter()
        .filter(|e| e.source.starts_with("flan"))
        .map(pos)
        .collect();
    assert!(flan.windows(2).all(|w| w[0] < w[1]));
    assert!(
        a[0].source.starts_with("flan_v2_cot/")
            && a.last().unwrap().source.starts_with("alpaca_eval/")
    );
}

#[test]
fn global_limit_and_per_source_cap() {
    let root = data_root();
    let (full, _) = load_pool("flan-cot", &root, &SubsetOptions::default()).unwrap();
    assert_eq!(full.len(), 33_443);
    let opts = SubsetOptions {
        limit: Some(1000),
        per_source_cap: Some(200),
        seed: 9,
        stratify: false,
    };
    let (sub, report) = load_pool("flan-cot", &root, &opts).unwrap();
    assert_eq!(sub.len(), 1000);
    assert_eq!(report.dropped_by_subsetting, 33_443 - 1000);
    assert!(sources(&sub).values().all(|&n| n <= 200));
    // The subset is a subsequence of the full pool (original order kept).
    let ids: Vec<&str> = full.iter().map(|e| e.id.as_str()).collect();
    let mut it = ids.iter();
    for e in &sub {
        assert!(it.any(|id| *id == e.id), "{} out of order", e.id);
    }
}

#[test]
fn default_mixture_counts() {
    let (ex, report) = load_pool("default", &data_root(), &SubsetOptions::default()).unwrap();
    assert_eq!(report.read, 33_443 + 55_185 + 4 * 805);
    assert_eq!(ex.len(), 33_443 + (55_185 - 1_400) + (4 * 805 - 2));
    let ids: BTreeSet<&str> = ex.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), ex.len(), "ids unique");
}

#[test]
fn fingerprint_tracks_toml_and_content() {
    let root = data_root();
    let a = mixture_fingerprint("flan-cot", &root).unwrap();
    assert_eq!(a.len(), 64);
    assert_eq!(a, mixture_fingerprint("flan-cot", &root).unwrap());
    assert_ne!(a, mixture_fingerprint("t0", &root).unwrap());

    // A private data root with one small file: editing the file changes the fingerprint.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pools")).unwrap();
    std::fs::copy(
        fixtures().join("flan_small_train.tsv"),
        dir.path().join("pools/flan_small_train.tsv"),
    )
    .unwrap();
    let toml_path = dir.path().join("mix.toml");
    std::fs::write(
        &toml_path,
        "[[entry]]\npath = \"pools/flan_small_train.tsv\"\n",
    )
    .unwrap();
    let mix = toml_path.to_str().unwrap();
    let f1 = mixture_fingerprint(mix, dir.path()).unwrap();
    let (ex, _) = load_pool(mix, dir.path(), &SubsetOptions::default()).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].id, "pools/flan_small_train.tsv:1");
    std::fs::write(dir.path().join("pools/flan_small_train.tsv"), "q\ta\tr\n").unwrap();
    let f2 = mixture_fingerprint(mix, dir.path()).unwrap();
    assert_ne!(f1, f2);
    std::fs::write(
        &toml_path,
        "# comment\n[[entry]]\npath = \"pools/flan_small_train.tsv\"\n",
    )
    .unwrap();
    assert_ne!(f2, mixture_fingerprint(mix, dir.path()).unwrap());
}

#[test]
fn mixture_errors() {
    let root = data_root();
    let e = load_pool("no-such-mixture", &root, &SubsetOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown mixture") && e.contains("default") && e.contains("tiny"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[entry]]\npath = \"pools/flan_v2_cot\"\nformat = \"flan-cot\"\ncapp = 3\n",
    )
    .unwrap();
    let e = resolve_mixture(bad.to_str().unwrap()).unwrap_err();
    assert_eq!(e.line(), Some(4), "{e}");
    std::fs::write(
        &bad,
        "[[entry]]\npath = \"pools/flan_v2_cot\"\nformat = \"tsv\"\n",
    )
    .unwrap();
    let e = resolve_mixture(bad.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("entry[0].format") && e.contains("flan-cot"),
        "{e}"
    );
    std::fs::write(&bad, "[[entry]]\npath = \"pools/nothing_here\"\n").unwrap();
    let e = load_pool(bad.to_str().unwrap(), &root, &SubsetOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("pools/nothing_here"), "{e}");
    let e = load_pool(
        "tiny",
        std::path::Path::new("/no/such/root"),
        &SubsetOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/no/such/root") && e.contains("DSEL_DATA_ROOT"),
        "{e}"
    );
}

#[test]
fn parquet_round_trip() {
    let examples = vec![
        Example {
            id: "a.jsonl:1".into(),
            source: "src/a".into(),
            subtask: String::new(),
            messages: vec![
                Message {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                Message {
                    role: "user".into(),
                    content: "Héllo ✓\nline two".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: " A".into(),
                },
            ],
            references: vec![],
        },
        Example {
            id: "b.json:2".into(),
            source: "tydiqa".into(),
            subtask: "korean".into(),
            messages: vec![Message {
                role: "user".into(),
                content: "질문".into(),
            }],
            references: vec!["1945년".into(), "1945".into()],
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("examples.parquet");
    write_examples_parquet(&path, &examples).unwrap();
    assert_eq!(read_examples_parquet(&path).unwrap(), examples);
    // No temp file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // Through the format dispatcher too (Parquet detected by extension).
    let mut report = IngestReport::default();
    let back = read_file(
        &path,
        None,
        &ReadOptions::with_root(dir.path()),
        &mut report,
    )
    .unwrap();
    assert_eq!(back, examples);
    // Real data survives the trip.
    let (val, _) =
        load_target_validation(&TargetSpec::Named(TaskName::Tydiqa), &data_root()).unwrap();
    write_examples_parquet(&path, &val).unwrap();
    assert_eq!(read_examples_parquet(&path).unwrap(), val);
}

#[test]
fn user_parquet_without_references() {
    use arrow::array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
    use arrow::buffer::OffsetBuffer;
    use arrow::datatypes::{DataType, Field, Fields, Schema};

    let fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ]);
    let structs = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(StringArray::from(vec![
                "user",
                "assistant",
                "user",
                "assistant",
            ])) as ArrayRef,
            Arc::new(StringArray::from(vec!["q1", "a1", "q2", ""])),
        ],
        None,
    );
    let item = Arc::new(Field::new("element", DataType::Struct(fields), true));
    let messages = ListArray::new(
        item.clone(),
        OffsetBuffer::from_lengths([2, 2]),
        Arc::new(structs),
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("subtask", DataType::Utf8, true),
        Field::new("messages", DataType::List(item), true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["r1", "r2"])),
            Arc::new(StringArray::from(vec!["s", "s"])),
            Arc::new(messages),
        ],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mine.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let spec = TargetSpec::File(path.clone());
    let (val, report) = load_target_validation(&spec, dir.path()).unwrap();
    assert_eq!(report.read, 2);
    assert_eq!(report.skipped_by_reason.get("empty_completion"), Some(&1));
    assert_eq!(val.len(), 1);
    assert_eq!(val[0].id, "r1");
    assert_eq!(val[0].source, "mine");
    assert_eq!(val[0].subtask, "s");
    assert!(val[0].references.is_empty());

    // A file missing the messages column is an error naming the column.
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec!["x"]))]).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = read_examples_parquet(&path).unwrap_err().to_string();
    assert!(e.contains("field \"messages\": missing column"), "{e}");
}

#[test]
fn data_root_default_exists() {
    assert!(
        default_data_root().join("pools").is_dir(),
        "{}",
        default_data_root().display()
    );
}

/// A stratified limit gives every source its share of the pool, rounded by
/// largest remainder: each count is the floor or the ceiling of
/// `k · n_source / n`, the total is `k`, the order is the pool's, and the
/// draw depends on the seed.
#[test]
fn stratified_limit_keeps_every_source_in_proportion() {
    let root = data_root();
    let (full, _) = load_pool("default", &root, &SubsetOptions::default()).unwrap();
    let all = sources(&full);
    let (n, k) = (full.len(), 2000usize);
    let opts = SubsetOptions {
        limit: Some(k),
        per_source_cap: None,
        seed: 3,
        stratify: true,
    };
    let (sub, _) = load_pool("default", &root, &opts).unwrap();
    assert_eq!(sub.len(), k);
    let got = sources(&sub);
    let mut ceilings = 0;
    for (source, &n_g) in &all {
        let exact = k as f64 * n_g as f64 / n as f64;
        let c = got.get(source).copied().unwrap_or(0);
        assert!(
            c == exact.floor() as usize || c == exact.ceil() as usize,
            "{source}: {c} of {k}, expected {exact:.3}"
        );
        ceilings += usize::from(c as f64 > exact.floor());
    }
    let floors: usize = all.values().map(|&n_g| k * n_g / n).sum();
    assert_eq!(ceilings, k - floors, "one extra slot per largest remainder");
    let ids: Vec<&str> = full.iter().map(|e| e.id.as_str()).collect();
    let mut it = ids.iter();
    for e in &sub {
        assert!(it.any(|id| *id == e.id), "{} out of order", e.id);
    }
    let again = load_pool("default", &root, &opts).unwrap().0;
    assert!(sub.iter().zip(&again).all(|(a, b)| a.id == b.id));
    let other = load_pool("default", &root, &SubsetOptions { seed: 4, ..opts })
        .unwrap()
        .0;
    assert!(sub.iter().zip(&other).any(|(a, b)| a.id != b.id));
}
