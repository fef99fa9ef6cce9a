"""Shared by the engine tests: edit requests, templates, hyperparameters, and reference
computations made without rrome's helpers.

Everything runs on the tiny random checkpoints of ``tiny_models`` (2 layers, hidden 64, MLP 128,
vocabulary 400), built once per session (conftest.py). The references: the subject's last token
from the offset mapping of the plain text, keys and module outputs from a forward hook of this
module on an unpadded single prompt, the module applied in float64, a delta's dense Δ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import rrome
from rrome.engine.prompts import EditPrompts
from rrome.engine.values import compute_value
from rrome.files.edits import EditRequest
from rrome.files.hparams import HParams

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


# The tiny models have 2 layers. At layer 1 (the last) δ reaches only the logits of the subject's
# own position: for a request whose subject is not the prompt's last token the NLL gradient is
# exactly zero and the KL one rounding noise (~1e-10), which Adam's first step turns into ±lr, so
# the result would be noise-driven. Layer 0 (δ reaches the targets through layer 1's attention)
# and, at layer 1, a subject that ends the prompt give gradients of 1e-6 .. 1 instead.
VALUE_CASES = pytest.mark.parametrize(("layer", "request_"), [(0, DARRIEUX), (1, FRANCE)], ids=["layer0", "layer1"])


def saved_weight(folder: Path, tensor: str) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))[tensor]


# Layer 0 of 2: δ reaches the target positions through layer 1 (see VALUE_CASES).
EDIT_LAYER = 0


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


def compute_value_on(
    loaded: tuple[Any, Any, Any],
    layer: int,
    request: EditRequest,
    templates: Sequence[str],
    hp: HParams,
    **kwargs: Any,
) -> Any:
    """``compute_value`` on a loaded (model, tokenizer, adapter) at ``layer``: the module, the
    blocks and the layout are the adapter's; ``kwargs`` (e.g. ``fast``) are passed on."""
    model, tok, adapter = loaded
    return compute_value(
        model,
        tok,
        adapter.module_name(layer),
        adapter.blocks,
        layer,
        EditPrompts.build(tok, request, templates),
        hp,
        layout=adapter.layout,
        **kwargs,
    )
