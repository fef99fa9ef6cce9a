"""Hostile safetensors files and index files, full disks and read-only files.

Every hostile input must give its specific :class:`rrome.RromeError` subclass (no panic, no
signal) and leave every file as it was: same bytes, same modification time, nothing new but
rrome's own lock file. I/O failures (a file-size limit standing in for a full disk, read-only
files and folders) give a clear one-line error and an intact original.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _helpers import STATE_DIR, assert_one_line_error, leftovers, run_cli
from crash_harness import Oracle, build_oracle, state_of
from tiny_models import write_safetensors

import rrome

# --- a small valid checkpoint and the ways to break it --------------------------------------

W = ("F32", (4, 8), np.arange(32, dtype=np.float32).tobytes())
B = ("F32", (8,), np.ones(8, dtype=np.float32).tobytes())
DELTA = rrome.Delta("w", np.ones(8, np.float32), np.ones(4, np.float32), layout="out_in")


def header_file(header: bytes | str, data: bytes, *, length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


DATA = W[2] + B[2]  # 160 bytes: w at 0..128, b at 128..160
GOOD = {"w": entry("F32", [4, 8], 0, 128), "b": entry("F32", [8], 128, 160)}


def js(obj: object) -> str:
    return json.dumps(obj)


# name -> (file bytes, expected message fragment)
HOSTILE_SHARDS: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "shorter than the 8-byte header length"),
    "truncated length": (b"\x10\x00\x00", "shorter than the 8-byte header length"),
    "header past the end": (header_file(js(GOOD), DATA, length=10_000), "runs past the end of the file"),
    "absurd header length": (header_file(js(GOOD), DATA, length=2**64 - 1), "exceeds the limit"),
    "header of 200 MB": (header_file(js(GOOD), DATA, length=200 << 20), "exceeds the limit"),
    "invalid UTF-8": (header_file(b'{"w\xff\xfe":{}}', DATA), "not valid UTF-8"),
    "invalid JSON": (header_file('{"w": {"dtype": "F32",', DATA), "not valid JSON"),
    "JSON array": (header_file("[1, 2, 3]", DATA), "not valid JSON"),
    "deeply nested JSON": (header_file('{"w":' + "[" * 5000 + "]" * 5000 + "}", DATA), "not valid JSON"),
    "NUL in header": (header_file(b'{"w":\x00}', DATA), "not valid JSON"),
    "offsets out of bounds": (
        header_file(js({"w": entry("F32", [4, 8], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA[:150]),
        "data section holds 150",
    ),
    "offsets far out of bounds": (
        header_file(js({"w": entry("F32", [4, 8], 0, 128), "b": entry("F32", [2**40], 128, 128 + 2**42)}), DATA),
        "data section holds 160",
    ),
    "overlapping tensors": (
        header_file(js({"w": entry("F32", [4, 8], 0, 128), "b": entry("F32", [8], 96, 128)}), DATA[:128]),
        "overlaps",
    ),
    "gap between tensors": (
        header_file(js({"w": entry("F32", [4, 8], 0, 128), "b": entry("F32", [4], 144, 160)}), DATA),
        "gap in the data section",
    ),
    "dtype x shape != bytes": (
        header_file(js({"w": entry("F32", [4, 9], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "needs 144 bytes",
    ),
    "bf16 byte count": (
        header_file(js({"w": entry("BF16", [4, 8], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "needs 64 bytes",
    ),
    "overflowing shape": (
        header_file(js({"w": entry("F32", [2**32, 2**32, 2**32], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "overflows",
    ),
    "overflowing byte size": (
        header_file(js({"w": entry("F64", [2**62], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "byte size overflows",
    ),
    "duplicate names": (
        header_file('{"w":' + js(GOOD["w"]) + ',"w":' + js(GOOD["b"]) + "}", DATA),
        "duplicate name",
    ),
    "unknown dtype": (
        header_file(js({"w": entry("F128", [4, 8], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "unknown dtype",
    ),
    "negative dimension": (
        header_file(js({"w": entry("F32", [-4, -8], 0, 128), "b": entry("F32", [8], 128, 160)}), DATA),
        "non-negative integer",
    ),
    "end before begin": (
        header_file(js({"w": entry("F32", [0], 128, 0), "b": entry("F32", [8], 128, 160)}), DATA),
        "before begin",
    ),
    "float offsets": (
        header_file(js({"w": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0.0, 128.5]}, "b": GOOD["b"]}), DATA),
        "data_offsets[0]",
    ),
    "metadata not strings": (header_file(js({"__metadata__": {"format": 1}, **GOOD}), DATA), "__metadata__"),
    "extra entry field": (
        header_file(js({"w": {**GOOD["w"], "offset": 3}, "b": GOOD["b"]}), DATA),
        "unknown field",
    ),
}


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """path -> (content, mtime_ns) of every file below the roots."""
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                st = p.lstat()
                out[str(p)] = (p.read_bytes() if p.is_file() else os.readlink(p).encode(), st.st_mtime_ns)
    return out


def assert_untouched(before: dict[str, tuple[bytes, int]], after: dict[str, tuple[bytes, int]], model: Path) -> None:
    """Same bytes and mtimes; the one new file allowed is rrome's own (empty-of-data) lock file."""
    lock = str(model / STATE_DIR / "lock")
    new = sorted(set(after) - set(before) - {lock})
    assert not new, f"files appeared: {new}"
    for path, (data, mtime) in before.items():
        assert path in after, f"{path} vanished"
        assert after[path][0] == data, f"{path} changed"
        assert after[path][1] == mtime, f"{path}: modification time changed"


def assert_every_call_refuses(model: Path, root: Path, error: type[Exception], *fragments: str) -> None:
    """inspect, apply in place and apply to a copy (below ``root``) of ``model`` each raise
    ``error`` naming every fragment, and nothing below ``root`` changes."""
    before = snapshot(root)
    for call in (
        lambda: rrome.inspect(model),
        lambda: rrome.apply_deltas(model, [DELTA]),
        lambda: rrome.apply_deltas(model, [DELTA], out_dir=root / "copy"),
    ):
        with pytest.raises(error) as info:
            call()
        assert all(f in str(info.value) for f in fragments), str(info.value)
    assert_untouched(before, snapshot(root), model)


@pytest.fixture
def single(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    write_safetensors(model / "model.safetensors", {"w": W, "b": B})
    (model / "config.json").write_text("{}")
    return model


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    model = tmp_path / "sharded"
    model.mkdir()
    write_safetensors(model / "a.safetensors", {"w": W})
    write_safetensors(model / "b.safetensors", {"b": B})
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "a.safetensors", "b": "b.safetensors"}})
    )
    return model


def test_the_valid_fixtures_are_valid(single: Path, sharded: Path) -> None:
    for model in (single, sharded):
        assert {t.name for t in rrome.inspect(model).tensors} == {"w", "b"}
        rrome.apply_deltas(model, [DELTA])


@pytest.mark.parametrize("case", sorted(HOSTILE_SHARDS))
def test_hostile_shard(case: str, single: Path, tmp_path: Path) -> None:
    content, fragment = HOSTILE_SHARDS[case]
    (single / "model.safetensors").write_bytes(content)
    assert_every_call_refuses(single, tmp_path, rrome.SafetensorsHeaderError, fragment, "model.safetensors")
    assert not (tmp_path / "copy").exists() and not (tmp_path / ".copy.rrome-partial").exists()


@pytest.mark.parametrize("case", ["absurd header length", "deeply nested JSON"])
def test_hostile_shard_through_the_cli(case: str, single: Path, tmp_path: Path) -> None:
    content, fragment = HOSTILE_SHARDS[case]
    (single / "model.safetensors").write_bytes(content)
    rrome.save_deltas(tmp_path / "bundle", [DELTA])
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli("apply-deltas", tmp_path / "bundle", single), "invalid safetensors file", fragment)
    assert_one_line_error(run_cli("inspect", single), fragment)
    assert_untouched(before, snapshot(tmp_path), single)


def test_hostile_deltas_bundle(single: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    rrome.save_deltas(bundle, [DELTA])
    (bundle / "rrome_deltas.safetensors").write_bytes(HOSTILE_SHARDS["overlapping tensors"][0])
    before = snapshot(tmp_path)
    with pytest.raises(rrome.SafetensorsHeaderError, match="overlaps"):
        rrome.load_deltas(bundle)
    assert_one_line_error(run_cli("apply-deltas", bundle, single), "rrome_deltas.safetensors", "overlaps")
    assert_untouched(before, snapshot(tmp_path), single)


def _index(model: Path, weight_map: object) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "case",
    [
        "parent",
        "absolute",
        "subfolder",
        "backslash",
        "dot-dot",
        "empty",
        "not a string",
        "no map",
        "bad JSON",
        "wrong",
        "twice",
    ],
)
def test_hostile_index(case: str, sharded: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sharded / "a.safetensors", outside)
    (sharded / "sub").mkdir()
    shutil.copy(sharded / "a.safetensors", sharded / "sub" / "a.safetensors")
    index = sharded / "model.safetensors.index.json"
    fragment = "not a plain file name inside the model folder"
    if case == "parent":
        _index(sharded, {"w": "../outside.safetensors", "b": "b.safetensors"})
    elif case == "absolute":
        _index(sharded, {"w": str(outside), "b": "b.safetensors"})
    elif case == "subfolder":
        _index(sharded, {"w": "sub/a.safetensors", "b": "b.safetensors"})
    elif case == "backslash":
        _index(sharded, {"w": "..\\outside.safetensors", "b": "b.safetensors"})
    elif case == "dot-dot":
        _index(sharded, {"w": "..", "b": "b.safetensors"})
    elif case == "empty":
        _index(sharded, {"w": "", "b": "b.safetensors"})
    elif case == "not a string":
        _index(sharded, {"w": 3, "b": "b.safetensors"})
        fragment = "is not a string"
    elif case == "no map":
        index.write_text(json.dumps({"weight_map": ["a.safetensors"]}))
        fragment = 'has no "weight_map" object'
    elif case == "bad JSON":
        index.write_text('{"weight_map": {')
        fragment = "not valid JSON"
    elif case == "twice":
        write_safetensors(sharded / "b.safetensors", {"w": W, "b": B})
        fragment = '"w" appears in more than one shard'
    else:
        _index(sharded, {"w": "b.safetensors", "b": "b.safetensors"})
        fragment = 'index names "w" but b.safetensors does not hold it'
    assert_every_call_refuses(sharded, tmp_path, rrome.CheckpointError, fragment)
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("how", ["symlink", "symlinked folder"])
def test_shard_links_out_of_the_folder_are_not_written(how: str, sharded: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(sharded / "a.safetensors", outside / "a.safetensors")
    if how == "symlink":
        (sharded / "a.safetensors").symlink_to(outside / "a.safetensors")
    else:
        (sharded / "a.safetensors").symlink_to(Path("..") / "elsewhere" / "a.safetensors")
    before = snapshot(tmp_path)
    with pytest.raises(rrome.CheckpointError, match="outside the model folder"):
        rrome.apply_deltas(sharded, [DELTA])
    assert_untouched(before, snapshot(tmp_path), sharded)
    # Reading through the link (e.g. a Hugging Face cache snapshot) is fine; a copy never
    # follows a link (tests/test_untrusted_folder.py): `cp -rL` first makes a real folder.
    assert {t.name for t in rrome.inspect(sharded).tensors} == {"w", "b"}
    with pytest.raises(rrome.CheckpointError, match="symbolic link"):
        rrome.apply_deltas(sharded, [DELTA], out_dir=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert (outside / "a.safetensors").read_bytes() == before[str(outside / "a.safetensors")][0]


def test_hard_linked_shard_is_unshared_not_written_through(sharded: Path, tmp_path: Path) -> None:
    # A shard with another hard link (outside the folder here) gets an inode of its own before
    # the in-place edit: the other name keeps its bytes and its modification time.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(sharded / "a.safetensors", outside / "a.safetensors")
    os.link(outside / "a.safetensors", sharded / "a.safetensors")
    before = snapshot(outside)
    rrome.apply_deltas(sharded, [DELTA])
    assert_untouched(before, snapshot(outside), sharded)
    assert os.stat(outside / "a.safetensors").st_nlink == 1
    assert not (sharded / "a.safetensors").samefile(outside / "a.safetensors")
    assert (sharded / "a.safetensors").read_bytes() != before[str(outside / "a.safetensors")][0]
    assert not [p.name for p in sharded.iterdir() if ".rrome-tmp-" in p.name]
    rrome.revert(sharded)
    assert (sharded / "a.safetensors").read_bytes() == before[str(outside / "a.safetensors")][0]


# --- full disks and read-only files ---------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    return build_oracle(tmp_path_factory.mktemp("io-oracle"), calibrate=False)


def file_size_limit(limit: int) -> Callable[[], None]:
    """A child that may not write past ``limit`` bytes of any file (a full disk, as ``ulimit -f``)."""

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return pre


def without_write_override() -> None:
    """Makes permission bits bind even for root: drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # PR_CAPBSET_DROP: the capabilities are gone after exec
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                os._exit(77)


def _copy_model(oracle: Oracle, dest: Path) -> Path:
    shutil.copytree(oracle.pristine, dest)
    return dest


@pytest.mark.parametrize("limit", [0, 4096, 1_000_000, 64 << 20])
def test_file_size_limit_in_place(limit: int, oracle: Oracle, tmp_path: Path) -> None:
    model = _copy_model(oracle, tmp_path / "model")
    proc = run_cli("apply-deltas", oracle.bundle, model, preexec=file_size_limit(limit))
    if limit >= 64 << 20:
        assert proc.returncode == 0, proc.stderr
        assert state_of(model, oracle, {1}) == 1
        return
    assert_one_line_error(proc, "File too large")
    # Rolled back at once: no recovery needed.
    assert rrome.inspect(model).pending == [] and leftovers(model) == []
    assert state_of(model, oracle, {0}) == 0


@pytest.mark.parametrize("limit", [0, 1_000_000])
def test_file_size_limit_copy(limit: int, oracle: Oracle, tmp_path: Path) -> None:
    model = _copy_model(oracle, tmp_path / "model")
    out = tmp_path / "copy"
    before = snapshot(model)
    proc = run_cli("apply-deltas", "--out", out, oracle.bundle, model, preexec=file_size_limit(limit))
    assert_one_line_error(proc, "File too large")
    assert not out.exists() and not (tmp_path / ".copy.rrome-partial").exists()
    assert_untouched(before, snapshot(model), model)


def test_read_only_shard(oracle: Oracle, tmp_path: Path) -> None:
    model = _copy_model(oracle, tmp_path / "model")
    shard = model / "model-00002-of-00003.safetensors"
    shard.chmod(0o444)
    before = snapshot(model)
    proc = run_cli("apply-deltas", oracle.bundle, model, preexec=without_write_override)
    assert proc.returncode != 77, "could not drop root's permission override"
    # The journal was written and the first shard patched before the read-only one was met:
    # the failed write is rolled back before the command returns.
    assert_one_line_error(proc, str(shard), "Permission denied")
    assert state_of(model, oracle, {0}) == 0
    for path, (data, _) in before.items():
        assert Path(path).read_bytes() == data, path
    shard.chmod(0o644)


def test_read_only_model_folder(oracle: Oracle, tmp_path: Path) -> None:
    model = _copy_model(oracle, tmp_path / "model")
    model.chmod(0o555)
    try:
        before = snapshot(model)
        proc = run_cli("apply-deltas", oracle.bundle, model, preexec=without_write_override)
        assert_one_line_error(proc, "Permission denied")
        assert_untouched(before, snapshot(model), model)
        # A read-only source can still be edited into a copy.
        proc = run_cli("apply-deltas", "--out", tmp_path / "copy", oracle.bundle, model, preexec=without_write_override)
        assert proc.returncode == 0, proc.stderr
        assert state_of(tmp_path / "copy", oracle, {1}) == 1
        assert_untouched(before, snapshot(model), model)
    finally:
        model.chmod(0o755)


def test_read_only_destination_parent(oracle: Oracle, tmp_path: Path) -> None:
    model = _copy_model(oracle, tmp_path / "model")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_cli("apply-deltas", "--out", parent / "copy", oracle.bundle, model, preexec=without_write_override)
        assert_one_line_error(proc, "Permission denied")
        assert list(parent.iterdir()) == []
        assert state_of(model, oracle, {0}) == 0
    finally:
        parent.chmod(0o755)
