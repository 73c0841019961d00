//! Parquet I/O of the canonical example table.
//!
//! Columns: `id` utf8, `source` utf8, `subtask` utf8,
//! `messages` list<struct<role utf8, content utf8>>, `references` list<utf8>.
//! Written zstd-compressed with the `parquet` crate's `ArrowWriter`, to a temporary
//! file in the target directory that is then renamed into place
//! ([`dsel_store::atomic_write_with`]). The reader also
//! accepts user-supplied files with these columns: `references` and `subtask` may
//! be absent, `source` too (then the file stem is used), and utf8 may be large-utf8.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{IngestError, IngestReport, Result};
use crate::readers::{display_path, ReadOptions};
use crate::{Example, Message};

fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ])
}

/// The Arrow schema of the canonical example table.
pub fn examples_schema() -> SchemaRef {
    let msg_item = Field::new("item", DataType::Struct(message_fields()), false);
    let ref_item = Field::new("item", DataType::Utf8, false);
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("subtask", DataType::Utf8, false),
        Field::new("messages", DataType::List(Arc::new(msg_item)), false),
        Field::new("references", DataType::List(Arc::new(ref_item)), false),
    ]))
}

/// Build one Arrow record batch of `examples` in the canonical schema.
pub fn examples_to_batch(examples: &[Example]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = examples_schema();
    let ids = StringArray::from_iter_values(examples.iter().map(|e| e.id.as_str()));
    let sources = StringArray::from_iter_values(examples.iter().map(|e| e.source.as_str()));
    let subtasks = StringArray::from_iter_values(examples.iter().map(|e| e.subtask.as_str()));

    let roles = StringArray::from_iter_values(
        examples
            .iter()
            .flat_map(|e| e.messages.iter().map(|m| m.role.as_str())),
    );
    let contents = StringArray::from_iter_values(
        examples
            .iter()
            .flat_map(|e| e.messages.iter().map(|m| m.content.as_str())),
    );
    let structs = StructArray::try_new(
        message_fields(),
        vec![Arc::new(roles) as ArrayRef, Arc::new(contents)],
        None,
    )?;
    let msg_item = Arc::new(Field::new(
        "item",
        DataType::Struct(message_fields()),
        false,
    ));
    let messages = ListArray::try_new(
        msg_item,
        OffsetBuffer::from_lengths(examples.iter().map(|e| e.messages.len())),
        Arc::new(structs),
        None,
    )?;

    let refs = StringArray::from_iter_values(
        examples
            .iter()
            .flat_map(|e| e.references.iter().map(String::as_str)),
    );
    let ref_item = Arc::new(Field::new("item", DataType::Utf8, false));
    let references = ListArray::try_new(
        ref_item,
        OffsetBuffer::from_lengths(examples.iter().map(|e| e.references.len())),
        Arc::new(refs),
        None,
    )?;
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(ids),
            Arc::new(sources),
            Arc::new(subtasks),
            Arc::new(messages),
            Arc::new(references),
        ],
    )
}

/// Write `examples` to `path` as zstd-compressed Parquet (temp file + rename).
pub fn write_examples_parquet(path: &Path, examples: &[Example]) -> Result<()> {
    let shown = path.display().to_string();
    let werr =
        |e: &dyn std::fmt::Display| IngestError::file(&shown, format!("cannot write Parquet: {e}"));
    dsel_store::atomic_write_with(path, |file| {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut writer = ArrowWriter::try_new(file, examples_schema(), Some(props))?;
        // Write in chunks so one row group never holds the whole pool in memory twice.
        for chunk in examples.chunks(16_384) {
            writer.write(&examples_to_batch(chunk)?)?;
        }
        writer.close()?;
        Ok(())
    })
    .map_err(|e| werr(&format!("{e:#}")))
}

/// Read a canonical Parquet example table (ids are kept as stored).
pub fn read_examples_parquet(path: &Path) -> Result<Vec<Example>> {
    let mut report = IngestReport::default();
    read_examples_parquet_counted(path, &ReadOptions::default(), &mut report)
}

fn string_values<'a>(
    col: &'a dyn Array,
    rel: &str,
    field: &str,
) -> Result<Box<dyn Fn(usize) -> Option<&'a str> + 'a>> {
    if let Some(a) = col.as_string_opt::<i32>() {
        Ok(Box::new(
            move |i| if a.is_null(i) { None } else { Some(a.value(i)) },
        ))
    } else if let Some(a) = col.as_string_opt::<i64>() {
        Ok(Box::new(
            move |i| if a.is_null(i) { None } else { Some(a.value(i)) },
        ))
    } else {
        Err(IngestError {
            path: rel.into(),
            position: None,
            field: Some(field.into()),
            message: format!("expected utf8, found {}", col.data_type()),
        })
    }
}

/// Read a Parquet example table, counting into `report` (used by the format dispatcher).
///
/// A row with an empty prompt or completion is skipped and counted like in the
/// other readers; a null `id`, `role` or `content` is an error naming the row.
pub(crate) fn read_examples_parquet_counted(
    path: &Path,
    opts: &ReadOptions,
    report: &mut IngestReport,
) -> Result<Vec<Example>> {
    let rel = display_path(path, opts.root.as_deref());
    let ferr = |msg: String| IngestError::file(&rel, msg);
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ferr("file not found".into())
        } else {
            ferr(format!("cannot read: {e}"))
        }
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| ferr(format!("not a readable Parquet file: {e}")))?;
    let reader = builder
        .build()
        .map_err(|e| ferr(format!("cannot read Parquet: {e}")))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut row0: u64 = 0;
    let mut read: u64 = 0;
    let missing = |name: &str| IngestError {
        path: rel.clone().into(),
        position: None,
        field: Some(name.into()),
        message: "missing column".into(),
    };
    for batch in reader {
        let batch = batch.map_err(|e| ferr(format!("cannot read Parquet: {e}")))?;
        let col = |name: &str| batch.column_by_name(name);
        let ids = string_values(col("id").ok_or_else(|| missing("id"))?.as_ref(), &rel, "id")?;
        let sources = match col("source") {
            Some(c) => Some(string_values(c.as_ref(), &rel, "source")?),
            None => None,
        };
        let subtasks = match col("subtask") {
            Some(c) => Some(string_values(c.as_ref(), &rel, "subtask")?),
            None => None,
        };
        let messages = col("messages").ok_or_else(|| missing("messages"))?;
        let bad_messages = || IngestError {
            path: rel.clone().into(),
            position: None,
            field: Some("messages".into()),
            message: format!(
                "expected list<struct<role utf8, content utf8>>, found {}",
                messages.data_type()
            ),
        };
        let messages = messages.as_list_opt::<i32>().ok_or_else(bad_messages)?;
        let structs = messages.values().as_struct_opt().ok_or_else(bad_messages)?;
        let roles = string_values(
            structs
                .column_by_name("role")
                .ok_or_else(bad_messages)?
                .as_ref(),
            &rel,
            "messages.role",
        )?;
        let contents = string_values(
            structs
                .column_by_name("content")
                .ok_or_else(bad_messages)?
                .as_ref(),
            &rel,
            "messages.content",
        )?;
        let references = match col("references") {
            None => None,
            Some(c) => {
                let list = c.as_list_opt::<i32>().ok_or_else(|| IngestError {
                    path: rel.clone().into(),
                    position: None,
                    field: Some("references".into()),
                    message: format!("expected list<utf8>, found {}", c.data_type()),
                })?;
                Some((
                    list,
                    string_values(list.values().as_ref(), &rel, "references")?,
                ))
            }
        };
        for i in 0..batch.num_rows() {
            let row = row0 + i as u64 + 1;
            let rerr = |field: &str, msg: &str| IngestError::at_record(&rel, row, Some(field), msg);
            let id = ids(i).ok_or_else(|| rerr("id", "null"))?.to_string();
            let source = match &sources {
                Some(s) => s(i).unwrap_or("").to_string(),
                None => stem.clone(),
            };
            let source = opts.source.clone().unwrap_or(source);
            let subtask = subtasks
                .as_ref()
                .and_then(|s| s(i))
                .unwrap_or("")
                .to_string();
            if messages.is_null(i) {
                return Err(rerr("messages", "null"));
            }
            let offs = messages.value_offsets();
            let (start, end) = (offs[i] as usize, offs[i + 1] as usize);
            let mut msgs = Vec::with_capacity(end - start);
            for j in start..end {
                let role = roles(j).ok_or_else(|| rerr("messages.role", "null"))?;
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(rerr(
                        "messages.role",
                        &format!("unknown role \"{role}\": expected system, user or assistant"),
                    ));
                }
                let content = contents(j).ok_or_else(|| rerr("messages.content", "null"))?;
                msgs.push(Message {
                    role: role.to_string(),
                    content: content.to_string(),
                });
            }
            let mut refs = Vec::new();
            if let Some((list, values)) = &references {
                if !list.is_null(i) {
                    let o = list.value_offsets();
                    for j in o[i] as usize..o[i + 1] as usize {
                        refs.push(
                            values(j)
                                .ok_or_else(|| rerr("references", "null element"))?
                                .to_string(),
                        );
                    }
                }
            }
            let ex = Example {
                id,
                source,
                subtask,
                messages: msgs,
                references: refs,
            };
            match crate::readers::skip_reason(&ex) {
                Some(reason) => report.skip(reason),
                None => out.push(ex),
            }
        }
        read += batch.num_rows() as u64;
        row0 += batch.num_rows() as u64;
    }
    report.count_file(rel.clone(), read, out.len() as u64);
    Ok(out)
}
