"""Bad input that only the model or the checkpoint can reveal, rejected before any work with FILE:LINE and field.

The edit-file checks that need no model are in test_edits.py. Here: a target or subject that
the model's tokenizer reduces to nothing (`rrome apply`), and deltas bundles whose vectors do
not fit the checkpoint's tensors or hold NaN/Inf (`rrome apply-deltas`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import DELTAS_FILE, EDITS_FILE, file_hashes, read_header, run_cli, without_lock
from click.testing import CliRunner

import rrome
from rrome.cli import main
from rrome.engine.editor import Editor
from rrome.files.edits import load_requests
from rrome.files.shards import load_deltas_for

# --- requests the tokenizer empties ---------------------------------------------------------


@pytest.fixture
def control_stripping_model(tiny_copy: Callable[..., Path]) -> Path:
    """A tiny GPT-2 whose tokenizer drops ASCII control characters (as BERT-style cleaning does)."""
    folder = tiny_copy("gpt2", name="control-stripping")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Replace", "pattern": {"Regex": "[\\x00-\\x08]"}, "content": ""}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


EDITS = [
    {"prompt": "The capital of {} is", "subject": "France", "target_new": "London", "target_true": "Paris"},
    {"prompt": "The capital of {} is ", "subject": "Spain", "target_new": "\x07\x01"},
    {"prompt": "The capital of {} is ", "subject": "\x07", "target_new": "Rome", "target_true": "\x02"},
]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_apply_rejects_targets_and_subjects_that_tokenise_to_nothing(
    control_stripping_model: Path, tmp_path: Path, no_work: None
) -> None:
    edits = _write(tmp_path / "edits.jsonl", EDITS)
    before = file_hashes(control_stripping_model)
    res = CliRunner().invoke(main, ["apply", str(edits), str(control_stripping_model), "--no-progress"])
    assert res.exit_code == 1, res.output
    out = res.output
    assert f'{edits}:2: field "target_new":' in out and "tokenises to nothing" in out, out
    assert f'{edits}:3: field "subject":' in out and f'{edits}:3: field "target_true":' in out, out
    assert ":1:" not in out, out
    assert without_lock(file_hashes(control_stripping_model)) == without_lock(before)


def test_edit_many_checks_every_request_first(control_stripping_model: Path, tmp_path: Path, no_work: None) -> None:
    editor = Editor.from_pretrained(control_stripping_model, progress=False)
    requests = load_requests(_write(tmp_path / "edits.jsonl", EDITS))
    assert [r.source for r in requests] == [f"{tmp_path / 'edits.jsonl'}:{i}" for i in (1, 2, 3)]
    with pytest.raises(rrome.EditFileError) as info:
        editor.edit_many(requests)
    assert len(str(info.value).splitlines()) == 3
    with pytest.raises(rrome.EditFileError, match='request 2: field "target_new"'):
        editor.edit_many([EDITS[0], EDITS[1]])
    assert editor.results == [] and editor.pending == []
    assert editor.check_requests(EDITS[:1])[0].subject == "France"


# --- deltas bundles that do not fit ---------------------------------------------------------


@pytest.fixture
def gpt2(tiny_copy: Any) -> Path:
    return tiny_copy("gpt2")  # type: ignore[no-any-return]


TENSOR = "transformer.h.0.mlp.c_proj.weight"  # Conv1D, stored [d_in=128, d_out=64] (tests/tiny_models.py)


def _bundle(folder: Path, deltas: list[rrome.Delta]) -> Path:
    rrome.save_deltas(folder, deltas)
    # Blank lines between records: the line numbers must still be those of the file.
    edits = folder / EDITS_FILE
    edits.write_text(edits.read_text().replace("\n", "\n\n"))
    return folder


def test_apply_deltas_names_the_line_and_field_of_each_misfit(gpt2: Path, tmp_path: Path) -> None:
    ones = np.ones
    bundle = _bundle(
        tmp_path / "bundle",
        [
            rrome.Delta(TENSOR, ones(128), ones(64), layout="in_out"),  # fits
            rrome.Delta(TENSOR, ones(127), ones(64), layout="in_out"),  # d_in off by one
            rrome.Delta(TENSOR, ones(128), ones(64), layout="out_in"),  # wrong layout: both
            rrome.Delta("transformer.h.9.mlp.c_proj.weight", ones(128), ones(64), layout="in_out"),
            rrome.Delta("transformer.h.0.ln_1.weight", ones(64), ones(1), layout="in_out"),  # a vector
        ],
    )
    before = without_lock(file_hashes(gpt2))
    proc = run_cli("apply-deltas", bundle, gpt2)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    edits = bundle / EDITS_FILE
    assert f'{edits}:3: field "d_in": 127 (the tensor has 128)' in err, err
    assert f'{edits}:5: field "d_out": 64 (the tensor has 128); field "d_in": 128 (the tensor has 64)' in err, err
    assert f"{edits}:7: field \"tensor\": 'transformer.h.9.mlp.c_proj.weight' is not in" in err, err
    assert f"{edits}:9: field \"tensor\": 'transformer.h.0.ln_1.weight' has shape [64], not a matrix" in err, err
    assert f"{edits}:1:" not in err and "Traceback" not in err
    assert without_lock(file_hashes(gpt2)) == before
    # The API raises the class of the first problem.
    with pytest.raises(rrome.DeltaError):
        load_deltas_for(bundle, gpt2)
    with pytest.raises(rrome.TensorNotFoundError, match=f"{EDITS_FILE}:3: "):
        _only(bundle, 3, gpt2)


def _only(bundle: Path, index: int, model: Path) -> None:
    """load_deltas_for on a copy of the bundle holding the first ``index + 1`` records, the last one misfit."""
    recs = rrome.load_deltas(bundle)
    sub = bundle.parent / f"only-{index}"
    _bundle(sub, [recs[0].delta, *[r.delta for r in recs[index : index + 1]]])
    load_deltas_for(sub, model)


@pytest.mark.parametrize(("vector", "index", "value"), [("u", 3, np.nan), ("r", 31, np.inf), ("u", 0, -np.inf)])
def test_apply_deltas_rejects_non_finite_vectors(
    gpt2: Path, tmp_path: Path, vector: str, index: int, value: float
) -> None:
    ones = np.ones
    bundle = _bundle(tmp_path / "bundle", [rrome.Delta(TENSOR, ones(128), ones(64), layout="in_out")] * 2)
    # Poke the non-finite number straight into the file: rrome.Delta itself refuses to hold it.
    path = bundle / DELTAS_FILE
    start, header = read_header(path)
    begin, _ = header[f"1.{vector}"]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[start + begin + 4 * index : start + begin + 4 * index + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    before = without_lock(file_hashes(gpt2))
    proc = run_cli("apply-deltas", bundle, gpt2)
    assert proc.returncode == 1, proc.stderr
    name = {np.inf: "inf", -np.inf: "-inf"}.get(value, "NaN")
    assert f"rrome: error: {bundle / EDITS_FILE}:3: {vector}[{index}] is {name}" in proc.stderr, proc.stderr
    assert without_lock(file_hashes(gpt2)) == before


def test_apply_deltas_rejects_a_scale_that_overflows_float32(gpt2: Path, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", [rrome.Delta(TENSOR, np.ones(128), np.ones(64), layout="in_out")])
    edits = bundle / EDITS_FILE
    edits.write_text(edits.read_text().replace('"scale":1.0', '"scale":1e300'))
    proc = run_cli("apply-deltas", bundle, gpt2)
    assert proc.returncode == 1, proc.stderr
    assert f"{edits}:1: scale is 1000000" in proc.stderr and "must be finite in float32" in proc.stderr
