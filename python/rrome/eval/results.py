"""Results folders without torch: their files, and the metrics of saved probabilities.

``rrome eval`` (:mod:`rrome.eval.runs`) and ``rrome tune`` write their folders through these
helpers, and ``rrome report`` (:mod:`rrome.eval.report`) reads them back with nothing else, so
rebuilding a table or a figure never imports torch. The metrics (docs/design.md §2;
:mod:`rrome.eval.probabilities` computes the probabilities they read):

- ES / EM over the rewrite prompt: share with P(new) > P(true), mean P(new) − P(true);
- PS / PM: the same over the paraphrase prompts;
- NS / NM over the neighbourhood prompts: share with P(true) > P(new), mean P(true) − P(new);
- Score: the harmonic mean of ES, PS and NS. All reported in percent.

Ties count as failures on both sides (a strict inequality is a success). A case's share is the
fraction of its prompts that succeed; the metric is the mean of these fractions over cases, as
in ROME's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
BASELINE_FILE = "baseline.json"
METRICS = ("ES", "PS", "NS", "Score", "EM", "PM", "NM")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_append(path: Path, obj: Any) -> None:
    """Appends ``obj`` as one JSON line and fsyncs it: after a crash the line is whole or torn
    (:func:`read_jsonl` drops a torn last line), never lost once this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON through a temporary file, fsynced and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a results file, without a torn last line (a killed run's, or the
    line a running process is writing). ``repair`` also cuts it off the file: only the run that
    is about to append may do that, never a reader such as ``rrome report``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return [json.loads(line) for line in data[:good].decode("utf-8").splitlines() if line.strip()]


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


def _mean(xs: Sequence[float]) -> float:
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
            succ[name].append(_mean([float(sign * (new - true) > 0) for new, true in pairs]))
            mag[mname].append(_mean([sign * (new - true) for new, true in pairs]))
    out = {k: 100 * _mean(v) for k, v in succ.items()}
    out.update({k: 100 * _mean(v) for k, v in mag.items()})
    present = [out[k] for k in ("ES", "PS", "NS") if succ[k]]
    out["Score"] = harmonic_mean(present) if present else math.nan
    return {k: out[k] for k in METRICS}
