"""The ``rrome`` command line, run as a real subprocess (console script and ``python -m``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _helpers import (
    DELTAS_FILE,
    EDITS_FILE,
    RROME_EXE,
    TARGETS,
    assert_one_line_error,
    file_hashes,
    math_shape,
    random_delta,
    region_sha,
    run_cli,
    run_cli_without,
    shard_hashes,
    shard_of,
    tensor_region,
    without_lock,
)

import rrome

HELP = {
    "apply-deltas": ["DELTAS", "MODEL_DIR", "--out"],
    "revert": ["MODEL_DIR", "--all"],
    "recover": ["MODEL_DIR"],
    "inspect": ["MODEL_DIR", "--tensors", "--json"],
}


@pytest.fixture
def gpt2(tiny_copy: Callable[..., Path]) -> Path:
    return tiny_copy("gpt2", sharded=True)


def gpt2_deltas(model: Path, n: int = 2) -> list[rrome.Delta]:
    t1, t0, layout = TARGETS["gpt2"]
    d_out, d_in = math_shape(model, t1, layout)
    rng = np.random.default_rng(42)
    names = [t1, t0, t1]
    return [random_delta(rng, names[i], d_out, d_in, layout, 1.0 - 0.25 * i, meta={"i": i}) for i in range(n)]


@pytest.fixture
def bundle(tmp_path: Path, gpt2: Path) -> Path:
    path = tmp_path / "bundle"
    rrome.save_deltas(path, gpt2_deltas(gpt2))
    return path


def test_console_script_is_installed() -> None:
    assert RROME_EXE.is_file(), RROME_EXE
    assert os.access(RROME_EXE, os.X_OK)
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for cmd in HELP:
        assert cmd in proc.stdout
    proc = run_cli("--version")
    assert proc.returncode == 0 and rrome.__version__ in proc.stdout


@pytest.mark.parametrize(("exe", "flag"), [(True, "--help"), (False, "-h")], ids=["console-script", "python-m"])
@pytest.mark.parametrize("cmd", list(HELP))
def test_subcommand_help(cmd: str, exe: bool, flag: str) -> None:
    proc = run_cli(cmd, flag, exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Usage: " in proc.stdout and cmd in proc.stdout
    for word in HELP[cmd]:
        assert word in proc.stdout, (cmd, word)


@pytest.mark.parametrize("exe", [True, False], ids=["console-script", "python-m"])
def test_apply_then_inspect_then_revert(gpt2: Path, bundle: Path, exe: bool) -> None:
    before = shard_hashes(gpt2)
    proc = run_cli("apply-deltas", bundle, gpt2, exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert "applied 2 delta(s) to 2 tensor(s)" in proc.stdout
    assert "batch 1" in proc.stdout
    assert shard_hashes(gpt2) != before
    assert [r.batch for r in rrome.load_deltas(gpt2)] == [1, 1]

    proc = run_cli("inspect", gpt2, exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert "edit log: 2 delta(s)" in proc.stdout
    lines = [x for x in proc.stdout.splitlines() if x.strip().startswith("batch 1")]
    assert len(lines) == 2
    assert TARGETS["gpt2"][0] in lines[0] and TARGETS["gpt2"][1] in lines[1]
    assert all("revertible" in x and "in_out" in x for x in lines)

    proc = run_cli("inspect", "--json", gpt2, exe=exe)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [e["batch"] for e in info["edits"]] == [1, 1]
    assert [e["meta"] for e in info["edits"]] == [{"i": 0}, {"i": 1}]
    assert info["pending"] == [] and info["indexed"] is True

    proc = run_cli("inspect", "--tensors", gpt2, exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert TARGETS["gpt2"][0] in proc.stdout and "transformer.wte.weight" in proc.stdout

    proc = run_cli("recover", gpt2, exe=exe)
    assert proc.returncode == 0 and "nothing to recover" in proc.stdout

    proc = run_cli("revert", gpt2, exe=exe)
    assert proc.returncode == 0, proc.stderr
    assert "reverted batch 1" in proc.stdout
    assert shard_hashes(gpt2) == before
    assert not (gpt2 / EDITS_FILE).exists()
    proc = run_cli("inspect", gpt2, exe=exe)
    assert proc.returncode == 0 and "edit log: empty" in proc.stdout


def test_apply_accepts_either_bundle_file(gpt2: Path, bundle: Path) -> None:
    assert run_cli("apply-deltas", bundle / EDITS_FILE, gpt2).returncode == 0
    assert run_cli("apply-deltas", bundle / DELTAS_FILE, gpt2, "--again").returncode == 0
    assert sorted({r.batch for r in rrome.load_deltas(gpt2)}) == [1, 2]
    proc = run_cli("revert", "--all", gpt2)
    assert proc.returncode == 0, proc.stderr
    assert "reverted batches 2, 1" in proc.stdout


def test_apply_out_creates_a_copy(gpt2: Path, bundle: Path, tmp_path: Path) -> None:
    before = without_lock(file_hashes(gpt2))
    out = tmp_path / "edited"
    proc = run_cli("apply-deltas", "--out", out, bundle, gpt2)
    assert proc.returncode == 0, proc.stderr
    assert out.is_dir()
    assert (out / EDITS_FILE).is_file() and (out / DELTAS_FILE).is_file()
    assert [r.batch for r in rrome.load_deltas(out)] == [1, 1]
    assert without_lock(file_hashes(gpt2)) == before
    assert not (gpt2 / EDITS_FILE).exists()
    assert shard_hashes(out) != shard_hashes(gpt2)
    # An existing destination is refused.
    proc = run_cli("apply-deltas", "--out", out, bundle, gpt2)
    assert_one_line_error(proc, str(out))


def test_missing_model_dir(bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli("apply-deltas", bundle, missing)
    assert_one_line_error(proc, str(missing))
    assert not missing.exists()
    for cmd in ("revert", "recover", "inspect"):
        assert_one_line_error(run_cli(cmd, missing), str(missing))
        assert not missing.exists()


def test_missing_bundle(gpt2: Path, tmp_path: Path) -> None:
    before = without_lock(file_hashes(gpt2))
    proc = run_cli("apply-deltas", tmp_path / "no-bundle", gpt2)
    assert_one_line_error(proc, EDITS_FILE)
    assert without_lock(file_hashes(gpt2)) == before


def test_malformed_jsonl_line(gpt2: Path, bundle: Path) -> None:
    before = without_lock(file_hashes(gpt2))
    edits = bundle / EDITS_FILE
    good = edits.read_text()
    assert len(good.splitlines()) == 2
    edits.write_text(good + "{not json\n")
    line = assert_one_line_error(run_cli("apply-deltas", bundle, gpt2), f"{EDITS_FILE}:3:")
    assert "JSON" in line
    # A well-formed line with a bad field names the field.
    edits.write_text(good.replace('"layout":"in_out"', '"layout":"sideways"', 1))
    assert_one_line_error(run_cli("apply-deltas", bundle, gpt2), f"{EDITS_FILE}:1:", "layout")
    assert without_lock(file_hashes(gpt2)) == before


def test_delta_size_mismatch(gpt2: Path, tmp_path: Path) -> None:
    before = without_lock(file_hashes(gpt2))
    t1, _, layout = TARGETS["gpt2"]
    d_out, d_in = math_shape(gpt2, t1, layout)
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad"
    rrome.save_deltas(bad, [random_delta(rng, t1, d_out, d_in + 1, layout, 1.0)])
    assert_one_line_error(run_cli("apply-deltas", bad, gpt2), t1)
    # Swapped layout: same numbers, transposed shape (d_out != d_in for c_proj).
    assert d_out != d_in
    swapped = tmp_path / "swapped"
    rrome.save_deltas(swapped, [random_delta(rng, t1, d_out, d_in, "out_in", 1.0)])
    assert_one_line_error(run_cli("apply-deltas", swapped, gpt2), t1)
    # Unknown tensor.
    unknown = tmp_path / "unknown"
    rrome.save_deltas(unknown, [random_delta(rng, "no.such.weight", d_out, d_in, layout, 1.0)])
    assert_one_line_error(run_cli("apply-deltas", unknown, gpt2), "no.such.weight")
    assert without_lock(file_hashes(gpt2)) == before
    assert not (gpt2 / EDITS_FILE).exists()


@pytest.mark.parametrize(
    "args",
    [
        ["apply-deltas"],
        ["apply-deltas", "BUNDLE"],
        ["revert"],
        ["recover"],
        ["inspect"],
        ["no-such-command"],
        ["revert", "--no-such-flag", "MODEL"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2(args: list[str], bundle: Path, gpt2: Path) -> None:
    args = [str(bundle) if a == "BUNDLE" else str(gpt2) if a == "MODEL" else a for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "Usage:" in proc.stderr


def test_revert_with_nothing_to_revert(gpt2: Path) -> None:
    before = without_lock(file_hashes(gpt2))
    assert_one_line_error(run_cli("revert", gpt2), "revert")
    assert_one_line_error(run_cli("revert", "--all", gpt2))
    assert without_lock(file_hashes(gpt2)) == before


def flip_byte(model: Path, tensor: str) -> None:
    """Changes one byte in the middle of ``tensor``'s stored bytes, in place, as another tool would."""
    shard = model / shard_of(model, tensor)
    start, end = tensor_region(shard, tensor)
    at = (start + end) // 2
    with open(shard, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0x01]))


@pytest.mark.parametrize("args", [[], ["--all"]], ids=["last", "all"])
def test_revert_refuses_a_tensor_changed_after_its_batch(gpt2: Path, bundle: Path, args: list[str]) -> None:
    """docs/design.md §4: revert writes back the stored original bytes only after checking that each
    tensor still holds exactly what the batch wrote; a tensor changed since is refused, and nothing
    in the folder changes (the edit log, the undo file and the changed byte stay)."""
    assert run_cli("apply-deltas", bundle, gpt2).returncode == 0
    edited = TARGETS["gpt2"][0]
    flip_byte(gpt2, edited)
    before = without_lock(file_hashes(gpt2))
    assert_one_line_error(run_cli("revert", *args, gpt2), edited, "changed after batch 1", "refusing to revert")
    assert without_lock(file_hashes(gpt2)) == before
    assert [r.batch for r in rrome.load_deltas(gpt2)] == [1, 1]


def test_revert_ignores_a_change_outside_the_batch(gpt2: Path, bundle: Path) -> None:
    """The check reads the batch's regions only: a change elsewhere does not block the revert, and
    the revert leaves it in place."""
    original = shard_hashes(gpt2)
    assert run_cli("apply-deltas", bundle, gpt2).returncode == 0
    flip_byte(gpt2, "transformer.wte.weight")
    changed = region_sha(gpt2, "transformer.wte.weight")
    proc = run_cli("revert", gpt2)
    assert proc.returncode == 0, proc.stderr
    assert region_sha(gpt2, "transformer.wte.weight") == changed
    flip_byte(gpt2, "transformer.wte.weight")  # the byte flipped back: the unedited checkpoint
    assert shard_hashes(gpt2) == original


def test_apply_deltas_does_not_import_torch(gpt2: Path, bundle: Path) -> None:
    proc = run_cli_without("apply-deltas", bundle, gpt2, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "batch 1" in proc.stdout
    assert [r.batch for r in rrome.load_deltas(gpt2)] == [1, 1]


def test_generate_prints_one_line_per_prompt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`rrome generate`: "PROMPT → CONTINUATION" per prompt, line breaks and backslashes escaped
    (the demo reloads the edited checkpoint with it)."""
    from click.testing import CliRunner

    import rrome.engine.editor
    from rrome.cli import main

    class Stub:
        def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
            assert max_new_tokens == 7
            return [" London, England.\n\nThe Space", " a\\b\r\n"][: len(prompts)]

    monkeypatch.setattr(rrome.engine.editor.Editor, "from_pretrained", classmethod(lambda cls, *a, **k: Stub()))
    result = CliRunner().invoke(main, ["generate", str(tmp_path), "P1", "P2", "--max-new-tokens", "7"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["P1 →  London, England.\\n\\nThe Space", "P2 →  a\\\\b\\r\\n"]
