"""The update Δ of the three variants (rome, r-rome, p-rome) against docs/design.md §1's formula.

The reference is computed here in float64 with ``torch.linalg.solve`` from a random SPD C0 and
real keys of the tiny models; rrome's float32 factors must agree to relative 1e-6 in Frobenius
norm, close each variant's own residual, and coincide when k_e = k_e_o.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from engine_reference import DARRIEUX, EDITED, FRANCE, HAND_TEMPLATES, HIDDEN, INTERMEDIATE, module_apply64, rel_diff

from rrome import Cholesky
from rrome.engine.keys import Keys, compute_keys
from rrome.engine.update import compute_update
from rrome.files.constants import METHODS


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


def _reference_delta(
    method: str, c0: torch.Tensor, k_e: torch.Tensor, k_e_o: torch.Tensor, v_e: torch.Tensor, w: Callable[..., Any]
) -> torch.Tensor:
    """docs/design.md §1's table, in float64: Δ = (v_e − W k_res)(C0⁻¹ k_num)ᵀ / (k_denᵀ C0⁻¹ k_num)."""
    k_num, k_res, k_den = {"rome": (k_e, k_e_o, k_e_o), "r-rome": (k_e, k_e, k_e), "p-rome": (k_e_o, k_e_o, k_e_o)}[
        method
    ]
    c0_inv_k = torch.linalg.solve(c0, k_num)
    return torch.outer(v_e - w(k_res), c0_inv_k) / (k_den @ c0_inv_k)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])  # Conv1D + bias, Linear + bias, Linear
def test_update_variants_match_formula(family: str, tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded(family)
    template, layout = EDITED[family]
    name = template.format(1)
    module = model.get_submodule(name)
    c0 = _random_spd(INTERMEDIATE, seed=7)
    chol = Cholesky(c0.numpy())

    def w(k: torch.Tensor) -> torch.Tensor:
        return module_apply64(module, layout, k)

    keys32 = compute_keys(model, tok, name, DARRIEUX, ["{}", *HAND_TEMPLATES])
    k_e, k_e_o = keys32.k_e.double(), keys32.k_e_o.double()
    # W k in float64 here, so that the only float32 rounding left is that of the returned factors.
    keys = Keys(k_e=k_e, k_e_o=k_e_o, w_k_e=w(k_e), w_k_e_o=w(k_e_o))
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(HIDDEN, generator=g, dtype=torch.float64) * float(keys.w_k_e_o.norm()) / HIDDEN**0.5
    v_e = keys.w_k_e_o + delta

    got = {}
    for method in METHODS:
        update = compute_update(method, chol, keys, v_e)
        assert update.u.shape == (INTERMEDIATE,) and update.r.shape == (HIDDEN,)
        assert update.u.dtype == update.r.dtype == np.float32
        mat = torch.outer(torch.from_numpy(update.r).double(), torch.from_numpy(update.u).double())
        ref = _reference_delta(method, c0, k_e, k_e_o, v_e, w)
        # Relative 1e-6 in Frobenius norm: float32 factors of a float64 computation.
        assert rel_diff(mat, ref) < 1e-6, (method, rel_diff(mat, ref))
        assert update.norm_delta == pytest.approx(float(ref.norm()) / (HIDDEN * INTERMEDIATE), rel=1e-6)
        # The defining property of each variant: Δ maps its key to the residual it closes.
        k_den = {"rome": k_e_o, "r-rome": k_e, "p-rome": k_e_o}[method]
        k_res = {"rome": k_e_o, "r-rome": k_e, "p-rome": k_e_o}[method]
        torch.testing.assert_close(mat @ k_den, v_e - w(k_res), rtol=1e-5, atol=1e-9)
        got[method] = mat
    # k_e != k_e_o here, so the three variants are three different updates.
    for a, b in (("rome", "r-rome"), ("rome", "p-rome"), ("r-rome", "p-rome")):
        assert rel_diff(got[a], got[b]) > 1e-3, (a, b)

    # With the plain prompt as the only template, k_e = k_e_o and the variants coincide.
    plain = compute_keys(model, tok, name, DARRIEUX, ["{}"])
    assert torch.equal(plain.k_e, plain.k_e_o) and torch.equal(plain.w_k_e, plain.w_k_e_o)
    v_plain = plain.w_k_e_o + delta.float()
    mats = []
    for method in METHODS:
        update = compute_update(method, chol, plain, v_plain)
        mats.append(torch.outer(torch.from_numpy(update.r).double(), torch.from_numpy(update.u).double()))
    for m in mats[1:]:
        assert rel_diff(m, mats[0]) < 1e-12


def test_update_rejects_unknown_method(tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded("gpt2")
    keys = compute_keys(model, tok, EDITED["gpt2"][0].format(0), FRANCE, ["{}"])
    chol = Cholesky(np.eye(INTERMEDIATE))
    with pytest.raises(ValueError, match="r-rome"):
        compute_update("memit", chol, keys, keys.w_k_e_o)  # type: ignore[arg-type]
