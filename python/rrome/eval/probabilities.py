"""The probabilities behind a case's metrics, and the neighbour leak of an edit.

:func:`case_probabilities` measures P(new) and P(true) for every prompt of a CounterFact case in
one batched pass (:func:`rrome.engine.probabilities.target_probabilities`); the metrics over them
are in :mod:`rrome.eval.metrics` (docs/design.md §2).

:func:`leak_fractions` is the neighbour-leak diagnostic: for a rank-one update Δ = r uᵀ / uᵀk_den
and a token whose key (the edited module's input) is k, the module's output there changes by
s·r with s = uᵀk / uᵀk_den, the fraction of the change the edit writes at its own key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rrome.engine.probabilities import target_probabilities
from rrome.engine.prompts import PLAIN, PromptFormat
from rrome.eval.metrics import CaseProbs
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError


def case_probabilities(model: Any, tokenizer: Any, request: EditRequest, fmt: PromptFormat = PLAIN) -> CaseProbs:
    """The probabilities behind a case's metrics, in one batched pass, every prompt read in
    ``fmt`` (plain, or inside the chat template).

    Raises:
        RromeError: the case has no ``target_true`` (the metrics compare against it).
    """
    if request.target_true is None:
        raise RromeError(f"case {request.case_id or request.subject!r} has no target_true; the metrics need one")
    true_n = request.neighborhood_target or request.target_true
    groups = [
        [request.text()],
        list(request.paraphrase_prompts),
        list(request.neighborhood_prompts),
    ]
    prompts: list[str] = []
    targets: list[str] = []
    for g, trues in zip(groups, (request.target_true, request.target_true, true_n), strict=True):
        for p in g:
            prompts += [p, p]
            targets += [request.target_new, trues]
    probs = target_probabilities(model, tokenizer, prompts, targets, fmt=fmt)
    out: list[list[tuple[float, float]]] = []
    at = 0
    for g in groups:
        out.append([(probs[at + 2 * i], probs[at + 2 * i + 1]) for i in range(len(g))])
        at += 2 * len(g)
    return CaseProbs(*out)


def neighbourhood_probabilities(
    model: Any, tokenizer: Any, request: EditRequest, fmt: PromptFormat = PLAIN
) -> list[tuple[float, float]]:
    """``(p_new, p_true)`` for each neighbourhood prompt, as :func:`case_probabilities` computes
    them in ``fmt`` (P(new target) and P(the neighbourhood's own true answer)).

    Raises:
        RromeError: the case has no true answer for its neighbourhood prompts.
    """
    true_n = request.neighborhood_target or request.target_true
    if true_n is None:
        raise RromeError(f"case {request.case_id or request.subject!r} has no target_true; the metrics need one")
    prompts = [p for p in request.neighborhood_prompts for _ in (0, 1)]
    targets = [request.target_new, true_n] * len(request.neighborhood_prompts)
    probs = target_probabilities(model, tokenizer, prompts, targets, fmt=fmt)
    return [(probs[2 * i], probs[2 * i + 1]) for i in range(len(request.neighborhood_prompts))]


@dataclass(frozen=True)
class LeakFraction:
    """Where one prompt meets a rank-one update Δ = r uᵀ / uᵀk_den.

    s_t = uᵀk_t / uᵀk_den at each token t of the prompt (k_t: the edited module's input there),
    so that the update changes the module's output at t by s_t · r, r being what it writes at its
    own key (Δ k_den = r). ``s`` is s_t at the token where |s_t| is largest (special tokens such
    as BOS left out: their keys are the same in every prompt), ``at`` that token's index (BOS
    counted), ``s_last`` s_t at the prompt's last token, whose output predicts the answer.
    """

    s: float
    at: int
    s_last: float


def leak_fractions(
    model: Any,
    tokenizer: Any,
    module_name: str,
    prompts: Sequence[str],
    u: Any,
    denominator: float,
    fmt: PromptFormat = PLAIN,
) -> list[LeakFraction]:
    """The leak fractions of ``prompts`` (read in ``fmt``: with a chat prefix, its tokens are
    counted too, and ``at`` indexes the wrapped text) under the update with input factor ``u``
    (as stored in the delta) and denominator ``uᵀk_den``
    (:class:`rrome.engine.editor.EditResult.denominator`).

    The keys of the edited layer do not depend on that layer's weight, so they are the same
    before and after the edit.
    """
    from rrome.engine.keys import keys_at_every_token

    if not prompts:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []))
    u64 = torch.tensor(np.array(u, dtype=np.float64).reshape(-1))  # a copy: the delta's factor may be read-only
    out = []
    for ids, k in keys_at_every_token(model, tokenizer, module_name, prompts, fmt=fmt):
        s = (k.double() @ u64) / denominator
        ordinary = [t for t, i in enumerate(ids) if i not in special] or [len(ids) - 1]
        at = max(ordinary, key=lambda t: abs(float(s[t])))
        out.append(LeakFraction(s=float(s[at]), at=at, s_last=float(s[-1])))
    return out
