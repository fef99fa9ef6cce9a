"""The rank-one update of ROME and its variants (docs/design.md §1, the variants).

With u = C0⁻¹ k_num (a Cholesky solve, never an inverse) the update is

    Δ = r uᵀ / (uᵀ k_den),   r = v_e − W k_res,

and the variants differ only in which key goes where:

=========  ======  ======  ======
method     k_num   k_res   k_den
=========  ======  ======  ======
rome       k_e     k_e^o   k_e^o    (the original code: mixes two keys → disabling edits)
r-rome     k_e     k_e     k_e      (the repair; the default)
p-rome     k_e^o   k_e^o   k_e^o
=========  ======  ======  ======

"W k" is the module's output with its bias, so W k_e^o = v_init and W k_e is the mean over
templates of the outputs (the module is affine). The update is stored as two float32 factors,
``u`` and ``r / (uᵀ k_den)``, and |Δ| = ‖Δ‖_F / (d_out·d_in) is reported for every edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from rrome.files.constants import METHODS, Method

if TYPE_CHECKING:
    import torch

    from rrome.engine.keys import Keys


class Solver(Protocol):
    """What u is solved against: C0's :class:`rrome.Cholesky` factor, or
    :class:`rrome.engine.retain.RetainedKeys` (C0 plus the keys of earlier edits)."""

    def solve(self, k: npt.ArrayLike) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True)
class Update:
    """Factors of Δ = r uᵀ and the numbers worth reporting about them.

    ``key`` is k_den (float64), the key at which the update changes the module's output by
    exactly r: the key :mod:`rrome.engine.retain` keeps for later edits.
    """

    u: npt.NDArray[np.float32]
    r: npt.NDArray[np.float32]
    denominator: float
    norm_delta: float  # ‖Δ‖_F / (d_out · d_in)
    key: npt.NDArray[np.float64] | None = None

    @property
    def norm_u(self) -> float:
        return float(np.linalg.norm(self.u.astype(np.float64)))

    @property
    def norm_r(self) -> float:
        return float(np.linalg.norm(self.r.astype(np.float64)))


def compute_update(method: Method, chol: Solver, keys: Keys, v_e: torch.Tensor) -> Update:
    """The rank-one update of ``method`` from the keys, the target value and C0's factor
    (or, with sequential retention, :class:`rrome.engine.retain.RetainedKeys`).

    Computed in float64 (keys and values are float32), returned as float32 factors.

    Raises:
        ValueError: for an unknown method.
        FloatingPointError: a zero or non-finite denominator.
    """
    k_e = keys.k_e.double().cpu().numpy()
    k_e_o = keys.k_e_o.double().cpu().numpy()
    if method == "rome":
        k_num, w_k_res, k_den = k_e, keys.w_k_e_o, k_e_o
    elif method == "r-rome":
        k_num, w_k_res, k_den = k_e, keys.w_k_e, k_e
    elif method == "p-rome":
        k_num, w_k_res, k_den = k_e_o, keys.w_k_e_o, k_e_o
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    u = chol.solve(k_num)
    u = u / np.linalg.norm(u)  # scaling u does not change Δ; unit norm keeps r readable
    denominator = float(u @ k_den)
    if not np.isfinite(denominator) or denominator == 0.0:
        raise FloatingPointError(f"{method}: the update's denominator uᵀk is {denominator}")
    residual = (v_e.double().cpu() - w_k_res.double().cpu()).numpy()  # may sit on two devices
    r = residual / denominator
    norm_delta = float(np.linalg.norm(r) * np.linalg.norm(u)) / (r.size * u.size)
    return Update(
        u=u.astype(np.float32), r=r.astype(np.float32), denominator=denominator, norm_delta=norm_delta, key=k_den
    )
