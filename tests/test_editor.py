"""The Editor end to end on tiny checkpoints: edit, save, revert, sequential edits, methods.

Weights: an edited float32 weight within float32 rounding of ``W + Σ Δ`` computed in float64
(relative 1e-6, absolute 1e-7); what ``save()`` writes equals the in-memory weight bit for bit
(float32 storage), and a half-precision save rounds ``W + Δ`` once, as the in-memory update does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import file_hashes, sha256_file, without_lock
from engine_reference import (
    DARRIEUX,
    EDIT_LAYER,
    EDITED,
    EIFFEL,
    FRANCE,
    HIDDEN,
    INTERMEDIATE,
    PUSH_HP,
    QUICK_HP,
    dense,
    rel_diff,
    saved_weight,
    stored_delta,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rrome
from rrome.engine.editor import Editor, EditResult
from rrome.files.constants import METHODS
from rrome.files.errors import RromeError

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("method", ["r-rome", "rome", "p-rome"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_edit(family: str, method: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    template, layout = EDITED[family]
    tensor = template.format(EDIT_LAYER) + ".weight"
    w0 = saved_weight(folder, tensor)
    editor = Editor.from_pretrained(folder, method=method, layer=EDIT_LAYER, hparams=PUSH_HP, progress=False)
    assert editor.method == method and editor.layer == EDIT_LAYER

    result = editor.edit(FRANCE)
    assert isinstance(result, EditResult)
    assert result.method == method and result.layer == EDIT_LAYER and result.request == FRANCE
    assert result.delta.tensor == tensor and result.delta.layout == layout
    assert result.delta.d_out == HIDDEN and result.delta.d_in == INTERMEDIATE
    meta = dict(result.delta.meta or {})
    assert meta["method"] == method and meta["layer"] == EDIT_LAYER and meta["request"] == FRANCE.to_json()
    assert meta["hparams"]["v_lr"] == PUSH_HP["v_lr"] and meta["templates"] == editor.templates()

    full = dense(result.delta)
    assert result.norm_delta == pytest.approx(float(full.norm()) / (HIDDEN * INTERMEDIATE), rel=1e-6)

    # The tiny model can be pushed with PUSH_HP (see its comment); the defaults cannot.
    assert result.losses[-1] < result.losses[0], result.losses
    assert result.p_new_after > result.p_new_before, (result.p_new_before, result.p_new_after)
    assert result.p_true_before is not None and result.p_true_after is not None

    # In memory: W + Δ, to float32 rounding (|W| is ~0.1, so 1e-7 absolute is a few ulps).
    weight = editor.model.get_submodule(editor.module_name).weight.detach()
    expected = w0.double() + (full.T if layout == "in_out" else full)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(weight, w0)
    assert editor.pending == [result.delta] and editor.results == [result]
    # The phases' seconds, in order, add up to the edit's (the last lap ends where seconds is read).
    assert list(result.timings) == ["before", "setup", "keys", "shield", "value", "update", "after"]
    assert all(t >= 0 for t in result.timings.values())
    assert sum(result.timings.values()) == pytest.approx(result.seconds, abs=1e-2)
    assert meta["timings"] == result.timings


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_save_in_place_then_revert(family: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    shard = folder / "model.safetensors"
    original_bytes = sha256_file(shard)
    original = load_file(str(shard))
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    editor = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    editor.edit(DARRIEUX)
    in_memory = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    assert sha256_file(shard) == original_bytes, "edit() must not write; save() does"

    report = editor.save()
    assert report is not None and report.batch == 1 and report.tensors == [tensor]
    assert editor.pending == [] and editor.save() is None
    reloaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    # Written by the shard writer as W + r uᵀ in float32: bit for bit the in-memory weight.
    assert torch.equal(reloaded[tensor], in_memory)
    saved = load_file(str(shard))
    assert torch.equal(saved[tensor], in_memory)
    for name, value in original.items():
        if name != tensor:
            assert torch.equal(saved[name], value), name
    log = rrome.load_deltas(folder)
    assert [(x.batch, x.delta.tensor) for x in log] == [(1, tensor)]

    assert rrome.revert(folder) == [1]
    assert sha256_file(shard) == original_bytes


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_save_to_copy_leaves_source(family: str, tiny_copy: Callable[..., Path], tmp_path: Path) -> None:
    folder = tiny_copy(family)
    before = without_lock(file_hashes(folder))
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    editor = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    editor.edit(EIFFEL)
    in_memory = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    out = tmp_path / "edited"
    report = editor.save(out)
    assert report is not None
    assert without_lock(file_hashes(folder)) == before
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).state_dict()[tensor], in_memory)
    assert [x.delta.tensor for x in rrome.load_deltas(out)] == [tensor]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_editor_half_precision_save_matches_memory(dtype: str, tiny_copy: Callable[..., Path]) -> None:
    """Run and stored in half precision: the writer rounds W + Δ once, as the in-memory update does."""
    folder = tiny_copy("llama", dtype={"bfloat16": "bf16", "float16": "f16"}[dtype])
    tensor = EDITED["llama"][0].format(EDIT_LAYER) + ".weight"
    w0 = saved_weight(folder, tensor)
    editor = Editor.from_pretrained(folder, dtype=dtype, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    result = editor.edit(FRANCE)
    live = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    assert live.dtype == w0.dtype == getattr(torch, dtype)
    # One rounding of W + Δ (computed in float32) to the storage dtype.
    expected = (w0.float() + dense(result.delta).float()).to(w0.dtype)
    assert torch.equal(live, expected)
    editor.save()
    assert torch.equal(saved_weight(folder, tensor), live)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_edits_compose(family: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    layout = EDITED[family][1]
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    w0 = saved_weight(folder, tensor)

    def editor() -> Editor:
        return Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)

    many = editor()
    both = many.edit_many([FRANCE, EIFFEL.to_json()])  # a request or its JSON record
    assert [r.request for r in both] == [FRANCE, EIFFEL]
    one_by_one = editor()
    first, second = one_by_one.edit(FRANCE), one_by_one.edit(EIFFEL)
    alone = editor().edit(EIFFEL)

    for a, b in ((both[0], first), (both[1], second)):
        np.testing.assert_allclose(a.delta.u, b.delta.u, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a.delta.r, b.delta.r, rtol=1e-6, atol=1e-9)
        assert a.losses == pytest.approx(b.losses, rel=1e-6)
    # Edit 2 was computed on the model holding edit 1, not on the unedited one.
    assert rel_diff(dense(both[1].delta), dense(alone.delta)) > 1e-3
    # C0 stays that of the unedited model: the same statistics file for both edits.
    assert both[0].delta.meta["stats"] == both[1].delta.meta["stats"] == alone.delta.meta["stats"]

    assert many.pending == [both[0].delta, both[1].delta]
    expected = w0.double() + sum(stored_delta(d.delta, layout) for d in both)
    live = many.model.get_submodule(many.module_name).weight.detach()
    torch.testing.assert_close(live.double(), expected, rtol=1e-6, atol=1e-7)
    report = many.save()
    assert report is not None and many.pending == []
    saved = saved_weight(folder, tensor)
    torch.testing.assert_close(saved.double(), expected, rtol=1e-6, atol=1e-7)
    log = rrome.load_deltas(folder)
    assert [x.batch for x in log] == [1, 1]
    assert [x.delta.meta["request"]["subject"] for x in log] == [FRANCE.subject, EIFFEL.subject]


def test_editor_hparams_overrides(tiny_dir: Callable[..., Path]) -> None:
    editor = Editor.from_pretrained(tiny_dir("gpt2"), layer=1, hparams=QUICK_HP, progress=False)
    assert editor.layer == 1 and editor.hparams.v_num_grad_steps == 5
    assert editor.hparams.context_template_lengths == ((3, 5),)
    with pytest.raises(RromeError, match="v_steps"):
        Editor.from_pretrained(tiny_dir("gpt2"), hparams={"v_steps": 3}, progress=False)


def test_editor_layer_in_hparams(tiny_dir: Callable[..., Path]) -> None:
    """``layer`` is a field like any other: a dict of fields sets it over the family's default
    (layer 0 on this two-layer model), ``layer=`` overrides it, and a layer the model lacks is refused."""
    folder = tiny_dir("gpt2")
    editor = Editor.from_pretrained(folder, hparams={"layer": 1}, progress=False)
    assert editor.layer == 1 and editor.hparams.layer == 1
    assert editor.module_name == "transformer.h.1.mlp.c_proj"
    assert Editor.from_pretrained(folder, layer=0, hparams={"layer": 1}, progress=False).layer == 0
    with pytest.raises(RromeError, match="layer 2 is out of range"):
        Editor.from_pretrained(folder, hparams={"layer": 2}, progress=False)


def test_editor_method_selection(tiny_dir: Callable[..., Path]) -> None:
    folder = tiny_dir("gpt2")
    default = Editor.from_pretrained(folder, progress=False)
    assert default.method == "r-rome"
    assert default.layer == 0  # the family's layer 17 does not exist in 2 layers: a third of the depth
    for method in ("rome", "p-rome", "r-rome"):
        assert Editor.from_pretrained(folder, method=method, progress=False).method == method
    with pytest.raises(ValueError, match="p-rome"):
        Editor.from_pretrained(folder, method="memit", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Editor.from_pretrained(folder, method="R-ROME", progress=False)  # type: ignore[arg-type]


def test_methods_give_different_updates(tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy("llama")
    mats = {}
    for method in METHODS:
        result = Editor.from_pretrained(folder, method=method, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False).edit(
            DARRIEUX
        )
        assert result.delta.meta["method"] == method
        mats[method] = dense(result.delta)
    # Same keys, same value (the optimisation does not depend on the method): only the variant differs.
    assert rel_diff(mats["rome"], mats["r-rome"]) > 1e-3
    assert rel_diff(mats["p-rome"], mats["r-rome"]) > 1e-3


def test_tentative_edit_is_measured_then_undone_exactly(tiny_copy: Callable[..., Path]) -> None:
    """What rrome eval does with each case: the edit is in the model inside the block, and after
    it the weight is the one before bit for bit, nothing is queued and no result is kept; the
    edit's record is the one the edit log would hold."""
    editor = Editor.from_pretrained(tiny_copy("gpt2"), layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    before = editor.edited_weight().detach().clone()
    with editor.tentative(FRANCE) as result:
        assert not torch.equal(editor.edited_weight(), before)
        record = result.to_json()
    assert torch.equal(editor.edited_weight(), before)
    assert editor.pending == [] and editor.results == []
    meta = dict(result.delta.meta or {})
    assert {k: meta[k] for k in record} == record and record["request"] == FRANCE.to_json()
    assert meta["hparams"] == editor.hparams.to_json()


def test_copy_edits_with_its_own_settings_on_the_same_model(tiny_copy: Callable[..., Path]) -> None:
    editor = Editor.from_pretrained(tiny_copy("gpt2"), layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    templates = editor.templates()
    other = editor.copy(method="p-rome", hparams=editor.hparams.with_overrides(v_num_grad_steps=2))
    assert other.model is editor.model and other.method == "p-rome" and editor.method == "r-rome"
    assert other.hparams.v_num_grad_steps == 2 and other.templates() is templates
    result = other.edit(FRANCE, queue=False)
    assert result.method == "p-rome" and other.pending == [] and other.results == [result]
    assert editor.results == [] and result.steps <= 2
