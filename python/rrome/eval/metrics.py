"""The CounterFact metrics of saved probabilities, without torch (docs/design.md §2).

:mod:`rrome.eval.probabilities` measures the probabilities; the metrics read them:

- ES / EM over the rewrite prompt: share with P(new) > P(true), mean P(new) − P(true);
- PS / PM: the same over the paraphrase prompts;
- NS / NM over the neighbourhood prompts: share with P(true) > P(new), mean P(true) − P(new);
- Score: the harmonic mean of ES, PS and NS. All reported in percent.

Ties count as failures on both sides (a strict inequality is a success). A case's share is the
fraction of its prompts that succeed; the metric is the mean of these fractions over cases, as
in ROME's evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("ES", "PS", "NS", "Score", "EM", "PM", "NM")


@dataclass(frozen=True)
class CaseProbs:
    """P(new) and P(true) for each prompt of one case, grouped as the metrics use them.

    Each list holds ``(p_new, p_true)`` pairs, one per prompt. ``neighborhood`` compares the
    neighbourhood prompts' own true answer with the edit's new target.
    """

    rewrite: list[tuple[float, float]]
    paraphrase: list[tuple[float, float]]
    neighborhood: list[tuple[float, float]]

    def to_json(self) -> dict[str, Any]:
        return {"rewrite": self.rewrite, "paraphrase": self.paraphrase, "neighborhood": self.neighborhood}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CaseProbs:
        def pairs(key: str) -> list[tuple[float, float]]:
            return [(float(a), float(b)) for a, b in obj[key]]

        return cls(pairs("rewrite"), pairs("paraphrase"), pairs("neighborhood"))


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean; NaN for no values."""
    return sum(xs) / len(xs) if xs else math.nan


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0, NaN when any is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def metrics(cases: Iterable[CaseProbs]) -> dict[str, float]:
    """ES, PS, NS, Score, EM, PM, NM in percent over cases (NaN where no case has such prompts)."""
    succ: dict[str, list[float]] = {"ES": [], "PS": [], "NS": []}
    mag: dict[str, list[float]] = {"EM": [], "PM": [], "NM": []}
    for c in cases:
        for name, mname, pairs, sign in (
            ("ES", "EM", c.rewrite, 1),
            ("PS", "PM", c.paraphrase, 1),
            ("NS", "NM", c.neighborhood, -1),
        ):
            if not pairs:
                continue
            succ[name].append(mean([float(sign * (new - true) > 0) for new, true in pairs]))
            mag[mname].append(mean([sign * (new - true) for new, true in pairs]))
    out = {k: 100 * mean(v) for k, v in succ.items()}
    out.update({k: 100 * mean(v) for k, v in mag.items()})
    present = [out[k] for k in ("ES", "PS", "NS") if succ[k]]
    out["Score"] = harmonic_mean(present) if present else math.nan
    return {k: out[k] for k in METRICS}
