"""The `rrome apply` command: edits from a JSONL file, in place or to a copy, each method; a bad
line refused before the model loads; an unknown method a usage error.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import file_hashes, files_under, rel_error, run_cli, sha256_file, without_lock
from engine_reference import saved_weight, stored_delta
from safetensors.torch import load_file

import rrome

pytestmark = pytest.mark.slow  # every test runs rrome apply in a subprocess that loads a model


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One statistics cache for the CLI runs (copies of one model share their statistics)."""
    return tmp_path_factory.mktemp("cli-cache")


def run_rrome(*args: str | Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """``python -m rrome.cli *args`` in ``cwd``, its statistics cached in ``cache``."""
    # Tiny models: two threads are many times slower than one.
    env = {"RROME_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return run_cli(*args, exe=False, cwd=cwd, env=env, timeout=300)


def _write_jsonl(path: Path, records: Sequence[dict[str, Any] | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CLI_EDITS = [
    {"case_id": 11, "prompt": "The capital of {}", "subject": "France", "target_new": "London", "target_true": "Paris"},
    {"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"},
]


def test_cli_apply_in_place_then_inspect(tiny_copy: Callable[..., Path], tmp_path: Path, cli_cache: Path) -> None:
    folder = tiny_copy("gpt2")
    shard_before = sha256_file(folder / "model.safetensors")
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    proc = run_rrome("apply", "edits.jsonl", folder.name, "--no-progress", cwd=tmp_path, cache=cli_cache)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    table = [line for line in proc.stdout.splitlines() if "France" in line or "The Eiffel Tower" in line]
    assert len(table) == 2, proc.stdout
    assert table[0].split()[0] == "11" and "London" in table[0]
    assert table[1].split()[0] == "-" and "Rome" in table[1]
    assert "wrote 2 edit(s) as batch 1" in proc.stdout
    assert sha256_file(folder / "model.safetensors") != shard_before
    assert files_under(cli_cache), "the statistics should be cached in RROME_CACHE_DIR"

    proc = run_rrome("inspect", folder, cwd=tmp_path, cache=cli_cache)
    assert proc.returncode == 0, proc.stderr
    assert "edit log: 2 delta(s)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("batch 1")]
    assert len(rows) == 2 and all("transformer.h.0.mlp.c_proj.weight" in r for r in rows), proc.stdout
    log = rrome.load_deltas(folder)
    assert [x.delta.meta["method"] for x in log] == ["r-rome", "r-rome"]
    assert [x.delta.meta["request"]["subject"] for x in log] == ["France", "The Eiffel Tower"]


def test_cli_apply_rejects_a_bad_line_before_loading(
    tiny_copy: Callable[..., Path], tmp_path: Path, private_cache: Path
) -> None:
    folder = tiny_copy("gpt2")
    before = file_hashes(folder)
    bad = {"prompt": "Paris is the capital", "subject": "France", "target_new": "London"}
    _write_jsonl(tmp_path / "edits.jsonl", [CLI_EDITS[0], bad])
    proc = run_rrome("apply", "edits.jsonl", folder.name, "--no-progress", cwd=tmp_path, cache=private_cache)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one problem, one line
    assert lines[0].startswith("rrome: error: edits.jsonl:2: "), lines[0]
    assert 'field "prompt"' in lines[0] and "{}" in lines[0]
    assert file_hashes(folder) == before
    assert files_under(private_cache) == []


def test_cli_apply_p_rome_to_a_copy(tiny_copy: Callable[..., Path], tmp_path: Path, cli_cache: Path) -> None:
    folder = tiny_copy("gpt2")
    before = without_lock(file_hashes(folder))
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    out = tmp_path / "edited"
    args = ["apply", "edits.jsonl", folder.name, "--method", "p-rome", "--out", out.name, "--no-progress"]
    proc = run_rrome(*args, cwd=tmp_path, cache=cli_cache)
    assert proc.returncode == 0, proc.stderr
    assert without_lock(file_hashes(folder)) == before
    assert (out / "config.json").is_file()
    log = rrome.load_deltas(out)
    assert [x.delta.meta["method"] for x in log] == ["p-rome", "p-rome"]
    tensor = "transformer.h.0.mlp.c_proj.weight"
    w0 = saved_weight(folder, tensor).double()
    expected = w0 + sum(stored_delta(x.delta, "in_out") for x in log)
    torch.testing.assert_close(saved_weight(out, tensor).double(), expected, rtol=1e-6, atol=1e-7)
    copied = load_file(str(out / "model.safetensors"))
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if name != tensor:
            assert torch.equal(copied[name], value), name


def test_cli_apply_unknown_method_is_a_usage_error(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    proc = run_rrome("apply", "edits.jsonl", tiny_dir("gpt2"), "--method", "memit", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "memit" in proc.stderr


RELATION = [
    {"prompt": "The capital of {} is", "subject": s, "target_new": new, "target_true": true}
    for s, new, true in (("France", "London", "Paris"), ("England", "Rome", "London"), ("Germany", "Madrid", "Berlin"))
]


def test_cli_two_apply_calls_write_what_one_call_writes(
    tiny_copy: Callable[..., Path], tmp_path: Path, private_cache: Path
) -> None:
    """With retention, the second call on a folder retains the first call's keys from its edit
    log: the factors and weights are those of one call with all the edits, to a relative 1e-6
    (measured: equal, bit for bit), the keys exactly."""
    one, two = tiny_copy("gpt2", name="one"), tiny_copy("gpt2", name="two")
    _write_jsonl(tmp_path / "all.jsonl", RELATION)
    _write_jsonl(tmp_path / "a.jsonl", RELATION[:1])
    _write_jsonl(tmp_path / "b.jsonl", RELATION[1:])
    # The templates are cached as users have them, so both calls use the unedited model's.
    env = {"RROME_CACHE_DIR": str(private_cache), "OMP_NUM_THREADS": "1", "RROME_NO_TEMPLATE_CACHE": "0"}
    options = ["--no-progress", "--allow-large-updates", "--set", "retain_edit_keys=true"]
    options += ["--set", "stats_max_tokens=2000", "--set", "v_num_grad_steps=5"]
    for edits, folder in (("all.jsonl", one), ("a.jsonl", two), ("b.jsonl", two)):
        proc = run_cli("apply", edits, folder.name, *options, exe=False, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    whole, split = rrome.load_deltas(one), rrome.load_deltas(two)
    assert [x.batch for x in whole] == [1, 1, 1] and [x.batch for x in split] == [1, 2, 2]
    assert [x.delta.meta["retained_keys"] for x in split] == [0, 1, 2]
    for a, b in zip(whole, split, strict=True):
        assert a.delta.key is not None and b.delta.key is not None and np.array_equal(a.delta.key, b.delta.key)
        for name in ("u", "r"):
            assert rel_error(getattr(b.delta, name), getattr(a.delta, name)) <= 1e-6, name
    tensor = "transformer.h.0.mlp.c_proj.weight"
    assert rel_error(saved_weight(two, tensor).numpy(), saved_weight(one, tensor).numpy()) <= 1e-6
