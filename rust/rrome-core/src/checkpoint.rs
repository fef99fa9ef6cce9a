//! A Hugging Face model folder seen as a set of validated safetensors shards.
//!
//! The folder holds either one safetensors file or shards named by the `weight_map` of an
//! index, chosen as transformers chooses ([`weights_file`]). Shard names must be plain file names inside the folder: an
//! index that points elsewhere (`..`, `/`, an absolute path) is refused before any file is
//! opened. Every shard header is validated, and the index must agree with the headers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::dtype::Dtype;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{open_read, read_file};
use crate::safetensors_header::{Header, TensorInfo};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model's configuration, which may name its weights file.
pub const CONFIG_FILE: &str = "config.json";
/// The `config.json` field that names the weights file (transformers' `transformers_weights`).
pub const EXPLICIT_WEIGHTS: &str = "transformers_weights";

/// One shard: its file name inside the folder and its validated header.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Plain file name inside the model folder.
    pub file: String,
    /// Full path.
    pub path: PathBuf,
    /// File size in bytes.
    pub len: u64,
    /// Permission bits of the file.
    pub mode: u32,
    /// Validated header.
    pub header: Header,
}

/// One tensor of a checkpoint: what it holds and where its bytes are.
///
/// The name, dtype and shape of every tensor are what identifies an unedited model for its
/// statistics cache (they change with the architecture or the storage dtype, not with the
/// weight values or the folder); shard and byte range say where to read or write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef<'a> {
    /// Tensor name, as in the header.
    pub name: &'a str,
    /// Storage dtype ([`Dtype::as_str`] spells it as the header does).
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// File name of its shard inside the model folder.
    pub shard: &'a str,
    /// Absolute offset of its first byte in the shard file.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

impl TensorRef<'_> {
    /// The byte range `offset..offset + len` in the shard file.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// A model folder with every shard header validated.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model folder.
    pub dir: PathBuf,
    /// Shards in file-name order.
    pub shards: Vec<Shard>,
    /// Whether the checkpoint is sharded through an index file.
    pub indexed: bool,
    by_tensor: HashMap<String, usize>,
}

/// Checks that an index entry names a plain file inside the folder.
pub fn check_shard_name(index: &Path, name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
        || Path::new(name).is_absolute();
    if bad {
        return Err(Error::checkpoint(
            index,
            format!("shard name {name:?} is not a plain file name inside the model folder"),
        ));
    }
    Ok(())
}

/// The Hugging Face cache repository (`<cache>/models--org--name`) of which `dir` is a snapshot
/// (`<repo>/snapshots/<revision>`, its files links into `<repo>/blobs/`), or `None`.
///
/// Such a folder is read through its links like any other, but never written in place (its
/// blobs are shared by every snapshot and by every program that uses the cache), and a copy
/// takes the blobs its links name as regular files.
pub fn hf_cache_repo(dir: &Path) -> Option<PathBuf> {
    let real = fs::canonicalize(dir).ok()?;
    let snapshots = real.parent()?;
    let repo = snapshots.parent()?;
    let is_repo = repo.file_name()?.to_str()?.starts_with("models--");
    (snapshots.file_name()? == "snapshots" && is_repo && repo.join("blobs").is_dir()).then(|| repo.to_path_buf())
}

/// Refuses to write in place into a Hugging Face cache snapshot ([`hf_cache_repo`]).
pub fn refuse_cache_snapshot(dir: &Path) -> Result<()> {
    match hf_cache_repo(dir) {
        Some(_) => Err(Error::checkpoint(
            dir,
            "is a snapshot of the Hugging Face cache, whose files are blobs shared with every other \
             snapshot and program using the cache; rrome never writes one in place. Write an edited copy \
             with --out DIR (out_dir=...)",
        )),
        None => Ok(()),
    }
}

/// The file that holds a folder's weights, and whether it is a shard index: chosen as
/// transformers' `from_pretrained` chooses for a local folder (docs/design.md §3), so that rrome
/// writes the file the model is loaded from, whatever else lies beside it:
/// 1. the file `config.json` names in `"transformers_weights"` (a plain file name here; an index
///    when it ends in `.safetensors.index.json`);
/// 2. else `model.safetensors`, if it is a file, even when an index lies beside it (a stale
///    index of an earlier sharded save is not what transformers loads);
/// 3. else `model.safetensors.index.json`.
///
/// # Errors
/// [`Error::Checkpoint`] for a `config.json` that is not JSON or names its weights file in a way
/// rrome cannot follow, or a folder with neither file.
pub fn weights_file(dir: &Path) -> Result<(String, bool)> {
    let config = dir.join(CONFIG_FILE);
    if config.is_file() {
        let text = read_file(&config)?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::checkpoint(&config, format!("not valid JSON: {e}")))?;
        if let Some(w) = v.get(EXPLICIT_WEIGHTS) {
            let name = w.as_str().unwrap_or_default();
            let plain = check_shard_name(&config, name).is_ok();
            let kind = [(".safetensors.index.json", true), (".safetensors", false)]
                .into_iter()
                .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix));
            return match kind {
                Some((_, indexed)) if plain => Ok((name.to_string(), indexed)),
                _ => Err(Error::checkpoint(
                    &config,
                    format!(
                        "\"{EXPLICIT_WEIGHTS}\" is {w}; rrome edits a safetensors file or index named by a plain \
                         file name inside the model folder"
                    ),
                )),
            };
        }
    }
    let (single, index) = (dir.join(SINGLE_FILE), dir.join(INDEX_FILE));
    if single.is_file() {
        Ok((SINGLE_FILE.to_string(), false))
    } else if index.is_file() {
        Ok((INDEX_FILE.to_string(), true))
    } else {
        // Something that is not a file (a FIFO, a folder) under either name: say what it is.
        for p in [&single, &index] {
            if fs::symlink_metadata(p).is_ok() {
                open_read(p)?;
            }
        }
        Err(Error::checkpoint(dir, format!("holds neither {SINGLE_FILE} nor {INDEX_FILE}")))
    }
}

impl Checkpoint {
    /// Opens a model folder and validates its index and every shard header.
    ///
    /// # Errors
    /// [`Error::Io`] for a missing folder or shard, [`Error::Checkpoint`] for a folder with
    /// neither file or an unsafe or inconsistent index, [`Error::Header`] for a bad shard.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let meta = fs::metadata(dir).at(dir)?;
        if !meta.is_dir() {
            return Err(Error::checkpoint(dir, "is not a folder"));
        }
        let (weights, indexed) = weights_file(dir)?;
        let index_path = dir.join(&weights);
        let (files, weight_map) = if indexed {
            let text = read_file(&index_path)?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| Error::checkpoint(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::checkpoint(&index_path, "has no \"weight_map\" object"))?;
            let mut wm = BTreeMap::new();
            let mut files = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::checkpoint(&index_path, format!("weight_map entry {tensor:?} is not a string"))
                })?;
                check_shard_name(&index_path, file)?;
                files.insert(file.to_string());
                wm.insert(tensor.clone(), file.to_string());
            }
            (files.into_iter().collect::<Vec<_>>(), Some(wm))
        } else {
            (vec![weights], None)
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut by_tensor = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let path = dir.join(file);
            let mut f = open_read(&path)?;
            let meta = f.metadata().at(&path)?;
            let (len, mode) = (meta.len(), meta.mode() & 0o7777);
            let header = Header::read_from(&mut f, len, &path)?;
            for t in &header.tensors {
                if by_tensor.insert(t.name.clone(), i).is_some() {
                    return Err(Error::checkpoint(dir, format!("tensor {:?} appears in more than one shard", t.name)));
                }
            }
            shards.push(Shard { file: file.clone(), path, len, mode, header });
        }
        if let Some(wm) = weight_map {
            for (tensor, file) in &wm {
                match by_tensor.get(tensor) {
                    Some(&i) if &shards[i].file == file => {}
                    Some(&i) => {
                        return Err(Error::checkpoint(
                            &index_path,
                            format!("index places {tensor:?} in {file} but it is stored in {}", shards[i].file),
                        ))
                    }
                    None => {
                        return Err(Error::checkpoint(
                            &index_path,
                            format!("index names {tensor:?} but {file} does not hold it"),
                        ))
                    }
                }
            }
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, indexed, by_tensor })
    }

    /// Finds a tensor: the index of its shard in [`Checkpoint::shards`], and its header entry.
    pub fn find(&self, name: &str) -> Result<(usize, &TensorInfo)> {
        let i = *self.by_tensor.get(name).ok_or_else(|| Error::tensor_not_found(&self.dir, name))?;
        Ok((i, self.shards[i].header.get(name).expect("indexed tensor is in its shard")))
    }

    /// One tensor by name, `None` where the checkpoint has none of that name.
    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        let (i, t) = self.find(name).ok()?;
        Some(self.tensor_ref(&self.shards[i], t))
    }

    /// Every tensor of every shard, sorted by name (byte order of the UTF-8 names, which is
    /// code point order: Python's `sorted` of the same names).
    pub fn tensors(&self) -> Vec<TensorRef<'_>> {
        let mut all = self.tensors_in_file_order();
        all.sort_unstable_by(|a, b| a.name.cmp(b.name));
        all
    }

    /// Every tensor, shard by shard (in file-name order) and in header order within a shard.
    pub fn tensors_in_file_order(&self) -> Vec<TensorRef<'_>> {
        self.shards.iter().flat_map(|s| s.header.tensors.iter().map(move |t| self.tensor_ref(s, t))).collect()
    }

    fn tensor_ref<'a>(&self, shard: &'a Shard, t: &'a TensorInfo) -> TensorRef<'a> {
        TensorRef {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            shard: &shard.file,
            offset: shard.header.abs_offset(t),
            len: t.nbytes(),
        }
    }

    /// The mode of files rrome creates for this checkpoint (edit log, journal, undo files,
    /// lock): the permission bits all shards share, plus read and write for the owner.
    pub fn file_mode(&self) -> u32 {
        crate::fsutil::owner_rw(self.shards.iter().fold(0o7777, |m, s| m & s.mode))
    }

    /// The shard stored in file `file`, if the checkpoint has one.
    pub fn shard(&self, file: &str) -> Option<&Shard> {
        self.shards.iter().find(|s| s.file == file)
    }

    /// Total number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.by_tensor.len()
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::safetensors_header::{write, TensorData};

    fn shard(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, u8)]) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, dt, shape, fill)| vec![*fill; dt.size() * shape.iter().product::<usize>()])
            .collect();
        let data: Vec<TensorData> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, dtype, shape, _), b)| TensorData { name, dtype: *dtype, shape: shape.clone(), data: b })
            .collect();
        write(&mut File::create(path).unwrap(), &data, &[]).unwrap();
    }

    #[test]
    fn tensors_are_listed_by_name_with_shard_and_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        shard(
            &dir.join("s1.safetensors"),
            &[("z.weight", Dtype::BF16, vec![4, 3], 1), ("b.bias", Dtype::F32, vec![4], 2)],
        );
        shard(&dir.join("s2.safetensors"), &[("a.weight", Dtype::F16, vec![3, 4], 3), ("é", Dtype::I64, vec![], 4)]);
        let index = r#"{"weight_map":{"z.weight":"s1.safetensors","b.bias":"s1.safetensors","a.weight":"s2.safetensors","é":"s2.safetensors"}}"#;
        std::fs::write(dir.join(INDEX_FILE), index).unwrap();
        let ckpt = Checkpoint::open(dir).unwrap();
        let listed = ckpt.tensors();
        let summary: Vec<(&str, &str, &[usize], &str, u64)> =
            listed.iter().map(|t| (t.name, t.dtype.as_str(), t.shape, t.shard, t.len)).collect();
        assert_eq!(
            summary,
            [
                ("a.weight", "F16", &[3, 4][..], "s2.safetensors", 24),
                ("b.bias", "F32", &[4][..], "s1.safetensors", 16),
                ("z.weight", "BF16", &[4, 3][..], "s1.safetensors", 24),
                ("é", "I64", &[][..], "s2.safetensors", 8),
            ]
        );
        // The byte range holds exactly the tensor's bytes.
        for (t, fill) in listed.iter().zip([3u8, 2, 1, 4]) {
            let f = File::open(dir.join(t.shard)).unwrap();
            let mut buf = vec![0u8; t.len as usize];
            f.read_exact_at(&mut buf, t.offset).unwrap();
            assert!(buf.iter().all(|&b| b == fill), "{}", t.name);
            assert_eq!(t.range(), t.offset..t.offset + t.len);
            assert_eq!(ckpt.tensor(t.name), Some(*t));
        }
        assert_eq!(ckpt.tensor("missing"), None);
        assert_eq!(listed.len(), ckpt.num_tensors());
    }

    #[test]
    fn single_file_checkpoint_lists_its_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        shard(&tmp.path().join(SINGLE_FILE), &[("w", Dtype::F32, vec![2, 2], 7), ("b", Dtype::F32, vec![2], 8)]);
        let ckpt = Checkpoint::open(tmp.path()).unwrap();
        let names: Vec<(&str, &str)> = ckpt.tensors().iter().map(|t| (t.name, t.shard)).collect();
        assert_eq!(names, [("b", SINGLE_FILE), ("w", SINGLE_FILE)]);
        assert!(!ckpt.indexed);
    }
}
