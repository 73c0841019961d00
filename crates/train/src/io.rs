//! Atomic file writes and safetensors helpers.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};

/// Writes `bytes` to `path` atomically, creating its folder first; see
/// [`dsel_store::atomic_write`].
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dsel_store_parent(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    dsel_store::atomic_write(path, bytes)
}

fn dsel_store_parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Serialises named tensors (any layout, any device) and string metadata to a
/// safetensors byte buffer.
pub(crate) fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    // `View::data` of candle tensors copies through a contiguous CPU buffer; make
    // the tensors contiguous first so that copy cannot fail inside candle.
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        owned.push((name.clone(), t.contiguous()?));
    }
    let bytes = safetensors::serialize(owned, Some(metadata))
        .map_err(|e| anyhow!("serialising safetensors: {e}"))?;
    sort_header(bytes)
}

/// Rewrites the JSON header of a safetensors buffer with every object key
/// sorted by its UTF-8 bytes, recursively ([`dsel_store::canonical_json`]),
/// padded with spaces to a multiple of 8 bytes as `safetensors` pads it. The
/// crate writes its `__metadata__` from a `HashMap`, whose order changes from
/// one write to the next; sorted, the same state always gives the same bytes.
/// The tensor data (ordered by dtype, then name) is unchanged.
pub(crate) fn sort_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| anyhow!("safetensors buffer shorter than its header length"))?;
    let end = 8usize
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| anyhow!("safetensors header length {len} exceeds the buffer"))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| anyhow!("safetensors header is not JSON: {e}"))?;
    let mut text = dsel_store::canonical_json(&header).into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - end);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[end..]);
    Ok(out)
}

/// Reads a safetensors file: its tensors (on `device`) and its metadata.
pub(crate) fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("{}: reading tensors", path.display()))?;
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| dsel_store::temp_file_target(&e.file_name().to_string_lossy()).is_some())
            .collect();
        assert!(leftovers.is_empty());
    }
}
