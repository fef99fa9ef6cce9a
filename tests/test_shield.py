"""The neighbour shield (``shield_subjects``): which subjects, which keys, and what they do to u.

The solve is checked against numpy: u ∝ (C0 + Σ w_i k_i k_iᵀ)⁻¹ k_num with w_i = λ / (k_iᵀC0⁻¹k_i),
C0 rebuilt from the cached factor (relative 1e-6 on u's direction: float64 throughout, one
rank-one update per key against a dense solve).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import SHARED_DATA
from engine_reference import DARRIEUX, EDIT_LAYER, FRANCE, QUICK_HP

from rrome.engine.editor import Editor
from rrome.engine.keys import compute_keys
from rrome.engine.shield import bank, choose_subjects
from rrome.files.edits import EditRequest

pytestmark = pytest.mark.usefixtures("private_cache")

NAMES = {
    "The capital of {}": ("Spain", "Italy", "france", "Peru", "Chile"),
    "{} plays": ("Alice", "Bob"),
}


def test_subjects_of_the_edits_own_prompt_come_first() -> None:
    chosen = choose_subjects(FRANCE, 3, NAMES)
    assert len(chosen) == 3 and set(chosen) <= {"Spain", "Italy", "Peru", "Chile"}  # "france" is France
    again = choose_subjects(FRANCE, 3, NAMES)
    assert chosen == again  # the same edit, the same subjects
    # Short of names in its own prompt, the rest come from every other prompt.
    everything = choose_subjects(FRANCE, 10, NAMES)
    assert everything[:4] and set(everything[:4]) == {"Spain", "Italy", "Peru", "Chile"}
    assert set(everything[4:]) == {"Alice", "Bob"}
    assert choose_subjects(FRANCE, 0, NAMES) == []
    # Another subject in the same prompt draws them in another order.
    orders = {
        tuple(choose_subjects(EditRequest(prompt="The capital of {}", subject=s, target_new="x"), 4, NAMES))
        for s in ("Oz", "Narnia", "Mordor", "Gondor", "Rohan")
    }
    assert len(orders) > 1


def test_the_bank_holds_nothing_counterfact_val_shows() -> None:
    groups = bank()
    names = [x for v in groups.values() for x in v]
    assert len(names) > 5000 and all(isinstance(x, str) and x for x in names)
    assert all(p.count("{}") == 1 for p in groups)
    val = SHARED_DATA / "counterfact" / "counterfact-val.json"
    if not val.is_file():
        pytest.skip(f"{val} is not here")
    records = json.loads(val.read_text(encoding="utf-8"))
    shown = "\n".join(r[k] for r in records for k in ("prompt", "rephrase_prompt", "locality_prompt")).casefold()
    subjects = {r["subject"].casefold() for r in records}
    leaked = [x for x in names if x.casefold() in subjects or x.casefold() in shown]
    assert not leaked, leaked[:5]


@pytest.mark.parametrize("retain", [False, True])
def test_the_shield_solves_against_the_subjects_keys(retain: bool, tiny_copy: Callable[..., Path]) -> None:
    """u of a shielded edit is C0 plus the shield's weighted keys (and the retained ones) solved
    against k_e, recomputed here with numpy; the record names the subjects; the keys are not
    retained for the next edit."""
    folder = tiny_copy("llama")
    hp = {**QUICK_HP, "shield_subjects": 4, "shield_weight": 3.0, "retain_edit_keys": retain}
    editor = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=hp, progress=False)
    first = editor.edit(FRANCE)
    shield = first.shield
    assert shield is not None and shield["weight"] == 3.0
    assert shield["subjects"] == choose_subjects(FRANCE, 4)
    assert first.delta.meta is not None and first.delta.meta["shield"] == shield

    retained = [np.asarray(k, np.float64) for k in editor.retained_keys]
    assert len(retained) == (1 if retain else 0)  # the edit's own key, never the shield's
    before = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    result = editor.edit(DARRIEUX)
    assert result.shield is not None
    l_factor = np.asarray(editor.cholesky().factor())
    c0 = l_factor @ l_factor.T
    c = c0.copy()
    for k in retained:
        c += 10.0 / float(k @ np.linalg.solve(c0, k)) * np.outer(k, k)
    c_unshielded = c.copy()
    # The keys as the shield read them, from the model as it was before this edit.
    editor.model.get_submodule(editor.module_name).weight.data.copy_(before)
    for name in result.shield["subjects"]:
        other = EditRequest(prompt=DARRIEUX.prompt, subject=name, target_new=DARRIEUX.target_new)
        k = compute_keys(editor.model, editor.tokenizer, editor.module_name, other, ["{}"]).k_e_o.double().numpy()
        c += 3.0 / float(k @ np.linalg.solve(c0, k)) * np.outer(k, k)
    keys = compute_keys(editor.model, editor.tokenizer, editor.module_name, DARRIEUX, editor.templates())
    expected = np.linalg.solve(c, keys.k_e.double().numpy())
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(result.delta.u.astype(np.float64), expected, rtol=1e-5, atol=1e-6)
    # Without the shield the same edit writes another direction.
    unshielded = np.linalg.solve(c_unshielded, keys.k_e.double().numpy())
    assert abs(float(unshielded @ expected)) / np.linalg.norm(unshielded) < 0.999


def test_the_shield_moves_its_subjects_less(tiny_copy: Callable[..., Path]) -> None:
    """Measured on the tiny model: the change of the module's output at the shield's own keys,
    relative to the change at the edit's key, is smaller with the shield than without."""
    folder = tiny_copy("llama")
    hp = {**QUICK_HP, "shield_subjects": 8, "shield_weight": 10.0}
    shielded = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=hp, progress=False)
    plain = shielded.copy(hparams=shielded.hparams.with_overrides(shield_subjects=0))
    with plain.tentative(FRANCE) as off:
        pass
    with shielded.tentative(FRANCE) as on:
        pass
    assert on.shield is not None and off.shield is None
    names = on.shield["subjects"]
    ks = []
    for name in names:
        other = EditRequest(prompt=FRANCE.prompt, subject=name, target_new=FRANCE.target_new)
        ks.append(compute_keys(shielded.model, shielded.tokenizer, shielded.module_name, other, ["{}"]).k_e_o)
    k_nb = torch.stack(ks).double().numpy()
    k_e = compute_keys(shielded.model, shielded.tokenizer, shielded.module_name, FRANCE, shielded.templates())
    k_e_np = k_e.k_e.double().numpy()

    def share(u: np.ndarray) -> float:
        return float(np.abs(k_nb @ u).mean() / abs(k_e_np @ u))

    assert share(on.delta.u.astype(np.float64)) < 0.5 * share(off.delta.u.astype(np.float64))
