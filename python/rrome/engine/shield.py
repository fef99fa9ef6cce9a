"""The neighbour shield: other subjects' keys in the edit's own prompt, kept still by the edit.

A rank-one edit changes the module's output at any key k by r·uᵀk/uᵀk_den, so a neighbour
("John Lennon performs on the", beside an edit of "Toko Yasuda, the") breaks when its key is close
to the subject's under C0⁻¹. Most broken neighbours receive a large share of the edit for that
reason (docs/evaluation.md, Neighbour leak). The shield
solves the edit against those keys as retention solves against earlier edits' keys
(:mod:`rrome.engine.retain`): ``shield_subjects`` other subjects are put into the edit's prompt,
their keys read at their last token (plain keys, as the prompt is read), and each is added to
C0 with the weight w = λ / (kᵀC0⁻¹k), λ = ``shield_weight``, for this edit only (they are not
retained for later edits). The edit then changes its own key as before and those keys less.

The subjects come from a bank shipped with the package (``rrome/data/shield/subjects.json``,
built by ``scripts/build_shield_bank.py``): CounterFact train subjects grouped by the prompt they
were asked in, with every name CounterFact val shows removed. Names asked in the edit's own
prompt come first (names of the same type), then names from every prompt; both in an order
fixed by a hash of the edit's subject and each name, so an edit always gets the same subjects
and different edits get different ones. The edit's own subject is never among them, and a name
whose tokens do not cover it in the prompt is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from importlib import resources

import numpy as np
import numpy.typing as npt
import torch

from rrome.engine.keys import module_io_at
from rrome.engine.prompts import PromptFormat, Row, prompt_row
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError


@functools.cache
def bank() -> dict[str, tuple[str, ...]]:
    """The packaged bank: prompt (with ``{}``) → subject names."""
    ref = resources.files("rrome") / "data" / "shield" / "subjects.json"
    raw = json.loads(ref.read_text(encoding="utf-8"))
    return {prompt: tuple(names) for prompt, names in raw["prompts"].items()}


def _order(subject: str, names: list[str]) -> list[str]:
    def rank(name: str) -> bytes:
        return hashlib.sha256(f"{subject}\0{name}".encode()).digest()

    return sorted(names, key=rank)


def choose_subjects(request: EditRequest, n: int, names: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Up to ``n`` subjects for ``request``'s shield, from ``names`` (default: :func:`bank`):
    those asked in the request's own prompt first, then any other (module docstring)."""
    groups = bank() if names is None else names
    own = request.subject.casefold()
    same = [x for x in groups.get(request.prompt, ()) if x.casefold() != own]
    chosen = _order(request.subject, list(dict.fromkeys(same)))[:n]
    if len(chosen) < n:
        taken = {x.casefold() for x in chosen} | {own}
        rest = list(dict.fromkeys(x for group in groups.values() for x in group if x.casefold() not in taken))
        chosen += _order(request.subject, rest)[: n - len(chosen)]
    return chosen


@dataclasses.dataclass(frozen=True)
class Shield:
    """The shield of one edit: the subjects used and their keys (float64, one row each)."""

    subjects: list[str]
    keys: npt.NDArray[np.float64]
    weight: float

    def to_json(self) -> dict[str, object]:
        """What the edit record says of it (``meta["shield"]``)."""
        return {"subjects": self.subjects, "weight": self.weight}


def shield_keys(
    model: torch.nn.Module,
    tokenizer: object,
    module_name: str,
    request: EditRequest,
    subjects: list[str],
    weight: float,
    fmt: PromptFormat,
) -> Shield:
    """Each subject put into ``request``'s prompt (in ``fmt``) and the input of ``module_name`` at
    its last token; subjects no token covers are left out."""
    rows: list[Row] = []
    used: list[str] = []
    for name in subjects:
        try:
            other = dataclasses.replace(request, subject=name, case_id=None, source=None)
            rows.append(prompt_row(tokenizer, "{}", other, fmt))
        except (RromeError, ValueError):  # no token covers the name there, or it is no subject
            continue
        used.append(name)
    if not rows:
        return Shield([], np.zeros((0, 0)), weight)
    k, _ = module_io_at(model, tokenizer, module_name, rows)
    return Shield(used, k.double().cpu().numpy(), weight)
