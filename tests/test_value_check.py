"""``v_check_update``: the value optimisation's stop rule checked under the rank-one update itself.

References are computed without rrome's batching or hooks: the update written into a copy of
the weight (float64, then rounded to float32 once), each rewriting prompt run alone and unpadded.
Tolerances: logits under the hook equal those under the written weight within 1e-5 (absolute and
relative, float32 sums in another order); argmax shares are exact counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_reference import DARRIEUX, EDIT_LAYER, EDITED, FRANCE, HAND_TEMPLATES, QUICK_HP, compute_value_on

from rrome.engine.editor import Editor
from rrome.engine.hooks import add_rank_one
from rrome.engine.keys import compute_keys
from rrome.engine.prompts import EditPrompts
from rrome.files.edits import EditRequest
from rrome.files.hparams import load_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

TEMPLATES = ["{}", *HAND_TEMPLATES[:2]]


def _written(model: Any, family: str, u: torch.Tensor, r: torch.Tensor) -> Any:
    """A copy of ``model`` with Δ = r uᵀ added to the edited weight (float64, rounded once)."""
    other = copy.deepcopy(model)
    name, layout = EDITED[family]
    weight = other.get_submodule(name.format(EDIT_LAYER)).weight
    full = torch.outer(r.double(), u.double())
    with torch.no_grad():
        weight.copy_((weight.double() + (full.T if layout == "in_out" else full)).float())
    return other


def _factors(model: Any, family: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rank-one update of the edited module, about the size of its weight's rows."""
    name, layout = EDITED[family]
    weight = model.get_submodule(name.format(EDIT_LAYER)).weight
    d_out, d_in = (weight.shape[1], weight.shape[0]) if layout == "in_out" else weight.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, generator=g) / d_in**0.5, torch.randn(d_out, generator=g)


def _share_alone(model: Any, tok: Any, request: EditRequest) -> float:
    """The fraction of the rewriting prompts' target positions at which the new target is the
    argmax, each prompt run alone and unpadded."""
    prompts = EditPrompts.build(tok, request, TEMPLATES)
    hits = []
    for row in prompts.rewrite:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row.ids])).logits[0]
        n = len(prompts.target)
        # The target's first token is predicted at the row's last prompt token.
        at = logits[len(row.ids) - n : len(row.ids)]
        hits += (at.argmax(-1) == torch.tensor(prompts.target)).tolist()
    return sum(hits) / len(hits)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_rank_one_hook_runs_the_written_weight(family: str, tiny_loaded: Callable[..., Any]) -> None:
    model, tok, adapter = tiny_loaded(family)
    u, r = _factors(model, family, 0)
    ids = torch.tensor([tok("The capital of France is a city").input_ids])
    with torch.no_grad(), add_rank_one(model, adapter.module_name(EDIT_LAYER), u, r):
        hooked = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        written = _written(model, family, u, r)(input_ids=ids).logits
    assert not torch.allclose(plain, written, atol=1e-3)  # the update matters here
    torch.testing.assert_close(hooked, written, atol=1e-5, rtol=1e-5)
    assert not model.get_submodule(adapter.module_name(EDIT_LAYER))._forward_hooks


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_failing_check_continues_and_leaves_the_trajectory_alone(
    family: str, padding_side: str, fast: bool, tiny_loaded: Callable[..., Any]
) -> None:
    """With the loss rule firing at every pass (v_stop_loss 100) and an update that never makes
    the edit, every pass is checked and none stops the run: the losses are those of a run that
    never stops, bit for bit, and each check's share is the written update's, prompt by prompt."""
    loaded = tiny_loaded(family, padding_side)
    model, tok, _ = loaded
    u, r = _factors(model, family, 1)
    calls: list[torch.Tensor] = []

    def factors(v_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(v_e.clone())
        return u, r

    # The check alone: δ's objective (Gemma 3's defaults optimise the update's, tests/test_value_objective.py).
    hp = load_hparams(family, n_layers=2).with_overrides(layer=EDIT_LAYER, v_objective="subject", **QUICK_HP)
    never = compute_value_on(loaded, EDIT_LAYER, DARRIEUX, TEMPLATES, hp.with_overrides(v_stop_loss=0.0), fast=fast)
    checked = compute_value_on(
        loaded,
        EDIT_LAYER,
        DARRIEUX,
        TEMPLATES,
        hp.with_overrides(v_stop_loss=100.0, v_check_update=True),
        fast=fast,
        factors=factors,
    )
    expected = _share_alone(_written(model, family, u, r), tok, DARRIEUX)
    assert expected < 1.0
    assert checked.stop == never.stop == "max-steps"
    assert checked.losses == never.losses and torch.equal(checked.v_e, never.v_e)
    assert [p for p, _ in checked.update_top1] == list(range(hp.v_num_grad_steps))
    assert all(share == expected for _, share in checked.update_top1), (checked.update_top1, expected)
    assert len(calls) == hp.v_num_grad_steps
    torch.testing.assert_close(calls[-1], checked.v_e)  # the last check saw the final v_e
    # Unchecked, the loss rule stops the run at its first pass.
    first = compute_value_on(loaded, EDIT_LAYER, DARRIEUX, TEMPLATES, hp.with_overrides(v_stop_loss=100.0), fast=fast)
    assert first.stop == "loss" and first.steps == 0 and first.update_top1 == []


def test_a_passing_check_stops_the_run(tiny_loaded: Callable[..., Any]) -> None:
    """An update that already makes the edit passes at the first check, and the run stops there
    as it would unchecked. At layer 1 (the last) the module's output reaches the logits through
    the final norm alone: u the plain prompt's key (uᵀx > 0 at the subject in every template)
    and r a large multiple of the target's unembedding put the target on top."""
    loaded = tiny_loaded("llama")
    model, tok, adapter = loaded
    request = EditRequest(prompt="The capital of {}", subject="France", target_new="of", target_true="Paris")
    prompts = EditPrompts.build(tok, request, TEMPLATES)
    assert len(prompts.target) == 1  # its only target position is the subject's last token
    name = adapter.module_name(1)
    keys = compute_keys(model, tok, name, request, ["{}"])
    u = keys.k_e_o.float() / keys.k_e_o.norm()
    r = 1e3 * model.get_output_embeddings().weight[prompts.target[0]].detach().clone()
    written = copy.deepcopy(model)
    with torch.no_grad():
        w = written.get_submodule(name).weight
        w.copy_(w + torch.outer(r, u))
    assert _share_alone(written, tok, request) == 1.0
    hp = load_hparams("llama", n_layers=2).with_overrides(layer=1, v_stop_loss=100.0, v_check_update=True, **QUICK_HP)
    result = compute_value_on(loaded, 1, request, TEMPLATES, hp, factors=lambda _v: (u, r))
    assert result.stop == "loss" and result.steps == 0 and result.update_top1 == [(0, 1.0)]


def test_without_factors_the_rule_is_deltas_alone(tiny_loaded: Callable[..., Any]) -> None:
    """``v_check_update`` is the editor's: the bare optimisation, given no factors, stops by δ's
    rule (here the loss rule at the first pass) and checks nothing."""
    loaded = tiny_loaded("llama")
    hp = load_hparams("llama", n_layers=2).with_overrides(
        layer=EDIT_LAYER, v_check_update=True, v_stop_loss=100.0, **QUICK_HP
    )
    result = compute_value_on(loaded, EDIT_LAYER, FRANCE, TEMPLATES, hp)
    assert result.stop == "loss" and result.steps == 0 and result.update_top1 == []


@pytest.mark.parametrize("method", ["r-rome", "rome"])
def test_editor_checks_the_update_it_writes(method: str, tiny_copy: Callable[..., Path]) -> None:
    """The editor's check applies the update it then writes: the share its last check recorded
    (at the final v_e, since the run ends at a check) is the edited model's, measured alone."""
    folder = tiny_copy("gpt2")
    hp = {**QUICK_HP, "v_stop_loss": 100.0, "v_check_update": True}
    editor = Editor.from_pretrained(folder, method=method, layer=EDIT_LAYER, hparams=hp, progress=False)
    editor._templates[(editor.hparams.template_seed, editor.hparams.context_template_lengths)] = TEMPLATES
    result = editor.edit(DARRIEUX)
    checks = result.value["update_top1"]
    assert checks and checks[-1][0] == len(result.losses) - 1
    assert checks[-1][1] == _share_alone(editor.model, editor.tokenizer, DARRIEUX)
    assert (result.stop == "loss") == (checks[-1][1] == 1.0)
    assert result.delta.meta is not None and result.delta.meta["hparams"]["v_check_update"] is True


def test_editor_without_the_check_passes_no_factors(tiny_copy: Callable[..., Path]) -> None:
    editor = Editor.from_pretrained(
        tiny_copy("gpt2"),
        layer=EDIT_LAYER,
        hparams={**QUICK_HP, "v_stop_loss": 100.0, "v_check_update": False},
        progress=False,
    )
    result = editor.edit(DARRIEUX)
    assert result.stop == "loss" and result.steps == 0 and result.value["update_top1"] == []
