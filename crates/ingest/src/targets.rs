//! Target tasks: LESS's validation sets (MMLU, BBH, TyDiQA) and the test sets, plus
//! custom target files.
//!
//! The validation sets are built exactly as LESS's
//! `less/data_selection/get_validation_dataset.py` builds them with its default tulu
//! chat format, split into a user turn and an assistant turn:
//!
//! * LESS's query is `"<|user|>\n" + U + "\n<|assistant|>\n" + P` and its scored
//!   completion is `C`. Here the user turn is `U` and the assistant turn is `C`
//!   (with its leading space, e.g. `" B"`). The chat wrapping is applied later by the
//!   tokenizer stage; the assistant-side prefix `P` that LESS keeps in the (unscored)
//!   query (`"The answer is:"` for MMLU, `"A:"` for BBH, the language's answer label
//!   for TyDiQA) is not part of the messages; [`less_assistant_prefix`] returns it
//!   for a stage that wants to reproduce LESS's token stream exactly.
//! * MMLU (285): for each of the 57 subjects (sorted), the first 5 dev rows; U =
//!   `"The following are multiple choice questions (with answers) about {s}.\n\n{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"`
//!   where `{s}` is the subject with every `_`-separated word prefixed by a space (so
//!   there are two spaces after "about", as in LESS); C = `" " + letter`.
//! * BBH (81): `tasks/bbh/bbh-three-shot.json` in file order; each task prompt is
//!   split on blank lines, the last three parts are the shots and the rest is the task
//!   description; each shot in turn is the target: U = description.strip() + "\n\n" +
//!   the other two shots (each + "\n\n") + the target's question (text before
//!   `"\nA:"`), C = the text after `"\nA:"` (`" Let's think step by step.\n…"`).
//! * TyDiQA (9): `tasks/tydiqa/tydiqa-one-shot.json` in file order, the first example
//!   of each language; U = instruction + passage label + " " + context + "\n" +
//!   question label + " " + question (LESS concatenates the instruction and the
//!   passage label with no separator; its trailing "\n" is the one the tulu format
//!   adds), C = `" " + answers[0].text`.
//!
//! Test sets follow LESS's evaluation scripts (`evaluation/eval/*/run_eval.py`) with
//! the arguments of its `eval_*.sh`. Test examples hold the prompt only (messages end
//! with the user turn) and the gold answers in `references`:
//!
//! * MMLU (14,042): 5-shot as `eval_mmlu.sh` (`--ntrain 5`): header + the subject's 5
//!   dev examples each as `"{q}\nA. …\nD. …\nAnswer: {letter}\n\n"` + the test
//!   question ending in `"\nAnswer:"`; references = [letter]. Departures: LESS drops
//!   shots when a prompt exceeds 2048 tokens (tokenizer dependent: left to the
//!   evaluator) and pandas turns the option text `None` into `nan`; the text is kept.
//! * BBH (6,511): U = the task's CoT prompt (`cot-prompts/<task>.txt` minus its first
//!   two lines, stripped) + `"\n\nQ: "` + input + `"\nA: Let's think step by step."`;
//!   references = [target]. (LESS's non-chat BBH eval ends the prompt at `"\nA:"` and
//!   lets the model write "Let's think step by step."; it samples 40 examples per task:
//!   use `per_subtask_cap = Some(40)` for that.)
//! * TyDiQA (gold files present: en 3,696, ko 1,625, sw 2,755): one-shot as
//!   `eval_tydiqa.sh` (`--n_shot 1`, with context): U = instruction + "\n\n" +
//!   `"{P} {shot context}\n{Q} {shot question}\n{A} {shot answer}"` + "\n\n" +
//!   `"{P} {context}\n{Q} {question}\n"`; references = every answer text. Departure:
//!   LESS samples the shot at random from the train split; here the shot is the
//!   language's validation example from `tydiqa-one-shot.json` (deterministic), and the
//!   test example identical to it is left out (counted as `demonstration_example`).
//!   LESS's 512-token context truncation is tokenizer dependent and left out; it
//!   samples 200 examples per language: `per_subtask_cap = Some(200)`.
//!
//! Custom target files (messages JSONL, prompt/completion JSONL, Alpaca JSON,
//! Parquet; optional `subtask` per record) work for both: validation keeps examples
//! that end with an assistant turn; test removes a final assistant turn and uses its
//! text as the reference when the record has no `references` of its own.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{FileCount, IngestError, IngestReport, Result};
use crate::mixture::{cap_by_key, check_data_root};
use crate::readers::{display_path, read_bytes, read_path, read_utf8, ReadOptions};
use crate::{Example, Message};

/// A named target task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskName {
    /// MMLU (57 subjects).
    Mmlu,
    /// BIG-Bench Hard (27 tasks).
    Bbh,
    /// TyDiQA-GoldP (9 languages).
    Tydiqa,
}

impl TaskName {
    /// Every named task.
    pub const ALL: [TaskName; 3] = [TaskName::Mmlu, TaskName::Bbh, TaskName::Tydiqa];

    /// The CLI name (`mmlu`, `bbh`, `tydiqa`), also used as the examples' source.
    pub fn name(self) -> &'static str {
        match self {
            TaskName::Mmlu => "mmlu",
            TaskName::Bbh => "bbh",
            TaskName::Tydiqa => "tydiqa",
        }
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A target: a named task or a custom file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// One of the LESS tasks.
    Named(TaskName),
    /// A custom target file (or directory) in any supported format.
    File(PathBuf),
}

impl TargetSpec {
    /// Parse a CLI string: `mmlu` | `bbh` | `tydiqa` (case-insensitive) or a path to
    /// an existing file or directory, or to a file with a supported extension
    /// (`.jsonl`, `.json`, `.tsv`, `.parquet`) that is then checked at load time.
    /// Anything else is an error listing the valid names.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        if let Some(task) = TaskName::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(t))
        {
            return Ok(TargetSpec::Named(task));
        }
        let path = PathBuf::from(t);
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !t.is_empty()
            && (path.exists() || matches!(ext.as_str(), "jsonl" | "json" | "tsv" | "parquet"))
        {
            return Ok(TargetSpec::File(path));
        }
        Err(IngestError::file(
            t,
            "unknown target: expected one of mmlu, bbh, tydiqa, or a path to a .jsonl, .json, .tsv or .parquet file",
        ))
    }
}

impl FromStr for TargetSpec {
    type Err = IngestError;
    fn from_str(s: &str) -> Result<Self> {
        TargetSpec::parse(s)
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Named(t) => write!(f, "{t}"),
            TargetSpec::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// TyDiQA prompt templates per language, as in LESS / open-instruct:
/// (language, ISO code, instruction, passage label, question label, answer label).
const TYDIQA_TEMPLATES: [(&str, &str, &str, &str, &str, &str); 9] = [
    (
        "english",
        "en",
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    (
        "arabic",
        "ar",
        "أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
        "المقطع:",
        "السؤال:",
        "الإجابة:",
    ),
    (
        "bengali",
        "bn",
        "প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
        "অধ্যায়:",
        "প্রশ্ন:",
        "উত্তর:",
    ),
    (
        "finnish",
        "fi",
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    (
        "indonesian",
        "id",
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    (
        "korean",
        "ko",
        "주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.",
        "문단:",
        "질문:",
        "답변:",
    ),
    (
        "russian",
        "ru",
        "Ответьте на следующий вопрос на основе информации в данном отрывке.",
        "Отрывок:",
        "Вопрос:",
        "Ответ:",
    ),
    (
        "swahili",
        "sw",
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    (
        "telugu",
        "te",
        "ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.",
        "పేరా:",
        "ప్రశ్న:",
        "సమాధానం:",
    ),
];

struct TydiTemplate {
    instruction: &'static str,
    passage: &'static str,
    question: &'static str,
    answer: &'static str,
}

fn tydiqa_template(lang: &str) -> Option<TydiTemplate> {
    TYDIQA_TEMPLATES
        .iter()
        .find(|t| t.0 == lang || t.1 == lang)
        .map(|t| TydiTemplate {
            instruction: t.2,
            passage: t.3,
            question: t.4,
            answer: t.5,
        })
}

fn tydiqa_language_name(code_or_name: &str) -> Option<&'static str> {
    TYDIQA_TEMPLATES
        .iter()
        .find(|t| t.0 == code_or_name || t.1 == code_or_name)
        .map(|t| t.0)
}

/// The text LESS puts at the start of the assistant turn, inside its unscored query,
/// for a named task (`subtask` is the TyDiQA language): `"The answer is:"` (MMLU),
/// `"A:"` (BBH), the language's answer label (TyDiQA, e.g. `"Answer:"`).
pub fn less_assistant_prefix(task: TaskName, subtask: &str) -> Option<&'static str> {
    match task {
        TaskName::Mmlu => Some("The answer is:"),
        TaskName::Bbh => Some("A:"),
        TaskName::Tydiqa => tydiqa_template(subtask).map(|t| t.answer),
    }
}

fn user(content: String) -> Message {
    Message {
        role: "user".into(),
        content,
    }
}

fn assistant(content: String) -> Message {
    Message {
        role: "assistant".into(),
        content,
    }
}

// ---------------------------------------------------------------- JSON object in file order

/// A JSON object's entries in document order (serde_json's `Map` sorts its keys).
struct OrderedObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedObject, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn read_ordered_object(path: &Path, rel: &str) -> Result<Vec<(String, Value)>> {
    let text = read_utf8(path, rel)?;
    serde_json::from_str::<OrderedObject>(&text)
        .map(|o| o.0)
        .map_err(|e| {
            IngestError::at_line(rel, e.line() as u64, None, format!("malformed JSON: {e}"))
        })
}

fn read_json_value(path: &Path, rel: &str) -> Result<Value> {
    let text = read_utf8(path, rel)?;
    serde_json::from_str(&text).map_err(|e| {
        IngestError::at_line(rel, e.line() as u64, None, format!("malformed JSON: {e}"))
    })
}

fn json_str<'v>(v: &'v Value, rel: &str, field: &str) -> Result<&'v str> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(IngestError {
            path: rel.into(),
            position: None,
            field: Some(field.into()),
            message: format!("expected a string, found {other}"),
        }),
    }
}

fn field_err(rel: &str, field: &str, msg: impl Into<String>) -> IngestError {
    IngestError {
        path: rel.into(),
        position: None,
        field: Some(field.to_string()),
        message: msg.into(),
    }
}

// ---------------------------------------------------------------- files read

const MMLU_DEV: &str = "tasks/mmlu/dev";
const MMLU_TEST: &str = "tasks/mmlu/test";
const BBH_THREE_SHOT: &str = "tasks/bbh/bbh-three-shot.json";
const BBH_COT_PROMPTS: &str = "tasks/bbh/cot-prompts";
const BBH_TEST: &str = "tasks/bbh/test";
const TYDIQA_ONE_SHOT: &str = "tasks/tydiqa/tydiqa-one-shot.json";
const TYDIQA_GOLD: &str = "tasks/tydiqa/gold";

fn mmlu_dev_path(root: &Path, subject: &str) -> PathBuf {
    root.join(MMLU_DEV).join(format!("{subject}_dev.csv"))
}

fn mmlu_test_path(root: &Path, subject: &str) -> PathBuf {
    root.join(MMLU_TEST).join(format!("{subject}_test.csv"))
}

fn bbh_cot_prompt_path(root: &Path, task: &str) -> PathBuf {
    root.join(BBH_COT_PROMPTS).join(format!("{task}.txt"))
}

fn bbh_test_files(root: &Path) -> Result<Vec<PathBuf>> {
    crate::readers::list_dir(
        &root.join(BBH_TEST),
        Some(crate::Format::Alpaca),
        &ReadOptions::with_root(root),
    )
}

fn tydiqa_gold_files(root: &Path) -> Result<Vec<PathBuf>> {
    crate::readers::list_dir(
        &root.join(TYDIQA_GOLD),
        Some(crate::Format::Alpaca),
        &ReadOptions::with_root(root),
    )
}

fn task_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Which set of a target: the validation examples or the test examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetSplit {
    /// What [`load_target_validation`] reads.
    Validation,
    /// What [`load_target_test`] reads.
    Test,
}

/// Every file [`load_target_validation`] (`split` = validation) or
/// [`load_target_test`] (test) reads for `spec`, each with the name it is
/// fingerprinted under, sorted by that name. Named tasks: paths relative to
/// the data root (MMLU validation: every `tasks/mmlu/dev/*_dev.csv`; MMLU
/// test: every `tasks/mmlu/test/*_test.csv` and its subject's dev file (the
/// shots); BBH validation: `tasks/bbh/bbh-three-shot.json`; BBH test: every
/// `tasks/bbh/test/*.json` and its `tasks/bbh/cot-prompts/<task>.txt`;
/// TyDiQA validation: `tasks/tydiqa/tydiqa-one-shot.json`; TyDiQA test: that
/// file (the shots) and every `tasks/tydiqa/gold/*.json`). A custom file:
/// its file name; a custom directory: its supported files, named relative
/// to it (so the spelling of the target's path does not matter).
pub fn target_files(
    spec: &TargetSpec,
    data_root: &Path,
    split: TargetSplit,
) -> Result<Vec<(String, PathBuf)>> {
    let named = |paths: Vec<PathBuf>| -> Vec<(String, PathBuf)> {
        paths
            .into_iter()
            .map(|p| (display_path(&p, Some(data_root)), p))
            .collect()
    };
    let mut files = match spec {
        TargetSpec::Named(task) => {
            check_data_root(data_root)?;
            let root = data_root;
            named(match (task, split) {
                (TaskName::Mmlu, TargetSplit::Validation) => {
                    mmlu_subjects(&root.join(MMLU_DEV), "_dev.csv", root)?
                        .iter()
                        .map(|s| mmlu_dev_path(root, s))
                        .collect()
                }
                (TaskName::Mmlu, TargetSplit::Test) => {
                    mmlu_subjects(&root.join(MMLU_TEST), "_test.csv", root)?
                        .iter()
                        .flat_map(|s| [mmlu_test_path(root, s), mmlu_dev_path(root, s)])
                        .collect()
                }
                (TaskName::Bbh, TargetSplit::Validation) => vec![root.join(BBH_THREE_SHOT)],
                (TaskName::Bbh, TargetSplit::Test) => bbh_test_files(root)?
                    .into_iter()
                    .flat_map(|p| {
                        let prompt = bbh_cot_prompt_path(root, &task_stem(&p));
                        [p, prompt]
                    })
                    .collect(),
                (TaskName::Tydiqa, TargetSplit::Validation) => vec![root.join(TYDIQA_ONE_SHOT)],
                (TaskName::Tydiqa, TargetSplit::Test) => {
                    let mut v = vec![root.join(TYDIQA_ONE_SHOT)];
                    v.extend(tydiqa_gold_files(root)?);
                    v
                }
            })
        }
        TargetSpec::File(path) if path.is_dir() => {
            crate::readers::list_dir(path, None, &ReadOptions::with_root(data_root))?
                .into_iter()
                .map(|p| (display_path(&p, Some(path)), p))
                .collect()
        }
        TargetSpec::File(path) => vec![(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| display_path(path, None)),
            path.clone(),
        )],
    };
    files.sort();
    files.dedup();
    Ok(files)
}

/// Fingerprint of the content a target's `split` is built from: blake3
/// (hex) of `"dsel-ingest target fingerprint v{RULES_VERSION}\n"` followed,
/// for each of [`target_files`] in order, by the name's byte length (u64
/// little-endian), the name, the file's byte length (u64 little-endian) and
/// the blake3 of its bytes. Editing any file a loader reads changes it; the
/// same files under another data root give the same fingerprint.
pub fn target_fingerprint(
    spec: &TargetSpec,
    data_root: &Path,
    split: TargetSplit,
) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(format!("dsel-ingest target fingerprint v{}\n", crate::RULES_VERSION).as_bytes());
    for (name, path) in target_files(spec, data_root, split)? {
        let bytes = read_bytes(&path, &name)?;
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(blake3::hash(&bytes).as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

// ---------------------------------------------------------------- MMLU

/// One MMLU CSV row: question, four options, answer letter.
struct MmluRow {
    record: u64,
    question: String,
    options: [String; 4],
    answer: String,
}

fn read_mmlu_csv(path: &Path, rel: &str) -> Result<Vec<MmluRow>> {
    let bytes = read_bytes(path, rel)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes.as_slice());
    let mut rows = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let n = i as u64 + 1;
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(n);
            IngestError::at_line(rel, line, None, format!("malformed CSV: {e}"))
        })?;
        if rec.len() != 6 {
            return Err(IngestError::at_record(
                rel,
                n,
                None,
                format!(
                    "expected 6 fields (question, A, B, C, D, answer), found {}",
                    rec.len()
                ),
            ));
        }
        let answer = rec[5].trim().to_string();
        if !matches!(answer.as_str(), "A" | "B" | "C" | "D") {
            return Err(IngestError::at_record(
                rel,
                n,
                Some("answer"),
                format!("expected A, B, C or D, found \"{answer}\""),
            ));
        }
        rows.push(MmluRow {
            record: n,
            question: rec[0].to_string(),
            options: [
                rec[1].to_string(),
                rec[2].to_string(),
                rec[3].to_string(),
                rec[4].to_string(),
            ],
            answer,
        });
    }
    Ok(rows)
}

/// LESS's `format_subject`: every `_`-separated word prefixed with a space.
fn mmlu_format_subject(subject: &str) -> String {
    subject.split('_').map(|w| format!(" {w}")).collect()
}

fn mmlu_header(subject: &str) -> String {
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        mmlu_format_subject(subject)
    )
}

/// LESS's `format_example`: question, lettered options and `"\nAnswer:"` (+ `" {letter}\n\n"`).
fn mmlu_format_example(row: &MmluRow, include_answer: bool) -> String {
    let mut s = row.question.clone();
    for (letter, opt) in ["A", "B", "C", "D"].iter().zip(&row.options) {
        s.push_str(&format!("\n{letter}. {opt}"));
    }
    s.push_str("\nAnswer:");
    if include_answer {
        s.push_str(&format!(" {}\n\n", row.answer));
    }
    s
}

/// Sorted subject names from the `*{suffix}` files of `dir`.
fn mmlu_subjects(dir: &Path, suffix: &str, root: &Path) -> Result<Vec<String>> {
    let rel = display_path(dir, Some(root));
    let entries = std::fs::read_dir(dir)
        .map_err(|e| IngestError::file(&rel, format!("cannot list directory: {e}")))?;
    let mut subjects = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| IngestError::file(&rel, format!("cannot list directory: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(s) = name.strip_suffix(suffix) {
            subjects.push(s.to_string());
        }
    }
    subjects.sort();
    if subjects.is_empty() {
        return Err(IngestError::file(rel, format!("no *{suffix} files")));
    }
    Ok(subjects)
}

fn mmlu_dev(root: &Path, subject: &str) -> Result<Vec<MmluRow>> {
    let path = mmlu_dev_path(root, subject);
    let rel = display_path(&path, Some(root));
    let mut rows = read_mmlu_csv(&path, &rel)?;
    if rows.len() < 5 {
        return Err(IngestError::file(
            rel,
            format!("expected at least 5 dev examples, found {}", rows.len()),
        ));
    }
    rows.truncate(5);
    Ok(rows)
}

fn mmlu_validation(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let subjects = mmlu_subjects(&root.join(MMLU_DEV), "_dev.csv", root)?;
    let mut out = Vec::new();
    for subject in subjects {
        let path = mmlu_dev_path(root, &subject);
        let rel = display_path(&path, Some(root));
        let rows = mmlu_dev(root, &subject)?;
        for row in &rows {
            out.push(Example {
                id: format!("{rel}:{}", row.record),
                source: "mmlu".into(),
                subtask: subject.clone(),
                messages: vec![
                    user(format!(
                        "{}{}",
                        mmlu_header(&subject),
                        mmlu_format_example(row, false)
                    )),
                    assistant(format!(" {}", row.answer)),
                ],
                references: Vec::new(),
            });
        }
        report.count_file(rel, rows.len() as u64, rows.len() as u64);
    }
    Ok(out)
}

fn mmlu_test(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let subjects = mmlu_subjects(&root.join(MMLU_TEST), "_test.csv", root)?;
    let mut out = Vec::new();
    for subject in subjects {
        let dev = mmlu_dev(root, &subject)?;
        let mut shots = mmlu_header(&subject);
        for row in &dev {
            shots.push_str(&mmlu_format_example(row, true));
        }
        let path = mmlu_test_path(root, &subject);
        let rel = display_path(&path, Some(root));
        let rows = read_mmlu_csv(&path, &rel)?;
        for row in &rows {
            out.push(Example {
                id: format!("{rel}:{}", row.record),
                source: "mmlu".into(),
                subtask: subject.clone(),
                messages: vec![user(format!("{shots}{}", mmlu_format_example(row, false)))],
                references: vec![row.answer.clone()],
            });
        }
        report.count_file(rel, rows.len() as u64, rows.len() as u64);
    }
    Ok(out)
}

// ---------------------------------------------------------------- BBH

fn bbh_validation(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let path = root.join(BBH_THREE_SHOT);
    let rel = display_path(&path, Some(root));
    let tasks = read_ordered_object(&path, &rel)?;
    let mut out = Vec::new();
    for (task, value) in &tasks {
        let prompt = json_str(value, &rel, task)?;
        let parts: Vec<&str> = prompt.split("\n\n").collect();
        if parts.len() < 3 {
            return Err(field_err(
                &rel,
                task,
                format!(
                    "expected at least 3 blank-line-separated shots, found {}",
                    parts.len()
                ),
            ));
        }
        let (desc, shots) = parts.split_at(parts.len() - 3);
        let desc = desc.join("\n\n");
        let mut split = Vec::with_capacity(3);
        for (i, shot) in shots.iter().enumerate() {
            let pieces: Vec<&str> = shot.split("\nA:").collect();
            if pieces.len() != 2 {
                return Err(field_err(
                    &rel,
                    task,
                    format!(
                        "shot {} must contain \"\\nA:\" exactly once, found {}",
                        i + 1,
                        pieces.len() - 1
                    ),
                ));
            }
            split.push((pieces[0], pieces[1]));
        }
        for (i, (question, answer)) in split.iter().enumerate() {
            let mut icl = String::new();
            for (j, (q, a)) in split.iter().enumerate() {
                if j != i {
                    icl.push_str(&format!("{q}\nA:{a}\n\n"));
                }
            }
            out.push(Example {
                id: format!("{rel}:{task}:{}", i + 1),
                source: "bbh".into(),
                subtask: task.clone(),
                messages: vec![
                    user(format!("{}\n\n{icl}{question}", desc.trim())),
                    assistant(answer.to_string()),
                ],
                references: Vec::new(),
            });
        }
    }
    report.read += out.len() as u64;
    report.files.push(FileCount {
        path: rel,
        read: tasks.len() as u64,
        produced: out.len() as u64,
    });
    Ok(out)
}

/// The BBH CoT prompt of a task as LESS's eval reads it: the file minus its first two
/// lines (canary and `-----`), stripped.
fn bbh_cot_prompt(root: &Path, task: &str) -> Result<String> {
    let path = bbh_cot_prompt_path(root, task);
    let rel = display_path(&path, Some(root));
    let text = read_utf8(&path, &rel)?;
    let body: String = text.split_inclusive('\n').skip(2).collect();
    if body.trim().is_empty() {
        return Err(IngestError::file(rel, "empty CoT prompt"));
    }
    Ok(body.trim().to_string())
}

fn bbh_test(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let files = bbh_test_files(root)?;
    let mut out = Vec::new();
    for path in files {
        let rel = display_path(&path, Some(root));
        let task = task_stem(&path);
        let prompt = bbh_cot_prompt(root, &task)?;
        let value = read_json_value(&path, &rel)?;
        let examples = value
            .get("examples")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                field_err(
                    &rel,
                    "examples",
                    "expected an object with an \"examples\" array",
                )
            })?;
        let mut produced = 0;
        for (i, ex) in examples.iter().enumerate() {
            let n = i as u64 + 1;
            let get = |field: &str| -> Result<&str> {
                match ex.get(field) {
                    Some(Value::String(s)) => Ok(s),
                    None => Err(IngestError::at_record(&rel, n, Some(field), "missing")),
                    Some(v) => Err(IngestError::at_record(
                        &rel,
                        n,
                        Some(field),
                        format!("expected a string, found {v}"),
                    )),
                }
            };
            let input = get("input")?;
            let target = get("target")?;
            out.push(Example {
                id: format!("{rel}:{n}"),
                source: "bbh".into(),
                subtask: task.clone(),
                messages: vec![user(format!(
                    "{prompt}\n\nQ: {input}\nA: Let's think step by step."
                ))],
                references: vec![target.to_string()],
            });
            produced += 1;
        }
        report.count_file(rel, examples.len() as u64, produced);
    }
    Ok(out)
}

// ---------------------------------------------------------------- TyDiQA

/// The one-shot validation example of a language.
struct TydiShot {
    lang: String,
    context: String,
    question: String,
    answer: String,
}

fn tydiqa_shots(root: &Path) -> Result<(String, Vec<TydiShot>)> {
    let path = root.join(TYDIQA_ONE_SHOT);
    let rel = display_path(&path, Some(root));
    let langs = read_ordered_object(&path, &rel)?;
    let mut shots = Vec::new();
    for (lang, value) in &langs {
        if tydiqa_template(lang).is_none() {
            return Err(field_err(
                &rel,
                lang,
                format!(
                    "unknown TyDiQA language: expected one of {}",
                    TYDIQA_TEMPLATES
                        .iter()
                        .map(|t| t.0)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let first = value
            .as_array()
            .and_then(|a| a.first())
            .ok_or_else(|| field_err(&rel, lang, "expected a non-empty list of examples"))?;
        let s = |field: &str| -> Result<String> {
            match first.get(field) {
                Some(Value::String(s)) => Ok(s.clone()),
                None => Err(field_err(&rel, &format!("{lang}[0].{field}"), "missing")),
                Some(v) => Err(field_err(
                    &rel,
                    &format!("{lang}[0].{field}"),
                    format!("expected a string, found {v}"),
                )),
            }
        };
        let answer = match first
            .get("answers")
            .and_then(|a| a.get(0))
            .and_then(|a| a.get("text"))
        {
            Some(Value::String(t)) => t.clone(),
            _ => {
                return Err(field_err(
                    &rel,
                    &format!("{lang}[0].answers[0].text"),
                    "missing or not a string",
                ))
            }
        };
        shots.push(TydiShot {
            lang: lang.clone(),
            context: s("context")?,
            question: s("question")?,
            answer,
        });
    }
    Ok((rel, shots))
}

fn tydiqa_validation(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let (rel, shots) = tydiqa_shots(root)?;
    let mut out = Vec::new();
    for shot in &shots {
        let Some(t) = tydiqa_template(&shot.lang) else {
            continue;
        };
        out.push(Example {
            id: format!("{rel}:{}:1", shot.lang),
            source: "tydiqa".into(),
            subtask: shot.lang.clone(),
            messages: vec![
                user(format!(
                    "{}{} {}\n{} {}",
                    t.instruction, t.passage, shot.context, t.question, shot.question
                )),
                assistant(format!(" {}", shot.answer)),
            ],
            references: Vec::new(),
        });
    }
    report.count_file(rel, out.len() as u64, out.len() as u64);
    Ok(out)
}

/// The language of a gold file from its name: the first dot-separated part that is a
/// known ISO code or language name (`tydiqa.goldp.en.train.json` → `english`).
fn tydiqa_file_language(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    name.split(['.', '_', '-']).find_map(tydiqa_language_name)
}

fn tydiqa_test(root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    let (_, shots) = tydiqa_shots(root)?;
    let shots: HashMap<&str, &TydiShot> = shots.iter().map(|s| (s.lang.as_str(), s)).collect();
    let files = tydiqa_gold_files(root)?;
    let mut out = Vec::new();
    for path in files {
        let rel = display_path(&path, Some(root));
        let lang = tydiqa_file_language(&path).ok_or_else(|| {
            IngestError::file(&rel, "cannot tell the language from the file name (expected e.g. tydiqa.goldp.en.train.json)")
        })?;
        let t = tydiqa_template(lang)
            .ok_or_else(|| IngestError::file(&rel, "no template for this language"))?;
        let shot = shots.get(lang).ok_or_else(|| {
            IngestError::file(
                &rel,
                format!("no one-shot example for language \"{lang}\" in tydiqa-one-shot.json"),
            )
        })?;
        let prefix = format!(
            "{}\n\n{} {}\n{} {}\n{} {}\n\n",
            t.instruction,
            t.passage,
            shot.context,
            t.question,
            shot.question,
            t.answer,
            shot.answer
        );
        let value = read_json_value(&path, &rel)?;
        let data = value.get("data").and_then(Value::as_array).ok_or_else(|| {
            field_err(
                &rel,
                "data",
                "expected SQuAD 1.1 JSON with a \"data\" array",
            )
        })?;
        let mut n: u64 = 0;
        let mut produced = 0;
        for (ai, article) in data.iter().enumerate() {
            let paragraphs = article
                .get("paragraphs")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    field_err(&rel, &format!("data[{ai}].paragraphs"), "expected an array")
                })?;
            for (pi, para) in paragraphs.iter().enumerate() {
                let here = format!("data[{ai}].paragraphs[{pi}]");
                let context = para.get("context").and_then(Value::as_str).ok_or_else(|| {
                    field_err(&rel, &format!("{here}.context"), "expected a string")
                })?;
                let qas = para
                    .get("qas")
                    .and_then(Value::as_array)
                    .ok_or_else(|| field_err(&rel, &format!("{here}.qas"), "expected an array"))?;
                for qa in qas {
                    n += 1;
                    let question = qa.get("question").and_then(Value::as_str).ok_or_else(|| {
                        IngestError::at_record(&rel, n, Some("question"), "expected a string")
                    })?;
                    let answers = qa.get("answers").and_then(Value::as_array).ok_or_else(|| {
                        IngestError::at_record(&rel, n, Some("answers"), "expected an array")
                    })?;
                    let mut refs = Vec::with_capacity(answers.len());
                    for a in answers {
                        let text = a.get("text").and_then(Value::as_str).ok_or_else(|| {
                            IngestError::at_record(
                                &rel,
                                n,
                                Some("answers.text"),
                                "expected a string",
                            )
                        })?;
                        refs.push(text.to_string());
                    }
                    if question == shot.question && context == shot.context {
                        report.skip("demonstration_example");
                        continue;
                    }
                    if refs.is_empty() {
                        report.skip("no_reference");
                        continue;
                    }
                    out.push(Example {
                        id: format!("{rel}:{n}"),
                        source: "tydiqa".into(),
                        subtask: lang.to_string(),
                        messages: vec![user(format!(
                            "{prefix}{} {context}\n{} {question}\n",
                            t.passage, t.question
                        ))],
                        references: refs,
                    });
                    produced += 1;
                }
            }
        }
        report.count_file(rel, n, produced);
    }
    Ok(out)
}

// ---------------------------------------------------------------- public loaders

fn read_custom(path: &Path, data_root: &Path, report: &mut IngestReport) -> Result<Vec<Example>> {
    // A relative custom path is taken as given (relative to the current directory);
    // ids are relative to the data root only when the file lies under it.
    read_path(path, None, &ReadOptions::with_root(data_root), report)
}

/// One split's loader of a named target: the data root in, the examples out.
type SplitLoader = fn(&Path, &mut IngestReport) -> Result<Vec<Example>>;

/// The examples of one split of `spec`, with the report they were counted
/// in: a named task's through its loader in `loaders` (MMLU, BBH, TyDiQA)
/// after checking the data root, a custom file's records through `keep`
/// (which counts the ones it drops in the report).
fn load_split(
    spec: &TargetSpec,
    data_root: &Path,
    loaders: [SplitLoader; 3],
    mut keep: impl FnMut(Example, &mut IngestReport) -> Option<Example>,
) -> Result<(Vec<Example>, IngestReport)> {
    let mut report = IngestReport::default();
    let examples = match spec {
        TargetSpec::Named(task) => {
            check_data_root(data_root)?;
            let [mmlu, bbh, tydiqa] = loaders;
            let load = match task {
                TaskName::Mmlu => mmlu,
                TaskName::Bbh => bbh,
                TaskName::Tydiqa => tydiqa,
            };
            load(data_root, &mut report)?
        }
        TargetSpec::File(path) => {
            let all = read_custom(path, data_root, &mut report)?;
            let mut kept = Vec::with_capacity(all.len());
            for ex in all {
                if let Some(ex) = keep(ex, &mut report) {
                    kept.push(ex);
                }
            }
            kept
        }
    };
    Ok((examples, report))
}

fn ends_with_assistant(ex: &Example) -> bool {
    ex.messages.last().is_some_and(|m| m.role == "assistant")
}

/// Load a target's validation examples (the examples ToV/LESS fine-tune or take
/// gradients on). See the module docs for the exact prompts.
///
/// Counts: MMLU 285 (subtask = subject), BBH 81 (subtask = task), TyDiQA 9
/// (subtask = language name). A custom file keeps the examples that end with a
/// non-empty assistant turn (others are counted as `no_assistant_turn`).
pub fn load_target_validation(
    spec: &TargetSpec,
    data_root: &Path,
) -> Result<(Vec<Example>, IngestReport)> {
    let loaders = [mmlu_validation, bbh_validation, tydiqa_validation];
    let (examples, mut report) = load_split(spec, data_root, loaders, |ex, report| {
        if ends_with_assistant(&ex) {
            Some(ex)
        } else {
            report.skip("no_assistant_turn");
            None
        }
    })?;
    report.kept = examples.len() as u64;
    Ok((examples, report))
}

/// Load a target's test examples: prompts (messages ending with the user turn) and
/// gold answers in `references`. See the module docs for the exact prompts.
///
/// `per_subtask_cap` keeps at most that many examples per subtask, sampled without
/// replacement with a ChaCha20 RNG derived from `seed` and the subtask name, in
/// original order (see [`crate::mixture`] for the algorithm). LESS's evaluation used
/// 40 per BBH task and 200 per TyDiQA language and all of MMLU.
///
/// A custom file: a final assistant turn is removed and its text (trimmed) becomes
/// the reference of a record that has no `references` of its own.
pub fn load_target_test(
    spec: &TargetSpec,
    data_root: &Path,
    per_subtask_cap: Option<usize>,
    seed: u64,
) -> Result<(Vec<Example>, IngestReport)> {
    let loaders = [mmlu_test, bbh_test, tydiqa_test];
    let (examples, mut report) = load_split(spec, data_root, loaders, |mut ex, report| {
        if ends_with_assistant(&ex) {
            if let Some(last) = ex.messages.pop() {
                if ex.references.is_empty() {
                    ex.references.push(last.content.trim().to_string());
                }
            }
        }
        if ex.references.is_empty() {
            report.skip("no_reference");
            return None;
        }
        Some(ex)
    })?;
    let examples = match per_subtask_cap {
        Some(cap) => {
            let before = examples.len();
            let kept = cap_by_key(examples, cap, seed, "test-per-subtask", |e| {
                e.subtask.clone()
            });
            report.dropped_by_subsetting += (before - kept.len()) as u64;
            kept
        }
        None => examples,
    };
    report.kept = examples.len() as u64;
    Ok((examples, report))
}
