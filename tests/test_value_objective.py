"""``v_objective = "update"``: the value optimisation adds at each prompt's subject token what
the update written for v_e adds there, not δ.

The reference is computed without rrome's batching or hooks: each rewriting prompt run alone and
unpadded, with r·uᵀx added to the edited module's output at the subject's last token only (x the
module's input there, (u, r) the factors of the update for the final v_e), and its NLL of the new
object averaged as the optimisation averages it. The optimisation ends on the pass its final v_e
was measured at, so its last recorded NLL must equal the reference. Tolerance 2e-6 absolute on
an NLL of about 6 (float32 sums in another order and another batch layout; measured: at most
3e-7); the tiny models' NLL moves little with the edited module's output (GPT-2's by 6e-5 between
the two objectives), so a looser one would not tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_reference import DARRIEUX, EDIT_LAYER, EDITED, HAND_TEMPLATES, PUSH_HP, compute_value_on

import rrome.engine.editor as editor_module
from rrome.engine.editor import Editor
from rrome.engine.prompts import EditPrompts
from rrome.files.hparams import OBJECTIVES, load_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

TEMPLATES = ["{}", *HAND_TEMPLATES[:2]]
TOL = 2e-6


def _captured_edit(
    folder: Path, method: str, hparams: dict[str, Any], fast: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any], EditPrompts]:
    """One edit of DARRIEUX; also what the editor handed the value optimisation (its keyword
    arguments, with ``fast`` set, and the prompts)."""
    seen: dict[str, Any] = {}
    real = editor_module.compute_value

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, prompts=args[5])
        seen["value"] = real(*args, **{**kwargs, "fast": fast})
        return seen["value"]

    monkeypatch.setattr(editor_module, "compute_value", spy)
    editor = Editor.from_pretrained(folder, method=method, layer=EDIT_LAYER, hparams=hparams, progress=False)
    editor._templates[(editor.hparams.template_seed, editor.hparams.context_template_lengths)] = TEMPLATES
    return editor.edit(DARRIEUX, queue=False), seen, seen["prompts"]


def _nll_with_update_at_subject(
    loaded: tuple[Any, Any, Any], family: str, prompts: EditPrompts, u: torch.Tensor, r: torch.Tensor
) -> float:
    model, _, _ = loaded
    module = model.get_submodule(EDITED[family][0].format(EDIT_LAYER))
    n = len(prompts.target)
    total = 0.0
    for row in prompts.rewrite:

        def at_subject(_m: Any, args: tuple[Any, ...], y: torch.Tensor, at: int = row.lookup) -> torch.Tensor:
            y = y.clone()
            y[0, at] += r.to(y.dtype) * (args[0][0, at] @ u.to(y.dtype))
            return y

        handle = module.register_forward_hook(at_subject)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row.ids])).logits[0].double()
        finally:
            handle.remove()
        logp = logits[len(row.ids) - n : len(row.ids)].log_softmax(-1)
        total -= float(logp.gather(1, torch.tensor(prompts.target)[:, None]).sum())
    return total / (len(prompts.rewrite) * n)


def _affine_factors(model: Any, family: str, seed: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """v ↦ (u, (v − w)·c): an update affine in v_e as every variant's is, with a random u (so
    that uᵀk differs from prompt to prompt, unlike the tiny models' own keys), w and c."""
    name, layout = EDITED[family]
    weight = model.get_submodule(name.format(EDIT_LAYER)).weight
    d_out, d_in = (weight.shape[1], weight.shape[0]) if layout == "in_out" else weight.shape
    g = torch.Generator().manual_seed(seed)
    u, w = torch.randn(d_in, generator=g), 0.05 * torch.randn(d_out, generator=g)
    return lambda v: (u, (v.detach().cpu() - w) * 50.0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_the_last_loss_is_that_of_the_update(
    family: str, padding_side: str, fast: bool, tiny_loaded: Callable[..., Any]
) -> None:
    """Under ``"update"`` the last recorded NLL is the update's at the subject tokens; under
    ``"subject"`` (δ at every prompt) it is not, by far more than the tolerance."""
    loaded = tiny_loaded(family, padding_side)
    factors = _affine_factors(loaded[0], family, 0)
    hp = load_hparams(family, n_layers=2).with_overrides(layer=EDIT_LAYER, **{**PUSH_HP, "v_stop_loss": 0.0})
    prompts = EditPrompts.build(loaded[1], DARRIEUX, TEMPLATES)
    nll = {}
    for objective in OBJECTIVES:
        hp_o = hp.with_overrides(v_objective=objective)
        value = compute_value_on(loaded, EDIT_LAYER, DARRIEUX, TEMPLATES, hp_o, fast=fast, factors=factors)
        assert value.stop == "max-steps" and value.steps == hp.v_num_grad_steps - 1
        assert value.nll[-1] < value.nll[1]  # the steps moved the loss
        nll[objective] = (value.nll[-1], _nll_with_update_at_subject(loaded, family, prompts, *factors(value.v_e)))
    assert nll["update"][0] == pytest.approx(nll["update"][1], rel=0, abs=TOL)
    assert abs(nll["subject"][0] - nll["subject"][1]) > 10 * TOL, nll


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("method", ["r-rome", "rome"])
def test_the_editor_optimises_the_update_it_writes(
    method: str,
    family: str,
    tiny_copy: Callable[..., Path],
    tiny_loaded: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The editor hands the optimisation the factors of the update it then writes: the last NLL
    is that update's at the subject tokens."""
    hp = {**PUSH_HP, "v_objective": "update", "v_check_update": False, "v_stop_loss": 0.0}
    result, seen, prompts = _captured_edit(tiny_copy(family), method, hp, True, monkeypatch)
    u, r = seen["factors"](seen["value"].v_e)
    torch.testing.assert_close(torch.from_numpy(result.delta.r.copy()), r, rtol=1e-6, atol=1e-9)
    expected = _nll_with_update_at_subject(tiny_loaded(family), family, prompts, u, r)
    assert result.value["nll"][-1] == pytest.approx(expected, rel=0, abs=TOL)
    assert result.value["update_top1"] == []  # no check asked for


def test_without_factors_the_objective_is_deltas(tiny_loaded: Callable[..., Any]) -> None:
    """``v_objective`` is the editor's, like ``v_check_update``: the bare optimisation, given no
    factors, optimises δ, step for step as under ``"subject"``."""
    loaded = tiny_loaded("gemma3")
    hp = load_hparams("gemma3", n_layers=2).with_overrides(layer=EDIT_LAYER, **{**PUSH_HP, "v_stop_loss": 0.0})
    assert hp.v_objective == "update"  # Gemma 3's default
    bare = compute_value_on(loaded, EDIT_LAYER, DARRIEUX, TEMPLATES, hp)
    subject = compute_value_on(loaded, EDIT_LAYER, DARRIEUX, TEMPLATES, hp.with_overrides(v_objective="subject"))
    assert bare.losses == subject.losses and torch.equal(bare.v_e, subject.v_e)
