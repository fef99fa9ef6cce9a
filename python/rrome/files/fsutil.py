"""File helpers every layer uses: atomic replacement of a file, and the sha256 of a file.

The Rust core has its own (``fsutil.rs``) for the checkpoint files it writes; these serve the
files the Python side writes (edit requests, results folders, saved factors, a tokenizer fix).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replaces the file at ``path`` by ``data``, atomically and durably.

    The bytes go to a new temporary file beside ``path`` (a unique hidden name), which is flushed
    to disk and renamed over ``path``; the folder is then synced so the rename survives a crash.
    Readers see the old file or the complete new one, never a part.

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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
    """Hex sha256 of a file's bytes.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
