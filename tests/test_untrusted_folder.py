"""A model folder is untrusted input (docs/design.md §7, "Threat model").

A folder from a clone, a tarball or a colleague's disk keeps its symbolic links and its
``.rrome/`` folder. Each test plants what an attacker could ship (a lock that is a link, a
journal or undo file that names a file which is not a tensor, links out of the folder, a FIFO
named as a shard, a header with hundreds of thousands of tensors) and checks that rrome refuses
with a clear one-line error and changes no byte outside the checkpoint's tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import DELTAS_FILE, EDITS_FILE, RROME_EXE, STATE_DIR, assert_one_line_error, run_cli, without_lock
from tiny_models import write_safetensors

import rrome
from rrome.files.edits import load_requests
from rrome.files.shards import load_deltas_for

W = ("F32", (4, 8), np.arange(32, dtype=np.float32).tobytes())
B = ("F32", (8,), np.ones(8, dtype=np.float32).tobytes())
DELTA = rrome.Delta("w", np.ones(8, np.float32), np.ones(4, np.float32), layout="out_in")
CONFIG = b'{"model_type": "llama"}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[str, bytes]:
    """relative path -> content (a link's target for links) of everything below root, links not followed."""
    out: dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = b"link:" + os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
    return out


def make_model(tmp_path: Path) -> Path:
    """A small model folder ``tmp_path/m``: ``w`` F32 [4, 8], ``b`` F32 [8] and a config.json."""
    m = tmp_path / "m"
    m.mkdir()
    write_safetensors(m / "model.safetensors", {"w": W, "b": B})
    (m / "config.json").write_bytes(CONFIG)
    return m


def make_bundle(tmp_path: Path) -> Path:
    """A bundle ``tmp_path/bundle`` holding DELTA."""
    b = tmp_path / "bundle"
    rrome.save_deltas(b, [DELTA])
    return b


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


def w_region(model: Path) -> tuple[int, int]:
    """(absolute offset, length) of tensor w in model.safetensors."""
    raw = (model / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])["w"]["data_offsets"]
    return 8 + n + begin, end - begin


def undo_file(path: Path, batch: int, regions: list[dict[str, object]], originals: list[bytes]) -> None:
    """An undo journal in rrome's format (U8 tensors region.<i>, region table in the metadata)."""
    header: dict[str, object] = {
        "__metadata__": {"format": "rrome-undo/1", "batch": str(batch), "regions": json.dumps(regions)}
    }
    offset = 0
    for i, data in enumerate(originals):
        header[f"region.{i}"] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(originals))


def region(shard: str, tensor: str, offset: int, original: bytes, current: bytes) -> dict[str, object]:
    return {
        "shard": shard,
        "tensor": tensor,
        "offset": offset,
        "len": len(original),
        "sha_before": sha(original),
        "sha_after": sha(current),
    }


# --- 1. a lock file that is a link -------------------------------------------------------------


@pytest.mark.parametrize("command", ["recover", "apply-deltas", "apply-deltas --out", "revert"])
def test_symlinked_lock_is_not_followed(command: str, model: Path, bundle: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (model / STATE_DIR).mkdir()
    (model / STATE_DIR / "lock").symlink_to(Path("..") / ".." / "victim.txt")
    before = tree(tmp_path)
    args = {
        "recover": ["recover", model],
        "apply-deltas": ["apply-deltas", bundle, model],
        "apply-deltas --out": ["apply-deltas", "--out", tmp_path / "copy", bundle, model],
        "revert": ["revert", model],
    }[command]
    assert_one_line_error(run_cli(*args), "lock", "symbolic link")
    assert victim.read_text() == "precious\n"
    assert tree(tmp_path) == before


def test_state_folder_that_is_a_link_is_refused(model: Path, bundle: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (model / STATE_DIR).symlink_to(elsewhere)
    before = tree(tmp_path)
    for args in (["apply-deltas", bundle, model], ["recover", model], ["revert", model]):
        assert_one_line_error(run_cli(*args), STATE_DIR, "symbolic link")
    assert tree(tmp_path) == before
    assert list(elsewhere.iterdir()) == []


# --- 2. planted journals, undo files and revert markers ----------------------------------------


def _plant_journal(model: Path, tmp_path: Path, case: str) -> None:
    journal = model / STATE_DIR / "journal.safetensors"
    off, n = w_region(model)
    current = (model / "model.safetensors").read_bytes()[off : off + n]
    if case == "names config.json":
        regions = [region("config.json", "w", 0, b"X" * len(CONFIG), CONFIG)]
        originals = [b"X" * len(CONFIG)]
    elif case == "names a link out of the folder":
        victim = tmp_path / "victim.bin"
        victim.write_bytes(b"v" * n)
        (model / "link.safetensors").symlink_to(Path("..") / "victim.bin")
        regions = [region("link.safetensors", "w", 0, b"A" * n, b"v" * n)]
        originals = [b"A" * n]
    elif case == "names a shard that is a link out":
        outside = tmp_path / "outside.safetensors"
        (model / "model.safetensors").rename(outside)
        (model / "model.safetensors").symlink_to(Path("..") / "outside.safetensors")
        regions = [region("model.safetensors", "w", off, b"A" * n, current)]
        originals = [b"A" * n]
    elif case == "offset in the header":
        head = (model / "model.safetensors").read_bytes()[:16]
        regions = [region("model.safetensors", "w", 0, b"B" * 16, head)]
        originals = [b"B" * 16]
    elif case == "offset past the tensor":
        tail_off = off + n  # tensor b's bytes, recorded as w's
        tail = (model / "model.safetensors").read_bytes()[tail_off : tail_off + 32]
        regions = [region("model.safetensors", "w", tail_off, b"C" * 32, tail)]
        originals = [b"C" * 32]
    elif case == "unknown tensor":
        regions = [region("model.safetensors", "nope", off, b"D" * n, current)]
        originals = [b"D" * n]
    else:
        raise AssertionError(case)
    undo_file(journal, 1, regions, originals)


JOURNAL_CASES = [
    "names config.json",
    "names a link out of the folder",
    "names a shard that is a link out",
    "offset in the header",
    "offset past the tensor",
    "unknown tensor",
]


@pytest.mark.parametrize("case", JOURNAL_CASES)
def test_planted_journal_is_refused(case: str, model: Path, bundle: Path, tmp_path: Path) -> None:
    _plant_journal(model, tmp_path, case)
    before = tree(tmp_path)
    for args in (["recover", model], ["apply-deltas", bundle, model], ["revert", model]):
        assert_one_line_error(run_cli(*args), "journal.safetensors", "region 0")
    with pytest.raises(rrome.IntegrityError, match=r"journal\.safetensors"):
        rrome.recover(model)
    assert without_lock(tree(tmp_path)) == without_lock(before)


def test_planted_revert_marker_and_undo_file_are_refused(model: Path, bundle: Path, tmp_path: Path) -> None:
    evil = b'{"auto_map": "x"}'[: len(CONFIG)].ljust(len(CONFIG))
    undo_file(
        model / STATE_DIR / "undo" / "batch-000001.safetensors",
        1,
        [region("config.json", "w", 0, evil, CONFIG)],
        [evil],
    )
    (model / STATE_DIR / "revert.json").write_text('{"batch": 1}')
    before = tree(tmp_path)
    for args in (["apply-deltas", bundle, model], ["recover", model], ["revert", model]):
        assert_one_line_error(run_cli(*args), "batch-000001.safetensors", "config.json")
    assert (model / "config.json").read_bytes() == CONFIG
    assert without_lock(tree(tmp_path)) == without_lock(before)


def test_revert_marker_for_a_batch_without_undo_data_is_refused(model: Path, bundle: Path, tmp_path: Path) -> None:
    # A marker naming a logged batch whose undo file is missing would silently drop log records.
    rrome.apply_deltas(model, [DELTA])
    (model / STATE_DIR / "undo" / "batch-000001.safetensors").unlink()
    (model / STATE_DIR / "revert.json").write_text('{"batch": 1}')
    before = tree(tmp_path)
    assert_one_line_error(run_cli("recover", model), "revert.json", "batch 1")
    assert without_lock(tree(tmp_path)) == without_lock(before)


def test_recovery_that_runs_first_is_reported(model: Path, bundle: Path) -> None:
    # A genuine interrupted write (killed after the journal) is rolled back by the next apply,
    # which says so on the command line and in the Python report.
    proc = run_cli("apply-deltas", bundle, model, crash_at="journal-written")
    assert proc.returncode < 0
    proc = run_cli("apply-deltas", bundle, model)
    assert proc.returncode == 0, proc.stderr
    assert "recovered: rolled back uncommitted batch 1" in proc.stdout
    proc = run_cli("apply-deltas", bundle, model, "--again", crash_at="committed")
    assert proc.returncode < 0
    rep = rrome.apply_deltas(model, [DELTA], again=True)
    assert rep.batch == 3 and any("completed batch 2" in a for a in rep.recovered)
    assert rrome.apply_deltas(model, [DELTA], again=True).recovered == []
    proc = run_cli("apply-deltas", bundle, model, "--again", crash_at="committed")
    proc = run_cli("revert", model)
    assert proc.returncode == 0, proc.stderr
    assert "recovered: completed batch 5" in proc.stdout and "reverted batch 5" in proc.stdout


# --- 3. copies never follow links ------------------------------------------------------------


@pytest.mark.parametrize("case", ["link to a secret folder", "link to a secret file", "loop", "shard link out"])
def test_copy_refuses_links(case: str, model: Path, bundle: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY\n")
    if case == "link to a secret folder":
        (model / "docs").symlink_to(Path("..") / "secret")
        name = "docs"
    elif case == "link to a secret file":
        (model / "tokenizer.json").symlink_to(secret / "id_rsa")
        name = "tokenizer.json"
    elif case == "loop":
        (model / "sub").mkdir()
        (model / "sub" / "loop").symlink_to(Path(".."))
        name = "loop"
    else:
        (model / "model.safetensors").rename(tmp_path / "outside.safetensors")
        (model / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
        name = "model.safetensors"
    before = tree(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("apply-deltas", "--out", out, bundle, model), name, "symbolic link")
    with pytest.raises(rrome.CheckpointError, match="symbolic link"):
        rrome.apply_deltas(model, [DELTA], out_dir=out)
    assert not out.exists() and not (tmp_path / ".out.rrome-partial").exists()
    assert without_lock(tree(tmp_path)) == without_lock(before)


def test_copy_refuses_special_files(model: Path, bundle: Path, tmp_path: Path) -> None:
    os.mkfifo(model / "pipe")
    assert_one_line_error(
        run_cli("apply-deltas", "--out", tmp_path / "out", bundle, model), "pipe", "not a regular file"
    )
    assert not (tmp_path / "out").exists()


# --- 4. a crash between the two renames of a shrinking write ------------------------------------


def test_kill_between_the_renames_of_a_shrinking_revert(model: Path, bundle: Path) -> None:
    rrome.apply_deltas(model, [DELTA])
    rrome.apply_deltas(model, [DELTA, DELTA], again=True)
    proc = run_cli("revert", model, crash_at="log-shrunk")
    assert proc.returncode < 0, (proc.returncode, proc.stderr)
    # The folder stays readable and the interrupted revert finishes.
    assert [e.batch for e in rrome.inspect(model).edits] == [1]
    proc = run_cli("recover", model)
    assert proc.returncode == 0, proc.stderr
    assert [r.batch for r in rrome.load_deltas(model)] == [1]
    assert rrome.revert(model) == [1]
    assert not (model / EDITS_FILE).exists() and not (model / DELTAS_FILE).exists()


def test_kill_between_the_renames_of_a_rollback(model: Path, bundle: Path) -> None:
    rrome.apply_deltas(model, [DELTA, DELTA])
    first = (model / "model.safetensors").read_bytes()
    proc = run_cli("apply-deltas", bundle, model, "--again", crash_at="patched")
    assert proc.returncode < 0
    proc = run_cli("recover", model, crash_at="log-shrunk")
    assert proc.returncode < 0, (proc.returncode, proc.stderr)
    assert [e.batch for e in rrome.inspect(model).edits] == [1, 1]
    proc = run_cli("recover", model)
    assert proc.returncode == 0, proc.stderr
    assert (model / "model.safetensors").read_bytes() == first
    assert rrome.revert(model) == [1]


# --- 5. the smaller ones -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        # The command line runs on this one (a subprocess that imports torch).
        pytest.param('{"a":' * 100_000 + "1" + "}" * 100_000, marks=pytest.mark.slow, id="line0"),
        pytest.param('{"case_id": ' + "9" * 5000 + "}", id="line1"),
    ],
)
def test_edits_file_with_absurd_json_is_a_line_error(line: str, tmp_path: Path, model: Path) -> None:
    good = json.dumps({"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"})
    edits = tmp_path / "edits.jsonl"
    edits.write_text(good + "\n" + line + "\n")
    with pytest.raises(rrome.EditFileError, match=r"edits.jsonl:2: "):
        load_requests(edits)
    if line.startswith('{"a":'):  # the command line too, once (it imports torch: seconds)
        proc = run_cli("apply", edits, model)
        assert_one_line_error(proc, "edits.jsonl:2: ", "nested too deeply")
        assert "Traceback" not in proc.stderr


def _no_hang(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=30)


def test_fifo_named_as_a_shard_does_not_hang(model: Path, bundle: Path, tmp_path: Path) -> None:
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    assert_one_line_error(_no_hang("inspect", model), "model.safetensors", "not a regular file")
    assert_one_line_error(_no_hang("apply-deltas", bundle, model), "model.safetensors", "not a regular file")


def test_fifo_as_an_index_or_edit_log_does_not_hang(model: Path, bundle: Path) -> None:
    os.mkfifo(model / EDITS_FILE)
    assert_one_line_error(_no_hang("inspect", model), EDITS_FILE, "not a regular file")
    (bundle / EDITS_FILE).unlink()
    os.mkfifo(bundle / EDITS_FILE)
    assert_one_line_error(_no_hang("apply-deltas", bundle, model), EDITS_FILE, "not a regular file")


def test_header_with_many_tensors_costs_little_memory(tmp_path: Path) -> None:
    n = 400_000
    m = tmp_path / "many"
    m.mkdir()
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
    raw = ("{" + entries + "}").encode()
    raw += b" " * (-len(raw) % 8)
    (m / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    probe = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(RROME_EXE), "inspect", str(m)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    rc, peak_kib = int(out[0]), int(out[1])
    assert rc == 0
    # The header is 21 MB of JSON; 122 MiB measured (Python included), where a parser that kept
    # a JSON value per entry needed 950 MiB.
    assert peak_kib < 200 * 1024, f"peak memory {peak_kib / 1024:.0f} MiB for {n} tensors"


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.parametrize("shard_mode", [0o600, 0o640])
def test_created_files_inherit_the_shard_mode(shard_mode: int, model: Path, bundle: Path, tmp_path: Path) -> None:
    os.chmod(model / "model.safetensors", shard_mode)
    old = os.umask(0o022)
    try:
        rrome.apply_deltas(model, [DELTA])
        rrome.apply_deltas(model, [DELTA], out_dir=tmp_path / "copy", again=True)
        proc = run_cli("apply-deltas", bundle, model, "--again", crash_at="journal-written")
        assert proc.returncode < 0
        journal_mode = stat.S_IMODE((model / STATE_DIR / "journal.safetensors").stat().st_mode)
        rrome.recover(model)
    finally:
        os.umask(old)
    assert journal_mode == shard_mode
    dir_mode = shard_mode | ((shard_mode & 0o444) >> 2)  # x where r
    for root in (model, tmp_path / "copy"):
        modes = _modes(root)
        for rel in (EDITS_FILE, DELTAS_FILE, f"{STATE_DIR}/lock", f"{STATE_DIR}/undo/batch-000001.safetensors"):
            assert modes[rel] == shard_mode, (root, rel, oct(modes[rel]))
        for rel in (STATE_DIR, f"{STATE_DIR}/undo"):
            assert modes[rel] == dir_mode, (root, rel, oct(modes[rel]))
    assert _modes(model)["config.json"] == _modes(tmp_path / "copy")["config.json"]


def test_inspect_escapes_tensor_names(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    write_safetensors(m / "model.safetensors", {"w\nrrome: forged line": W, "b\x1b[31m": B})
    proc = run_cli("inspect", "--tensors", m)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not any(line.startswith("rrome: forged line") for line in lines), proc.stdout
    assert "\x1b" not in proc.stdout
    assert any("w\\nrrome: forged line" in line for line in lines), proc.stdout


def test_line_numbers_survive_unicode_blank_lines(model: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bad = rrome.Delta("w", np.ones(7, np.float32), np.ones(4, np.float32), layout="out_in")
    rrome.save_deltas(bundle, [DELTA, bad])
    lines = (bundle / EDITS_FILE).read_text().splitlines()
    # A line holding only a non-breaking space (blank to the JSON-lines reader) before the bad record.
    (bundle / EDITS_FILE).write_text(lines[0] + "\n\u00a0\n" + lines[1] + "\n")
    with pytest.raises(rrome.DeltaError, match=r"rrome_edits.jsonl:3: "):
        load_deltas_for(bundle, model)
