"""Forward-pass probabilities of target strings: what an edit reports before and after, and
what the evaluation's metrics are built from.

P(x | prompt) = exp(−mean NLL of x's tokens after the prompt) (docs/design.md §2). The prompt and
the target are tokenised as the edit tokenises them (:func:`rrome.engine.keys.target_ids`),
batched with padding on the tokenizer's side and explicit position ids. Everything here only
reads the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrome.engine.keys import Row, pad_rows, target_ids
from rrome.engine.models import context_length, input_device


def _log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each target as a continuation of its prompt."""
    limit = context_length(model.config)
    rows, spans = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        pre = list(tokenizer(prompt)["input_ids"])
        tgt = target_ids(tokenizer, prompt, target)
        ids = pre + tgt[:-1]
        cut = max(0, len(ids) - limit) if limit else 0  # too long: keep the end, where the target is
        rows.append(Row(ids[cut:], len(pre) - 1 - cut))
        spans.append(tgt)
    device = input_device(model)
    out: list[torch.Tensor] = []
    for at in range(0, len(rows), batch_size):
        batch = pad_rows(tokenizer, rows[at : at + batch_size], device)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits
        for i, tgt in enumerate(spans[at : at + batch_size]):
            start = int(batch.lookup[i])
            pos = torch.arange(start, start + len(tgt), device=device)
            lp = logits[i, pos].float().log_softmax(-1)
            out.append(lp[torch.arange(len(tgt), device=device), torch.tensor(tgt, device=device)].cpu())
    return out


def target_probabilities(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[float]:
    """exp(−mean NLL) of each target's tokens as a continuation of its prompt (batched)."""
    if not prompts:
        return []
    return [float(lp.mean().exp()) for lp in _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size)]


def continuation_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each target's tokens after its prompt."""
    if not prompts:
        return []
    return [float(lp.sum()) for lp in _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size)]
