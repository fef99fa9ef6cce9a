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

Nothing is refactored: the solve uses C0's cached Cholesky factor and the Woodbury identity,

    C⁻¹ k = C0⁻¹ k − Ẑ (I/λ + Ĝ)⁻¹ Ẑᵀ k,   Ẑ = C0⁻¹ K̂,  Ĝ = K̂ᵀ C0⁻¹ K̂,

with K̂ the earlier keys scaled to unit length under C0⁻¹ (Ĝ has a unit diagonal). Each earlier
key costs one solve with C0's factor, once; each edit a small m × m system (m earlier keys).
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
        chol: C0's Cholesky factor.
        weight: λ > 0 (``retain_weight``), see the module docstring.
    """

    def __init__(self, chol: Cholesky, weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"retain_weight must be a finite number > 0; got {weight!r}")
        self.chol = chol
        self.weight = float(weight)
        self._keys: list[npt.NDArray[np.float64]] = []  # k_p / √(k_pᵀ C0⁻¹ k_p)
        self._solved: list[npt.NDArray[np.float64]] = []  # C0⁻¹ of the same
        self.raw: list[npt.NDArray[np.float64]] = []  # the keys as added

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: npt.ArrayLike) -> None:
        """Retains one more key (an earlier edit's, float64 copy).

        Raises:
            ValueError: the key has the wrong width, is not finite, or is zero under C0⁻¹.
        """
        k = np.array(key, dtype=np.float64).reshape(-1)
        if k.shape != (self.chol.d,) or not np.isfinite(k).all():
            raise ValueError(f"a retained key must be {self.chol.d} finite numbers; got shape {k.shape}")
        z = self.chol.solve(k)
        q = float(k @ z)
        if not (math.isfinite(q) and q > 0):
            raise ValueError(f"a retained key has kᵀC0⁻¹k = {q}; it must be positive")
        scale = 1.0 / math.sqrt(q)
        self.raw.append(k)
        self._keys.append(k * scale)
        self._solved.append(z * scale)

    def clear(self) -> None:
        self._keys.clear()
        self._solved.clear()
        self.raw.clear()

    def solve(self, k: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(C0 + Σ_p w_p k_p k_pᵀ)⁻¹ k for a vector (d,) or the columns of a (d, m) array; with no
        key retained, C0⁻¹ k exactly as the factor computes it."""
        y = self.chol.solve(k)
        if not self._keys:
            return y
        K = np.stack(self._keys, axis=1)  # (d, m)
        Z = np.stack(self._solved, axis=1)
        gram = K.T @ Z
        gram = (gram + gram.T) / 2  # symmetric up to rounding; make it exactly so
        system = gram + np.eye(len(self._keys)) / self.weight
        coef = np.linalg.solve(system, K.T @ y)
        out: npt.NDArray[np.float64] = y - Z @ coef
        return out
