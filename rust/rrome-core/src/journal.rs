//! Undo records: the original bytes of every region a batch changes, with their hashes.
//!
//! One file format serves two roles. While an in-place write is in progress it is the undo
//! journal (`.rrome/journal.safetensors`): written and fsynced before the first shard byte
//! changes, so a crash at any later point can be rolled back. Once the batch is committed the
//! same file is renamed to `.rrome/undo/batch-NNNNNN.safetensors`, where `revert` finds the exact
//! original bytes (no W − Δ arithmetic). It is a safetensors file of U8 tensors `region.<i>`
//! with the region table (shard, tensor, absolute offset, length, sha256 before and after) in
//! its metadata, so it goes through the same validating parser as everything else.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::check_shard_name;
use crate::dtype::Dtype;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{atomic_write_mode, open_read};
use crate::lock::STATE_DIR;
use crate::safetensors_header::{self, Header};

/// Format tag of undo files.
pub const UNDO_FORMAT: &str = "rrome-undo/1";

/// One changed byte range of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Shard file name inside the model folder.
    pub shard: String,
    /// Tensor stored there.
    pub tensor: String,
    /// Absolute file offset of the first byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
    /// sha256 (hex) of the bytes before the batch.
    pub sha_before: String,
    /// sha256 (hex) of the bytes after the batch.
    pub sha_after: String,
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Path of the active journal of a model folder.
pub fn journal_path(model_dir: &Path) -> PathBuf {
    model_dir.join(STATE_DIR).join("journal.safetensors")
}

/// Folder of committed undo files.
pub fn undo_dir(model_dir: &Path) -> PathBuf {
    model_dir.join(STATE_DIR).join("undo")
}

/// Path of the undo file of batch `batch`.
pub fn undo_path(model_dir: &Path, batch: u64) -> PathBuf {
    undo_dir(model_dir).join(format!("batch-{batch:06}.safetensors"))
}

/// Reads `len` bytes at `offset` of `path`.
pub fn read_region(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let f = open_read(path)?;
    let mut buf = Vec::new();
    read_region_into(&f, path, offset, len, &mut buf)?;
    Ok(buf)
}

/// Reads `len` bytes at `offset` of the open file `f` (named `path` in errors) into `buf`,
/// which is resized to `len`: a buffer reused for regions of one size is allocated and
/// zeroed once.
pub fn read_region_into(f: &File, path: &Path, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize(len as usize, 0);
    f.read_exact_at(buf, offset).at(path)
}

/// Stands for a sha256 in the first version of an undo header: the real hex digest that
/// replaces it has the same length, so the header keeps its length.
const HASH_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Counts the bytes written through it.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes an undo file atomically, hashing each region once, while its bytes stream.
///
/// `regions` gives each region's place; their `sha_before` and `sha_after` are filled in here.
/// `original(i, w)` writes exactly `regions[i].len` original bytes of region `i` into `w` and
/// returns (sha256 of those bytes, sha256 of the bytes the batch puts there). It is called once
/// per region, in order, so one region at a time needs to be in memory. The header goes out
/// first with placeholder hashes of the same length; once every region has streamed, it is
/// rewritten in place with the real hashes, before the file is flushed and renamed into place,
/// so no reader or crash ever sees the placeholders under the final name. The file gets
/// exactly `mode` (that of the shards it holds bytes of).
pub fn write_undo(
    path: &Path,
    mode: u32,
    batch: u64,
    regions: &mut [Region],
    mut original: impl FnMut(usize, &mut dyn Write) -> Result<(String, String)>,
) -> Result<()> {
    let names: Vec<String> = (0..regions.len()).map(|i| format!("region.{i}")).collect();
    let descs: Vec<(&str, Dtype, Vec<usize>)> =
        names.iter().zip(regions.iter()).map(|(n, r)| (n.as_str(), Dtype::U8, vec![r.len as usize])).collect();
    let header = |regions: &[Region]| -> Vec<u8> {
        let meta = vec![
            ("format".to_string(), UNDO_FORMAT.to_string()),
            ("batch".to_string(), batch.to_string()),
            ("regions".to_string(), serde_json::to_string(regions).expect("regions serialise")),
        ];
        let mut h = Vec::new();
        safetensors_header::write_header(&mut h, &descs, &meta).expect("writing into memory");
        h
    };
    for r in regions.iter_mut() {
        r.sha_before = HASH_PLACEHOLDER.to_string();
        r.sha_after = HASH_PLACEHOLDER.to_string();
    }
    let first = header(regions);
    let mut inner: Option<Error> = None;
    let res = atomic_write_mode(path, Some(mode), |w| {
        w.write_all(&first)?;
        for (i, r) in regions.iter_mut().enumerate() {
            let mut counted = Counted { inner: &mut *w, n: 0 };
            let (before, after) = match original(i, &mut counted) {
                Ok(h) => h,
                Err(e) => {
                    inner = Some(e);
                    return Err(std::io::Error::other("streaming the original bytes failed"));
                }
            };
            if counted.n != r.len {
                inner = Some(Error::Integrity {
                    msg: format!(
                        "undo data of {} in {}: {} bytes written, {} expected",
                        r.tensor, r.shard, counted.n, r.len
                    ),
                });
                return Err(std::io::Error::other("wrong region length"));
            }
            r.sha_before = before;
            r.sha_after = after;
        }
        let last = header(regions);
        if last.len() != first.len() {
            inner = Some(Error::Integrity {
                msg: format!("{}: the undo header changed length when its hashes were filled in", path.display()),
            });
            return Err(std::io::Error::other("undo header changed length"));
        }
        w.flush()?;
        w.get_ref().write_all_at(&last, 0)
    });
    match (res, inner) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
}

/// A validated undo file.
#[derive(Debug, Clone)]
pub struct Undo {
    /// The file.
    pub path: PathBuf,
    /// Batch number.
    pub batch: u64,
    /// Regions, in the order they were written.
    pub regions: Vec<Region>,
    header: Header,
}

impl Undo {
    /// Reads and validates an undo file.
    pub fn read(path: &Path) -> Result<Undo> {
        let header = Header::read(path)?;
        let bad = |msg: String| Error::Integrity { msg: format!("{}: {msg}", path.display()) };
        if header.meta("format") != Some(UNDO_FORMAT) {
            return Err(bad(format!("not an rrome undo file (format {:?})", header.meta("format"))));
        }
        let batch = header.meta("batch").and_then(|b| b.parse().ok()).ok_or_else(|| bad("no batch number".into()))?;
        let regions: Vec<Region> = serde_json::from_str(header.meta("regions").unwrap_or(""))
            .map_err(|e| bad(format!("region table unreadable ({e})")))?;
        for (i, r) in regions.iter().enumerate() {
            check_shard_name(path, &r.shard)?;
            let t = header.get(&format!("region.{i}")).ok_or_else(|| bad(format!("region.{i} missing")))?;
            if t.nbytes() != r.len {
                return Err(bad(format!("region.{i} holds {} bytes, table says {}", t.nbytes(), r.len)));
            }
        }
        if header.tensors.len() != regions.len() {
            return Err(bad("region table and tensors disagree".into()));
        }
        Ok(Undo { path: path.to_path_buf(), batch, regions, header })
    }

    /// The original bytes of region `i`, checked against their recorded hash.
    pub fn original(&self, i: usize) -> Result<Vec<u8>> {
        let t = self.header.get(&format!("region.{i}")).expect("validated");
        let mut f = open_read(&self.path)?;
        f.seek(SeekFrom::Start(self.header.abs_offset(t))).at(&self.path)?;
        let mut buf = vec![0u8; t.nbytes() as usize];
        f.read_exact(&mut buf).at(&self.path)?;
        if sha256_hex(&buf) != self.regions[i].sha_before {
            return Err(Error::Integrity {
                msg: format!("{}: region.{i} does not match its recorded sha256", self.path.display()),
            });
        }
        Ok(buf)
    }

    /// The bytes of region `i` as stored, unchecked, into `buf` (for a byte-for-byte
    /// comparison with what is about to be overwritten).
    pub fn raw_into(&self, i: usize, buf: &mut Vec<u8>) -> Result<()> {
        let t = self.header.get(&format!("region.{i}")).expect("validated");
        let f = open_read(&self.path)?;
        read_region_into(&f, &self.path, self.header.abs_offset(t), t.nbytes(), buf)
    }
}
