"""Hyperparameters of an edit: per-family defaults shipped as data files, overridable per run.

``rrome/data/hparams/<family>.json`` holds, for each model family, the edited layer and the
value-optimisation constants of DESIGN.md §1. The starting points are the reference ROME
values (GPT-2 XL: layer 17; GPT-J: layer 5); a layer beyond a smaller model's depth falls
back to a third of its depth. Every run records the hyperparameters it used in the edit log.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rrome.errors import RromeError


@dataclass(frozen=True)
class HParams:
    """Hyperparameters of ROME / r-ROME for one model family."""

    family: str
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context_template_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    template_seed: int = 0
    stats_max_tokens: int = 100_000

    def with_overrides(self, **overrides: Any) -> HParams:
        """A copy with the given fields replaced (``None`` values are ignored).

        Raises:
            RromeError: for an unknown field name.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise RromeError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_hparams(family: str, *, n_layers: int | None = None) -> HParams:
    """The packaged defaults of a family; the layer is clamped into ``[0, n_layers)``.

    Raises:
        RromeError: no defaults for the family.
    """
    path = resources.files("rrome") / "data" / "hparams" / f"{family}.json"
    if not path.is_file():
        raise RromeError(f"no default hyperparameters for model family {family!r}")
    raw = json.loads(path.read_text())
    raw["context_template_lengths"] = tuple(tuple(x) for x in raw["context_template_lengths"])
    hp = HParams(**raw)
    if n_layers is not None and not 0 <= hp.layer < n_layers:
        hp = dataclasses.replace(hp, layer=n_layers // 3)
    return hp
