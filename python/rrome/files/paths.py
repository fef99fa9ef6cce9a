"""Where rrome keeps what it computes once: the cache folder, and how its files are trusted.

Each model's layer statistics, their Cholesky factors (:mod:`rrome.engine.stats`) and its
context templates (:mod:`rrome.engine.keys`) live in :func:`model_cache_dir`, under
``cache_root()/stats``; the converted demo models (:mod:`rrome.demo`) under
``cache_root()/models``.

A cached file changes edits without a trace, so the cache is kept private and checked
(docs/design.md §3, §7): :func:`private_model_cache_dir` makes the folders ``0700`` and refuses
one that others may write; :func:`seal` writes a file's sha256 beside it (``<file>.sha256``,
in ``sha256sum`` format) and makes the file ``0600``; :func:`unsealed` says why a file cannot
be trusted (no checksum, another checksum), and its reader then computes it again.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from rrome.files.errors import CacheFolderError, RromeError
from rrome.files.fsutil import atomic_write, read_regular, sha256_file

CACHE_ENV = "RROME_CACHE_DIR"
"""Environment variable naming the cache folder (overrides ``$XDG_CACHE_HOME/rrome``)."""

CHECKSUM_SUFFIX = ".sha256"
"""Suffix of the file beside each cache file that holds its sha256 (:func:`seal`)."""

_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  ([^/\n]+)\n")


def cache_root() -> Path:
    """rrome's cache folder: ``$RROME_CACHE_DIR``, else ``$XDG_CACHE_HOME/rrome``, else ``~/.cache/rrome``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base directory specification says.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "rrome"
    return Path.home() / ".cache" / "rrome"


def model_cache_dir(key: str) -> Path:
    """The folder of one model's cached work (statistics, factors, templates):
    ``cache_root()/stats/<key>``, ``key`` being :func:`rrome.engine.stats.model_key`.
    Only the path: read or write there through :func:`private_model_cache_dir`."""
    return cache_root() / "stats" / key


def private_model_cache_dir(key: str) -> Path:
    """:func:`model_cache_dir`, made (with the folders above it, up to :func:`cache_root`) where
    missing, each new one ``0700``; every folder from the cache root down must be the user's own
    and not writable by group or others.

    Raises:
        CacheFolderError: a folder of the cache that another user owns or that group or others
            may write; the message says how to make it private.
        OSError: a folder cannot be made or examined.
    """
    root = private_cache_root()
    folder = model_cache_dir(key)
    for path in (root / "stats", folder):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        _check_private(path, root)
    return folder


def private_cache_root() -> Path:
    """:func:`cache_root`, made ``0700`` where missing (with any missing folders above it) and
    checked like the folders below it (:func:`private_model_cache_dir`).

    Raises:
        CacheFolderError: see :func:`private_model_cache_dir`.
        OSError: it cannot be made or examined.
    """
    root = cache_root()
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700, parents=True)
    _check_private(root, root)
    return root


def _check_private(path: Path, root: Path) -> None:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheFolderError(f"{path}: not a folder; rrome's cache ({CACHE_ENV}={root}) must be a folder of yours")
    mode = stat.S_IMODE(st.st_mode)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise CacheFolderError(
            f"{path}: the cache folder belongs to another user (uid {st.st_uid}), who could change the statistics "
            f"rrome reads from it; set {CACHE_ENV} to a folder of your own"
        )
    if mode & 0o022:
        who = {0o020: "group", 0o002: "others"}.get(mode & 0o022, "group and others")
        raise CacheFolderError(
            f"{path}: the cache folder may be written by {who} (mode {mode:04o}), who could change the statistics "
            f"rrome reads from it; make it private with `chmod 700 {path}` or set {CACHE_ENV} to a private folder"
        )


def checksum_path(path: Path) -> Path:
    """The file that holds the sha256 of the cache file ``path``: ``<path>.sha256``."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def seal(path: Path) -> None:
    """Makes the cache file ``path`` readable by its owner alone and writes its sha256 beside it
    (:func:`checksum_path`, a line ``<hex>  <name>`` as ``sha256sum`` writes it), atomically,
    after the file itself: a crash in between leaves a file whose checksum is missing or stale,
    which :func:`unsealed` refuses."""
    os.chmod(path, 0o600)
    line = f"{sha256_file(path)}  {path.name}\n"
    atomic_write(checksum_path(path), line.encode(), mode=0o600)


def unsealed(path: Path, *, sha256: str | None = None) -> str | None:
    """Why the cache file ``path`` may not be used (``None`` when its bytes have the sha256
    recorded beside it by :func:`seal`): a missing, unreadable or malformed checksum file, or
    another sha256. ``sha256`` is the digest of the bytes the caller has already read from
    ``path``; without it the file is read here, and must exist and be a regular file (a FIFO is
    refused without blocking).

    Raises:
        InvalidFileError: ``path`` is not a regular file.
        OSError: ``path`` cannot be read.
    """
    side = checksum_path(path)
    try:
        text = read_regular(side, limit=4096).decode("utf-8")
    except FileNotFoundError:
        return f"no checksum ({side.name} is missing)"
    except (OSError, RromeError, UnicodeDecodeError) as e:
        return f"its checksum file {side.name} cannot be read ({e})"
    match = _CHECKSUM_LINE.fullmatch(text)
    if match is None or match.group(2) != path.name:
        return f"its checksum file {side.name} is not a checksum of {path.name}"
    if (sha256 if sha256 is not None else sha256_file(path)) != match.group(1):
        return f"its contents do not match the checksum in {side.name}"
    return None
