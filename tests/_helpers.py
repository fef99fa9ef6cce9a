"""Plain helpers shared by the test modules (safetensors layout, hashing, running the CLI and
reading its errors).

Nothing here imports torch or transformers, so the CLI and crash tests can use it freely.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

import rrome

EDITS_FILE = "rrome_edits.jsonl"
DELTAS_FILE = "rrome_deltas.safetensors"
STATE_DIR = ".rrome"
CRASH_ENV = "RROME_CRASH_AT"

# The console script installed beside the interpreter of the virtual environment.
RROME_EXE = Path(sys.executable).parent / "rrome"

# The shared data folder (CounterFact, zsRE, ...): $RROME_SHARED_DATA, else ../shared/data beside
# the checkout.
SHARED_DATA = Path(os.environ.get("RROME_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

V = TypeVar("V")

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


def without_lock(files: Mapping[str, V]) -> dict[str, V]:
    """Relative path -> anything (hashes, contents), without rrome's lock files, whose content
    names their last holder (pid, time).

    rrome creates ``.rrome/lock`` in every folder it writes or reads for a copy; it is the one
    file a copy may add to (or rewrite in) its source folder. Lock files of folders further down
    (a tree of several model folders) are left out too.
    """
    lock = f"{STATE_DIR}/lock"
    return {k: v for k, v in files.items() if k != lock and not k.endswith(f"/{lock}")}


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root``, sorted; none if it does not exist."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).exists() else []


def leftovers(folder: Path) -> list[str]:
    """Journal, revert marker or temporary files a finished or recovered operation must not leave."""
    state = folder / STATE_DIR
    found = [p.name for p in (state / "journal.safetensors", state / "revert.json") if p.exists()]
    found += [p.name for d in (folder, state) if d.exists() for p in d.iterdir() if ".rrome-tmp-" in p.name]
    return found


def shard_hashes(model_dir: Path) -> dict[str, str]:
    return {s: sha256_file(model_dir / s) for s in shard_files(model_dir)}


# --- deltas -------------------------------------------------------------------------------


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment less the crash-test variable, plus ``extra``."""
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    env.update(extra or {})
    return env


def run_cli(
    *args: str | os.PathLike[str],
    crash_at: str | None = None,
    exe: bool = True,
    timeout: float = 60,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs the ``rrome`` command (the venv console script, or ``python -m rrome.cli``) in ``cwd``,
    with ``env`` added to this process's environment, without core dumps; ``preexec`` runs in
    the child before the command (e.g. to lower a limit)."""
    extra = dict(env or {})
    if crash_at is not None:
        extra[CRASH_ENV] = crash_at

    def before_exec() -> None:
        _no_core_dumps()
        if preexec is not None:
            preexec()

    cmd = [str(RROME_EXE)] if exe else [sys.executable, "-m", "rrome.cli"]
    return subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        env=_child_env(extra),
        cwd=cwd,
        timeout=timeout,
        preexec_fn=before_exec,
        check=False,
    )


def kill_after_first_line(
    args: Iterable[str | os.PathLike[str]], watched: Path, env: Mapping[str, str], *, timeout: float, what: str
) -> subprocess.Popen[bytes]:
    """Starts ``rrome *args`` with exactly ``env`` in a session of its own, waits until
    ``watched`` holds a first complete line (failing with ``what`` after ``timeout`` seconds, or
    with the child's stderr if it exits first), then SIGKILLs the session: a real run killed in
    the middle of its work. Returns the reaped process."""
    proc = subprocess.Popen(
        [str(RROME_EXE), *map(str, args)],
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not (watched.exists() and watched.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, what
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return proc


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``python -c code *args`` with this interpreter, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=timeout,
        check=False,
    )


def run_cli_without(
    *args: str | os.PathLike[str], modules: Iterable[str] = ("torch", "transformers"), timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs ``rrome *args`` (its ``main``) in a fresh interpreter that exits with status 99,
    naming them on stderr, if the command imported any of ``modules`` or a module below one,
    whether the command succeeded or not."""
    code = (
        "import os, sys\n"
        "from rrome.cli import main\n"
        f"sys.argv = ['rrome', *{[str(a) for a in args]!r}]\n"
        f"modules = {tuple(modules)!r}\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    loaded = sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in modules))\n"
        "    if loaded:\n"
        "        print(f'imported {loaded}', file=sys.stderr, flush=True)\n"
        "        os._exit(99)\n"
    )
    return run_python(code, timeout=timeout)


# --- command output -----------------------------------------------------------------------


def one_line_error(stderr: str, *needles: str) -> str:
    """The one line of ``stderr``, an ``rrome: error: `` holding every needle (no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rrome: error: ") and "Traceback" not in stderr, lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str, code: int = 1) -> str:
    """``proc`` failed with status ``code`` (not a signal, not a panic) and said why in one line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout, proc.stdout
    return one_line_error(proc.stderr, *needles)
