"""Plain helpers shared by the test modules (safetensors layout, hashing, running the CLI).

Nothing here imports torch or transformers, so the CLI and crash tests can use it freely.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

import rrome

EDITS_FILE = "rrome_edits.jsonl"
DELTAS_FILE = "rrome_deltas.safetensors"
STATE_DIR = ".rrome"
CRASH_ENV = "RROME_CRASH_AT"

# The console script installed beside the interpreter of the virtual environment.
RROME_EXE = Path(sys.executable).parent / "rrome"

# Edited tensors per family of the tiny checkpoints (tests/tiny_models.py) that the file tests
# write into: (tensor in layer 1, same module in layer 0, layout).
TARGETS = {
    "gpt2": ("transformer.h.1.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.weight", "in_out"),
    "llama": ("model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight", "out_in"),
}


# --- safetensors layout -------------------------------------------------------------------


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """Returns (data_start, header dict) of a safetensors file, parsed independently of rrome."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


def tensor_region(path: Path, name: str) -> tuple[int, int]:
    """Absolute (start, end) byte range of tensor ``name`` in the safetensors file ``path``."""
    start, header = read_header(path)
    b, e = header[name]["data_offsets"]
    return start + b, start + e


def shard_files(model_dir: Path) -> list[str]:
    """The safetensors shards of a checkpoint folder (file names, sorted)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def shard_of(model_dir: Path, tensor: str) -> str:
    """The shard file that holds ``tensor``."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"][tensor]
    return "model.safetensors"


def edited_ranges(model_dir: Path, tensors: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """Shard file name -> byte ranges of the given tensors in that shard."""
    out: dict[str, list[tuple[int, int]]] = {}
    for t in tensors:
        shard = shard_of(model_dir, t)
        out.setdefault(shard, []).append(tensor_region(model_dir / shard, t))
    return out


def region_bytes(model_dir: Path, tensor: str) -> bytes:
    """The stored bytes of one tensor."""
    shard = model_dir / shard_of(model_dir, tensor)
    b, e = tensor_region(shard, tensor)
    with open(shard, "rb") as f:
        f.seek(b)
        return f.read(e - b)


def region_sha(model_dir: Path, tensor: str) -> str:
    return hashlib.sha256(region_bytes(model_dir, tensor)).hexdigest()


def blank(data: bytes, ranges: Iterable[tuple[int, int]]) -> bytes:
    """``data`` with the given byte ranges zeroed (to compare everything outside them)."""
    buf = bytearray(data)
    for b, e in ranges:
        buf[b:e] = bytes(e - b)
    return bytes(buf)


def assert_only_tensors_changed(orig_dir: Path, new_dir: Path, tensors: Iterable[str]) -> None:
    """Every file of ``orig_dir`` exists in ``new_dir`` and is byte-identical to it, except the
    stored bytes of ``tensors``: shard lengths, headers, other tensors and padding all agree."""
    tensors = list(tensors)
    ranges = edited_ranges(orig_dir, tensors)
    shards = set(shard_files(orig_dir))
    for rel, _ in file_hashes(orig_dir).items():
        a = (orig_dir / rel).read_bytes()
        b = (new_dir / rel).read_bytes()
        if rel not in shards:
            assert a == b, f"{rel} changed"
            continue
        assert len(a) == len(b), f"{rel}: length {len(a)} -> {len(b)}"
        start, header = read_header(orig_dir / rel)
        assert a[:start] == b[:start], f"{rel}: header bytes changed"
        for name, info in header.items():
            if name == "__metadata__" or name in tensors:
                continue
            lo, hi = (start + o for o in info["data_offsets"])
            assert a[lo:hi] == b[lo:hi], f"{rel}: tensor {name} changed"
        mine = ranges.get(rel, [])
        assert blank(a, mine) == blank(b, mine), f"{rel}: bytes outside the edited tensors changed"


# --- files and hashes ---------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file below ``root``."""
    root = Path(root)
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = sha256_file(p)
    return out


def without_lock(hashes: dict[str, str]) -> dict[str, str]:
    """File hashes without rrome's lock file, whose content names its last holder (pid, time).

    rrome creates ``.rrome/lock`` in every folder it writes or reads for a copy; it is the one
    file a copy may add to (or rewrite in) its source folder.
    """
    return {k: v for k, v in hashes.items() if k != f"{STATE_DIR}/lock"}


def shard_hashes(model_dir: Path) -> dict[str, str]:
    return {s: sha256_file(model_dir / s) for s in shard_files(model_dir)}


# --- deltas -------------------------------------------------------------------------------


def random_delta(
    rng: np.random.Generator,
    tensor: str,
    d_out: int,
    d_in: int,
    layout: str,
    scale: float,
    meta: Mapping[str, object] | None = None,
    magnitude: float = 0.05,
) -> rrome.Delta:
    u = (rng.standard_normal(d_in) * magnitude).astype(np.float32)
    r = (rng.standard_normal(d_out) * magnitude).astype(np.float32)
    return rrome.Delta(tensor, u, r, layout=layout, scale=scale, meta=meta)


def math_shape(model_dir: Path, tensor: str, layout: str) -> tuple[int, int]:
    """(d_out, d_in) of a stored 2-D tensor read from its safetensors header."""
    _, header = read_header(model_dir / shard_of(model_dir, tensor))
    a, b = header[tensor]["shape"]
    return (a, b) if layout == "out_in" else (b, a)


# --- subprocesses -------------------------------------------------------------------------


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cli(
    *args: str | os.PathLike[str],
    crash_at: str | None = None,
    exe: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Runs the ``rrome`` command (the venv console script, or ``python -m rrome.cli``)."""
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    cmd = [str(RROME_EXE)] if exe else [sys.executable, "-m", "rrome.cli"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=_no_core_dumps,
        check=False,
    )
