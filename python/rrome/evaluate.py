"""Scoring what a model says: the probability of a target string after a prompt.

P(x | prompt) = exp(−mean NLL of x's tokens), DESIGN.md §2. The editor reports it before and
after every edit; the CounterFact metrics build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rrome.keys import Row, pad_rows, target_ids


def target_probabilities(model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
    """exp(−mean NLL) of each target's tokens as a continuation of its prompt (batched)."""
    rows, spans = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        pre = list(tokenizer(prompt)["input_ids"])
        tgt = target_ids(tokenizer, prompt, target)
        rows.append(Row(pre + tgt[:-1], len(pre) - 1))
        spans.append(tgt)
    device = next(model.parameters()).device
    batch = pad_rows(tokenizer, rows, device)
    with torch.no_grad():
        log_probs = model(**batch.model_inputs()).logits.float().log_softmax(-1)
    out = []
    for i, tgt in enumerate(spans):
        start = int(batch.lookup[i])
        pos = torch.arange(start, start + len(tgt), device=device)
        lp = log_probs[i, pos, torch.tensor(tgt, device=device)]
        out.append(float(lp.mean().exp()))
    return out
