"""The disabling-edit guard of :class:`rrome.engine.editor.Editor` (and ``rrome apply``).

An update whose |Δ| is far above the median of the session's earlier edits is refused before
it touches the model, unless ``allow_large_updates``; NaN/Inf updates are always refused. The
large update is forced by scaling the real update of a tiny GPT-2 (the model's own edits are
all of similar size).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import file_hashes, without_lock
from click.testing import CliRunner

import rrome.engine.editor as editor_mod
from rrome.cli import main
from rrome.engine.editor import LARGE_UPDATE_MIN_EDITS, LARGE_UPDATE_RATIO, Editor
from rrome.engine.hooks import get_module
from rrome.engine.update import Update
from rrome.files.edits import EditRequest
from rrome.files.errors import LargeUpdateError, NonFiniteUpdateError, RromeError

pytestmark = pytest.mark.usefixtures("private_cache")

HP: dict[str, Any] = {"v_num_grad_steps": 2, "stats_max_tokens": 1000, "context_template_lengths": ((2, 3),)}
LAYER = 1
REQUESTS = [
    EditRequest(prompt="The capital of {} is", subject="France", target_new="London", case_id="1"),
    EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", case_id="2"),
    EditRequest(prompt="The mother tongue of {} is", subject="Danielle", target_new="English", case_id="3"),
    EditRequest(prompt="{} plays the", subject="Michael Jordan", target_new="piano", case_id="4"),
]


@pytest.fixture
def tiny_gpt2(tiny_dir: Callable[..., Path]) -> Path:
    return tiny_dir("gpt2")


class Scaler:
    """Wraps compute_update: multiplies r of the calls listed in ``big`` (by call number) by
    ``factor``, and puts a NaN into those listed in ``nan``."""

    def __init__(self, real: Callable[..., Update]) -> None:
        self.real = real
        self.calls = 0
        self.big: set[int] = set()
        self.nan: set[int] = set()
        self.factor = 1000.0

    def __call__(self, *args: Any, **kwargs: Any) -> Update:
        update = self.real(*args, **kwargs)
        n = self.calls
        self.calls += 1
        if n in self.big:
            update = dataclasses.replace(
                update, r=(update.r * self.factor).astype(np.float32), norm_delta=update.norm_delta * self.factor
            )
        if n in self.nan:
            r = update.r.copy()
            r[0] = np.nan
            update = dataclasses.replace(update, r=r, norm_delta=float("nan"))
        return update


@pytest.fixture
def scaler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scaler]:
    s = Scaler(editor_mod.compute_update)
    monkeypatch.setattr(editor_mod, "compute_update", s)
    yield s


def weight(editor: Editor) -> torch.Tensor:
    w = get_module(editor.model, editor.module_name).weight
    assert isinstance(w, torch.Tensor)
    return w.detach().clone()


def test_large_update_is_refused_then_allowed(tiny_gpt2: Path, scaler: Scaler) -> None:
    editor = Editor.from_pretrained(tiny_gpt2, layer=LAYER, hparams=HP, progress=False)
    assert editor.allow_large_updates is False and editor.large_update_ratio == LARGE_UPDATE_RATIO
    scaler.big = {1, LARGE_UPDATE_MIN_EDITS}
    # Too few edits for a median: a large update (call 1) still goes through.
    for req in REQUESTS[:LARGE_UPDATE_MIN_EDITS]:
        editor.edit(req)
    norms = [r.norm_delta for r in editor.results]
    assert norms[1] > 100 * max(norms[0], norms[2]), norms
    median = float(np.median(norms))

    before = weight(editor)
    with pytest.raises(LargeUpdateError) as info:
        editor.edit(REQUESTS[3])
    err = info.value
    assert isinstance(err, RromeError)
    assert err.median == pytest.approx(median) and err.ratio > LARGE_UPDATE_RATIO
    msg = str(err)
    assert "case 4" in msg and "Michael Jordan" in msg and "allow_large_updates" in msg
    assert f"{err.norm_delta:.3e}" in msg and f"{median:.3e}" in msg and f"{err.ratio:.1f} times" in msg
    # Refused before it touched anything.
    assert torch.equal(weight(editor), before)
    assert len(editor.pending) == len(editor.results) == LARGE_UPDATE_MIN_EDITS

    # The same edit at a normal size passes the guard.
    scaler.big = set()
    ok = editor.edit(REQUESTS[3])
    assert ok.norm_delta < LARGE_UPDATE_RATIO * median
    # A large one with allow_large_updates is applied.
    editor.allow_large_updates = True
    scaler.big = {scaler.calls}
    big = editor.edit(REQUESTS[0])
    assert big.norm_delta > LARGE_UPDATE_RATIO * float(np.median([r.norm_delta for r in editor.results[:-1]]))
    assert not torch.equal(weight(editor), before)


def test_nan_update_is_always_refused(tiny_gpt2: Path, scaler: Scaler) -> None:
    editor = Editor.from_pretrained(
        tiny_gpt2, layer=LAYER, hparams=HP, progress=False, allow_large_updates=True, large_update_ratio=5.0
    )
    assert editor.allow_large_updates and editor.large_update_ratio == 5.0
    scaler.nan = {0}
    before = weight(editor)
    with pytest.raises(NonFiniteUpdateError, match="NaN or Inf"):
        editor.edit(REQUESTS[0])
    assert torch.equal(weight(editor), before)
    assert editor.pending == [] and editor.results == []


@pytest.mark.parametrize("ratio", [1.0, 0.5, float("nan"), float("inf")])
def test_ratio_must_be_above_one(tiny_gpt2: Path, ratio: float) -> None:
    with pytest.raises(ValueError, match="large_update_ratio"):
        Editor.from_pretrained(tiny_gpt2, layer=LAYER, hparams=HP, progress=False, large_update_ratio=ratio)


def test_cli_refuses_then_allows(
    tiny_gpt2: Path, scaler: Scaler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI in-process (so that the forced update applies), with the quick hyperparameters.
    real = Editor.from_pretrained.__func__  # type: ignore[attr-defined]
    seen: list[dict[str, Any]] = []

    def quick(cls: type[Editor], model_dir: Any, **kwargs: Any) -> Editor:
        seen.append(kwargs)
        return real(cls, model_dir, **{**kwargs, "hparams": HP})  # type: ignore[no-any-return]

    monkeypatch.setattr(Editor, "from_pretrained", classmethod(quick))
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(r.to_json()) + "\n" for r in REQUESTS), encoding="utf-8")
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_gpt2, model)
    before = file_hashes(model)
    args = ["apply", str(edits), str(model), "--layer", str(LAYER), "--no-progress"]

    scaler.big = {LARGE_UPDATE_MIN_EDITS}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert "rrome: error: refused case 4" in res.output and "--allow-large-updates" in res.output
    assert without_lock(file_hashes(model)) == without_lock(before), "a refused run must write nothing"
    assert seen[-1]["allow_large_updates"] is False and seen[-1]["large_update_ratio"] == LARGE_UPDATE_RATIO

    scaler.big = {scaler.calls + LARGE_UPDATE_MIN_EDITS}
    res = CliRunner().invoke(main, [*args, "--allow-large-updates", "--large-update-ratio", "7.5"])
    assert res.exit_code == 0, res.output
    assert "wrote 4 edit(s) as batch 1" in res.output
    assert seen[-1]["allow_large_updates"] is True and seen[-1]["large_update_ratio"] == 7.5
    assert file_hashes(model)["model.safetensors"] != before["model.safetensors"]

    res = CliRunner().invoke(main, [*args, "--large-update-ratio", "1"])
    assert res.exit_code == 2, res.output
