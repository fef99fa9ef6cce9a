//! Durable and careful file operations shared by every writer.
//!
//! A file that other processes may read (statistics, edit logs, deltas bundles) is never
//! written in place: it is written to a temporary sibling, flushed to disk, renamed over the
//! target and the folder is flushed, so a reader or a crash sees the old file or the new one.
//! A shard shared by hard link with another folder is given an inode of its own the same way
//! ([`unshare`]) before anything writes into it.
//!
//! A model folder is untrusted input (docs/design.md §7, "Threat model"): every file rrome opens
//! for writing inside one is opened with `O_NOFOLLOW` and checked to be a regular file through
//! the opened descriptor ([`open_write_nofollow`], [`create_new`]); every file it reads is
//! opened without blocking and checked the same way ([`open_read`]), so a FIFO or a device
//! named as a shard gives an error instead of a hang. Files rrome creates get an exact mode
//! (the mode of the shards they belong to, see [`owner_rw`]), whatever the umask.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Environment variable that makes the process abort at a named step (crash tests only).
pub const CRASH_ENV: &str = "RROME_CRASH_AT";

/// Aborts the process when [`CRASH_ENV`] names `step` (crash tests only).
pub(crate) fn crash_point(step: &str) {
    if let Ok(want) = std::env::var(CRASH_ENV) {
        if want == step {
            std::process::abort();
        }
    }
}

/// Flushes a folder's entries (renames, creations, removals) to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    SYNCED_DIRS.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    let d = File::open(dir).at(dir)?;
    d.sync_all().at(dir)
}

#[cfg(test)]
thread_local! {
    /// Every folder [`fsync_dir`] flushed on this thread (tests check the protocol with it).
    pub(crate) static SYNCED_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The mode of files rrome creates for shards whose permission bits are `shard_mode` (the
/// bitwise AND over the shards a file belongs to): the same bits, plus read and write for the
/// owner so that rrome can replace its own files later. Never wider than the shards for group
/// and others: undo files hold original weights.
pub fn owner_rw(shard_mode: u32) -> u32 {
    (shard_mode & 0o666) | 0o600
}

/// The mode of a folder rrome creates beside files of mode `file_mode`: search permission
/// wherever there is read permission.
pub fn dir_mode(file_mode: u32) -> u32 {
    file_mode | ((file_mode & 0o444) >> 2)
}

/// Mode of files rrome creates where nothing says otherwise (a folder whose shards it cannot read).
pub const PRIVATE_MODE: u32 = 0o600;

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a folder"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// The error for a symbolic link where rrome needs a real file or folder.
pub fn link_refused(path: &Path) -> Error {
    Error::checkpoint(
        path,
        "is a symbolic link; rrome never follows links inside a model folder (remove it, or make a real \
         copy of the folder with `cp -rL` if you trust where the link points)",
    )
}

/// The error for something that is not a regular file where rrome needs one.
pub fn not_regular(path: &Path, ft: &fs::FileType) -> Error {
    Error::io(path, std::io::Error::new(ErrorKind::InvalidInput, format!("not a regular file ({})", kind_of(ft))))
}

fn check_regular(f: &File, path: &Path) -> Result<()> {
    let ft = f.metadata().at(path)?.file_type();
    if ft.is_file() {
        Ok(())
    } else {
        Err(not_regular(path, &ft))
    }
}

/// Maps the error of an `O_NOFOLLOW` open that met a link (ELOOP) to [`link_refused`].
fn nofollow_error(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        link_refused(path)
    } else {
        Error::io(path, e)
    }
}

/// Opens an existing file for reading. Links are followed (reading a Hugging Face cache
/// snapshot through its links is harmless), but the open never blocks on a FIFO or device and
/// the descriptor must be a regular file.
pub fn open_read(path: &Path) -> Result<File> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).at(path)?;
    check_regular(&f, path)?;
    Ok(f)
}

/// Largest file [`read_file`] reads whole (an index, an edit log's JSON lines, a marker): far
/// above any real one (10,000 logged edits take tens of megabytes), far below a machine's memory.
pub const MAX_WHOLE_FILE: u64 = 1 << 30;

/// Reads a whole (small) file through [`open_read`]; a file above [`MAX_WHOLE_FILE`] (a sparse
/// file may claim any size) is an error, and the buffer is allocated fallibly.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let f = open_read(path)?;
    let len = f.metadata().at(path)?.len();
    if len > MAX_WHOLE_FILE {
        return Err(Error::io(
            path,
            std::io::Error::new(
                ErrorKind::FileTooLarge,
                format!("is {len} bytes, more than the {MAX_WHOLE_FILE} rrome reads from such a file"),
            ),
        ));
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(len as usize).map_err(|_| {
        Error::io(path, std::io::Error::new(ErrorKind::OutOfMemory, format!("cannot allocate {len} bytes")))
    })?;
    f.take(MAX_WHOLE_FILE + 1).read_to_end(&mut buf).at(path)?;
    Ok(buf)
}

/// Opens an existing regular file for reading and writing, never through a symbolic link.
pub fn open_write_nofollow(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| nofollow_error(path, e))?;
    check_regular(&f, path)?;
    Ok(f)
}

/// Creates a new file that must not exist yet (not even as a link) with exactly `mode`.
pub fn create_new(path: &Path, mode: u32) -> Result<File> {
    create_new_with(path, Some(mode))
}

/// [`create_new`], with the umask's default mode when `mode` is `None`.
fn create_new_with(path: &Path, mode: Option<u32>) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create_new(true).custom_flags(libc::O_NOFOLLOW);
    if let Some(m) = mode {
        options.mode(m);
    }
    let f = options.open(path).map_err(|e| nofollow_error(path, e))?;
    if let Some(m) = mode {
        // The umask may have cleared bits of `m` at creation.
        f.set_permissions(fs::Permissions::from_mode(m)).at(path)?;
    }
    Ok(f)
}

/// Makes sure `path` is a real folder (created with exactly `mode` if missing, and its parent
/// flushed so the new entry survives a crash). A link or a file there is refused.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(link_refused(path)),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) => Err(Error::checkpoint(path, format!("should be a folder but is {}", kind_of(&m.file_type())))),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match fs::DirBuilder::new().mode(mode).create(path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return ensure_dir(path, mode),
                Err(e) => return Err(Error::io(path, e)),
            }
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).at(path)?;
            fsync_dir(&parent_of(path))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Copies the regular file `from` (never through a link) to the new file `to`, keeping its
/// permission bits. Not flushed: the caller flushes what it copied.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .map_err(|e| nofollow_error(from, e))?;
    check_regular(&src, from)?;
    let mode = src.metadata().at(from)?.mode() & 0o7777;
    let mut dst = create_new(to, mode)?;
    std::io::copy(&mut src, &mut dst).at(to)?;
    Ok(())
}

/// The parent folder of `path` (`.` for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temporary sibling used while `path` is being replaced.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    parent_of(path).join(format!(".{name}.rrome-tmp-{}", std::process::id()))
}

/// Writes `path` atomically: `fill` writes the content into a temporary sibling, which is
/// fsynced and renamed over `path`; then the folder is fsynced. On error the temporary file is
/// removed and `path` is untouched. The new file gets the umask's default mode.
pub fn atomic_write(path: &Path, fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>) -> Result<()> {
    atomic_write_mode(path, None, fill)
}

/// [`atomic_write`] giving the new file exactly `mode` when it is `Some`. The temporary file
/// is created fresh (never opened through a link); a rename replaces a link at `path` rather
/// than writing through it.
pub fn atomic_write_mode(
    path: &Path,
    mode: Option<u32>,
    fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_sibling(path);
    let result = (|| {
        // A leftover of a dead process with the same pid (or a planted link) goes first.
        remove_if_exists(&tmp)?;
        let f = create_new_with(&tmp, mode)?;
        {
            let mut w = BufWriter::new(&f);
            fill(&mut w).at(&tmp)?;
            w.flush().at(&tmp)?;
        }
        f.sync_all().at(&tmp)?;
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file if it exists; a missing file is not an error.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Gives `path` an inode of its own when it shares one with other hard links, so that writing
/// into it cannot change the other names. The content is copied to the temporary sibling
/// (which recovery removes after a crash), flushed, renamed over `path`, and the folder is
/// flushed: a crash leaves either the shared file or the private copy, byte for byte equal.
/// The other links keep the original inode untouched. Returns whether a copy was made.
pub fn unshare(path: &Path) -> Result<bool> {
    if fs::metadata(path).at(path)?.nlink() <= 1 {
        return Ok(false);
    }
    let tmp = tmp_sibling(path);
    let result = (|| {
        // The copy keeps the permission bits and is flushed before the rename.
        remove_if_exists(&tmp)?;
        copy_file(path, &tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        crash_point("unshare-copied");
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(&parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    crash_point("unshared");
    Ok(true)
}

/// Puts the regular file `from` (never a link: the caller has checked) at `to`, sharing its
/// inode by hard link where the filesystem allows and copying it otherwise. Returns whether it
/// was linked.
///
/// Only for files that no rrome writer changes through an existing inode while it has other
/// links: in-place writers [`unshare`] a file first, and every other writer replaces files by
/// rename.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<bool> {
    if fs::symlink_metadata(from).at(from)?.file_type().is_symlink() {
        return Err(link_refused(from));
    }
    match fs::hard_link(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(Error::io(to, e)),
        // Across filesystems, without permission, or on a filesystem without links: copy.
        Err(_) => {
            copy_file(from, to)?;
            Ok(false)
        }
    }
}
