"""File helpers every layer uses: reads that never block, writes that never go through a link,
and the sha256 of a file.

The Rust core has its own (``fsutil.rs``) for the checkpoint files it writes; these serve the
files the Python side reads and writes (edit requests, results folders, saved factors, the
statistics cache, a tokenizer fix). A results folder or a cache folder is as untrusted as a
model folder (docs/design.md §7): any of its names may be a symbolic link, a hard link, a FIFO
or a device, so

- every read opens with ``O_NONBLOCK`` and checks through the descriptor that it holds a
  regular file (:func:`open_regular`, :func:`read_regular`, :func:`sha256_file`): a FIFO never
  hangs a reader;
- every replacement is a new file beside the old one, created with ``O_EXCL`` and renamed over
  it (:func:`atomic_write`): the rename replaces a link, never the file it points to;
- every append opens with ``O_NOFOLLOW`` and gives a file with other hard links an inode of its
  own first (:func:`append_durably`);
- a folder rrome creates inside such a folder must be a real folder (:func:`real_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat

from rrome.files.errors import InvalidFileError

PathLike = str | os.PathLike[str]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _require_regular(fd: int, name: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidFileError(f"{name}: {_kind(st.st_mode)}, not a regular file")
    return st


def _regular_or_close(fd: int, name: str) -> int:
    """``fd`` if it is a regular file; otherwise it is closed and the error raised."""
    try:
        _require_regular(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: PathLike) -> int:
    """A descriptor open for reading on the regular file at ``path`` (links followed).

    Opened with ``O_NONBLOCK``, so a FIFO or a device in its place is refused at once instead of
    blocking (for a regular file the flag changes nothing). The caller closes the descriptor.

    Raises:
        InvalidFileError: ``path`` names a FIFO, socket, device or folder.
        OSError: it cannot be opened (``FileNotFoundError`` when missing).
    """
    name = os.fspath(path)
    return _regular_or_close(os.open(name, os.O_RDONLY | _NONBLOCK | _CLOEXEC | _BINARY), name)


def read_regular(path: PathLike, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``, read without blocking (:func:`open_regular`).

    Args:
        path: the file.
        limit: the most bytes the file may hold; a larger file is refused before it is read.

    Raises:
        InvalidFileError: not a regular file, or larger than ``limit``.
        OSError: it cannot be read (``FileNotFoundError`` when missing).
    """
    name = os.fspath(path)
    fd = open_regular(name)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise InvalidFileError(f"{name}: {size} bytes, more than the {limit} this file may hold")
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew while read
        raise InvalidFileError(f"{name}: more than the {limit} bytes this file may hold")
    return data


def atomic_write(path: PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replaces the file at ``path`` by ``data``, atomically and durably, never through a link.

    The bytes go to a new temporary file beside ``path`` (a unique hidden name, created with
    ``O_EXCL``, so not even a planted link of that name is followed), which is flushed to disk
    and renamed over ``path``; the folder is then synced so the rename survives a crash. Readers
    see the old file or the complete new one, never a part. The rename replaces a symbolic or
    hard link at ``path`` by the new file: the file a link pointed to is left as it was.

    Args:
        path: the file to write.
        data: its new contents.
        mode: the new file's permission bits; default: what any new file gets (0o666 less the
            umask).

    Raises:
        OSError: the file cannot be written; ``path`` is left as it was and no temporary file
            remains.
    """
    name = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(name))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def append_durably(path: PathLike, data: bytes) -> None:
    """Appends ``data`` to the regular file at ``path`` (created if missing) and fsyncs it.

    Opened with ``O_NOFOLLOW``: a symbolic link at ``path`` is refused, never appended through.
    A file with other hard links (one that may be another folder's, or anybody's) is first given
    an inode of its own: its bytes are copied to a new file that replaces it
    (:func:`atomic_write`), and the append goes there.

    Raises:
        InvalidFileError: ``path`` is a symbolic link, a FIFO, a device or a folder.
        OSError: the file cannot be written.
    """
    name = os.fspath(path)
    for _ in range(2):
        fd = _open_append(name)
        try:
            st = _require_regular(fd, name)
            if st.st_nlink > 1:
                atomic_write(name, read_regular(name), mode=stat.S_IMODE(st.st_mode))
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            return
        finally:
            os.close(fd)
    raise InvalidFileError(f"{name}: still has other hard links after it was copied; appended nothing")


def _open_append(name: str) -> int:
    try:
        return os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(name)):
            raise InvalidFileError(f"{name}: a symbolic link; rrome does not write through links") from None
        raise


def open_lock_file(path: PathLike) -> int:
    """A descriptor for ``flock`` on the regular file at ``path`` (created if missing), opened
    with ``O_NOFOLLOW`` and never written: a link there is refused, not followed.

    Raises:
        InvalidFileError: ``path`` is a symbolic link, a FIFO, a device or a folder.
        OSError: the file cannot be opened.
    """
    name = os.fspath(path)
    return _regular_or_close(_open_append(name), name)


def real_dir(path: PathLike) -> None:
    """Makes the folder ``path`` (its parent must exist) unless it is there, and checks that it
    is a real folder, not a symbolic link to one: files rrome writes below it stay below it.

    Raises:
        InvalidFileError: ``path`` is a symbolic link or not a folder.
        OSError: it cannot be made.
    """
    name = os.fspath(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(name)
    st = os.lstat(name)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidFileError(f"{name}: {_kind(st.st_mode)}, not a folder; rrome does not write through links")


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a regular file's bytes, read without blocking (:func:`open_regular`).

    Raises:
        InvalidFileError: ``path`` names a FIFO, socket, device or folder.
        FileNotFoundError: the file does not exist.
    """
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
