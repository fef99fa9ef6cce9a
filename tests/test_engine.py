"""The editing engine against independent computations (docs/design.md §1 and §6).

Everything runs on the tiny random checkpoints of ``tiny_models`` (2 layers, hidden 64, MLP 128,
vocabulary 400), built once per session. The reference numbers are computed here without
rrome's helpers: the subject's last token from the offset mapping of the plain text, keys and
module outputs from a forward hook of this file on an unpadded single prompt, the update from
docs/design.md §1's formula with ``torch.linalg.solve`` in float64.

Tolerances (each stated where it is used):

* keys and module outputs: absolute 1e-5 (float32 forward passes of the same numbers);
* the update Δ: relative 1e-6 in Frobenius norm (float64 reference, float32 factors);
* fast vs plain value optimisation: per loss value ``|a - b| <= 1e-5 * max(1, |b|)`` (absolute
  below 1, relative above), and v_e within ``1e-5 + 1e-5 * |v|`` per element;
* weights: an edited float32 weight within float32 rounding of ``W + Σ Δ`` computed in float64;
  what ``save()`` writes equals the in-memory weight bit for bit (float32 storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, train_tokenizer
from transformers import AutoModelForCausalLM

import rrome
from rrome import Cholesky
from rrome.engine.editor import Editor, EditResult
from rrome.engine.keys import Keys, TokenizationError, compute_keys, generate_templates, target_ids
from rrome.engine.update import compute_update
from rrome.engine.values import compute_value
from rrome.files.constants import METHODS
from rrome.files.edits import EditRequest
from rrome.files.errors import EditFileError, RromeError
from rrome.files.hparams import load_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

# The module ROME edits and how its weight is stored, per docs/design.md §1 (not taken from rrome).
EDITED = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "in_out"),
    "gptj": ("transformer.h.{}.mlp.fc_out", "out_in"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "out_in"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"), ("model.layers.{}.mlp.down_proj", "out_in")
    ),
}
HIDDEN = 64  # tiny_models: hidden size of every family
INTERMEDIATE = 128  # tiny_models: MLP width, i.e. d_in of the edited projection

FRANCE = EditRequest(prompt="The capital of {}", subject="France", target_new="London", target_true="Paris")
DARRIEUX = EditRequest(
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English", target_true="French"
)

# The subject at the very start of the prompt: the BOS trap of docs/design.md §1.
EIFFEL = EditRequest(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", target_true="Paris")

# Hand-written templates of different lengths (so that padding matters), beside generated ones.
# The last one names both subjects first: the key must come from where the prompt puts the subject.
HAND_TEMPLATES = [
    "The cat sat on the mat. {}",
    "I. {}",
    "Because of the rain in Paris, everyone stayed in. {}",
    "The Eiffel Tower and Danielle Darrieux. {}",
]

# Small but complete: a few steps, few tokens of statistics, 5 generated templates.
QUICK_HP: dict[str, Any] = {"v_num_grad_steps": 5, "stats_max_tokens": 2000, "context_template_lengths": ((3, 5),)}
# The tiny random models have module outputs of norm ~0.05 and nearly uniform next-token
# distributions. With the reference constants (lr 0.5, weight decay 0.5 / ‖v_init‖², clamp 4)
# the first Adam step moves δ by ~4, the weight-decay term then dominates and the loss *rises*
# (measured: 6.2 -> ~40 on gpt2, 6.0 -> ~80 on llama), so P(new) cannot move. Scaled to the tiny
# activations (lr 0.05, no weight decay, a loose clamp), the same optimisation does lower the loss
# and raise P(new) (e.g. 0.0028 -> 0.0035 on gpt2); the random LM head bounds how far it can go.
PUSH_HP: dict[str, Any] = {
    "v_num_grad_steps": 15,
    "v_lr": 0.05,
    "v_weight_decay": 0.0,
    "clamp_norm_factor": 1000.0,
    "stats_max_tokens": 2000,
    "context_template_lengths": ((3, 5),),
}


# --------------------------------------------------------------------------------------------
# independent helpers


def fill(template: str, request: EditRequest) -> tuple[str, int, int]:
    """``template`` ⊕ the request's prompt, and the character span of the subject in it."""
    at = template.index("{}")
    sentence = request.prompt.replace("{}", request.subject)
    text = template[:at] + sentence + template[at + 2 :]
    start = at + request.prompt.index("{}")
    return text, start, start + len(request.subject)


def subject_last_token(tokenizer: Any, text: str, start: int, end: int) -> int:
    """Index of the subject's last token in the tokenisation of ``text``.

    The last token that starts before the subject's end (BOS has an empty span and never counts),
    cross-checked against the tokenisation of the text cut after the subject: its ids must be a
    prefix of the full text's and end at the same token.
    """
    enc = tokenizer(text, return_offsets_mapping=True)
    starts = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end]
    assert starts, (text, start, end)
    last = starts[-1]
    assert enc["offset_mapping"][last][1] > start, "the token found does not reach into the subject"
    head = tokenizer(text[:end])["input_ids"]
    assert enc["input_ids"][: len(head)] == head, (text, head, enc["input_ids"])
    assert len(head) - 1 == last, (text, len(head) - 1, last)
    return last


def naive_last_token(tokenizer: Any, text: str, start: int, end: int) -> int:
    """The trap of docs/design.md §1: add the lengths of the separately tokenised pieces."""
    return len(tokenizer(text[:start])["input_ids"]) + len(tokenizer(text[start:end])["input_ids"]) - 1


def module_io(model: Any, tokenizer: Any, module_name: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module_name`` at every position of ``text`` alone (float64, (T, d))."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen["k"] = args[0].detach()
        seen["v"] = (out[0] if isinstance(out, tuple) else out).detach()

    enc = tokenizer(text, return_tensors="pt")
    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    return seen["k"][0].double(), seen["v"][0].double()


def reference_keys(
    model: Any, tokenizer: Any, module_name: str, request: EditRequest, templates: Sequence[str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per template: the key and the module output at the subject's last token, computed here."""
    keys, outs = [], []
    for t in templates:
        text, start, end = fill(t, request)
        idx = subject_last_token(tokenizer, text, start, end)
        k, v = module_io(model, tokenizer, module_name, text)
        keys.append(k[idx])
        outs.append(v[idx])
    return keys, outs


def module_apply64(module: torch.nn.Module, layout: str, k: torch.Tensor) -> torch.Tensor:
    """The module's output "W k", bias included, in float64: ``k @ W + b`` for Conv1D, ``W k + b`` for Linear."""
    w = module.weight.detach().double()
    y = k.double() @ w if layout == "in_out" else w @ k.double()
    bias = getattr(module, "bias", None)
    return y + bias.detach().double() if bias is not None else y


def dense(delta: rrome.Delta) -> torch.Tensor:
    """The d_out × d_in update of a delta, in float64."""
    r = torch.tensor(delta.r, dtype=torch.float64)  # the factors are read-only arrays: copy them
    return torch.outer(r * delta.scale, torch.tensor(delta.u, dtype=torch.float64))


def stored_delta(delta: rrome.Delta, layout: str) -> torch.Tensor:
    """Δ in the stored layout (transposed for Conv1D), float64."""
    full = dense(delta)
    return full.T if layout == "in_out" else full


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_hashes(folder: Path, *, ignore_lock: bool = False) -> dict[str, str]:
    """sha256 of every file under ``folder``; ``ignore_lock`` leaves out ``.rrome/lock``, the one
    file that writing a copy may add to its source (it names the lock's last holder)."""
    out = {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    if ignore_lock:
        out.pop(".rrome/lock", None)
    return out


def stats_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


# --------------------------------------------------------------------------------------------
# 1. keys


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_match_independent_hook(
    family: str, padding_side: str, bos: bool, tiny_loaded: Callable[..., Any]
) -> None:
    model, tok, adapter = tiny_loaded(family, padding_side, bos)
    template, layout = EDITED[family]
    assert adapter.layout == layout
    assert tok.padding_side == padding_side
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == bos
    templates = generate_templates(model, tok, lengths=((3, 5),)) + HAND_TEMPLATES
    assert templates[0] == "{}" and len(templates) == 1 + 5 + len(HAND_TEMPLATES)
    for layer in (0, 1):
        name = template.format(layer)
        assert adapter.module_name(layer) == name
        for request in (DARRIEUX, EIFFEL):
            keys = compute_keys(model, tok, name, request, templates)
            assert keys.k_e.shape == keys.k_e_o.shape == (INTERMEDIATE,)
            assert keys.w_k_e.shape == keys.w_k_e_o.shape == (HIDDEN,)
            ref_k, ref_v = reference_keys(model, tok, name, request, templates)
            # Absolute 1e-5: the same float32 computation, batched and padded versus alone.
            torch.testing.assert_close(keys.k_e_o.double(), ref_k[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.w_k_e_o.double(), ref_v[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.k_e.double(), torch.stack(ref_k).mean(0), atol=1e-5, rtol=0)
            torch.testing.assert_close(keys.w_k_e.double(), torch.stack(ref_v).mean(0), atol=1e-5, rtol=0)
            # The module is affine: the mean output is the output at the mean key.
            module = model.get_submodule(name)
            torch.testing.assert_close(keys.w_k_e.double(), module_apply64(module, layout, keys.k_e), atol=1e-5, rtol=0)
            # The templates do change the key (otherwise the comparison above proves little). Not
            # at layer 0 of GPT-J / NeoX: their parallel MLP sees only the token's own embedding.
            if layer == 1:
                assert float((keys.k_e - keys.k_e_o).norm()) > 1e-3 * float(keys.k_e_o.norm())


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


# --------------------------------------------------------------------------------------------
# 2. the three update variants


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


def _reference_delta(
    method: str, c0: torch.Tensor, k_e: torch.Tensor, k_e_o: torch.Tensor, v_e: torch.Tensor, w: Callable[..., Any]
) -> torch.Tensor:
    """docs/design.md §1's table, in float64: Δ = (v_e − W k_res)(C0⁻¹ k_num)ᵀ / (k_denᵀ C0⁻¹ k_num)."""
    k_num, k_res, k_den = {"rome": (k_e, k_e_o, k_e_o), "r-rome": (k_e, k_e, k_e), "p-rome": (k_e_o, k_e_o, k_e_o)}[
        method
    ]
    c0_inv_k = torch.linalg.solve(c0, k_num)
    return torch.outer(v_e - w(k_res), c0_inv_k) / (k_den @ c0_inv_k)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])  # Conv1D + bias, Linear + bias, Linear
def test_update_variants_match_formula(family: str, tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded(family)
    template, layout = EDITED[family]
    name = template.format(1)
    module = model.get_submodule(name)
    c0 = _random_spd(INTERMEDIATE, seed=7)
    chol = Cholesky(c0.numpy())

    def w(k: torch.Tensor) -> torch.Tensor:
        return module_apply64(module, layout, k)

    keys32 = compute_keys(model, tok, name, DARRIEUX, ["{}", *HAND_TEMPLATES])
    k_e, k_e_o = keys32.k_e.double(), keys32.k_e_o.double()
    # W k in float64 here, so that the only float32 rounding left is that of the returned factors.
    keys = Keys(k_e=k_e, k_e_o=k_e_o, w_k_e=w(k_e), w_k_e_o=w(k_e_o))
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(HIDDEN, generator=g, dtype=torch.float64) * float(keys.w_k_e_o.norm()) / HIDDEN**0.5
    v_e = keys.w_k_e_o + delta

    got = {}
    for method in METHODS:
        update = compute_update(method, chol, keys, v_e)
        assert update.u.shape == (INTERMEDIATE,) and update.r.shape == (HIDDEN,)
        assert update.u.dtype == update.r.dtype == np.float32
        mat = torch.outer(torch.from_numpy(update.r).double(), torch.from_numpy(update.u).double())
        ref = _reference_delta(method, c0, k_e, k_e_o, v_e, w)
        # Relative 1e-6 in Frobenius norm: float32 factors of a float64 computation.
        assert rel_diff(mat, ref) < 1e-6, (method, rel_diff(mat, ref))
        assert update.norm_delta == pytest.approx(float(ref.norm()) / (HIDDEN * INTERMEDIATE), rel=1e-6)
        # The defining property of each variant: Δ maps its key to the residual it closes.
        k_den = {"rome": k_e_o, "r-rome": k_e, "p-rome": k_e_o}[method]
        k_res = {"rome": k_e_o, "r-rome": k_e, "p-rome": k_e_o}[method]
        torch.testing.assert_close(mat @ k_den, v_e - w(k_res), rtol=1e-5, atol=1e-9)
        got[method] = mat
    # k_e != k_e_o here, so the three variants are three different updates.
    for a, b in (("rome", "r-rome"), ("rome", "p-rome"), ("r-rome", "p-rome")):
        assert rel_diff(got[a], got[b]) > 1e-3, (a, b)

    # With the plain prompt as the only template, k_e = k_e_o and the variants coincide.
    plain = compute_keys(model, tok, name, DARRIEUX, ["{}"])
    assert torch.equal(plain.k_e, plain.k_e_o) and torch.equal(plain.w_k_e, plain.w_k_e_o)
    v_plain = plain.w_k_e_o + delta.float()
    mats = []
    for method in METHODS:
        update = compute_update(method, chol, plain, v_plain)
        mats.append(torch.outer(torch.from_numpy(update.r).double(), torch.from_numpy(update.u).double()))
    for m in mats[1:]:
        assert rel_diff(m, mats[0]) < 1e-12


def test_update_rejects_unknown_method(tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded("gpt2")
    keys = compute_keys(model, tok, EDITED["gpt2"][0].format(0), FRANCE, ["{}"])
    chol = Cholesky(np.eye(INTERMEDIATE))
    with pytest.raises(ValueError, match="r-rome"):
        compute_update("memit", chol, keys, keys.w_k_e_o)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 3. the fast value optimisation equals the plain loop


def _model_fingerprint(model: Any, blocks: str) -> tuple[list[int], list[torch.Tensor]]:
    return [id(b) for b in model.get_submodule(blocks)], [p.detach().clone() for p in model.parameters()]


# The tiny models have 2 layers. At layer 1 (the last) δ reaches only the logits of the subject's
# own position: for a request whose subject is not the prompt's last token the NLL gradient is
# exactly zero and the KL one rounding noise (~1e-10), which Adam's first step turns into ±lr, so
# the result would be noise-driven. Layer 0 (δ reaches the targets through layer 1's attention)
# and, at layer 1, a subject that ends the prompt give gradients of 1e-6 .. 1 instead.
VALUE_CASES = pytest.mark.parametrize(("layer", "request_"), [(0, DARRIEUX), (1, FRANCE)], ids=["layer0", "layer1"])


def _check_fast_equals_plain(
    model: Any, tok: Any, adapter: Any, layer: int, request: EditRequest, templates: Sequence[str]
) -> None:
    hp = load_hparams(adapter.family, n_layers=2).with_overrides(layer=layer, v_num_grad_steps=5)
    before = _model_fingerprint(model, adapter.blocks)
    results = {}
    for fast in (False, True):
        results[fast] = compute_value(
            model,
            tok,
            adapter.module_name(layer),
            adapter.blocks,
            layer,
            request,
            templates,
            hp,
            layout=adapter.layout,
            fast=fast,
        )
        after = _model_fingerprint(model, adapter.blocks)
        assert after[0] == before[0], "the blocks were not put back"
        assert all(torch.equal(a, b) for a, b in zip(after[1], before[1], strict=True)), "weights changed"
        assert not model.get_submodule(adapter.module_name(layer))._forward_hooks, "a hook was left behind"
        assert not model.get_submodule(adapter.blocks)[layer]._forward_pre_hooks, "a pre-hook was left behind"
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
    _check_fast_equals_plain(model, tok, adapter, layer, request_, templates)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_fast_value_equals_plain_with_column_logits(
    family: str, tiny_loaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers versions without 2-D ``logits_to_keep`` masks get one column list for the
    batch (every row's logits there, then the needed pairs selected): the same numbers."""
    import rrome.engine.values

    monkeypatch.setattr(rrome.engine.values, "_MASKED_LOGITS", False)
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
        _check_fast_equals_plain(model, tok, adapter, layer, SHORT, templates)


@VALUE_CASES
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])  # absolute positions, BOS, BOS
def test_value_does_not_depend_on_padding_side(
    family: str, layer: int, request_: EditRequest, tiny_loaded: Callable[..., Any]
) -> None:
    results = []
    for side in ("right", "left"):
        model, tok, adapter = tiny_loaded(family, side)
        hp = load_hparams(adapter.family, n_layers=2).with_overrides(layer=layer, v_num_grad_steps=5)
        results.append(
            compute_value(
                model,
                tok,
                adapter.module_name(layer),
                adapter.blocks,
                layer,
                request_,
                ["{}", *HAND_TEMPLATES],
                hp,
                layout=adapter.layout,
            )
        )
    right, left = results
    assert left.losses == pytest.approx(right.losses, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(left.v_e, right.v_e, atol=1e-5, rtol=1e-5)


def test_value_targets_have_no_special_tokens(tiny_loaded: Callable[..., Any]) -> None:
    model, tok, adapter = tiny_loaded("llama", "left", True)
    hp = load_hparams("llama", n_layers=2).with_overrides(v_num_grad_steps=1)
    res = compute_value(
        model, tok, adapter.module_name(0), adapter.blocks, 0, DARRIEUX, ["{}"], hp, layout=adapter.layout
    )
    prefix = DARRIEUX.prompt.replace("{}", DARRIEUX.subject)
    full = tok(prefix + " English")["input_ids"]
    assert res.target_ids == full[len(tok(prefix)["input_ids"]) :]
    assert tok.bos_token_id not in res.target_ids
    assert tok.decode(res.target_ids).strip() == "English"


# --------------------------------------------------------------------------------------------
# 4. the Editor end to end


def _weight(folder: Path, tensor: str) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))[tensor]


# Layer 0 of 2: δ reaches the target positions through layer 1 (see VALUE_CASES).
EDIT_LAYER = 0


@pytest.mark.parametrize("method", ["r-rome", "rome", "p-rome"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_edit(family: str, method: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    template, layout = EDITED[family]
    tensor = template.format(EDIT_LAYER) + ".weight"
    w0 = _weight(folder, tensor)
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


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_save_in_place_then_revert(family: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    shard = folder / "model.safetensors"
    original_bytes = sha256(shard)
    original = load_file(str(shard))
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    editor = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    editor.edit(DARRIEUX)
    in_memory = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    assert sha256(shard) == original_bytes, "edit() must not write; save() does"

    report = editor.save()
    assert report is not None and report["batch"] == 1 and report["tensors"] == [tensor]
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
    assert sha256(shard) == original_bytes


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_save_to_copy_leaves_source(family: str, tiny_copy: Callable[..., Path], tmp_path: Path) -> None:
    folder = tiny_copy(family)
    before = folder_hashes(folder, ignore_lock=True)
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    editor = Editor.from_pretrained(folder, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    editor.edit(EIFFEL)
    in_memory = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    out = tmp_path / "edited"
    report = editor.save(out)
    assert report is not None
    assert folder_hashes(folder, ignore_lock=True) == before
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).state_dict()[tensor], in_memory)
    assert [x.delta.tensor for x in rrome.load_deltas(out)] == [tensor]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_editor_half_precision_save_matches_memory(dtype: str, tiny_copy: Callable[..., Path]) -> None:
    """Run and stored in half precision: the writer rounds W + Δ once, as the in-memory update does."""
    folder = tiny_copy("llama", dtype={"bfloat16": "bf16", "float16": "f16"}[dtype])
    tensor = EDITED["llama"][0].format(EDIT_LAYER) + ".weight"
    w0 = _weight(folder, tensor)
    editor = Editor.from_pretrained(folder, dtype=dtype, layer=EDIT_LAYER, hparams=QUICK_HP, progress=False)
    result = editor.edit(FRANCE)
    live = editor.model.get_submodule(editor.module_name).weight.detach().clone()
    assert live.dtype == w0.dtype == getattr(torch, dtype)
    # One rounding of W + Δ (computed in float32) to the storage dtype.
    expected = (w0.float() + dense(result.delta).float()).to(w0.dtype)
    assert torch.equal(live, expected)
    editor.save()
    assert torch.equal(_weight(folder, tensor), live)


# --------------------------------------------------------------------------------------------
# 5. sequential edits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sequential_edits_compose(family: str, tiny_copy: Callable[..., Path]) -> None:
    folder = tiny_copy(family)
    layout = EDITED[family][1]
    tensor = EDITED[family][0].format(EDIT_LAYER) + ".weight"
    w0 = _weight(folder, tensor)

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
    saved = _weight(folder, tensor)
    torch.testing.assert_close(saved.double(), expected, rtol=1e-6, atol=1e-7)
    log = rrome.load_deltas(folder)
    assert [x.batch for x in log] == [1, 1]
    assert [x.delta.meta["request"]["subject"] for x in log] == [FRANCE.subject, EIFFEL.subject]


# --------------------------------------------------------------------------------------------
# 6. method selection


def test_editor_hparams_overrides(tiny_dir: Callable[..., Path]) -> None:
    editor = Editor.from_pretrained(tiny_dir("gpt2"), layer=1, hparams=QUICK_HP, progress=False)
    assert editor.layer == 1 and editor.hparams.v_num_grad_steps == 5
    assert editor.hparams.context_template_lengths == ((3, 5),)
    with pytest.raises(RromeError, match="v_steps"):
        Editor.from_pretrained(tiny_dir("gpt2"), hparams={"v_steps": 3}, progress=False)


def test_editor_layer_in_hparams(tiny_dir: Callable[..., Path]) -> None:
    try:
        editor = Editor.from_pretrained(tiny_dir("gpt2"), hparams={"layer": 1}, progress=False)
    except RromeError:
        return  # a clear refusal would do too
    assert editor.layer == 1


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


# --------------------------------------------------------------------------------------------
# 7. tokenisation errors

TOKENIZER_KINDS = pytest.mark.parametrize(
    ("bos", "sp"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["bytelevel", "bytelevel-bos", "sentencepiece", "sentencepiece-bos"],
)


def _unchecked_request(**fields: Any) -> EditRequest:
    """An EditRequest built around its own validation (it refuses blank targets)."""
    request = object.__new__(EditRequest)
    defaults: dict[str, Any] = {
        "target_true": None,
        "case_id": None,
        "paraphrase_prompts": (),
        "neighborhood_prompts": (),
        "neighborhood_target": None,
    }
    for name, value in {**defaults, **fields}.items():
        object.__setattr__(request, name, value)
    return request


@TOKENIZER_KINDS
def test_target_ids(bos: bool, sp: bool) -> None:
    tok = train_tokenizer(bos=bos, padding_side="right", sentencepiece_like=sp)
    assert issubclass(TokenizationError, RromeError)
    for prefix in ("The capital of France is ", ""):
        with pytest.raises(TokenizationError, match="tokenises to nothing"):
            target_ids(tok, prefix, "")
    for prefix in ("The capital of France is", "The capital of France is "):
        ids = target_ids(tok, prefix, "London")
        assert ids and tok.bos_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids).strip() == "London"
        assert tok(prefix.rstrip() + " London")["input_ids"][-len(ids) :] == ids


@TOKENIZER_KINDS
def test_empty_target_after_a_word_is_a_tokenization_error(bos: bool, sp: bool) -> None:
    tok = train_tokenizer(bos=bos, padding_side="right", sentencepiece_like=sp)
    with pytest.raises(TokenizationError, match="tokenises to nothing"):
        print(target_ids(tok, "The capital of France is", ""))


def test_blank_target_is_rejected_by_the_request() -> None:
    with pytest.raises(EditFileError, match='"target_new"'):
        EditRequest(prompt="The capital of {}", subject="France", target_new=" ")
    assert issubclass(EditFileError, RromeError)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every expensive step of an edit fail the test if it is reached."""

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("reached the expensive part of an edit")

    import rrome.engine.editor as editor_mod

    for name in ("compute_keys", "compute_value", "compute_update", "generate_templates", "target_probabilities"):
        monkeypatch.setattr(editor_mod, name, forbidden)
    monkeypatch.setattr(editor_mod.stats, "second_moment", forbidden)


def test_editor_rejects_blank_targets_before_any_work(
    tiny_dir: Callable[..., Path], no_work: None, private_cache: Path
) -> None:
    editor = Editor.from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(EditFileError, match='"target_new"'):
        editor.edit({"prompt": "The capital of {}", "subject": "France", "target_new": "  "})
    # The prefix ends in a space: the empty target really is empty, and the guard holds.
    with pytest.raises(TokenizationError):
        editor.edit(_unchecked_request(prompt="The capital of {} is ", subject="France", target_new=""))
    assert editor.pending == [] and editor.results == []
    assert stats_files(private_cache) == []


def test_editor_rejects_an_empty_target_before_any_work(
    tiny_dir: Callable[..., Path], no_work: None, private_cache: Path
) -> None:
    editor = Editor.from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(TokenizationError):
        editor.edit(_unchecked_request(prompt="The capital of {}", subject="France", target_new=""))


# --------------------------------------------------------------------------------------------
# 8. the `rrome apply` command


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One statistics cache for the CLI runs (copies of one model share their statistics)."""
    return tmp_path_factory.mktemp("cli-cache")


def run_rrome(*args: str | Path, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        RROME_CACHE_DIR=str(cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",  # tiny models: two threads are many times slower
    )
    env.pop("RROME_CRASH_AT", None)
    cmd = [sys.executable, "-m", "rrome.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


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
    shard_before = sha256(folder / "model.safetensors")
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    proc = run_rrome("apply", "edits.jsonl", folder.name, "--no-progress", cwd=tmp_path, cache=cli_cache)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    table = [line for line in proc.stdout.splitlines() if "France" in line or "The Eiffel Tower" in line]
    assert len(table) == 2, proc.stdout
    assert table[0].split()[0] == "11" and "London" in table[0]
    assert table[1].split()[0] == "-" and "Rome" in table[1]
    assert "wrote 2 edit(s) as batch 1" in proc.stdout
    assert sha256(folder / "model.safetensors") != shard_before
    assert stats_files(cli_cache), "the statistics should be cached in RROME_CACHE_DIR"

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
    before = folder_hashes(folder)
    bad = {"prompt": "Paris is the capital", "subject": "France", "target_new": "London"}
    _write_jsonl(tmp_path / "edits.jsonl", [CLI_EDITS[0], bad])
    proc = run_rrome("apply", "edits.jsonl", folder.name, "--no-progress", cwd=tmp_path, cache=private_cache)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one problem, one line
    assert lines[0].startswith("rrome: error: edits.jsonl:2: "), lines[0]
    assert 'field "prompt"' in lines[0] and "{}" in lines[0]
    assert folder_hashes(folder) == before
    assert stats_files(private_cache) == []


def test_cli_apply_p_rome_to_a_copy(tiny_copy: Callable[..., Path], tmp_path: Path, cli_cache: Path) -> None:
    folder = tiny_copy("gpt2")
    before = folder_hashes(folder, ignore_lock=True)
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    out = tmp_path / "edited"
    args = ["apply", "edits.jsonl", folder.name, "--method", "p-rome", "--out", out.name, "--no-progress"]
    proc = run_rrome(*args, cwd=tmp_path, cache=cli_cache)
    assert proc.returncode == 0, proc.stderr
    assert folder_hashes(folder, ignore_lock=True) == before
    assert (out / "config.json").is_file()
    log = rrome.load_deltas(out)
    assert [x.delta.meta["method"] for x in log] == ["p-rome", "p-rome"]
    tensor = "transformer.h.0.mlp.c_proj.weight"
    w0 = _weight(folder, tensor).double()
    expected = w0 + sum(stored_delta(x.delta, "in_out") for x in log)
    torch.testing.assert_close(_weight(out, tensor).double(), expected, rtol=1e-6, atol=1e-7)
    copied = load_file(str(out / "model.safetensors"))
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if name != tensor:
            assert torch.equal(copied[name], value), name


def test_cli_apply_unknown_method_is_a_usage_error(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "edits.jsonl", CLI_EDITS)
    proc = run_rrome("apply", "edits.jsonl", tiny_dir("gpt2"), "--method", "memit", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "memit" in proc.stderr
