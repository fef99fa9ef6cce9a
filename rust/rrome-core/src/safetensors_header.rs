//! Reading, validating and writing safetensors headers.
//!
//! Layout: 8-byte little-endian header length `n`, `n` bytes of JSON, then the data section.
//! Nothing in a header is trusted until [`parse`] has checked it: the length is bounded and
//! inside the file, the JSON is UTF-8 with no duplicate names, every dtype is known, every
//! `dtype × shape` product fits in u64 and equals its byte range, and the ranges tile the data
//! section exactly (start at 0, no gaps, no overlap, end at the end of the file). Shards,
//! statistics files, deltas bundles and undo journals all go through this one parser.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::open_read;

/// Largest header rrome accepts (the reference implementation uses the same bound).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor entry of a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Start of the tensor's bytes, relative to the data section.
    pub begin: u64,
    /// End (exclusive), relative to the data section.
    pub end: u64,
}

impl TensorInfo {
    /// Number of bytes of the tensor.
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
    /// Tensors in the order of their data offsets.
    pub tensors: Vec<TensorInfo>,
    /// `__metadata__`, in file order.
    pub metadata: Vec<(String, String)>,
    /// Indices into `tensors`, sorted by name (a lookup table that stores no second copy of
    /// the names: a header may list hundreds of thousands of tensors).
    by_name: Vec<u32>,
}

impl Header {
    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name
            .binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|k| &self.tensors[self.by_name[k] as usize])
    }

    /// Looks a metadata value up by key.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Absolute file offset of a tensor's first byte.
    pub fn abs_offset(&self, t: &TensorInfo) -> u64 {
        self.data_start + t.begin
    }

    /// Reads and validates the header of the safetensors file at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::Header`] if it is not a valid file.
    pub fn read(path: &Path) -> Result<Header> {
        let mut f = open_read(path)?;
        let file_len = f.metadata().at(path)?.len();
        Header::read_from(&mut f, file_len, path)
    }

    /// Reads and validates a header from an open file of length `file_len`.
    pub fn read_from(f: &mut File, file_len: u64, path: &Path) -> Result<Header> {
        if file_len < 8 {
            return Err(Error::header(
                path,
                format!("file is {file_len} bytes, shorter than the 8-byte header length"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        f.read_exact(&mut len_bytes).at(path)?;
        let n = u64::from_le_bytes(len_bytes);
        if n > MAX_HEADER_LEN {
            return Err(Error::header(path, format!("header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes")));
        }
        if n > file_len - 8 {
            return Err(Error::header(
                path,
                format!("header length {n} runs past the end of the file ({file_len} bytes)"),
            ));
        }
        let mut json = vec![0u8; n as usize];
        f.read_exact(&mut json).at(path)?;
        parse(&json, file_len - 8 - n).map_err(|msg| Error::header(path, msg))
    }
}

/// Validates header JSON bytes for a data section of `data_len` bytes.
///
/// Returns the reason in words on failure (the caller adds the file name). This is the fuzzed
/// entry point: it must never panic, whatever the input. Each entry is checked and reduced to
/// a [`TensorInfo`] as soon as it is read, so memory stays a small multiple of the header's
/// size whatever the number of tensors.
pub fn parse(json: &[u8], data_len: u64) -> std::result::Result<Header, String> {
    let text = std::str::from_utf8(json).map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
    let problem = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = EntriesSeed { problem: &problem }.deserialize(&mut de).and_then(|e| de.end().map(|()| e));
    let Entries { mut tensors, metadata } = match parsed {
        Ok(e) => e,
        Err(e) => return Err(problem.take().unwrap_or_else(|| format!("header is not valid JSON: {e}"))),
    };
    let data_start = 8 + json.len() as u64;
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0u64;
    for t in &tensors {
        if t.begin != expected {
            return Err(if t.begin < expected {
                format!(
                    "tensor {:?} overlaps the previous tensor (starts at {}, previous ends at {expected})",
                    t.name, t.begin
                )
            } else {
                format!("gap in the data section before tensor {:?} (bytes {expected}..{})", t.name, t.begin)
            });
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(format!("tensors cover {expected} bytes but the data section holds {data_len}"));
    }
    let count = u32::try_from(tensors.len()).map_err(|_| "header lists more than 2^32 tensors".to_string())?;
    let mut by_name: Vec<u32> = (0..count).collect();
    by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
    if let Some(w) = by_name.windows(2).find(|w| tensors[w[0] as usize].name == tensors[w[1] as usize].name) {
        return Err(format!("duplicate name {:?}", tensors[w[0] as usize].name));
    }
    Ok(Header { data_start, tensors, metadata, by_name })
}

fn parse_entry(name: &str, value: &Value) -> std::result::Result<TensorInfo, String> {
    let obj = value.as_object().ok_or_else(|| format!("entry {name:?} is not an object"))?;
    for key in obj.keys() {
        if !matches!(key.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(format!("entry {name:?} has an unknown field {key:?}"));
        }
    }
    let tag = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("entry {name:?} has no string field \"dtype\""))?;
    let dtype = Dtype::parse(tag).ok_or_else(|| format!("tensor {name:?} has unknown dtype {tag:?}"))?;
    let shape_v = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("entry {name:?} has no array field \"shape\""))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    let mut numel: u64 = 1;
    for d in shape_v {
        let d = d
            .as_u64()
            .ok_or_else(|| format!("tensor {name:?} has a shape entry that is not a non-negative integer"))?;
        numel = numel.checked_mul(d).ok_or_else(|| format!("tensor {name:?}: shape {shape_v:?} overflows"))?;
        shape.push(usize::try_from(d).map_err(|_| format!("tensor {name:?}: dimension {d} too large"))?);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| format!("entry {name:?} has no field \"data_offsets\" of two integers"))?;
    let begin =
        offs[0].as_u64().ok_or_else(|| format!("tensor {name:?}: data_offsets[0] is not a non-negative integer"))?;
    let end =
        offs[1].as_u64().ok_or_else(|| format!("tensor {name:?}: data_offsets[1] is not a non-negative integer"))?;
    if end < begin {
        return Err(format!("tensor {name:?}: data_offsets end {end} is before begin {begin}"));
    }
    let nbytes =
        numel.checked_mul(dtype.size() as u64).ok_or_else(|| format!("tensor {name:?}: byte size overflows"))?;
    if end - begin != nbytes {
        return Err(format!(
            "tensor {name:?}: {dtype} × {shape:?} needs {nbytes} bytes but data_offsets span {}",
            end - begin
        ));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, shape, begin, end })
}

/// The top-level JSON object, each entry validated as it is read.
struct Entries {
    tensors: Vec<TensorInfo>,
    metadata: Vec<(String, String)>,
}

/// Reads [`Entries`]; a problem with an entry's content (rather than its JSON) is put in
/// `problem`, so that it is reported in its own words, not as a JSON syntax error.
struct EntriesSeed<'a> {
    problem: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Entries;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Entries, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Entries;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
        let fail = |msg: String| -> A::Error {
            *self.problem.borrow_mut() = Some(msg);
            de::Error::custom("invalid entry")
        };
        let mut out = Entries { tensors: Vec::new(), metadata: Vec::new() };
        let mut seen_metadata = false;
        while let Some(name) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            if name == "__metadata__" {
                if std::mem::replace(&mut seen_metadata, true) {
                    return Err(fail("duplicate name \"__metadata__\"".into()));
                }
                let obj = value.as_object().ok_or_else(|| fail("__metadata__ is not an object".into()))?;
                for (k, v) in obj {
                    let s = v.as_str().ok_or_else(|| fail(format!("__metadata__ value of {k:?} is not a string")))?;
                    out.metadata.push((k.clone(), s.to_string()));
                }
            } else {
                out.tensors.push(parse_entry(&name, &value).map_err(fail)?);
            }
        }
        Ok(out)
    }
}

/// A tensor to write: name, dtype, shape and its little-endian bytes.
pub struct TensorData<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes; length must be `numel × dtype.size()`.
    pub data: &'a [u8],
}

/// Serialises a complete safetensors file (header and data) into `w`.
///
/// The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
pub fn write<W: Write>(w: &mut W, tensors: &[TensorData<'_>], metadata: &[(String, String)]) -> std::io::Result<()> {
    let descs: Vec<(&str, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            assert_eq!(numel * t.dtype.size(), t.data.len(), "tensor {} has the wrong byte length", t.name);
            (t.name, t.dtype, t.shape.clone())
        })
        .collect();
    write_header(w, &descs, metadata)?;
    for t in tensors {
        w.write_all(t.data)?;
    }
    Ok(())
}

/// Writes only the length prefix and header for tensors described by (name, dtype, shape), in
/// that order; the caller then streams each tensor's bytes in the same order.
pub fn write_header<W: Write>(
    w: &mut W,
    descs: &[(&str, Dtype, Vec<usize>)],
    metadata: &[(String, String)],
) -> std::io::Result<()> {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        obj.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in descs {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let end = offset + numel * dtype.size() as u64;
        obj.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("header serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    w.write_all(&(json.len() as u64).to_le_bytes())?;
    w.write_all(&json)
}

/// Reads a whole (small) safetensors file: its validated header and its data section.
pub fn read_all(path: &Path) -> Result<(Header, Vec<u8>)> {
    let mut f = open_read(path)?;
    let len = f.metadata().at(path)?.len();
    let header = Header::read_from(&mut f, len, path)?;
    let mut data = alloc_bytes(len - header.data_start, path)?;
    f.read_to_end(&mut data).at(path)?;
    if data.len() as u64 != len - header.data_start {
        return Err(Error::header(path, "file changed while it was read"));
    }
    Ok((header, data))
}

/// An empty buffer with room for `n` bytes, or a one-line error naming `path` when the memory
/// cannot be had (a sparse file may claim any size: an infallible allocation would abort).
pub fn alloc_bytes(n: u64, path: &Path) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    let fits = usize::try_from(n).ok().is_some_and(|n| v.try_reserve_exact(n).is_ok());
    if !fits {
        return Err(Error::header(path, format!("cannot allocate {n} bytes to read it")));
    }
    Ok(v)
}

/// Reads the `len` bytes at absolute offset `offset` of `f` (the file at `path`) into a new
/// buffer, allocated fallibly ([`alloc_bytes`]).
pub fn read_range(f: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = alloc_bytes(len, path)?;
    buf.resize(len as usize, 0);
    f.read_exact_at(&mut buf, offset).at(path)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(json: &str, data_len: u64) -> std::result::Result<Header, String> {
        parse(json.as_bytes(), data_len)
    }

    #[test]
    fn accepts_valid_header() {
        let h = hdr(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            12,
        )
        .unwrap();
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.get("b").unwrap().shape, vec![2]);
        assert_eq!(h.meta("format"), Some("pt"));
    }

    #[test]
    fn rejects_each_kind_of_corruption() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                16,
                "duplicate",
            ),
            (r#"{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#, 8, "unknown dtype"),
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8, "needs 12 bytes"),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
                20,
                "gap",
            ),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 16, "data section holds 16"),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#,
                8,
                "overflows",
            ),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8, "before begin"),
            (r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, 8, "non-negative"),
            (r#"{"a":[1,2]}"#, 0, "not an object"),
            (r#"[1,2]"#, 0, "not valid JSON"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}"#, 8, "unknown field"),
        ];
        for (json, len, want) in cases {
            let err = hdr(json, len).unwrap_err();
            assert!(err.contains(want), "{json}: got {err:?}, wanted {want:?}");
        }
        let err = parse(&[0xff, 0xfe], 0).unwrap_err();
        assert!(err.contains("UTF-8"));
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let a = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let b = [9u8; 3];
        let mut f = File::create(&p).unwrap();
        write(
            &mut f,
            &[
                TensorData { name: "a", dtype: Dtype::F32, shape: vec![2], data: &a },
                TensorData { name: "b", dtype: Dtype::U8, shape: vec![3], data: &b },
            ],
            &[("k".into(), "v".into())],
        )
        .unwrap();
        drop(f);
        let (h, data) = read_all(&p).unwrap();
        assert_eq!(h.data_start % 8, 0);
        assert_eq!(h.meta("k"), Some("v"));
        let t = h.get("b").unwrap();
        assert_eq!(&data[t.begin as usize..t.end as usize], &b);
    }

    #[test]
    fn bad_length_prefix_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert!(matches!(Header::read(&p), Err(Error::Header { .. })));
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(Header::read(&p), Err(Error::Header { .. })));
        std::fs::write(&p, [1u8, 2]).unwrap();
        assert!(matches!(Header::read(&p), Err(Error::Header { .. })));
    }
}
