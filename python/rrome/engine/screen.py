"""The disabling-edit screen: which requests ROME would wreck, known from the keys alone.

ROME's update divides by ``uᵀk_e^o`` where r-ROME divides by ``uᵀk_e`` (``u = C0⁻¹k_e``,
:mod:`rrome.engine.update`). Their ratio

    ρ = uᵀk_e / uᵀk_e^o

says how many times larger ROME's update is than r-ROME's for the same residual; it needs two
forward passes and one Cholesky solve, no optimisation. ``uᵀk_e = k_eᵀC0⁻¹k_e`` is positive, so
ρ ≤ 0 means ROME's denominator has the wrong sign or vanishes.

**Why it happens.** A model whose tokenizer prepends no BOS (GPT-2, GPT-J, SmolLM2) puts the
subject's last token at position 0 (or next to it) when the subject opens the prompt ("Danielle
Darrieux's mother tongue is"). A token there sees nothing but itself, and the first position of
such models is an attention sink whose hidden state is unlike any other: its key k_e^o has a
small norm and points away from k_e, the mean key over the context templates (where text
precedes the subject). ROME then divides by a tiny ``uᵀk_e^o`` (a *disabling edit*: |Δ| orders
of magnitude above the others, generation collapses); r-ROME and p-ROME stay small but change
the plain prompt only by about 1/ρ of what they intend, so the edit does not take on it.
Tokenizers that prepend BOS (Gemma, Llama) keep every subject token at position ≥ 1 and ρ
near 1.

A request is *flagged* when ρ ≥ ``threshold`` (default :data:`SCREEN_RATIO`) or ρ ≤ 0: under
``rome`` the editor refuses it before optimising (unless told to allow large updates), under
``r-rome`` / ``p-rome`` it warns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rrome._rust import Cholesky
from rrome.engine.keys import Keys
from rrome.engine.prompts import Row
from rrome.files.edits import EditRequest

SCREEN_RATIO = 10.0
"""Default threshold on ρ: ROME's update would be about this many times r-ROME's."""

LEADING_TEXT_ADVICE = (
    "start the prompt with a newline before the subject, both when editing and when querying (on SmolLM2 "
    "this brought rho back to about 1; a BOS the model was not trained to see there may not help: "
    "SmolLM2's <|im_start|> left rho at 100-205 on the three cases tried)"
)


@dataclass(frozen=True)
class ScreenResult:
    """What the screen found for one request.

    Attributes:
        case_id: the request's case id (``None`` if it has none).
        subject: the subject.
        position: index of the subject's last token in the plain prompt (0 = first token).
        bos: whether the tokenizer put a special token before the plain prompt.
        norm_k_e, norm_k_e_o: norms of the two keys.
        cosine: cos(k_e, k_e^o).
        ratio: ρ = uᵀk_e / uᵀk_e^o, u = C0⁻¹k_e (inf when uᵀk_e^o is 0).
        threshold: the threshold it was compared with.
    """

    case_id: int | str | None
    subject: str
    position: int
    bos: bool
    norm_k_e: float
    norm_k_e_o: float
    cosine: float
    ratio: float
    threshold: float

    @property
    def flagged(self) -> bool:
        """ρ ≥ threshold, ρ ≤ 0 or not a number: ROME would make a disabling edit here."""
        return not (0.0 < self.ratio < self.threshold)

    def warning(self, method: str) -> str:
        """One sentence on what ``method`` will do with this request (empty when not flagged)."""
        if not self.flagged:
            return ""
        case = f"case {self.case_id}" if self.case_id is not None else "this request"
        where = f"the subject's last token is at position {self.position} of the plain prompt" + (
            "" if self.bos else " with no BOS before it"
        )
        head = f"{case} ({self.subject!r}): rho = {self.ratio:.3g} (limit {self.threshold:g}); {where}"
        if method == "rome":
            what = "rome would divide by a denominator rho times too small: a disabling edit that collapses the model"
        else:
            what = f"{method} stays small but changes the plain prompt only by about 1/rho of what it intends"
        return f"{head}; {what}; to avoid it, {LEADING_TEXT_ADVICE}"

    def to_json(self) -> dict[str, Any]:
        ratio: float | str = self.ratio if math.isfinite(self.ratio) else str(self.ratio)
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "position": self.position,
            "bos": self.bos,
            "norm_k_e": self.norm_k_e,
            "norm_k_e_o": self.norm_k_e_o,
            "cosine": self.cosine,
            "ratio": ratio,
            "disabling": self.flagged,
        }


def key_ratio(chol: Cholesky, k_e: np.ndarray, k_e_o: np.ndarray) -> float:
    """ρ = uᵀk_e / uᵀk_e^o with u = C0⁻¹k_e (float64; inf or -inf when uᵀk_e^o is 0)."""
    k_e = np.asarray(k_e, dtype=np.float64)
    k_e_o = np.asarray(k_e_o, dtype=np.float64)
    u = chol.solve(k_e)
    num, den = float(u @ k_e), float(u @ k_e_o)
    if den == 0.0:
        return math.copysign(math.inf, num)
    return num / den


def screen_keys(
    chol: Cholesky,
    keys: Keys,
    request: EditRequest,
    plain: Row,
    special_ids: set[int],
    *,
    threshold: float = SCREEN_RATIO,
) -> ScreenResult:
    """The screen of one request from its keys and the row of its plain prompt."""
    k_e = keys.k_e.double().cpu().numpy()
    k_e_o = keys.k_e_o.double().cpu().numpy()
    n_e, n_o = float(np.linalg.norm(k_e)), float(np.linalg.norm(k_e_o))
    cosine = float(k_e @ k_e_o) / (n_e * n_o) if n_e > 0 and n_o > 0 else 0.0
    return ScreenResult(
        case_id=request.case_id,
        subject=request.subject,
        position=plain.lookup,
        bos=bool(plain.ids) and plain.ids[0] in special_ids,
        norm_k_e=n_e,
        norm_k_e_o=n_o,
        cosine=cosine,
        ratio=key_ratio(chol, k_e, k_e_o),
        threshold=threshold,
    )
