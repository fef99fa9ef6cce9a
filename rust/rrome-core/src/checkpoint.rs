//! A Hugging Face model folder seen as a set of validated safetensors shards.
//!
//! The folder holds either `model.safetensors` or shards named by the `weight_map` of
//! `model.safetensors.index.json`. Shard names must be plain file names inside the folder: an
//! index that points elsewhere (`..`, `/`, an absolute path) is refused before any file is
//! opened. Every shard header is validated, and the index must agree with the headers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{open_read, read_file};
use crate::safetensors_header::{Header, TensorInfo};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

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
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, weight_map, indexed) = if index_path.exists() {
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
            (files.into_iter().collect::<Vec<_>>(), Some(wm), true)
        } else if single.exists() {
            (vec![SINGLE_FILE.to_string()], None, false)
        } else {
            return Err(Error::checkpoint(dir, format!("holds neither {SINGLE_FILE} nor {INDEX_FILE}")));
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
