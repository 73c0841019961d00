//! Readers for every supported pool/target file format.
//!
//! Every reader takes the file path, [`ReadOptions`] and an [`IngestReport`] to count
//! into, and returns the examples in file order. Structural problems (malformed JSON,
//! a missing or mistyped field, invalid UTF-8, a TSV line without three fields) are
//! errors that name the file, the 1-based line or record and the field. A well-formed
//! record with nothing to learn from is skipped and counted in
//! [`IngestReport::skipped_by_reason`]:
//!
//! | reason | when |
//! |---|---|
//! | `empty_prompt` | no user turn with non-whitespace text |
//! | `empty_completion` | an assistant turn (completion, output, answer) is whitespace only |
//! | `empty_messages` | a messages record with an empty `messages` array |
//! | `no_assistant_turn` | a messages record with no assistant turn and no `references` |
//!
//! Blank lines in JSONL/TSV files are ignored (not records). Ids are
//! `<path relative to the data root>:<1-based line or record>`; a messages or
//! prompt/completion line with its own `"id"` gets `<path>:<that id>` instead
//! (duplicates inside one file are an error).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{IngestError, IngestReport, Result};
use crate::{Example, Message};

/// The end-of-text marker the T0 completions carry; one trailing copy is removed.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// A supported input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Tulu-style JSONL: `{"messages":[{"role","content"}], "subtask"?, "id"?, "source"?|"dataset"?, "references"?}`.
    Messages,
    /// JSONL `{"prompt","completion","subtask"?,"id"?}`: user = prompt, assistant =
    /// completion minus one trailing `<|endoftext|>`. Source: the file stem.
    PromptCompletion,
    /// T0 / P3 prompt/completion JSONL: as [`Format::PromptCompletion`], source `t0/<file stem>`.
    T0,
    /// Alpaca JSON list `{"instruction","input"?,"output","subtask"?}`: user = instruction,
    /// plus `"\n\n" + input` when input is non-empty; assistant = output. Source: the file stem.
    Alpaca,
    /// AlpacaEval outputs JSON list `{"instruction","output","generator","dataset"}`:
    /// user = instruction, assistant = output, source `alpaca_eval/<file stem without .model_outputs>`.
    AlpacaEval,
    /// FLAN v2 CoT TSV (question, answer, rationale; no header): see [`read_flan_cot_tsv`].
    FlanCot,
    /// Parquet with the canonical columns (see [`crate::parquet_io`]).
    Parquet,
}

impl Format {
    /// Every format, in the order of [`Format::NAMES`].
    pub const ALL: [Format; 7] = [
        Format::Messages,
        Format::PromptCompletion,
        Format::T0,
        Format::Alpaca,
        Format::AlpacaEval,
        Format::FlanCot,
        Format::Parquet,
    ];

    /// The names accepted by [`Format::from_str`] (and in mixture files).
    pub const NAMES: [&'static str; 7] = [
        "messages",
        "prompt-completion",
        "t0",
        "alpaca",
        "alpaca-eval",
        "flan-cot",
        "parquet",
    ];

    /// The canonical name of this format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::PromptCompletion => "prompt-completion",
            Format::T0 => "t0",
            Format::Alpaca => "alpaca",
            Format::AlpacaEval => "alpaca-eval",
            Format::FlanCot => "flan-cot",
            Format::Parquet => "parquet",
        }
    }

    /// The file extension (without dot) files of this format carry.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Messages | Format::PromptCompletion | Format::T0 => "jsonl",
            Format::Alpaca | Format::AlpacaEval => "json",
            Format::FlanCot => "tsv",
            Format::Parquet => "parquet",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    /// Parse a format name (case-insensitive; `_` and `-` are interchangeable).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let norm = match norm.as_str() {
            "tulu" | "messages-jsonl" => "messages",
            "prompt-completion-jsonl" | "promptcompletion" => "prompt-completion",
            "alpacaeval" => "alpaca-eval",
            "flan" | "flan-v2-cot" | "flancot" => "flan-cot",
            other => other,
        };
        Format::ALL
            .into_iter()
            .find(|f| f.name() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown format \"{s}\": expected one of {}",
                    Format::NAMES.join(", ")
                )
            })
    }
}

/// Options shared by the readers.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Ids and error paths are made relative to this directory (normally the data
    /// root) when the file lies under it.
    pub root: Option<PathBuf>,
    /// Overrides the source name of every example read.
    pub source: Option<String>,
}

impl ReadOptions {
    /// Options with ids relative to `root`.
    pub fn with_root(root: &Path) -> Self {
        Self {
            root: Some(root.to_path_buf()),
            source: None,
        }
    }
}

/// Per-file reading context: display path and defaults.
pub(crate) struct Ctx {
    /// Path shown in ids and errors (relative to the root when possible, `/`-separated).
    pub(crate) rel: String,
    pub(crate) source_override: Option<String>,
}

impl Ctx {
    pub(crate) fn new(path: &Path, opts: &ReadOptions) -> Self {
        Self {
            rel: display_path(path, opts.root.as_deref()),
            source_override: opts.source.clone(),
        }
    }
    pub(crate) fn id(&self, n: u64) -> String {
        format!("{}:{n}", self.rel)
    }
    fn line_err(&self, line: u64, field: Option<&str>, msg: impl Into<String>) -> IngestError {
        IngestError::at_line(&self.rel, line, field, msg)
    }
    fn rec_err(&self, rec: u64, field: Option<&str>, msg: impl Into<String>) -> IngestError {
        IngestError::at_record(&self.rel, rec, field, msg)
    }
    fn source(&self, default: String) -> String {
        self.source_override.clone().unwrap_or(default)
    }
}

/// `path` relative to `root` when under it, with `/` separators.
pub(crate) fn display_path(path: &Path, root: Option<&Path>) -> String {
    let rel = root.and_then(|r| path.strip_prefix(r).ok()).unwrap_or(path);
    if rel.has_root() {
        return rel.to_string_lossy().into_owned();
    }
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.is_empty() {
        path.to_string_lossy().into_owned()
    } else {
        parts.join("/")
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Read a whole file as bytes; errors name the path.
pub(crate) fn read_bytes(path: &Path, rel: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IngestError::file(rel, "file not found")
        } else {
            IngestError::file(rel, format!("cannot read: {e}"))
        }
    })
}

/// Decode a whole file as UTF-8; an error names the 1-based line of the first bad byte.
pub(crate) fn read_utf8(path: &Path, rel: &str) -> Result<String> {
    let bytes = read_bytes(path, rel)?;
    String::from_utf8(bytes).map_err(|e| {
        let upto = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..upto].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let line_start = bytes[..upto]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        IngestError::at_line(
            rel,
            line,
            None,
            format!("invalid UTF-8 (byte {} of the line)", upto - line_start + 1),
        )
    })
}

/// Split file bytes into `(1-based line number, text)` for every non-blank line,
/// checking UTF-8 per line. A trailing `\r` is removed.
fn text_lines<'a>(bytes: &'a [u8], ctx: &Ctx) -> Result<Vec<(u64, &'a str)>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            ctx.line_err(
                line_no,
                None,
                format!("invalid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
            )
        })?;
        if !text.trim().is_empty() {
            out.push((line_no, text));
        }
    }
    Ok(out)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where a field error is reported.
#[derive(Clone, Copy)]
enum Loc<'a> {
    Line(&'a Ctx, u64),
    Record(&'a Ctx, u64),
}

impl Loc<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> IngestError {
        match *self {
            Loc::Line(c, n) => c.line_err(n, Some(field), msg),
            Loc::Record(c, n) => c.rec_err(n, Some(field), msg),
        }
    }
    fn err_nofield(&self, msg: impl Into<String>) -> IngestError {
        match *self {
            Loc::Line(c, n) => c.line_err(n, None, msg),
            Loc::Record(c, n) => c.rec_err(n, None, msg),
        }
    }
}

fn req_str<'v>(obj: &'v Map<String, Value>, field: &str, loc: Loc) -> Result<&'v str> {
    match obj.get(field) {
        None => Err(loc.err(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(loc.err(field, format!("expected a string, found {}", type_name(v)))),
    }
}

fn opt_str<'v>(obj: &'v Map<String, Value>, field: &str, loc: Loc) -> Result<Option<&'v str>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(loc.err(field, format!("expected a string, found {}", type_name(v)))),
    }
}

/// An optional `"id"`: a string or an integer.
fn opt_id(obj: &Map<String, Value>, loc: Loc) -> Result<Option<String>> {
    match obj.get("id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(v) => Err(loc.err(
            "id",
            format!("expected a string or an integer, found {}", type_name(v)),
        )),
    }
}

fn opt_references(obj: &Map<String, Value>, loc: Loc) -> Result<Vec<String>> {
    match obj.get("references") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(loc.err(
                    &format!("references[{i}]"),
                    format!("expected a string, found {}", type_name(other)),
                )),
            })
            .collect(),
        Some(v) => Err(loc.err(
            "references",
            format!("expected an array of strings, found {}", type_name(v)),
        )),
    }
}

fn as_object<'v>(v: &'v Value, loc: Loc) -> Result<&'v Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| loc.err_nofield(format!("expected a JSON object, found {}", type_name(v))))
}

fn parse_json_line(text: &str, loc: Loc) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| loc.err_nofield(format!("malformed JSON: {e}")))
}

/// Why an example has nothing to learn from, if so (see the module docs).
pub(crate) fn skip_reason(ex: &Example) -> Option<&'static str> {
    if ex.messages.is_empty() {
        return Some("empty_messages");
    }
    if !ex
        .messages
        .iter()
        .any(|m| m.role == "user" && !m.content.trim().is_empty())
    {
        return Some("empty_prompt");
    }
    let mut has_assistant = false;
    for m in &ex.messages {
        if m.role == "assistant" {
            has_assistant = true;
            if m.content.trim().is_empty() {
                return Some("empty_completion");
            }
        }
    }
    if !has_assistant && ex.references.is_empty() {
        return Some("no_assistant_turn");
    }
    None
}

/// Tracks ids given by the file itself, to reject duplicates.
struct IdCheck(HashMap<String, u64>);

impl IdCheck {
    fn new() -> Self {
        Self(HashMap::new())
    }
    fn id(&mut self, ctx: &Ctx, own: Option<String>, n: u64, loc: Loc) -> Result<String> {
        match own {
            None => Ok(ctx.id(n)),
            Some(own) => {
                if let Some(prev) = self.0.insert(own.clone(), n) {
                    return Err(loc.err(
                        "id",
                        format!("duplicate id \"{own}\" (first seen at {prev})"),
                    ));
                }
                Ok(format!("{}:{own}", ctx.rel))
            }
        }
    }
}

fn push_example(out: &mut Vec<Example>, report: &mut IngestReport, ex: Example) {
    match skip_reason(&ex) {
        Some(reason) => {
            tracing::debug!(id = %ex.id, reason, "skipping example");
            report.skip(reason);
        }
        None => out.push(ex),
    }
}

fn msg(role: &str, content: impl Into<String>) -> Message {
    Message {
        role: role.to_string(),
        content: content.into(),
    }
}

/// Counts a file's `read` records and the examples `out` it produced in
/// `report`; returns `out`.
fn finish(
    report: &mut IngestReport,
    ctx: &Ctx,
    read: u64,
    out: Vec<Example>,
) -> Result<Vec<Example>> {
    report.count_file(ctx.rel.clone(), read, out.len() as u64);
    Ok(out)
}

/// A single-turn example: the user's `user`, the assistant's `assistant`.
fn user_assistant(
    id: String,
    source: String,
    subtask: String,
    user: impl Into<String>,
    assistant: impl Into<String>,
    references: Vec<String>,
) -> Example {
    Example {
        id,
        source,
        subtask,
        messages: vec![msg("user", user), msg("assistant", assistant)],
        references,
    }
}

/// How a file holds its JSON objects.
#[derive(Clone, Copy)]
enum Records {
    /// JSONL: one object per non-blank line, numbered by line.
    Lines,
    /// One JSON list of objects, numbered by 1-based position.
    List,
}

/// Reads the JSON objects of `path` (the file of `ctx`) and makes an example
/// of each with `make(n, object, loc)`, `n` its line or list position; the
/// examples are kept or skipped by [`push_example`] and the file is counted
/// by [`finish`].
fn read_objects<'c>(
    path: &Path,
    ctx: &'c Ctx,
    records: Records,
    report: &mut IngestReport,
    mut make: impl FnMut(u64, &Map<String, Value>, Loc<'c>) -> Result<Example>,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let read = match records {
        Records::Lines => {
            let bytes = read_bytes(path, &ctx.rel)?;
            let lines = text_lines(&bytes, ctx)?;
            for &(n, text) in &lines {
                let loc = Loc::Line(ctx, n);
                let value = parse_json_line(text, loc)?;
                let ex = make(n, as_object(&value, loc)?, loc)?;
                push_example(&mut out, report, ex);
            }
            lines.len()
        }
        Records::List => {
            let items = read_json_list(path, ctx)?;
            for (i, item) in items.iter().enumerate() {
                let n = i as u64 + 1;
                let loc = Loc::Record(ctx, n);
                let ex = make(n, as_object(item, loc)?, loc)?;
                push_example(&mut out, report, ex);
            }
            items.len()
        }
    };
    finish(report, ctx, read as u64, out)
}

/// Read tulu-style messages JSONL (see [`Format::Messages`]).
///
/// Roles must be `system`, `user` or `assistant`. Source: the line's `"source"`,
/// else its `"dataset"`, else the file stem (an options override wins).
pub fn read_messages_jsonl(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let ctx = Ctx::new(path, opts);
    let stem = file_stem(path);
    let mut ids = IdCheck::new();
    read_objects(path, &ctx, Records::Lines, report, |n, obj, loc| {
        let msgs = match obj.get("messages") {
            None => return Err(loc.err("messages", "missing")),
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(loc.err(
                    "messages",
                    format!("expected an array, found {}", type_name(v)),
                ))
            }
        };
        let mut messages = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let field = format!("messages[{i}]");
            let mo = m.as_object().ok_or_else(|| {
                loc.err(
                    &field,
                    format!("expected an object, found {}", type_name(m)),
                )
            })?;
            let role = match mo.get("role") {
                Some(Value::String(s)) => s.as_str(),
                None => return Err(loc.err(&format!("{field}.role"), "missing")),
                Some(v) => {
                    return Err(loc.err(
                        &format!("{field}.role"),
                        format!("expected a string, found {}", type_name(v)),
                    ))
                }
            };
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(loc.err(
                    &format!("{field}.role"),
                    format!("unknown role \"{role}\": expected system, user or assistant"),
                ));
            }
            let content = match mo.get("content") {
                Some(Value::String(s)) => s.clone(),
                None => return Err(loc.err(&format!("{field}.content"), "missing")),
                Some(v) => {
                    return Err(loc.err(
                        &format!("{field}.content"),
                        format!("expected a string, found {}", type_name(v)),
                    ))
                }
            };
            messages.push(msg(role, content));
        }
        let subtask = opt_str(obj, "subtask", loc)?.unwrap_or("").to_string();
        let own_source = match opt_str(obj, "source", loc)? {
            Some(s) => Some(s),
            None => opt_str(obj, "dataset", loc)?,
        };
        let source = ctx.source(own_source.map_or_else(|| stem.clone(), str::to_string));
        let references = opt_references(obj, loc)?;
        let id = ids.id(&ctx, opt_id(obj, loc)?, n, loc)?;
        Ok(Example {
            id,
            source,
            subtask,
            messages,
            references,
        })
    })
}

/// Remove one trailing `<|endoftext|>` (trailing whitespace after it is dropped too).
pub fn strip_endoftext(completion: &str) -> &str {
    completion
        .trim_end()
        .strip_suffix(ENDOFTEXT)
        .unwrap_or(completion)
}

fn read_prompt_completion_impl(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
    default_source: String,
) -> Result<Vec<Example>> {
    let ctx = Ctx::new(path, opts);
    let mut ids = IdCheck::new();
    read_objects(path, &ctx, Records::Lines, report, |n, obj, loc| {
        let prompt = req_str(obj, "prompt", loc)?;
        let completion = strip_endoftext(req_str(obj, "completion", loc)?);
        let subtask = opt_str(obj, "subtask", loc)?.unwrap_or("").to_string();
        let references = opt_references(obj, loc)?;
        let id = ids.id(&ctx, opt_id(obj, loc)?, n, loc)?;
        Ok(user_assistant(
            id,
            ctx.source(default_source.clone()),
            subtask,
            prompt,
            completion,
            references,
        ))
    })
}

/// Read prompt/completion JSONL (see [`Format::PromptCompletion`]).
///
/// The assistant turn is the completion with one trailing `<|endoftext|>` removed
/// (the T0 files end every completion with it); nothing else is trimmed.
pub fn read_prompt_completion_jsonl(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    read_prompt_completion_impl(path, opts, report, file_stem(path))
}

/// Read T0 prompt/completion JSONL: [`read_prompt_completion_jsonl`] with source `t0/<file stem>`.
pub fn read_t0_jsonl(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    read_prompt_completion_impl(path, opts, report, format!("t0/{}", file_stem(path)))
}

/// Parse a whole JSON file that must be a list of objects.
fn read_json_list(path: &Path, ctx: &Ctx) -> Result<Vec<Value>> {
    let text = read_utf8(path, &ctx.rel)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        IngestError::at_line(
            &ctx.rel,
            e.line() as u64,
            None,
            format!("malformed JSON: {e}"),
        )
    })?;
    match value {
        Value::Array(items) => Ok(items),
        other => Err(IngestError::file(
            &ctx.rel,
            format!(
                "expected a JSON list of objects, found {}",
                type_name(&other)
            ),
        )),
    }
}

/// Read an Alpaca-style JSON list (see [`Format::Alpaca`]). Ids use the 1-based list position.
pub fn read_alpaca_json(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let ctx = Ctx::new(path, opts);
    let stem = file_stem(path);
    read_objects(path, &ctx, Records::List, report, |n, obj, loc| {
        let instruction = req_str(obj, "instruction", loc)?;
        let input = opt_str(obj, "input", loc)?.unwrap_or("");
        let output = req_str(obj, "output", loc)?;
        let subtask = opt_str(obj, "subtask", loc)?.unwrap_or("").to_string();
        let user = if input.is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{input}")
        };
        Ok(user_assistant(
            ctx.id(n),
            ctx.source(stem.clone()),
            subtask,
            user,
            output,
            Vec::new(),
        ))
    })
}

/// Read an AlpacaEval `*.model_outputs.json` file (see [`Format::AlpacaEval`]).
///
/// `generator` and `dataset` must be strings when present; they are not kept.
pub fn read_alpaca_eval_json(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let ctx = Ctx::new(path, opts);
    let stem = file_stem(path);
    let name = stem.strip_suffix(".model_outputs").unwrap_or(&stem);
    let source = ctx.source(format!("alpaca_eval/{name}"));
    read_objects(path, &ctx, Records::List, report, |n, obj, loc| {
        let instruction = req_str(obj, "instruction", loc)?;
        let output = req_str(obj, "output", loc)?;
        opt_str(obj, "generator", loc)?;
        opt_str(obj, "dataset", loc)?;
        Ok(user_assistant(
            ctx.id(n),
            source.clone(),
            String::new(),
            instruction,
            output,
            Vec::new(),
        ))
    })
}

/// Replace every literal two-character `\n` escape with a real newline. Other
/// backslashes are left as they are (the FLAN CoT files escape only newlines).
pub fn unescape_flan(field: &str) -> String {
    field.replace("\\n", "\n")
}

/// The assistant turn built from a FLAN CoT rationale and answer:
/// `"{rationale} So the answer is {answer}."`, FLAN's own CoT target template
/// `"{chain_of_thought} So the answer is {answer}."` (flan/v2/templates.py). No
/// period is added when the answer already ends with one; with an empty rationale
/// the text starts at `So the answer is`.
pub fn flan_cot_target(rationale: &str, answer: &str) -> String {
    let rationale = rationale.trim();
    let answer = answer.trim();
    let end = if answer.ends_with('.') { "" } else { "." };
    if rationale.is_empty() {
        format!("So the answer is {answer}{end}")
    } else {
        format!("{rationale} So the answer is {answer}{end}")
    }
}

/// Read a FLAN v2 CoT TSV file: three tab-separated fields per line (question,
/// answer, rationale), no header, literal `\n` escapes turned into newlines.
///
/// user = the question as is (FLAN wraps it in one of ~10 randomly chosen input
/// templates; the bare question is used here so the example is deterministic);
/// assistant = [`flan_cot_target`]`(rationale, answer)`.
/// Source: `flan_v2_cot/<file stem without _train>`.
pub fn read_flan_cot_tsv(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let ctx = Ctx::new(path, opts);
    let bytes = read_bytes(path, &ctx.rel)?;
    let stem = file_stem(path);
    let task = stem.strip_suffix("_train").unwrap_or(&stem);
    let source = ctx.source(format!("flan_v2_cot/{task}"));
    let mut out = Vec::new();
    let lines = text_lines(&bytes, &ctx)?;
    for &(n, text) in &lines {
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() != 3 {
            return Err(ctx.line_err(
                n,
                None,
                format!(
                    "expected 3 tab-separated fields (question, answer, rationale), found {}",
                    fields.len()
                ),
            ));
        }
        let question = unescape_flan(fields[0]);
        let answer = unescape_flan(fields[1]);
        let rationale = unescape_flan(fields[2]);
        let assistant = if answer.trim().is_empty() {
            String::new()
        } else {
            flan_cot_target(&rationale, &answer)
        };
        push_example(
            &mut out,
            report,
            user_assistant(
                ctx.id(n),
                source.clone(),
                String::new(),
                question,
                assistant,
                Vec::new(),
            ),
        );
    }
    finish(report, &ctx, lines.len() as u64, out)
}

/// Tell the format of a file from its extension and, for `.jsonl` / `.json`, its first record.
///
/// `.tsv` → FLAN CoT; `.parquet` → Parquet; `.jsonl` → messages when the first
/// non-blank line has `"messages"`, prompt/completion when it has `"prompt"`;
/// `.json` → AlpacaEval when the name ends in `.model_outputs.json` or the first
/// element has `"generator"`, else Alpaca when it has `"instruction"`.
pub fn detect_format(path: &Path, opts: &ReadOptions) -> Result<Format> {
    let rel = display_path(path, opts.root.as_deref());
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "tsv" => Ok(Format::FlanCot),
        "parquet" => Ok(Format::Parquet),
        "jsonl" => {
            let ctx = Ctx::new(path, opts);
            let bytes = read_bytes(path, &rel)?;
            let first = bytes
                .split(|&b| b == b'\n')
                .enumerate()
                .find(|(_, l)| !l.iter().all(u8::is_ascii_whitespace));
            let Some((i, line)) = first else {
                return Err(IngestError::file(rel, "empty file: cannot tell its format"));
            };
            let n = i as u64 + 1;
            let text = std::str::from_utf8(line)
                .map_err(|_| IngestError::at_line(&rel, n, None, "invalid UTF-8"))?;
            let value = parse_json_line(text, Loc::Line(&ctx, n))?;
            match value.as_object() {
                Some(o) if o.contains_key("messages") => Ok(Format::Messages),
                Some(o) if o.contains_key("prompt") => Ok(Format::PromptCompletion),
                _ => Err(IngestError::at_line(
                    rel,
                    n,
                    None,
                    "cannot tell the format: expected an object with \"messages\" or \"prompt\"",
                )),
            }
        }
        "json" => {
            if path
                .file_name()
                .is_some_and(|f| f.to_string_lossy().ends_with(".model_outputs.json"))
            {
                return Ok(Format::AlpacaEval);
            }
            let ctx = Ctx::new(path, opts);
            let items = read_json_list(path, &ctx)?;
            match items.first().and_then(Value::as_object) {
                Some(o) if o.contains_key("generator") && o.contains_key("instruction") => {
                    Ok(Format::AlpacaEval)
                }
                Some(o) if o.contains_key("instruction") => Ok(Format::Alpaca),
                _ => Err(IngestError::file(
                    rel,
                    "cannot tell the format: expected a JSON list of objects with \"instruction\"",
                )),
            }
        }
        _ => Err(IngestError::file(
            rel,
            format!(
                "unsupported file extension \"{ext}\": expected .jsonl, .json, .tsv or .parquet"
            ),
        )),
    }
}

/// Read one file in `format` (detected with [`detect_format`] when `None`).
pub fn read_file(
    path: &Path,
    format: Option<Format>,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path, opts)?,
    };
    match format {
        Format::Messages => read_messages_jsonl(path, opts, report),
        Format::PromptCompletion => read_prompt_completion_jsonl(path, opts, report),
        Format::T0 => read_t0_jsonl(path, opts, report),
        Format::Alpaca => read_alpaca_json(path, opts, report),
        Format::AlpacaEval => read_alpaca_eval_json(path, opts, report),
        Format::FlanCot => read_flan_cot_tsv(path, opts, report),
        Format::Parquet => crate::parquet_io::read_examples_parquet_counted(path, opts, report),
    }
}

/// The files [`read_dir`] reads from `dir`, in sorted file-name order: regular files
/// (not hidden) whose extension is that of `format`, or any supported extension
/// when `format` is `None`. Other files (LICENSE, README, ...) are ignored.
pub fn list_dir(dir: &Path, format: Option<Format>, opts: &ReadOptions) -> Result<Vec<PathBuf>> {
    let rel = display_path(dir, opts.root.as_deref());
    let entries = std::fs::read_dir(dir)
        .map_err(|e| IngestError::file(&rel, format!("cannot list directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| IngestError::file(&rel, format!("cannot list directory: {e}")))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let wanted = match format {
            Some(f) => ext == f.extension(),
            None => matches!(ext.as_str(), "jsonl" | "json" | "tsv" | "parquet"),
        };
        if wanted {
            files.push(path);
        } else {
            tracing::debug!(file = %path.display(), "ignoring file with unsupported extension");
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(IngestError::file(
            rel,
            match format {
                Some(f) => format!("no .{} files in this directory", f.extension()),
                None => "no .jsonl, .json, .tsv or .parquet files in this directory".to_string(),
            },
        ));
    }
    Ok(files)
}

/// Read every supported file of a directory (see [`list_dir`]) in sorted file order,
/// each in `format` or its detected format.
pub fn read_dir(
    dir: &Path,
    format: Option<Format>,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for file in list_dir(dir, format, opts)? {
        out.extend(read_file(&file, format, opts, report)?);
    }
    Ok(out)
}

/// Read a file or, when `path` is a directory, every supported file in it.
pub fn read_path(
    path: &Path,
    format: Option<Format>,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    if path.is_dir() {
        read_dir(path, format, opts, report)
    } else {
        read_file(path, format, opts, report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_paths() {
        let root = Path::new("/data");
        assert_eq!(
            display_path(Path::new("/data/pools/a.tsv"), Some(root)),
            "pools/a.tsv"
        );
        assert_eq!(
            display_path(Path::new("/elsewhere/a.tsv"), Some(root)),
            "/elsewhere/a.tsv"
        );
        assert_eq!(display_path(Path::new("rel/a.tsv"), None), "rel/a.tsv");
    }

    #[test]
    fn flan_target_template() {
        assert_eq!(
            flan_cot_target("Because.", "7"),
            "Because. So the answer is 7."
        );
        assert_eq!(flan_cot_target("", "yes"), "So the answer is yes.");
        assert_eq!(flan_cot_target("R", "It is."), "R So the answer is It is.");
    }
}
