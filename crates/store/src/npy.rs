//! NumPy `.npy` files (format 1.0 / 2.0, little endian, C order): a
//! streaming writer, a one-shot writer, and a memory-mapped reader.
//!
//! Files written here open with `numpy.load(path, mmap_mode="r")`. The
//! header is padded so data starts at a multiple of 64 bytes, which keeps
//! the memory-mapped data aligned for every element type.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use crate::fsutil::TempFile;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers are padded so the data offset is a multiple of this.
const ALIGN: usize = 64;

/// Element type of an `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `u8` (`|u1`).
    U8,
    /// `u16` (`<u2`).
    U16,
    /// `u32` (`<u4`).
    U32,
    /// `u64` (`<u8`).
    U64,
    /// `i8` (`|i1`).
    I8,
    /// `i16` (`<i2`).
    I16,
    /// `i32` (`<i4`).
    I32,
    /// `i64` (`<i8`).
    I64,
    /// IEEE half precision (`<f2`).
    F16,
    /// `f32` (`<f4`).
    F32,
    /// `f64` (`<f8`).
    F64,
}

impl DType {
    /// NumPy `descr` string as written by this crate (`<f4`, `|u1`, …).
    pub fn descr(self) -> &'static str {
        match self {
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::U32 => "<u4",
            DType::U64 => "<u8",
            DType::I8 => "|i1",
            DType::I16 => "<i2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::F16 => "<f2",
            DType::F32 => "<f4",
            DType::F64 => "<f8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// Parses a NumPy `descr`; `Err` says why it is unsupported.
    fn parse(descr: &str) -> std::result::Result<Self, String> {
        let (order, code) = match descr.chars().next() {
            Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
            _ => ('=', descr),
        };
        let dt = match code {
            "u1" => DType::U8,
            "u2" => DType::U16,
            "u4" => DType::U32,
            "u8" => DType::U64,
            "i1" => DType::I8,
            "i2" => DType::I16,
            "i4" => DType::I32,
            "i8" => DType::I64,
            "f2" => DType::F16,
            "f4" => DType::F32,
            "f8" => DType::F64,
            _ => return Err(format!("unsupported dtype {descr:?}")),
        };
        if order == '>' && dt.size() > 1 {
            return Err(format!("big-endian dtype {descr:?} is not supported"));
        }
        if order == '=' && cfg!(target_endian = "big") && dt.size() > 1 {
            return Err(format!("native-order dtype {descr:?} on a big-endian host"));
        }
        Ok(dt)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.descr())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A plain numeric type that can be stored in `.npy` files. Sealed: every
/// bit pattern of an implementor is a valid value, which the memory-mapped
/// reader relies on.
pub trait NpyElement: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// Appends the little-endian bytes of `data` to `out`.
    fn extend_le_bytes(data: &[Self], out: &mut Vec<u8>);
}

macro_rules! npy_element {
    ($($t:ty => $d:expr),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl NpyElement for $t {
            const DTYPE: DType = $d;
            fn extend_le_bytes(data: &[Self], out: &mut Vec<u8>) {
                out.reserve(std::mem::size_of_val(data));
                for x in data {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    )*};
}

npy_element!(
    u8 => DType::U8,
    u16 => DType::U16,
    u32 => DType::U32,
    u64 => DType::U64,
    i8 => DType::I8,
    i16 => DType::I16,
    i32 => DType::I32,
    i64 => DType::I64,
    half::f16 => DType::F16,
    f32 => DType::F32,
    f64 => DType::F64,
);

/// Raw bytes of `data` in little-endian order: borrowed on little-endian
/// hosts, converted otherwise.
fn le_bytes<T: NpyElement>(data: &[T]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: `T` is one of the sealed primitive numeric types above:
        // no padding, every byte initialised; u8 has alignment 1.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let mut v = Vec::new();
        T::extend_le_bytes(data, &mut v);
        std::borrow::Cow::Owned(v)
    }
}

fn shape_literal(shape: &[usize]) -> String {
    match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn header_dict(dtype: DType, shape_lit: &str) -> String {
    format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_lit}, }}",
        dtype.descr()
    )
}

/// Full header bytes (magic … newline) for `dict`, padded with spaces to a
/// multiple of 64, and at least `min_total` bytes long.
fn encode_header(dict: &str, min_total: usize) -> Vec<u8> {
    // dict + at least one '\n'.
    let body = dict.len() + 1;
    let (major, pre) = if round_up(10 + body, ALIGN).max(min_total) - 10 <= u16::MAX as usize {
        (1u8, 10usize)
    } else {
        (2u8, 12usize)
    };
    let total = round_up(pre + body, ALIGN).max(min_total);
    let header_len = total - pre;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.push(major);
    out.push(0);
    if major == 1 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

fn checked_product(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Writes a whole array to `path` atomically (temp file + rename).
/// `shape` must multiply to `data.len()`.
pub fn write_npy<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    write_npy_hashed(path.as_ref(), shape, data).map(drop)
}

/// [`write_npy`], returning the blake3 and size of the bytes written.
pub(crate) fn write_npy_hashed<T: NpyElement>(
    path: &Path,
    shape: &[usize],
    data: &[T],
) -> Result<(blake3::Hash, u64)> {
    let n = checked_product(shape)
        .with_context(|| format!("{}: shape {shape:?} overflows", path.display()))?;
    if n != data.len() {
        bail!(
            "{}: shape {shape:?} holds {n} elements but {} were given",
            path.display(),
            data.len()
        );
    }
    let header = encode_header(&header_dict(T::DTYPE, &shape_literal(shape)), 0);
    let body = le_bytes(data);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header);
    hasher.update(&body);
    let mut tmp = TempFile::create(path)?;
    let tmp_path = tmp.tmp_path().to_path_buf();
    let mut w = BufWriter::with_capacity(1 << 20, tmp.file());
    w.write_all(&header)
        .and_then(|_| w.write_all(&body))
        .and_then(|_| w.flush())
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    drop(w);
    tmp.persist()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((hasher.finalize(), hasher.count()))
}

/// Streaming `.npy` writer: rows are appended with [`NpyWriter::write`]
/// and the leading dimension is filled in by [`NpyWriter::finish`]. Header
/// space for the largest possible leading dimension is reserved up front,
/// so the patch never moves the data. The file is written under a temporary
/// name and renamed into place by `finish`; dropping the writer unfinished
/// leaves nothing at `path`.
pub struct NpyWriter<T: NpyElement> {
    writer: BufWriter<File>,
    tmp: TempFile,
    path: PathBuf,
    shape_tail: Vec<usize>,
    row_len: usize,
    header_len: usize,
    elements: u64,
    _marker: std::marker::PhantomData<T>,
}

impl<T: NpyElement> NpyWriter<T> {
    /// Starts an array of shape `[?, shape_tail…]` at `path` (the parent
    /// folder must exist).
    pub fn create(path: impl AsRef<Path>, shape_tail: &[usize]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let row_len = checked_product(shape_tail)
            .with_context(|| format!("{}: shape {shape_tail:?} overflows", path.display()))?;
        let header_len = Self::reserved_header(shape_tail).len();
        let mut tmp = TempFile::create(&path)?;
        let file = tmp
            .file()
            .try_clone()
            .with_context(|| format!("opening {}", tmp.tmp_path().display()))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        // Placeholder header (overwritten by `finish`).
        writer
            .write_all(&vec![b' '; header_len])
            .with_context(|| format!("writing {}", tmp.tmp_path().display()))?;
        Ok(Self {
            writer,
            tmp,
            path,
            shape_tail: shape_tail.to_vec(),
            row_len,
            header_len,
            elements: 0,
            _marker: std::marker::PhantomData,
        })
    }

    fn header_for(leading: &str, shape_tail: &[usize], min_total: usize) -> Vec<u8> {
        let mut dims: Vec<String> = vec![leading.to_string()];
        dims.extend(shape_tail.iter().map(|d| d.to_string()));
        let lit = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        encode_header(&header_dict(T::DTYPE, &lit), min_total)
    }

    fn reserved_header(shape_tail: &[usize]) -> Vec<u8> {
        // Room for the widest leading dimension (u64::MAX has 20 digits).
        Self::header_for(&u64::MAX.to_string(), shape_tail, 0)
    }

    /// Appends elements (any number; the total must be a whole number of
    /// rows at `finish`).
    pub fn write(&mut self, data: &[T]) -> Result<()> {
        self.writer
            .write_all(&le_bytes(data))
            .with_context(|| format!("writing {}", self.tmp.tmp_path().display()))?;
        self.elements += data.len() as u64;
        Ok(())
    }

    /// Elements written so far.
    pub fn elements(&self) -> u64 {
        self.elements
    }

    /// Completes the file: patches the leading dimension into the header,
    /// fsyncs and renames it into place. Returns the final shape.
    pub fn finish(mut self) -> Result<Vec<usize>> {
        let leading = if self.row_len == 0 {
            if self.elements != 0 {
                bail!(
                    "{}: {} elements written but rows of shape {:?} hold none",
                    self.path.display(),
                    self.elements,
                    self.shape_tail
                );
            }
            0
        } else {
            if !self.elements.is_multiple_of(self.row_len as u64) {
                bail!(
                    "{}: {} elements written, not a whole number of rows of shape {:?} ({} elements each)",
                    self.path.display(),
                    self.elements,
                    self.shape_tail,
                    self.row_len
                );
            }
            usize::try_from(self.elements / self.row_len as u64).with_context(|| {
                format!("{}: leading dimension overflows usize", self.path.display())
            })?
        };
        let header = Self::header_for(&leading.to_string(), &self.shape_tail, self.header_len);
        if header.len() != self.header_len {
            bail!(
                "{}: internal error: header grew from {} to {} bytes",
                self.path.display(),
                self.header_len,
                header.len()
            );
        }
        let tmp_path = self.tmp.tmp_path().to_path_buf();
        self.writer
            .flush()
            .and_then(|_| self.writer.seek(SeekFrom::Start(0)))
            .and_then(|_| self.writer.write_all(&header))
            .and_then(|_| self.writer.flush())
            .with_context(|| format!("writing {}", tmp_path.display()))?;
        self.tmp
            .persist()
            .with_context(|| format!("writing {}", self.path.display()))?;
        let mut shape = vec![leading];
        shape.extend_from_slice(&self.shape_tail);
        Ok(shape)
    }
}

/// A memory-mapped `.npy` array.
pub struct NpyArray {
    path: PathBuf,
    mmap: Mmap,
    shape: Vec<usize>,
    dtype: DType,
    offset: usize,
    len: usize,
}

impl fmt::Debug for NpyArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NpyArray")
            .field("path", &self.path)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl NpyArray {
    /// Opens and memory-maps an `.npy` file, parsing its header. Errors name
    /// the file. Fortran-ordered arrays of more than one dimension are
    /// rejected.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only; artifact files are immutable once
        // committed (the store never rewrites them in place).
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let header = parse_header(&mmap)
            .with_context(|| format!("{}: invalid .npy header", path.display()))?;
        if header.fortran_order && header.shape.len() > 1 {
            bail!(
                "{}: Fortran-ordered arrays are not supported (shape {:?})",
                path.display(),
                header.shape
            );
        }
        let len = checked_product(&header.shape)
            .with_context(|| format!("{}: shape {:?} overflows", path.display(), header.shape))?;
        let need = len
            .checked_mul(header.dtype.size())
            .and_then(|b| b.checked_add(header.offset))
            .with_context(|| format!("{}: shape {:?} overflows", path.display(), header.shape))?;
        if mmap.len() != need {
            bail!(
                "{}: file has {} bytes but header (shape {:?}, dtype {}) needs {need}",
                path.display(),
                mmap.len(),
                header.shape,
                header.dtype
            );
        }
        Ok(Self {
            path,
            mmap,
            shape: header.shape,
            dtype: header.dtype,
            offset: header.offset,
            len,
        })
    }

    /// Array shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw little-endian data bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.mmap[self.offset..]
    }

    /// The data as a slice of `T`, checking that `T` matches the dtype and
    /// that the data is aligned for `T`.
    pub fn as_slice<T: NpyElement>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            bail!(
                "{}: array has dtype {}, requested {}",
                self.path.display(),
                self.dtype,
                T::DTYPE
            );
        }
        if cfg!(target_endian = "big") && self.dtype.size() > 1 {
            bail!(
                "{}: little-endian data cannot be viewed in place on a big-endian host",
                self.path.display()
            );
        }
        let bytes = self.as_bytes();
        if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
            bail!(
                "{}: data at offset {} is not aligned for {}",
                self.path.display(),
                self.offset,
                self.dtype
            );
        }
        // SAFETY: dtype matches `T` (a sealed plain numeric type valid for
        // every bit pattern), the pointer is aligned (checked above), and
        // `open` checked that the mapping holds exactly `len` elements.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), self.len) })
    }

    /// Copies the data out as a `Vec<T>`.
    pub fn to_vec<T: NpyElement>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }
}

/// Reads a whole `.npy` file into memory: `(shape, data)`.
pub fn read_npy<T: NpyElement>(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<T>)> {
    let a = NpyArray::open(path)?;
    let data = a.to_vec::<T>()?;
    Ok((a.shape.clone(), data))
}

#[derive(Debug)]
struct Header {
    dtype: DType,
    fortran_order: bool,
    shape: Vec<usize>,
    offset: usize,
}

fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("missing magic string \\x93NUMPY");
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, pre): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("file too short for a version {major}.{minor} header");
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => bail!("unsupported format version {major}.{minor}"),
    };
    let end = pre
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .with_context(|| format!("header length {len} runs past the end of the file"))?;
    let text = std::str::from_utf8(&bytes[pre..end]).context("header is not UTF-8/ASCII")?;
    let dict = PyParser::new(text).dict()?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (k, v) in dict {
        match (k.as_str(), v) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            ("descr" | "fortran_order" | "shape", v) => {
                bail!("field {k:?} has an unexpected value {v:?}")
            }
            _ => bail!("unexpected field {k:?}"),
        }
    }
    let descr = descr.context("field 'descr' is missing")?;
    let dtype = DType::parse(&descr).map_err(|e| anyhow::anyhow!("field 'descr': {e}"))?;
    Ok(Header {
        dtype,
        fortran_order: fortran.context("field 'fortran_order' is missing")?,
        shape: shape.context("field 'shape' is missing")?,
        offset: end,
    })
}

#[derive(Debug)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parser for the Python dict literal of an `.npy` header.
struct PyParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> PyParser<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            s: s.as_bytes(),
            pos: 0,
        }
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.pos += 1;
                Ok(())
            }
            other => bail!(
                "expected {:?} at byte {}, found {:?}",
                c as char,
                self.pos,
                other.map(|b| b as char)
            ),
        }
    }

    fn dict(&mut self) -> Result<Vec<(String, PyValue)>> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        loop {
            if self.peek() == Some(b'}') {
                self.pos += 1;
                break;
            }
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.value()?;
            out.push((key, value));
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {}
                other => bail!(
                    "expected ',' or '}}' at byte {}, found {:?}",
                    self.pos,
                    other.map(|b| b as char)
                ),
            }
        }
        if self.peek().is_some() {
            bail!("unexpected text after the header dict at byte {}", self.pos);
        }
        Ok(out)
    }

    fn string(&mut self) -> Result<String> {
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            other => bail!(
                "expected a string at byte {}, found {:?}",
                self.pos,
                other.map(|b| b as char)
            ),
        };
        self.pos += 1;
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos] != q {
            if self.s[self.pos] == b'\\' {
                bail!(
                    "escapes in header strings are not supported (byte {})",
                    self.pos
                );
            }
            self.pos += 1;
        }
        if self.pos >= self.s.len() {
            bail!("unterminated string starting at byte {start}");
        }
        let out = String::from_utf8_lossy(&self.s[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(out)
    }

    fn value(&mut self) -> Result<PyValue> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(PyValue::Str(self.string()?)),
            Some(b'(') => {
                self.pos += 1;
                let mut dims = Vec::new();
                loop {
                    match self.peek() {
                        Some(b')') => {
                            self.pos += 1;
                            break;
                        }
                        Some(c) if c.is_ascii_digit() => {
                            dims.push(self.int()?);
                            match self.peek() {
                                Some(b',') => self.pos += 1,
                                Some(b')') => {}
                                other => bail!(
                                    "expected ',' or ')' in shape at byte {}, found {:?}",
                                    self.pos,
                                    other.map(|b| b as char)
                                ),
                            }
                        }
                        other => bail!(
                            "expected a dimension at byte {}, found {:?}",
                            self.pos,
                            other.map(|b| b as char)
                        ),
                    }
                }
                Ok(PyValue::Tuple(dims))
            }
            _ => {
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphabetic() {
                    self.pos += 1;
                }
                match &self.s[start..self.pos] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    other => bail!(
                        "unexpected value {:?} at byte {start}",
                        String::from_utf8_lossy(other)
                    ),
                }
            }
        }
    }

    fn int(&mut self) -> Result<usize> {
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or_default();
        let v = text
            .parse::<usize>()
            .with_context(|| format!("dimension {text:?} at byte {start} is out of range"))?;
        // Python 2 era files may write long integers as `3L`.
        if self.s.get(self.pos) == Some(&b'L') {
            self.pos += 1;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = encode_header(&header_dict(DType::F32, &shape_literal(&[3, 4])), 0);
        assert_eq!(h.len() % 64, 0);
        let parsed = parse_header(&h).unwrap();
        assert_eq!(parsed.shape, vec![3, 4]);
        assert_eq!(parsed.dtype, DType::F32);
        assert!(!parsed.fortran_order);
        assert_eq!(parsed.offset, h.len());
    }

    #[test]
    fn parses_numpy_variants() {
        for (text, shape) in [
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
                vec![],
            ),
            (
                "{\"descr\":\"<i8\",\"fortran_order\":True,\"shape\":(5,)}",
                vec![5],
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (2L, 3L), }",
                vec![2, 3],
            ),
        ] {
            let d = PyParser::new(text).dict().unwrap();
            let shape_v = d.into_iter().find(|(k, _)| k == "shape").unwrap().1;
            match shape_v {
                PyValue::Tuple(t) => assert_eq!(t, shape),
                other => panic!("{other:?}"),
            }
        }
        assert!(PyParser::new("{'descr': '<i8'").dict().is_err());
        assert!(PyParser::new("{'shape': (2, x)}").dict().is_err());
        assert!(DType::parse(">f4").is_err());
        assert_eq!(DType::parse(">u1"), Ok(DType::U8));
        assert!(DType::parse("<c8").is_err());
    }
}
