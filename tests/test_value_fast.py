"""The fast value optimisation equals the plain loop (docs/design.md §6).

Both paths run the same Adam steps on the same model, every family, both padding sides, the
masked and the column-list logits, and inside a sliding window; they leave the model, its blocks
and its hooks as they found them. The fast path's prefix cache is cut from the first pass's keys
and values (no pass of its own) wherever the prompts fit the sliding window.
Tolerances: per loss value ``|a - b| <= 1e-5 * max(1, |b|)``
(absolute below 1, relative above), and v_init, v_e within ``1e-5 + 1e-5 * |v|`` per element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from engine_reference import DARRIEUX, HAND_TEMPLATES, VALUE_CASES, compute_value_on, fill
from tiny_models import FAMILIES

from rrome.engine import values
from rrome.engine.keys import compute_keys, generate_templates
from rrome.files.edits import EditRequest
from rrome.files.hparams import load_hparams


def _model_fingerprint(model: Any, blocks: str) -> tuple[list[int], list[torch.Tensor]]:
    return [id(b) for b in model.get_submodule(blocks)], [p.detach().clone() for p in model.parameters()]


WINDOWED = {"gemma2", "gemma3", "mistral"}
"""Tiny families with a sliding window (16 or 32 tokens) that longer prompts overrun: their
first pass's window has dropped positions, and the prefix is computed by a pass of its own."""


def _check_fast_equals_plain(
    model: Any,
    tok: Any,
    adapter: Any,
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
    cut_prefix: bool | None = None,
) -> None:
    hp = load_hparams(adapter.family, n_layers=2).with_overrides(layer=layer, v_num_grad_steps=5)
    before = _model_fingerprint(model, adapter.blocks)
    results = {}
    built = []
    real_build = values._PrefixCache.build

    def spy_build(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real_build(*args, **kwargs)

    values._PrefixCache.build = spy_build  # type: ignore[method-assign]
    try:
        for fast in (False, True):
            results[fast] = compute_value_on((model, tok, adapter), layer, request, templates, hp, fast=fast)
            after = _model_fingerprint(model, adapter.blocks)
            assert after[0] == before[0], "the blocks were not put back"
            assert all(torch.equal(a, b) for a, b in zip(after[1], before[1], strict=True)), "weights changed"
            assert not model.get_submodule(adapter.module_name(layer))._forward_hooks, "a hook was left behind"
            assert not model.get_submodule(adapter.blocks)[layer]._forward_pre_hooks, "a pre-hook was left behind"
    finally:
        values._PrefixCache.build = real_build  # type: ignore[method-assign]
    if cut_prefix is not None:
        # The prefix cache comes from the first pass's own keys and values, not from a pass of its own.
        assert (not built) == cut_prefix, (adapter.family, built)
    plain, fast_ = results[False], results[True]
    assert len(plain.losses) == 5, plain.losses  # no early stop at this loss level
    assert len(fast_.losses) == len(plain.losses)
    for i, (a, b) in enumerate(zip(fast_.losses, plain.losses, strict=True)):
        # Absolute 1e-5 below 1, relative 1e-5 above.
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (i, fast_.losses, plain.losses)
    assert fast_.steps == plain.steps and fast_.target_ids == plain.target_ids
    torch.testing.assert_close(fast_.v_init, plain.v_init, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_.v_e, plain.v_e, atol=1e-5, rtol=1e-5)
    # Non-trivial optimisation: δ moved, and v_init is the module output at the plain prompt.
    assert float(plain.delta.norm()) > 1e-3
    keys = compute_keys(model, tok, adapter.module_name(layer), request, ["{}"])
    torch.testing.assert_close(plain.v_init, keys.w_k_e_o, atol=1e-5, rtol=0)


@VALUE_CASES
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_value_equals_plain(
    family: str, padding_side: str, layer: int, request_: EditRequest, tiny_loaded: Callable[..., Any]
) -> None:
    model, tok, adapter = tiny_loaded(family, padding_side)
    templates = generate_templates(model, tok, lengths=((3, 5),)) + HAND_TEMPLATES
    _check_fast_equals_plain(model, tok, adapter, layer, request_, templates, cut_prefix=family not in WINDOWED)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_fast_value_equals_plain_with_column_logits(
    family: str, tiny_loaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers versions without 2-D ``logits_to_keep`` masks get one column list for the
    batch (every row's logits there, then the needed pairs selected): the same numbers."""
    import rrome.engine.models

    monkeypatch.setattr(rrome.engine.models, "MASKED_LOGITS", False)
    model, tok, adapter = tiny_loaded(family, "left")
    templates = generate_templates(model, tok, lengths=((3, 5),)) + HAND_TEMPLATES
    _check_fast_equals_plain(model, tok, adapter, 1, DARRIEUX, templates)


SHORT = EditRequest(prompt="In {}", subject="France", target_new="London")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(
    "family",
    [pytest.param(f) for f in ("mistral", "gemma2", "gemma3")],
)
def test_fast_value_equals_plain_within_the_sliding_window(
    family: str, padding_side: str, tiny_loaded: Callable[..., Any]
) -> None:
    """Prompts shorter than the sliding window (16 tokens for the tiny Gemmas, 32 for Mistral), so
    that a fast path may reuse the prefix's keys and values there too."""
    model, tok, adapter = tiny_loaded(family, padding_side)
    templates = ["{}", "I. {}"]
    longest = max(len(tok(fill(t, SHORT)[0] + " London")["input_ids"]) for t in templates)
    assert longest < model.config.sliding_window, longest
    for layer in (0, 1):  # the subject ends the prompt: δ matters at both layers
        _check_fast_equals_plain(model, tok, adapter, layer, SHORT, templates, cut_prefix=True)
