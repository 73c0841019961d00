//! Target validation and test sets against the LESS formats.

mod common;

use std::collections::BTreeMap;

use common::{data_root, fixtures};
use dsel_ingest::*;

fn per_subtask(ex: &[Example]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in ex {
        *m.entry(e.subtask.clone()).or_insert(0) += 1;
    }
    m
}

#[test]
fn target_spec_parsing() {
    assert_eq!(
        TargetSpec::parse("mmlu").unwrap(),
        TargetSpec::Named(TaskName::Mmlu)
    );
    assert_eq!(
        "BBH".parse::<TargetSpec>().unwrap(),
        TargetSpec::Named(TaskName::Bbh)
    );
    assert_eq!(
        TargetSpec::parse("tydiqa").unwrap(),
        TargetSpec::Named(TaskName::Tydiqa)
    );
    assert_eq!(
        TargetSpec::parse("x/my.jsonl").unwrap(),
        TargetSpec::File("x/my.jsonl".into())
    );
    let e = TargetSpec::parse("gsm8k").unwrap_err().to_string();
    assert!(
        e.contains("mmlu") && e.contains("bbh") && e.contains("tydiqa") && e.starts_with("gsm8k:"),
        "{e}"
    );
}

#[test]
fn mmlu_validation_matches_less() {
    let (ex, report) =
        load_target_validation(&TargetSpec::Named(TaskName::Mmlu), &data_root()).unwrap();
    assert_eq!(ex.len(), 285);
    assert_eq!(report.kept, 285);
    let subtasks = per_subtask(&ex);
    assert_eq!(subtasks.len(), 57);
    assert!(subtasks.values().all(|&n| n == 5));
    // First example: abstract_algebra_dev.csv row 1, LESS's exact prompt (note the two
    // spaces after "about" from LESS's format_subject).
    let e = &ex[0];
    assert_eq!(e.id, "tasks/mmlu/dev/abstract_algebra_dev.csv:1");
    assert_eq!(e.source, "mmlu");
    assert_eq!(e.subtask, "abstract_algebra");
    assert_eq!(e.messages.len(), 2);
    assert_eq!(e.messages[0].role, "user");
    assert_eq!(
        e.messages[0].content,
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n\
         Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"
    );
    assert_eq!(e.messages[1].role, "assistant");
    assert_eq!(e.messages[1].content, " B");
    // Another subject and row, to pin the subject formatting and the letter.
    let anatomy = ex
        .iter()
        .find(|e| e.id == "tasks/mmlu/dev/anatomy_dev.csv:3")
        .unwrap();
    assert_eq!(
        anatomy.messages[0].content,
        "The following are multiple choice questions (with answers) about  anatomy.\n\n\
         The pleura\nA. have no sensory innervation.\nB. are separated by a 2 mm space.\n\
         C. extend into the neck.\nD. are composed of respiratory epithelium.\nAnswer:"
    );
    assert_eq!(anatomy.messages[1].content, " C");
    assert_eq!(
        less_assistant_prefix(TaskName::Mmlu, ""),
        Some("The answer is:")
    );
}

const BOOL_DESC: &str = "Evaluate the result of a random Boolean expression.";
const BOOL_SHOT1: &str = "Q: not ( ( not not True ) ) is\nA: Let's think step by step.\nRemember that (i) expressions inside brackets are always evaluated first and that (ii) the order of operations from highest priority to lowest priority is \"not\", \"and\", \"or\", respectively.\nWe first simplify this expression \"Z\" as follows: \"Z = not ( ( not not True ) ) = not ( ( A ) )\" where \"A = not not True\".\nLet's evaluate A: A = not not True = not (not True) = not False = True.\nPlugging in A, we get: Z = not ( ( A ) ) = not ( ( True ) ) = not True = False. So the answer is False.";
const BOOL_SHOT2_Q: &str = "Q: True and False and not True and True is";
const BOOL_SHOT2_A: &str = " Let's think step by step.\nRemember that (i) expressions inside brackets are always evaluated first and that (ii) the order of operations from highest priority to lowest priority is \"not\", \"and\", \"or\", respectively.\nWe first simplify this expression \"Z\" as follows: \"Z = True and False and not True and True = A and B\" where \"A = True and False\" and \"B = not True and True\".\nLet's evaluate A: A = True and False = False.\nLet's evaluate B: B = not True and True = not (True and True) = not (True) = False.\nPlugging in A and B, we get: Z = A and B = False and False = False. So the answer is False.";
const BOOL_SHOT3: &str = "Q: not not ( not ( False ) ) is\nA: Let's think step by step.\nRemember that (i) expressions inside brackets are always evaluated first and that (ii) the order of operations from highest priority to lowest priority is \"not\", \"and\", \"or\", respectively.\nWe first simplify this expression \"Z\" as follows: \"Z = not not ( not ( False ) ) = not not ( A )\" where \"A = not ( False )\".\nLet's evaluate A: A = not ( False ) = not False = True.\nPlugging in A, we get: Z = not not ( A ) = not not (True) = not not False = True. So the answer is True.";

#[test]
fn bbh_validation_matches_less() {
    let (ex, _) = load_target_validation(&TargetSpec::Named(TaskName::Bbh), &data_root()).unwrap();
    assert_eq!(ex.len(), 81);
    let subtasks = per_subtask(&ex);
    assert_eq!(subtasks.len(), 27);
    assert!(subtasks.values().all(|&n| n == 3));
    // File order: date_understanding first.
    assert_eq!(ex[0].subtask, "date_understanding");
    assert_eq!(
        ex[0].id,
        "tasks/bbh/bbh-three-shot.json:date_understanding:1"
    );
    // boolean_expressions, second shot as target, shots 1 and 3 in context.
    let e = ex
        .iter()
        .find(|e| e.id == "tasks/bbh/bbh-three-shot.json:boolean_expressions:2")
        .unwrap();
    assert_eq!(e.source, "bbh");
    assert_eq!(e.subtask, "boolean_expressions");
    let expected_user = format!("{BOOL_DESC}\n\n{BOOL_SHOT1}\n\n{BOOL_SHOT3}\n\n{BOOL_SHOT2_Q}");
    assert_eq!(e.messages[0].content, expected_user);
    assert_eq!(e.messages[1].content, BOOL_SHOT2_A);
    // Every target's answer is the text after "\nA:" of a shot, and ends with the answer sentence.
    assert!(ex.iter().all(|e| e.messages[1]
        .content
        .starts_with(" Let's think step by step.")));
    assert_eq!(less_assistant_prefix(TaskName::Bbh, "x"), Some("A:"));
}

#[test]
fn tydiqa_validation_matches_less() {
    let root = data_root();
    let (ex, _) = load_target_validation(&TargetSpec::Named(TaskName::Tydiqa), &root).unwrap();
    assert_eq!(ex.len(), 9);
    let langs: Vec<&str> = ex.iter().map(|e| e.subtask.as_str()).collect();
    assert_eq!(
        langs,
        [
            "finnish",
            "telugu",
            "russian",
            "arabic",
            "indonesian",
            "english",
            "swahili",
            "korean",
            "bengali"
        ]
    );
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tasks/tydiqa/tydiqa-one-shot.json")).unwrap(),
    )
    .unwrap();
    let en = &raw["english"][0];
    let e = ex.iter().find(|e| e.subtask == "english").unwrap();
    assert_eq!(e.id, "tasks/tydiqa/tydiqa-one-shot.json:english:1");
    assert_eq!(
        e.messages[0].content,
        format!(
            "Answer the following question based on the information in the given passage.Passage: {}\nQuestion: Who owns HBO?",
            en["context"].as_str().unwrap()
        )
    );
    assert_eq!(e.messages[1].content, " Home Box Office");
    assert_eq!(
        less_assistant_prefix(TaskName::Tydiqa, "english"),
        Some("Answer:")
    );
    assert_eq!(
        less_assistant_prefix(TaskName::Tydiqa, "korean"),
        Some("답변:")
    );
}

#[test]
fn mmlu_test_set() {
    let (ex, report) =
        load_target_test(&TargetSpec::Named(TaskName::Mmlu), &data_root(), None, 0).unwrap();
    assert_eq!(ex.len(), 14_042);
    assert_eq!(report.read, 14_042);
    let e = ex
        .iter()
        .find(|e| e.id == "tasks/mmlu/test/anatomy_test.csv:2")
        .unwrap();
    assert_eq!(e.messages.len(), 1);
    assert_eq!(e.references, vec!["B".to_string()]);
    let u = &e.messages[0].content;
    assert!(u.starts_with(
        "The following are multiple choice questions (with answers) about  anatomy.\n\n\
         What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
    ));
    assert_eq!(u.matches("\nAnswer: ").count(), 5, "five answered shots");
    assert!(u.ends_with(
        "\n\nA \"dished face\" profile is often associated with\n\
         A. a protruding mandible due to reactivation of the condylar cartilage by acromegaly.\n\
         B. a recessive maxilla due to failure of elongation of the cranial base.\n\
         C. an enlarged frontal bone due to hydrocephaly.\n\
         D. defective development of the maxillary air sinus.\nAnswer:"
    ));
    // Capped: at most 3 per subject, seeded.
    let (capped, rep) =
        load_target_test(&TargetSpec::Named(TaskName::Mmlu), &data_root(), Some(3), 7).unwrap();
    assert_eq!(capped.len(), 57 * 3);
    assert_eq!(rep.dropped_by_subsetting, 14_042 - 171);
}

#[test]
fn bbh_test_set() {
    let root = data_root();
    let (ex, _) = load_target_test(&TargetSpec::Named(TaskName::Bbh), &root, None, 0).unwrap();
    assert_eq!(ex.len(), 6_511);
    assert_eq!(per_subtask(&ex).len(), 27);
    let e = ex
        .iter()
        .find(|e| e.id == "tasks/bbh/test/boolean_expressions.json:1")
        .unwrap();
    assert_eq!(e.references, vec!["False".to_string()]);
    let u = &e.messages[0].content;
    let expected = format!(
        "{BOOL_DESC}\n\n{BOOL_SHOT1}\n\n{BOOL_SHOT2_Q}\nA:{BOOL_SHOT2_A}\n\n{BOOL_SHOT3}\n\nQ: not ( True ) and ( True ) is\nA: Let's think step by step."
    );
    assert_eq!(u, &expected);
    let (capped, _) =
        load_target_test(&TargetSpec::Named(TaskName::Bbh), &root, Some(40), 42).unwrap();
    // Every BBH task has more than 40 examples.
    assert_eq!(capped.len(), 27 * 40);
}

#[test]
fn tydiqa_test_set() {
    let root = data_root();
    let (ex, report) =
        load_target_test(&TargetSpec::Named(TaskName::Tydiqa), &root, None, 0).unwrap();
    // en 3,696 + ko 1,625 + sw 2,755, minus the three one-shot demonstrations.
    assert_eq!(report.read, 3_696 + 1_625 + 2_755);
    assert_eq!(
        report.skipped_by_reason.get("demonstration_example"),
        Some(&3)
    );
    assert_eq!(ex.len(), 3_696 + 1_625 + 2_755 - 3);
    let counts = per_subtask(&ex);
    assert_eq!(counts.get("english"), Some(&3_695));
    assert_eq!(counts.get("korean"), Some(&1_624));
    assert_eq!(counts.get("swahili"), Some(&2_754));
    let e = ex.iter().find(|e| e.subtask == "english").unwrap();
    let u = &e.messages[0].content;
    assert!(u.starts_with(
        "Answer the following question based on the information in the given passage.\n\nPassage: "
    ));
    assert!(u.contains("\nQuestion: Who owns HBO?\nAnswer: Home Box Office\n\nPassage: "));
    assert!(
        u.ends_with("\nQuestion: When was quantum field theory developed?\n"),
        "{u}"
    );
    assert_eq!(e.references, vec!["1920s".to_string()]);
    let (capped, _) =
        load_target_test(&TargetSpec::Named(TaskName::Tydiqa), &root, Some(200), 1).unwrap();
    assert_eq!(capped.len(), 600);
}

#[test]
fn custom_target_file() {
    let spec = TargetSpec::File(fixtures().join("custom_target.jsonl"));
    let (val, rep) = load_target_validation(&spec, &data_root()).unwrap();
    assert_eq!(val.len(), 3);
    assert_eq!(rep.skipped_by_reason.get("no_assistant_turn"), Some(&1));
    assert_eq!(per_subtask(&val).get("math"), Some(&2));
    let (test, _) = load_target_test(&spec, &data_root(), None, 0).unwrap();
    assert_eq!(test.len(), 3);
    assert!(test
        .iter()
        .all(|e| e.messages.last().unwrap().role == "user"));
    assert_eq!(test[0].references, vec!["Paris".to_string()]);
    assert_eq!(test[2].references, vec!["6".to_string(), "six".to_string()]);
}

#[test]
fn missing_data_root_names_path_and_env_var() {
    let e = load_target_validation(
        &TargetSpec::Named(TaskName::Mmlu),
        std::path::Path::new("/no/such/root"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/no/such/root") && e.contains("DSEL_DATA_ROOT"),
        "{e}"
    );
}

/// Files copied from the shared data into a scratch data root (never
/// committed): two MMLU subjects (dev) and one's test set, BBH's three-shot
/// file, one BBH test task with its CoT prompt, TyDiQA's one-shot file and
/// one gold file.
const SLICE: [&str; 8] = [
    "tasks/mmlu/dev/anatomy_dev.csv",
    "tasks/mmlu/dev/astronomy_dev.csv",
    "tasks/mmlu/test/anatomy_test.csv",
    "tasks/bbh/bbh-three-shot.json",
    "tasks/bbh/test/boolean_expressions.json",
    "tasks/bbh/cot-prompts/boolean_expressions.txt",
    "tasks/tydiqa/tydiqa-one-shot.json",
    "tasks/tydiqa/gold/tydiqa.goldp.sw.train.json",
];

fn copy_slice(to: &std::path::Path) {
    for rel in SLICE {
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        // A fresh (writable) file: the shared data is read-only.
        std::fs::write(&dst, std::fs::read(data_root().join(rel)).unwrap()).unwrap();
    }
}

#[test]
fn named_target_fingerprints_cover_every_file_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    copy_slice(&root);
    let (val, test) = (TargetSplit::Validation, TargetSplit::Test);
    let cases: [(TaskName, TargetSplit, Vec<&str>); 6] = [
        (TaskName::Mmlu, val, vec![SLICE[0], SLICE[1]]),
        (TaskName::Mmlu, test, vec![SLICE[0], SLICE[2]]),
        (TaskName::Bbh, val, vec![SLICE[3]]),
        (TaskName::Bbh, test, vec![SLICE[5], SLICE[4]]),
        (TaskName::Tydiqa, val, vec![SLICE[6]]),
        (TaskName::Tydiqa, test, vec![SLICE[7], SLICE[6]]),
    ];
    for (task, split, names) in cases {
        let spec = TargetSpec::Named(task);
        let files = target_files(&spec, &root, split).unwrap();
        let got: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got, names, "{task} {split:?}");
        // Every file the loader reports reading is covered.
        let report = match split {
            TargetSplit::Validation => load_target_validation(&spec, &root).unwrap().1,
            TargetSplit::Test => load_target_test(&spec, &root, None, 0).unwrap().1,
        };
        for f in &report.files {
            assert!(
                got.contains(&f.path.as_str()),
                "{task} {split:?}: {}",
                f.path
            );
        }
        let fp = target_fingerprint(&spec, &root, split).unwrap();
        assert_eq!(
            fp,
            dsel_testkit::expected_target_fingerprint(&root, &names),
            "{task} {split:?}"
        );
        // Changing any one byte of any of its files changes it.
        for name in &names {
            let path = root.join(name);
            let orig = std::fs::read(&path).unwrap();
            let mut edited = orig.clone();
            edited[orig.len() / 2] ^= 0x20;
            std::fs::write(&path, &edited).unwrap();
            let changed = target_fingerprint(&spec, &root, split).unwrap();
            assert_ne!(changed, fp, "{task} {split:?}: edit of {name} not seen");
            assert_eq!(
                changed,
                dsel_testkit::expected_target_fingerprint(&root, &names)
            );
            std::fs::write(&path, &orig).unwrap();
        }
        assert_eq!(target_fingerprint(&spec, &root, split).unwrap(), fp);
    }
}

#[test]
fn editing_a_row_or_moving_the_data_root_is_seen_by_the_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    copy_slice(&a);
    copy_slice(&b);
    let mmlu = TargetSpec::Named(TaskName::Mmlu);
    let fp =
        |root: &std::path::Path| target_fingerprint(&mmlu, root, TargetSplit::Validation).unwrap();
    // Another data root with the same content: the same fingerprint.
    assert_eq!(fp(&a), fp(&b));
    let before = fp(&b);
    // Edit one row of anatomy's dev file under `b`.
    let path = b.join("tasks/mmlu/dev/anatomy_dev.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("hyoid bone", "stapes bone", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, &edited).unwrap();
    assert_ne!(fp(&b), before);
    assert_ne!(fp(&b), fp(&a));
    assert_eq!(
        fp(&b),
        dsel_testkit::expected_target_fingerprint(&b, &[SLICE[0], SLICE[1]])
    );
    let (ex, _) = load_target_validation(&mmlu, &b).unwrap();
    assert!(ex
        .iter()
        .any(|e| e.messages[0].content.contains("stapes bone")));
    // The test split reads the dev file too (its shots).
    let t = |root: &std::path::Path| target_fingerprint(&mmlu, root, TargetSplit::Test).unwrap();
    assert_ne!(t(&a), t(&b));

    // A custom file: keyed on its name and bytes, wherever it lies and
    // however its path is spelled.
    let (fa, fb) = (a.join("mine.jsonl"), b.join("mine.jsonl"));
    let line = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
    std::fs::write(&fa, format!("{line}\n")).unwrap();
    std::fs::write(&fb, format!("{line}\n")).unwrap();
    let custom = |p: &std::path::Path| {
        target_fingerprint(
            &TargetSpec::File(p.to_path_buf()),
            &a,
            TargetSplit::Validation,
        )
        .unwrap()
    };
    assert_eq!(custom(&fa), custom(&fb));
    assert_eq!(
        custom(&fa),
        dsel_testkit::expected_target_fingerprint(&a, &["mine.jsonl"])
    );
    std::fs::write(&fb, format!("{line}\n{line}\n")).unwrap();
    assert_ne!(custom(&fa), custom(&fb));
}
