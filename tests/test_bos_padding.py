"""BOS and padding sides: where the tokenizer's habits could move the numbers, they do not.

* the subject-token trap of docs/design.md §1: with BOS, or a prefix ending in a space tokenised
  alone, adding the lengths of the separately tokenised pieces is off by one; rrome's key sits at
  the subject's real last token;
* keys and the value optimisation are the same padded on the left and on the right (absolute
  1e-5 for keys; losses and v_e within 1e-5 relative and absolute);
* the value's target ids carry no BOS or other special token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from engine_reference import (
    DARRIEUX,
    EDITED,
    EIFFEL,
    HAND_TEMPLATES,
    VALUE_CASES,
    compute_value_on,
    fill,
    module_io,
    naive_last_token,
    subject_last_token,
)
from tiny_models import FAMILIES

from rrome.engine.keys import compute_keys
from rrome.files.edits import EditRequest
from rrome.files.hparams import load_hparams


@pytest.mark.parametrize(
    ("bos", "sp"),
    [(True, True), (True, False), (False, True)],
    ids=["bos-sentencepiece", "bos-bytelevel", "sentencepiece"],
)
def test_subject_token_trap(bos: bool, sp: bool, tiny_loaded: Callable[..., Any]) -> None:
    """The naive index (lengths of separately tokenised pieces) is wrong here; rrome must not be."""
    model, tok, _ = tiny_loaded("llama", "right", bos, sp)
    name = EDITED["llama"][0].format(1)
    for request in (EIFFEL, DARRIEUX):
        text, start, end = fill("{}", request)
        right_idx = subject_last_token(tok, text, start, end)
        naive_idx = naive_last_token(tok, text, start, end)
        at_start = start == 0
        if bos or not at_start:
            # BOS counted twice, or a prefix ending in a space tokenised alone: off by at least one.
            assert naive_idx != right_idx, (text, naive_idx, right_idx)
        keys = compute_keys(model, tok, name, request, ["{}"])
        k, _ = module_io(model, tok, name, text)
        torch.testing.assert_close(keys.k_e_o.double(), k[right_idx], atol=1e-5, rtol=0)
        if naive_idx != right_idx and naive_idx < k.shape[0]:
            assert float((keys.k_e_o.double() - k[naive_idx]).norm()) > 1e-3


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_do_not_depend_on_padding_side(family: str, bos: bool, tiny_loaded: Callable[..., Any]) -> None:
    right = tiny_loaded(family, "right", bos)
    left = tiny_loaded(family, "left", bos)
    name = EDITED[family][0].format(1)
    templates = ["{}", *HAND_TEMPLATES]
    for request in (DARRIEUX, EIFFEL):
        kr = compute_keys(right[0], right[1], name, request, templates)
        kl = compute_keys(left[0], left[1], name, request, templates)
        for field in ("k_e", "k_e_o", "w_k_e", "w_k_e_o"):
            torch.testing.assert_close(getattr(kl, field), getattr(kr, field), atol=1e-5, rtol=0, msg=field)


@VALUE_CASES
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])  # absolute positions, BOS, BOS
def test_value_does_not_depend_on_padding_side(
    family: str, layer: int, request_: EditRequest, tiny_loaded: Callable[..., Any]
) -> None:
    results = []
    for side in ("right", "left"):
        loaded = tiny_loaded(family, side)
        hp = load_hparams(loaded[2].family, n_layers=2).with_overrides(layer=layer, v_num_grad_steps=5)
        results.append(compute_value_on(loaded, layer, request_, ["{}", *HAND_TEMPLATES], hp))
    right, left = results
    assert left.losses == pytest.approx(right.losses, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(left.v_e, right.v_e, atol=1e-5, rtol=1e-5)


def test_value_targets_have_no_special_tokens(tiny_loaded: Callable[..., Any]) -> None:
    loaded = tiny_loaded("llama", "left", True)
    tok = loaded[1]
    hp = load_hparams("llama", n_layers=2).with_overrides(v_num_grad_steps=1)
    res = compute_value_on(loaded, 0, DARRIEUX, ["{}"], hp)
    prefix = DARRIEUX.prompt.replace("{}", DARRIEUX.subject)
    full = tok(prefix + " English")["input_ids"]
    assert res.target_ids == full[len(tok(prefix)["input_ids"]) :]
    assert tok.bos_token_id not in res.target_ids
    assert tok.decode(res.target_ids).strip() == "English"
