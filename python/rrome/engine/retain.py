"""Sequential retention: solve each edit against C0 plus the keys of the edits before it.

ROME's input factor u = C0⁻¹ k is the direction that changes the module's output at the edit's
key k while disturbing the keys of ordinary text (whose second moment is C0) least. It knows
nothing of earlier edits, so a later edit of the same relation, whose key overlaps theirs,
overwrites part of what they wrote: the change of the module output at an earlier edit's key
k_p is Δ k_p = r · uᵀk_p / uᵀk. With ``retain_edit_keys`` the editor solves instead against

    C = C0 + Σ_p w_p k_p k_pᵀ,    u = C⁻¹ k,

as MEMIT-style methods and ENCORE do with the keys they have edited, which makes the new edit
leave the earlier keys more alone (and, as the weights grow, not at all: u ⟂ k_p).

The weights are w_p = λ / (k_pᵀ C0⁻¹ k_p), λ = ``retain_weight``. In the coordinates where C0 is
the identity (z = L⁻¹k with C0 = L Lᵀ) each earlier key becomes a unit direction added with
weight λ: C = L (I + λ Σ ẑ_p ẑ_pᵀ) Lᵀ. For one earlier key the Sherman-Morrison formula gives
what the new edit does there exactly,

    Δ_new k_p  =  Δ_new k_p (without retention) / (1 + λ (1 − cos²)),

cos being the cosine of k_p and k under C0⁻¹ (their cosine after whitening). λ therefore means
the same on every model, whatever the width and the scale of its keys. For comparison with a
count of corpus tokens: C0 averages N tokens (``stats_max_tokens``), so the weight w_p is that
of λ·N / (k_pᵀ C0⁻¹ k_p) tokens; keys of ordinary text have k C0⁻¹ k ≈ d on average.

Nothing is refactored. The editor keeps a copy of C0's cached Cholesky factor and folds each
retained key into it with one rank-one update (``Cholesky.rank_one_update``, O(d²): L Lᵀ +
w_p k_p k_pᵀ, one plane rotation per column), so that every later edit costs one ordinary solve
with the updated factor, O(d²), however many keys are retained. Memory: one more d × d float64
factor (32 MiB at d = 2048) and the raw keys (d floats each). A Woodbury solve against C0's
factor, which this replaced, cost each edit O(d m² + m³) for m retained keys: minutes per edit
at m = 10,000 (benches/retain.py measures both).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from rrome._rust import Cholesky


class RetainedKeys:
    """C0 (through its Cholesky factor) plus weighted keys of earlier edits; :meth:`solve` as
    :meth:`rrome.Cholesky.solve` does, against C0 + Σ_p w_p k_p k_pᵀ.

    Args:
        chol: C0's Cholesky factor (never changed: the updates go to a copy).
        weight: λ > 0 (``retain_weight``), see the module docstring.
    """

    def __init__(self, chol: Cholesky, weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"retain_weight must be a finite number > 0; got {weight!r}")
        self.chol = chol
        self.weight = float(weight)
        self._updated: Cholesky | None = None  # C0 plus the retained keys, once there is one
        self.raw: list[npt.NDArray[np.float64]] = []  # the keys as added

    def __len__(self) -> int:
        return len(self.raw)

    def add(self, key: npt.ArrayLike) -> None:
        """Retains one more key (an earlier edit's, float64 copy): one rank-one update, O(d²).

        Raises:
            ValueError: the key has the wrong width, is not finite, or is zero under C0⁻¹.
        """
        self.add_many(np.array(key, dtype=np.float64).reshape(1, -1))

    def add_many(self, keys: npt.ArrayLike, weight: float | None = None) -> None:
        """Retains the rows of ``keys`` (m, d), in order, as :meth:`add` would one by one; their
        kᵀC0⁻¹k come from one solve with m right-hand sides. Nothing is retained if any is bad.
        ``weight``: their λ, if not :attr:`weight` (the neighbour shield's keys,
        :mod:`rrome.engine.shield`).

        Raises:
            ValueError: a key has the wrong width, is not finite, or is zero under C0⁻¹.
        """
        ks = np.array(keys, dtype=np.float64, ndmin=2)
        if ks.ndim != 2 or ks.shape[1] != self.chol.d or not np.isfinite(ks).all():
            raise ValueError(f"a retained key must be {self.chol.d} finite numbers; got shape {ks.shape[1:]}")
        if len(ks) == 0:
            return
        qs = np.einsum("ij,ji->i", ks, self.chol.solve(np.ascontiguousarray(ks.T)))
        bad = [i for i, q in enumerate(qs) if not (math.isfinite(q) and q > 0)]
        if bad:
            raise ValueError(f"a retained key has kᵀC0⁻¹k = {qs[bad[0]]}; it must be positive")
        lam = self.weight if weight is None else float(weight)
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"a key's weight must be a finite number > 0; got {weight!r}")
        if self._updated is None:
            self._updated = Cholesky.from_factor(self.chol.factor(), self.chol.ridge)
        for k, q in zip(ks, qs, strict=True):
            self._updated.rank_one_update(k, lam / float(q))
            self.raw.append(k.copy())

    def copy(self) -> RetainedKeys:
        """A copy that further keys can be added to without changing this one (the factor is
        copied, C0's is shared)."""
        other = RetainedKeys(self.chol, self.weight)
        if self._updated is not None:
            other._updated = Cholesky.from_factor(self._updated.factor(), self._updated.ridge)
        other.raw = [k.copy() for k in self.raw]
        return other

    def clear(self) -> None:
        self._updated = None
        self.raw.clear()

    def solve(self, k: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(C0 + Σ_p w_p k_p k_pᵀ)⁻¹ k for a vector (d,) or the columns of a (d, m) array; with no
        key retained, C0⁻¹ k exactly as the factor computes it."""
        return (self._updated or self.chol).solve(k)
