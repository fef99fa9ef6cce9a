"""``clamp_base = "unedited"``: ‖δ‖'s clamp is relative to the module's output at the subject in
the model before any edit, ‖W0 k + b‖, not in the model as earlier edits left it.

Checked on tiny models (GPT-2's Conv1D with its bias, Llama's Linear without) against the
unedited weight kept aside: after edits in the same editor, after replayed edits, across a save
and a new editor on the folder (the edit log's edits are subtracted), after a restore and a
tentative edit; the clamp binds at that norm; the first edit is the same as under "current".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_reference import PUSH_HP

from rrome.engine.editor import Editor
from rrome.engine.hooks import get_module
from rrome.engine.keys import compute_keys
from rrome.files.edits import EditRequest
from rrome.files.hparams import PRESETS, load_hparams, resolve_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

RELATION = "The capital of {} is"
FIRST = EditRequest(prompt=RELATION, subject="France", target_new="London", target_true="Paris")
SECOND = EditRequest(prompt=RELATION, subject="England", target_new="Rome", target_true="London")
THIRD = EditRequest(prompt=RELATION, subject="Spain", target_new="Berlin", target_true="Madrid")
LAYER = 0
# The tiny models' scale (engine_reference.PUSH_HP) with a clamp that binds: δ ends on it.
HP: dict[str, Any] = {**PUSH_HP, "v_num_grad_steps": 4, "v_lr": 0.5, "clamp_norm_factor": 2.0}
TOL = 1e-5  # relative: float32 forward passes against a float64 product


def _editor(folder: Path, **fields: Any) -> Editor:
    return Editor.from_pretrained(folder, layer=LAYER, hparams={**HP, **fields}, progress=False)


def _unedited_output(editor: Editor) -> Callable[[EditRequest], float]:
    """request ↦ ‖W0 k_e^o + b‖ with W0 the edited weight as it is now (call before any edit)."""
    w = editor.edited_weight().detach().to(torch.float64).clone()
    w0 = w.T if editor.adapter.layout == "in_out" else w
    bias = get_module(editor.model, editor.module_name).bias
    b = torch.zeros(w0.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).clone()

    def norm(request: EditRequest) -> float:
        # The keys (the module's inputs) do not depend on the edited weight.
        k = compute_keys(editor.model, editor.tokenizer, editor.module_name, request, editor.templates()).k_e_o
        return float((w0 @ k.to(torch.float64) + b).norm())

    return norm


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_clamp_is_relative_to_the_unedited_output(family: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    editor = _editor(folder, clamp_base="unedited")
    unedited = _unedited_output(editor)
    results = [editor.edit(FIRST), editor.edit(SECOND)]
    for request, result in zip((FIRST, SECOND), results, strict=True):
        scale = result.value["clamp_scale"]
        assert scale == pytest.approx(unedited(request), rel=TOL)
        assert result.value["delta_norm"] == pytest.approx(HP["clamp_norm_factor"] * scale, rel=TOL)  # it binds
    # The first edit reached the second subject's key: the current output's norm is another
    # number, ten tolerances away at least, so the check above tells the two bases apart.
    second = results[1].value
    assert abs(second["v_init_norm"] - second["clamp_scale"]) > 10 * TOL * second["clamp_scale"]
    # Saved, then a new editor on the folder: the edit log's two edits are subtracted too.
    editor.save()
    third = _editor(folder, clamp_base="unedited").edit(THIRD)
    assert third.value["clamp_scale"] == pytest.approx(unedited(THIRD), rel=TOL)
    assert abs(third.value["v_init_norm"] - third.value["clamp_scale"]) > 10 * TOL * third.value["clamp_scale"]
    # Under "current" the clamp is relative to the current output (the reference code).
    current = _editor(folder).edit(THIRD)
    assert current.value["clamp_scale"] == pytest.approx(current.value["v_init_norm"], rel=1e-12)


def test_replay_restore_and_tentative_edits_are_counted(tiny_dir: Callable[..., Path]) -> None:
    folder = tiny_dir("llama")
    editor = _editor(folder, clamp_base="unedited")
    unedited = _unedited_output(editor)
    w0 = editor.edited_weight().detach().clone()
    first = editor.edit(FIRST)
    # Replayed factors count as edits: a fresh editor that replays the first edit clamps the
    # second as the editor that made it does.
    replayed = _editor(folder, clamp_base="unedited")
    replayed.replay(first.delta.u, first.delta.r)
    a, b = editor.edit(SECOND), replayed.edit(SECOND)
    assert a.value["clamp_scale"] == b.value["clamp_scale"] == pytest.approx(unedited(SECOND), rel=TOL)
    # A tentative edit is forgotten with its weight; a restore forgets every edit.
    with editor.tentative(THIRD):
        pass
    assert editor.edit(THIRD).value["clamp_scale"] == pytest.approx(unedited(THIRD), rel=TOL)
    editor.restore(w0)
    again = editor.edit(SECOND).value
    assert again["clamp_scale"] == pytest.approx(unedited(SECOND), rel=TOL)
    assert again["clamp_scale"] == pytest.approx(again["v_init_norm"], rel=TOL)  # unedited again


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_first_edit_is_the_same_either_way(family: str, tiny_dir: Callable[..., Path]) -> None:
    folder = tiny_dir(family)
    current, unedited = _editor(folder).edit(FIRST), _editor(folder, clamp_base="unedited").edit(FIRST)
    assert np.array_equal(current.delta.u, unedited.delta.u) and np.array_equal(current.delta.r, unedited.delta.r)


def test_reference_keeps_the_current_output() -> None:
    assert "clamp_base" in PRESETS["reference"]
    for family in ("gemma3", "llama", "gpt2"):
        assert resolve_hparams(family, "reference", n_layers=18).clamp_base == "current"
    assert load_hparams("gpt2", n_layers=2).clamp_base == "current"
