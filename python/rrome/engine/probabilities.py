"""Forward-pass probabilities of target strings: what an edit reports before and after, and
what the evaluation's metrics are built from.

P(x | prompt) = exp(−mean NLL of x's tokens after the prompt) (docs/design.md §2). The prompt and
the target are tokenised as the edit tokenises them (:func:`rrome.engine.prompts.target_ids`; an
edit hands over its :class:`~rrome.engine.prompts.RequestTokens`), batched with padding on the
tokenizer's side and explicit position ids. A :class:`~rrome.engine.prompts.PromptFormat` says
whether each prompt is read as plain text or inside the chat template. Everything here only
reads the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrome.engine.models import context_length, input_device, logits_at
from rrome.engine.prompts import PLAIN, PromptFormat, RequestTokens, Row, pad_rows, target_ids


def _log_probs_of(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each ``(prompt ids, target ids)`` pair's target after its prompt."""
    limit = context_length(model.config)
    rows = []
    for pre, tgt in pairs:
        ids = pre + tgt[:-1]
        cut = max(0, len(ids) - limit) if limit else 0  # too long: keep the end, where the target is
        rows.append(Row(ids[cut:], len(pre) - 1 - cut))
    device = input_device(model)
    out: list[torch.Tensor] = []
    for at in range(0, len(rows), batch_size):
        batch = pad_rows(tokenizer, rows[at : at + batch_size], device)
        chunk = pairs[at : at + batch_size]
        keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for i, (_, tgt) in enumerate(chunk):
            start = int(batch.lookup[i])
            keep[i, start : start + len(tgt)] = True
        with torch.no_grad():
            logits = logits_at(model, batch.model_inputs(), keep)  # row by row, each target's positions
        at_row = 0
        for _, tgt in chunk:
            lp = logits[at_row : at_row + len(tgt)].float().log_softmax(-1)
            at_row += len(tgt)
            out.append(lp[torch.arange(len(tgt), device=lp.device), torch.tensor(tgt, device=lp.device)].cpu())
    return out


def _log_probs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int,
    fmt: PromptFormat = PLAIN,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each target as a continuation of its prompt (in ``fmt``)."""
    pairs = [
        (fmt.ids(tokenizer, prompt), target_ids(tokenizer, prompt, target, fmt))
        for prompt, target in zip(prompts, targets, strict=True)
    ]
    return _log_probs_of(model, tokenizer, pairs, batch_size=batch_size)


def request_probabilities(model: Any, tokenizer: Any, tokens: RequestTokens) -> tuple[float, float | None]:
    """P(target_new | prompt) and P(target_true | prompt) (``None`` without one) of a tokenised
    request, as :func:`target_probabilities` computes them."""
    targets = [tokens.new] + ([tokens.true] if tokens.true is not None else [])
    pairs = [(tokens.plain.ids, t) for t in targets]
    probs = [float(lp.mean().exp()) for lp in _log_probs_of(model, tokenizer, pairs, batch_size=32)]
    return probs[0], (probs[1] if len(probs) > 1 else None)


def target_probabilities(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    fmt: PromptFormat = PLAIN,
) -> list[float]:
    """exp(−mean NLL) of each target's tokens as a continuation of its prompt (batched; each
    prompt read in ``fmt``)."""
    if not prompts:
        return []
    lps = _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size, fmt=fmt)
    return [float(lp.mean().exp()) for lp in lps]


def continuation_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each target's tokens after its prompt."""
    if not prompts:
        return []
    return [float(lp.sum()) for lp in _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size)]
