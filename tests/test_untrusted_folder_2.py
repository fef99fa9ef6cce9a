"""A model folder is untrusted input, second round (docs/design.md §7).

The first round (tests/test_untrusted_folder.py) planted links, journals and special files.
This one plants what passes those checks: a lock that is a *hard* link to a shard, a stale
shard index beside ``model.safetensors``, an undo folder that is a file, a sparse deltas file
that claims 64 GiB, a batch number at the end of u64, names and lock holders that carry
terminal escapes; and it checks what a user sees when a command is interrupted after its
batch committed, or when the same bundle is applied twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _helpers import (
    DELTAS_FILE,
    EDITS_FILE,
    RROME_EXE,
    STATE_DIR,
    assert_one_line_error,
    run_cli,
    run_python,
    without_lock,
)
from test_untrusted_folder import DELTA, make_bundle, make_model, tree

import rrome


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


def w_values(model: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(model / "model.safetensors")["w"]


# --- 1. a hard-linked lock ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["shard", "config", "outside"])
@pytest.mark.parametrize("command", ["apply-deltas", "apply-deltas --out", "revert", "recover"])
def test_a_hard_linked_lock_is_never_written(
    tmp_path: Path, model: Path, bundle: Path, target: str, command: str
) -> None:
    if command in ("revert", "recover"):
        rrome.apply_deltas(model, [DELTA])
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"a file of the user's, outside the folder")
    linked = {"shard": model / "model.safetensors", "config": model / "config.json", "outside": outside}[target]
    lock = model / STATE_DIR / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.unlink(missing_ok=True)
    os.link(linked, lock)
    before = linked.read_bytes()
    args = {
        "apply-deltas": ["apply-deltas", bundle, model],
        "apply-deltas --out": ["apply-deltas", bundle, model, "--out", tmp_path / "copy"],
        "revert": ["revert", model],
        "recover": ["recover", model],
    }[command]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    after = linked.read_bytes()
    if target == "shard" and command in ("apply-deltas", "revert"):
        # The tensor w is the one thing that may change; the file keeps its size and header.
        assert len(after) == len(before) and after[:100] == before[:100]
        assert rrome.Checkpoint(model).num_tensors == 2
    else:
        assert after == before
    assert os.stat(lock).st_nlink == 1 and not os.path.samefile(lock, linked)


# --- 2. the weights file transformers loads ---------------------------------------------------


def _down_proj(model_dir: Path) -> tuple[str, int, int]:
    ckpt = rrome.Checkpoint(model_dir)
    name = next(t.name for t in ckpt.tensors() if t.name.endswith("layers.0.mlp.down_proj.weight"))
    d_out, d_in = next(t.shape for t in ckpt.tensors() if t.name == name)
    return name, d_out, d_in


def _loaded_weight(model_dir: Path, name: str) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    return m.state_dict()[name].detach().numpy().copy()


@pytest.mark.parametrize("layout", ["single", "sharded", "single beside a stale index", "named in config"])
def test_the_file_written_is_the_file_transformers_loads(tiny_copy, tiny_dir, tmp_path: Path, layout: str) -> None:
    model = tiny_copy("llama", sharded=layout == "sharded")
    if layout == "single beside a stale index":
        # An earlier sharded save left its index and shards behind.
        sharded = tiny_dir("llama", sharded=True)
        for f in sharded.iterdir():
            if f.name.startswith("model-") or f.name.endswith(".index.json"):
                (model / f.name).write_bytes(f.read_bytes())
    if layout == "named in config":
        # config.json names the weights file; model.safetensors is a stale copy beside it.
        (model / "weights.safetensors").write_bytes((model / "model.safetensors").read_bytes())
        config = json.loads((model / "config.json").read_text())
        config["transformers_weights"] = "weights.safetensors"
        (model / "config.json").write_text(json.dumps(config))
    name, d_out, d_in = _down_proj(model)
    before = _loaded_weight(model, name)
    rng = np.random.default_rng(0)
    u, r = rng.standard_normal(d_in).astype(np.float32), rng.standard_normal(d_out).astype(np.float32)
    rrome.apply_deltas(model, [rrome.Delta(name, u, r, layout="out_in")])
    after = _loaded_weight(model, name)
    np.testing.assert_allclose(after - before, np.outer(r, u), rtol=1e-5, atol=1e-5)


def test_a_config_naming_weights_rrome_cannot_follow_is_refused(model: Path, bundle: Path) -> None:
    for bad in ['"../elsewhere.safetensors"', '"weights.bin"', "7"]:
        (model / "config.json").write_text(f'{{"model_type": "llama", "transformers_weights": {bad}}}')
        before = tree(model)
        assert_one_line_error(run_cli("apply-deltas", bundle, model), "config.json", "transformers_weights")
        assert without_lock(tree(model)) == without_lock(before)


# --- 3. a command that committed, and the same bundle twice ---------------------------------


@pytest.mark.parametrize("plant", ["file", "link", "folder for the batch"])
def test_a_planted_undo_folder_is_refused_before_anything_is_written(
    tmp_path: Path, model: Path, bundle: Path, plant: str
) -> None:
    state = model / STATE_DIR
    state.mkdir()
    if plant == "file":
        (state / "undo").write_bytes(b"not a folder")
    elif plant == "link":
        (tmp_path / "elsewhere").mkdir()
        (state / "undo").symlink_to(tmp_path / "elsewhere")
    else:
        (state / "undo" / "batch-000001.safetensors").mkdir(parents=True)
    before = tree(model)
    assert_one_line_error(run_cli("apply-deltas", bundle, model), "undo")
    assert without_lock(tree(model)) == without_lock(before)
    if plant == "link":
        assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_same_bundle_twice_is_refused_unless_again(tmp_path: Path, model: Path, bundle: Path) -> None:
    w0 = w_values(model)
    assert run_cli("apply-deltas", bundle, model).returncode == 0
    w1 = w_values(model)
    before = tree(model)
    assert_one_line_error(run_cli("apply-deltas", bundle, model), "applied before", "--again", "batch 1")
    assert without_lock(tree(model)) == without_lock(before)
    # A copy of a folder that holds the batch is refused alike, and nothing appears.
    assert_one_line_error(run_cli("apply-deltas", bundle, model, "--out", tmp_path / "c"), "--again")
    assert not (tmp_path / "c").exists()
    with pytest.raises(rrome.DeltaError, match="again"):
        rrome.apply_deltas(model, [DELTA])
    proc = run_cli("apply-deltas", bundle, model, "--again")
    assert proc.returncode == 0 and "as batch 2" in proc.stdout, proc.stderr
    np.testing.assert_array_equal(w_values(model) - w1, w1 - w0)


def test_an_interrupt_during_the_write_reports_the_committed_batch(model: Path, bundle: Path) -> None:
    # SIGINT arriving while the Rust call runs: Python only acts on it once the call returns,
    # after the commit. Here it is sent from inside the call's Python wrapper, just after.
    code = (
        "import os, signal, sys\n"
        "import rrome.files.shards as shards\n"
        "real = shards.apply_bundle\n"
        "def interrupted(*a, **k):\n"
        "    rep = real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return rep\n"
        "shards.apply_bundle = interrupted\n"
        "from rrome.cli import main\n"
        "sys.argv = ['rrome', 'apply-deltas', sys.argv[1], sys.argv[2]]\n"
        "main()\n"
    )
    proc = run_python(code, str(bundle), str(model))
    assert proc.returncode == 0, proc.stderr
    assert "as batch 1" in proc.stdout and "Aborted" not in proc.stdout + proc.stderr
    assert "batch 1 was committed" in proc.stderr
    assert [e.batch for e in rrome.inspect(model).edits] == [1]


def test_a_real_interrupt_never_leaves_a_half_reported_write(model: Path, bundle: Path) -> None:
    # SIGINT at once, while the command starts up or writes: either nothing was applied and the
    # command says it was interrupted, or batch 1 is applied and the command says so.
    proc = subprocess.Popen(
        [str(RROME_EXE), "apply-deltas", str(bundle), str(model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    logged = [e.batch for e in rrome.inspect(model).edits]
    if logged:
        assert proc.returncode == 0 and "as batch 1" in out, (out, err)
    else:
        assert proc.returncode != 0


# --- 4-6. wrong input accepted, crashes -------------------------------------------------------


def test_a_mistyped_bundle_path_does_not_fall_back_to_its_parent(tmp_path: Path, model: Path, bundle: Path) -> None:
    before = tree(model)
    assert_one_line_error(run_cli("apply-deltas", bundle / "typo", model), "typo", "no such deltas bundle")
    other = bundle / "notes.txt"
    other.write_text("not a bundle file")
    assert_one_line_error(run_cli("apply-deltas", other, model), "notes.txt", "neither")
    assert without_lock(tree(model)) == without_lock(before)
    assert run_cli("apply-deltas", bundle / EDITS_FILE, model).returncode == 0


def _pad_sparse(deltas_file: Path, extra_bytes: int) -> None:
    """Appends a tensor of ``extra_bytes`` zero bytes (a hole: the file stays small on disk)."""
    raw = deltas_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header["pad"] = {"dtype": "U8", "shape": [extra_bytes], "data_offsets": [len(data), len(data) + extra_bytes]}
    text = json.dumps(header).encode()
    with open(deltas_file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate(8 + len(text) + len(data) + extra_bytes)


def test_a_sparse_64_gib_deltas_file_is_read_only_where_records_point(model: Path, bundle: Path) -> None:
    _pad_sparse(bundle / DELTAS_FILE, 64 << 30)
    proc = run_cli("apply-deltas", bundle, model)
    assert proc.returncode == 0, proc.stderr
    # The same in the model's own edit log: inspect, a second apply and revert all work.
    _pad_sparse(model / DELTAS_FILE, 64 << 30)
    assert run_cli("inspect", model).returncode == 0
    rrome.apply_deltas(model, [rrome.Delta("w", np.full(8, 2, np.float32), np.ones(4, np.float32), layout="out_in")])
    for _ in range(2):
        proc = run_cli("revert", model)
        assert proc.returncode == 0, proc.stderr
    assert not (model / EDITS_FILE).exists()


def test_a_record_claiming_a_huge_factor_is_a_one_line_error(model: Path, bundle: Path) -> None:
    edits = bundle / EDITS_FILE
    rec = json.loads(edits.read_text())
    rec["d_in"] = 1 << 34
    edits.write_text(json.dumps(rec) + "\n")
    before = tree(model)
    assert_one_line_error(run_cli("apply-deltas", bundle, model), f"{EDITS_FILE}:1", '"d_in"', "wider than")
    assert without_lock(tree(model)) == without_lock(before)


def test_a_last_batch_of_u64_max_is_a_corrupt_log(model: Path, bundle: Path) -> None:
    rrome.apply_deltas(model, [DELTA])
    edits = model / EDITS_FILE
    rec = json.loads(edits.read_text())
    rec["batch"] = 2**64 - 1
    edits.write_text(json.dumps(rec) + "\n")
    before = tree(model)
    other = rrome.Delta("w", np.full(8, 3, np.float32), np.ones(4, np.float32), layout="out_in")
    rrome.save_deltas(bundle, [other])
    assert_one_line_error(run_cli("apply-deltas", bundle, model), "18446744073709551615", "corrupt")
    assert without_lock(tree(model)) == without_lock(before)


# --- 7-8. output that is escaped, arguments that are not UTF-8 -------------------------------

FORGED = "x\x1b]0;owned\x07\nrecovered: everything is fine"


def test_recovered_file_names_are_escaped(model: Path, bundle: Path) -> None:
    (model / f".{FORGED}.rrome-tmp-1").write_bytes(b"")
    proc = run_cli("apply-deltas", bundle, model)
    assert proc.returncode == 0, proc.stderr
    recovered = [line for line in proc.stdout.splitlines() if line.startswith("recovered:")]
    assert len(recovered) == 1 and "\x1b" not in proc.stdout and "\\x1b" in recovered[0], proc.stdout


def test_a_planted_lock_holder_is_escaped(model: Path, bundle: Path) -> None:
    lock = model / STATE_DIR / "lock"
    lock.parent.mkdir()
    lock.write_text(FORGED + "y" * 100_000)
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_cli("apply-deltas", bundle, model)
    line = assert_one_line_error(proc, "locked by another rrome process")
    assert "\x1b" not in proc.stderr and "\\x1b" in line and len(line) < 4000


def test_arguments_that_are_not_utf8(tmp_path: Path, model: Path, bundle: Path) -> None:
    out = tmp_path / os.fsdecode(b"copy-\xff")
    proc = run_cli("apply-deltas", bundle, model, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "panicked" not in proc.stderr and os.fsencode(out) in [os.fsencode(p) for p in tmp_path.iterdir()]
    # The user's own path is echoed as given (bytes that are not UTF-8 included).
    raw = subprocess.run([str(RROME_EXE), "revert", os.fsencode(out)], capture_output=True, timeout=60, check=False)
    assert raw.returncode == 0 and b"panicked" not in raw.stderr, raw.stderr
    assert b"reverted batch 1" in raw.stdout


# --- smaller: copies ---------------------------------------------------------------------------


def test_out_inside_the_source_is_refused(model: Path, bundle: Path) -> None:
    before = tree(model)
    assert_one_line_error(run_cli("apply-deltas", bundle, model, "--out", model / "edited"), "inside the model folder")
    assert without_lock(tree(model)) == without_lock(before)


def test_a_stale_partial_in_the_source_is_not_copied(tmp_path: Path, model: Path, bundle: Path) -> None:
    stale = model / ".old.rrome-partial"
    stale.mkdir()
    (stale / "junk").write_bytes(b"left by a dead run")
    assert run_cli("apply-deltas", bundle, model, "--out", tmp_path / "c").returncode == 0
    assert not (tmp_path / "c" / ".old.rrome-partial").exists()
